"""The launcher and its workers stop together.

torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL leaves
its workers training and writing checkpoints, unseen; and on SIGTERM or Ctrl-C it kills its
workers with SIGKILL 30 s later, too soon for a large checkpoint. Here the launcher passes the
stop signals (preemption.py) on to its workers and goes on waiting for them to save and exit,
and each worker asks the kernel to kill it when the launcher dies (Linux's PR_SET_PDEATHSIG).
"""

import ctypes
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from torchmoe.train.preemption import STOP_SIGNALS, say

LAUNCHER_PID = "TORCHMOE_LAUNCHER_PID"
# the signals torchrun itself still turns into "kill the workers" (its defaults, minus ours)
LEFT_TO_TORCHRUN = "SIGHUP,SIGQUIT"
_PR_SET_PDEATHSIG = 1


def forward_stop_signals() -> None:
    """In the launcher, before it starts the workers: pass every stop signal on to them."""
    os.environ[LAUNCHER_PID] = str(os.getpid())
    for s in STOP_SIGNALS:
        signal.signal(s, _forward)


class StoppedBeforeStart(Exception):
    """A stop signal reached the launcher while no worker was running (rendezvous, start)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


forwarded: list[int] = []  # the stop signals passed on so far, in order


def _forward(signum: int, frame: FrameType | None) -> None:
    """Pass the signal on; with no worker yet, stop the launcher; the third time, kill the
    workers: one blocked in a collective cannot run its own handler."""
    workers = child_pids(os.getpid())
    if not workers:
        raise StoppedBeforeStart(signum)
    forwarded.append(signum)
    third = len(forwarded) >= 3
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL if third else signum)
        except ProcessLookupError:  # exited meanwhile
            pass
    if third:
        say(
            f"error: {signal.Signals(signum).name} received a third time: killed the workers; "
            "the next run resumes from the last complete checkpoint"
        )
        os._exit(128 + signum)


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc: the workers, not their own
    children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry.name))
    return found


def die_with_launcher() -> None:
    """In a worker that torchrun started: be killed (SIGKILL) when the launcher dies. An
    unfinished save is then a ``.tmp`` folder the next run clears."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and os.getppid() != int(launcher):  # it died before the line above
        os._exit(1)
