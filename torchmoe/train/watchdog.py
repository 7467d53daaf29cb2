"""A hung or frozen rank ends the job in minutes, and the message names it.

A rank that stops (SIGSTOP, a dead host, a stuck file system) leaves the others blocked in a
collective; torch's default timeout is 30 minutes and its error names no rank. Here every rank
runs a thread that (1) bumps a heartbeat counter in the job's TCP store and (2) watches its own
progress (a finished step, a loaded or saved checkpoint). With no progress for
``comm.init_timeout_s`` (until the first step ends) or ``comm.train_timeout_s`` (after), it reads
every rank's counter twice, names the ranks whose counter did not move, prints one line and ends
the process with status 3; torchrun then stops the others. The process group's own timeout is
set above both, as a backstop.
"""

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from torchmoe.train.preemption import say

EXIT_HUNG = 3
_PREFIX = "torchmoe/watchdog"


def process_group_timeout(init_timeout_s: float, train_timeout_s: float) -> timedelta:
    """Longer than the watchdog's limits, so that the watchdog speaks first."""
    return timedelta(seconds=max(init_timeout_s, train_timeout_s) + 60)


class Watchdog:
    """Started with the process group up (rank, world from it) when training starts;
    ``progress`` after every step and checkpoint; ``close`` at the end."""

    def __init__(self, init_timeout_s: float, train_timeout_s: float) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.init_timeout_s, self.train_timeout_s = init_timeout_s, train_timeout_s
        self.slow, self.doing = True, "loading (before the first step)"
        self._last = time.monotonic()
        self._interval = min(max(min(init_timeout_s, train_timeout_s) / 20, 0.1), 5.0)
        self._store = _own_store_client(timedelta(seconds=4 * self._interval + 5))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchmoe-watchdog", daemon=True)
        self._thread.start()

    @property
    def limit(self) -> float:
        """Seconds allowed now: the init timeout for slow work (the first step, saving)."""
        return self.init_timeout_s if self.slow else self.train_timeout_s

    def progress(self, doing: str, slow: bool) -> None:
        """Something finished; next the rank is ``doing`` this, ``slow`` work or a step."""
        self._last = time.monotonic()
        self.doing, self.slow = doing, slow

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        beats = 0
        while not self._stop.wait(self._interval):
            beats += 1
            self._set(f"{_PREFIX}/{self.rank}", str(beats))
            if time.monotonic() - self._last > self.limit:
                self._give_up()

    def _give_up(self) -> None:
        silent = self._silent_ranks()
        if silent:
            who = f"rank {', '.join(map(str, silent))} stopped answering (stopped, hung or dead)"
        elif self._store is None:
            who = "the other ranks could not be asked"
        else:
            who = "every rank is alive: a collective is deadlocked or the step is that slow"
        key = "comm.init_timeout_s" if self.slow else "comm.train_timeout_s"
        say(
            f"error: rank {self.rank}: no progress for {self.limit:g} s while {self.doing}; "
            f"{who}; the job ends. Raise {key} if this work is legitimately that slow\n"
        )
        os._exit(EXIT_HUNG)

    def _silent_ranks(self) -> list[int]:
        """Ranks whose heartbeat did not move over a few beats."""
        if self._store is None:
            return []
        before = self._beats()
        time.sleep(3 * self._interval)
        after = self._beats()
        return [r for r in range(self.world) if r != self.rank and before[r] == after[r]]

    def _beats(self) -> list[str | None]:
        out: list[str | None] = []
        for r in range(self.world):
            key = f"{_PREFIX}/{r}"
            try:
                out.append(self._store.get(key).decode() if self._store.check([key]) else None)
            except (RuntimeError, dist.DistError):  # the store's host is gone too
                out.append(None)
        return out

    def _set(self, key: str, value: str) -> None:
        if self._store is not None:
            try:
                self._store.set(key, value)
            except (RuntimeError, dist.DistError):
                self._store = None


def _own_store_client(timeout: timedelta) -> dist.Store | None:
    """A connection of our own to the job's TCP store (torchrun's agent, or rank 0), with a
    short timeout: the process group's client waits as long as the process group does. Keys are
    per launch attempt. None when the launcher gave no store address."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    attempt = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get(
        "TORCHELASTIC_RESTART_COUNT", ""
    )
    try:
        client = dist.TCPStore(addr, int(port), is_master=False, timeout=timeout)
    except (RuntimeError, dist.DistError, ValueError):
        return None
    return dist.PrefixStore(f"{attempt}/", client)
