"""Bad rows (undecodable, no text, empty) are skipped and counted, not fatal: one broken line in a
terabyte corpus must not end a week-long run, nor crash every resume at the same step. Too many of
them means the data or ``data.text_field`` is wrong, and the run stops with one line.

Each rank judges the rows it read, a random sample of the corpus. So that a corpus within the
limit never stops a run by the luck of one rank's sample, the count must exceed the allowed
fraction by a margin of chance: three standard deviations of the binomial count, plus 10 rows.
"""

import logging
import math
from collections import Counter
from collections.abc import Callable

from torchmoe.config.errors import ConfigError

logger = logging.getLogger(__name__)

# Rows beyond the allowed count and its margin before a run stops.
SLACK_ROWS = 10
# Each rank names this many bad rows in the log; the rest are only counted.
ROWS_NAMED = 5


class BadRow(Exception):
    """A row that holds no usable document; the message is the reason."""


class BlankRow(BadRow):
    """A line with only whitespace in a text file: not a document, and not counted as bad."""


class BadDataError(ConfigError):
    """More bad rows than ``data.max_bad_fraction`` allows."""


def too_many(bad: int, rows: int, max_fraction: float) -> bool:
    """Whether ``bad`` of ``rows`` is more than ``max_fraction`` allows, beyond chance; with a
    fraction of 0 no bad row is allowed."""
    if max_fraction == 0:
        return bad > 0
    expected = max_fraction * rows
    return bad > expected + 3 * math.sqrt(expected) + SLACK_ROWS


class BadRowCounter:
    """Judges the bad fraction and names bad rows; ``by_file`` counts this process's skips."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.by_file: Counter[str] = Counter()

    def skip(self, file: str, line: Callable[[], int], reason: str, rows: int, bad: int) -> None:
        """Count a bad row of ``file`` (``line()`` finds its line or row number, only when it
        is named), given the rank's rows read and skipped so far (checkpointed with the data
        position, so a resume goes on counting); raises BadDataError once too many."""
        self.by_file[file] += 1
        if too_many(bad, rows, self.max_fraction):
            raise BadDataError(
                f"data: {bad} of {rows} rows read are bad, more than "
                f"data.max_bad_fraction = {self.max_fraction} allows (last: {file} row "
                f"{line()}: {reason}); fix or drop those rows, check data.text_field, or raise "
                "data.max_bad_fraction"
            )
        if sum(self.by_file.values()) <= ROWS_NAMED:
            logger.warning("data: skipped %s row %d: %s", file, line(), reason)
