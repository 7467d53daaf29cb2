"""metrics.jsonl follows the checkpoint a run starts from, so its rows are one history.

A resumed run would otherwise append rows for steps the file already has (the rows the
abandoned run logged after its last checkpoint), and a fresh run in a used folder would append
a second run to the first. Nothing is deleted: rows and files that no longer belong are moved
aside beside the file.
"""

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _free(path: Path, stem: str) -> Path:
    """``<stem>-<n>.jsonl`` beside ``path`` with the first n not taken."""
    n = 1
    while (target := path.with_name(f"{stem}-{n}.jsonl")).exists():
        n += 1
    return target


def _step(line: str) -> int | None:
    """A row's step, or None for a line that is not a row (e.g. cut short by a crash)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def follow_checkpoint(path: Path, resumed_step: int | None) -> None:
    """Make ``path`` (metrics.jsonl) the history of a run that resumed from ``resumed_step``
    (None or 0: a fresh start, from nothing or from a seed checkpoint)."""
    if not path.is_file():
        return
    if not resumed_step:
        old = _free(path, path.stem)
        path.rename(old)
        logger.info("a fresh run: the earlier %s is now %s", path.name, old.name)
        return
    keep, later = [], []
    for line in path.read_text().splitlines():
        step = _step(line)
        (keep if step is not None and step <= resumed_step else later).append(line)
    if not later:
        return
    aside = _free(path, f"{path.stem}.after-step-{resumed_step}")
    aside.write_text("".join(f"{line}\n" for line in later))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)
    logger.info(
        "resumed from step %d: %d rows logged after it moved from %s to %s",
        resumed_step,
        len(later),
        path.name,
        aside.name,
    )
