"""Preemption: SIGTERM (what Slurm and Kubernetes send first), SIGINT (Ctrl-C) and SIGUSR1
(Slurm's ``--signal``) end a run cleanly instead of losing the steps since the last checkpoint.

The first signal only raises a flag. After each step the ranks agree on it (one all-reduce,
so every rank stops after the same step, whichever ranks got the signal); the loop then saves a
checkpoint and exits 0. A second signal is logged and ignored, so the save in progress is never
cut short; a third exits at once with 128 + the signal's number, leaving the last good
checkpoint (an unfinished save is a ``.tmp`` the next run clears).
"""

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from torchmoe.train.ranks import agree_max

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def say(line: str) -> None:
    """One line on stderr, written directly: a signal handler may interrupt a print or a log
    call, and writing through the same buffered stream again would fail."""
    os.write(2, f"[torchmoe {time.strftime('%H:%M:%S')}] {line}\n".encode())


class StopRequest:
    """Counts the stop signals this process received; ``agreed`` is the collective view."""

    def __init__(self) -> None:
        self.received = 0
        self.signum = 0
        self.doing = "finishing the step"

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1:
            self.signum = signum
            say(f"{name} received: stopping after this step, with a checkpoint")
        elif self.received == 2:
            say(f"{name} received again: still {self.doing}; a third signal exits at once")
        else:
            say(
                f"error: {name} received a third time: exiting at once while {self.doing}; "
                "the next run resumes from the last complete checkpoint"
            )
            os._exit(128 + signum)

    def agreed(self) -> int:
        """The signal number every rank acts on (0: none): a collective, call it on every rank
        at the same step."""
        return agree_max([self.signum])[0]


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Route the stop signals to a StopRequest while the loop runs, then restore the previous
    handlers. Outside the main thread (an embedding application's worker) nothing is routed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
