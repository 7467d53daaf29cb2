"""Bad rows (undecodable, no text, empty) are skipped and counted, not fatal: one broken line in a
terabyte corpus must not end a week-long run, nor crash every resume at the same step. Too many of
them means the data or ``data.text_field`` is wrong, and the run stops with one line."""

import logging
from collections import Counter

from torchmoe.config.errors import ConfigError

logger = logging.getLogger(__name__)

# The bad fraction is judged over at least this many rows, so one early bad row is not "100%".
MIN_ROWS_JUDGED = 1000
# Each rank names this many bad rows in the log; the rest are only counted.
ROWS_NAMED = 5


class BadRow(Exception):
    """A row that holds no usable document; the message is the reason."""


class BadDataError(ConfigError):
    """More bad rows than ``data.max_bad_fraction`` allows."""


class BadRowCounter:
    """Judges the bad fraction and names bad rows; ``by_file`` counts this process's skips."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.by_file: Counter[str] = Counter()

    def skip(self, file: str, row: int, reason: str, rows: int, bad: int) -> None:
        """Count a bad row, given the rank's rows read and skipped so far (checkpointed with
        the data position, so a resume goes on counting); raises BadDataError once too many."""
        self.by_file[file] += 1
        where = f"{file} row {row}"
        if bad > self.max_fraction * max(rows, MIN_ROWS_JUDGED):
            raise BadDataError(
                f"data: {bad} of {rows} rows read are bad, more than "
                f"data.max_bad_fraction = {self.max_fraction} allows (last: {where}: {reason}); "
                "fix or drop those rows, check data.text_field, or raise data.max_bad_fraction"
            )
        if sum(self.by_file.values()) <= ROWS_NAMED:
            logger.warning("data: skipped %s: %s", where, reason)

    def summary(self) -> str:
        """'3 in a.jsonl, 1 in b.jsonl' (this process), or '' without bad rows."""
        return ", ".join(f"{n} in {file}" for file, n in self.by_file.most_common())
