"""torchrun, as ``run_train.sh`` launches it, with the workers' exit status passed through.

torchrun itself turns any failed worker into exit 1 and a ChildFailedError traceback, after the
worker's own one-line error. Here the launcher exits with the workers' status instead, adding
nothing to what the worker printed: 2 when a rank refused the job (a ConfigError), else the
failing rank's status; a rank killed by a signal gets one line naming it, and exit 1.

SIGTERM, SIGINT and SIGUSR1 go on to the workers, which finish their step, save and exit 0
(process_link.py, preemption.py); the launcher then exits 0 too.
"""

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from torchmoe.train.preemption import say
from torchmoe.train.process_link import (
    LEFT_TO_TORCHRUN,
    StoppedBeforeStart,
    forward_stop_signals,
    forwarded,
)

USER_ERROR = 2  # torchmoe.train's exit status for a refused job


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    args.signals_to_handle = LEFT_TO_TORCHRUN  # the stop signals are forwarded instead
    forward_stop_signals()
    # the agent logs each failure as an error; the worker has said why, and the line below how
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except StoppedBeforeStart as e:
        say(f"stopped by {e} while no worker was running: nothing to save")
        return 0
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if USER_ERROR in codes.values():
            return USER_ERROR
        if forwarded and all(code == -forwarded[0] for code in codes.values()):
            # a stop signal reached workers still starting, before they could handle it
            say(f"stopped by {signal.Signals(forwarded[0]).name} before training started")
            return 0
        rank, code = next(iter(codes.items()))
        if code > 0:  # the worker printed why
            return code
        print(f"error: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
