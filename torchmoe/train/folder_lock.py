"""One run per output folder: two runs writing one ``job.dump_folder`` overwrite each other's
checkpoints and interleave their metrics rows.

Rank 0 creates ``<dump_folder>/.torchmoe.lock`` (host, pid, start) atomically before the first
step and removes it when the run ends. A lock whose process is gone (same host, pid not
running, e.g. after a SIGKILL) is stale and taken over with a log line; any other lock refuses
the run in one line.
"""

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchmoe.config.errors import ConfigError

logger = logging.getLogger(__name__)
LOCK_NAME = ".torchmoe.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's content, or None when it cannot be read as one (cut short by a crash)."""
    try:
        holder = json.loads(path.read_text())
        return holder if {"host", "pid", "started"} <= holder.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def _acquire(path: Path, me: dict, key: str) -> None:
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            stale = holder is None or (
                holder["host"] == me["host"] and not _alive(int(holder["pid"]))
            )
            if not stale:
                raise ConfigError(
                    f"{key} = {path.parent} is in use by another run (host "
                    f"{holder['host']}, pid {holder['pid']}, started {holder['started']}); use "
                    f"another {key}, or delete {path} if that run is gone"
                ) from None
            logger.info("taking over %s: the run that held it is gone (%s)", path, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


@contextmanager
def folder_lock(folder: Path, enabled: bool = True, key: str = "job.dump_folder") -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block (``enabled``: this rank writes files);
    ``key`` names the setting that chose the folder, for the refusal."""
    if not enabled:
        yield
        return
    path = folder / LOCK_NAME
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _acquire(path, me, key)
    except OSError as e:  # a file in the way, a read-only mount
        raise ConfigError(
            f"{key} = {folder}: cannot create {LOCK_NAME} there ({e.strerror or e}); point "
            f"{key} at a writable folder"
        ) from None
    try:
        yield
    finally:
        if _holder(path) == me:  # never remove a lock another run took over
            path.unlink(missing_ok=True)
