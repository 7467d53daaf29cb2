"""Entry point: ``python -m torchmoe.train [--config FILE] [--section.key value ...]``.

``--print-config`` prints the resolved config as TOML and exits; ``-h``/``--help`` prints the
usage, the environment variables (launch_env.py) and the config with every key's meaning and
range. With ``COMM_MODE=fake`` (or ``fake_backend``) and ``WORLD_SIZE=N`` it plans the layout for N
ranks on the meta device instead of training (torchmoe/parallel/dry_run.py). Configuration errors
print one line and exit with status 2; a non-finite loss or a step out of device memory prints
one line and exits with status 1;
SIGTERM, SIGINT or SIGUSR1 during training saves a checkpoint and exits 0 (preemption.py).
"""

import logging
import os
import signal
import sys

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import load_config, to_toml
from torchmoe.train.launch_env import USAGE, dry_run_requested, log_ranks, with_config_file


def _setup_logging(shown: set[int]) -> None:
    """Info lines from the ranks LOG_RANK names, each line tagged with its rank when several
    are shown; warnings and errors from every rank."""
    rank = int(os.environ.get("RANK", "0"))
    tag = f"rank {rank} " if len(shown) > 1 else ""
    logging.basicConfig(
        level=logging.INFO if rank in shown else logging.WARNING,
        format=f"[torchmoe {tag}%(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = with_config_file(sys.argv[1:] if argv is None else argv)
    try:
        shown = log_ranks()  # bad values: one line, even here
        _setup_logging(shown)  # before the config: it may say which flavor keys gave way
        cfg, flags = load_config(argv)
        dry_run = dry_run_requested()
        if "help" in flags:
            print(USAGE + to_toml(cfg, with_help=True))
            return 0
        if "print-config" in flags:
            print(to_toml(cfg))
            return 0
        if dry_run:
            from torchmoe.parallel.dry_run import dry_run

            dry_run(cfg)
            return 0
        from torchmoe.train.preemption import stop_signals
        from torchmoe.train.process_link import die_with_launcher
        from torchmoe.train.trainer import NonFiniteLossError, StepOutOfMemoryError, Trainer

        die_with_launcher()

        if cfg.job.description:
            logging.getLogger(__name__).info(cfg.job.description)
        try:
            with stop_signals() as stop:  # a signal while the Trainer is built counts too
                Trainer(cfg).train(stop)
        except (NonFiniteLossError, StepOutOfMemoryError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop routes it (preemption.py)
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
