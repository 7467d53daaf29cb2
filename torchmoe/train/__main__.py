"""Entry point: ``python -m torchmoe.train [--config FILE] [--section.key value ...]``.

``--print-config`` prints the resolved config as TOML and exits; ``--help`` prints it with every
key's meaning and range. With ``COMM_MODE=fake`` and ``WORLD_SIZE=N`` it plans the layout for N
ranks on the meta device instead of training (torchmoe/parallel/dry_run.py). Configuration errors
print one line and exit with status 2; a non-finite loss prints one line and exits with status 1;
SIGTERM, SIGINT or SIGUSR1 during training saves a checkpoint and exits 0 (preemption.py).
"""

import logging
import os
import signal
import sys

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import load_config, to_toml


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    log_rank = int(os.environ.get("LOG_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == log_rank else logging.WARNING,
        format="[torchmoe %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, flags = load_config(argv)
        if "help" in flags:
            print(to_toml(cfg, with_help=True))
            return 0
        if "print-config" in flags:
            print(to_toml(cfg))
            return 0
        if os.environ.get("COMM_MODE") == "fake":
            from torchmoe.parallel.dry_run import dry_run

            dry_run(cfg)
            return 0
        _setup_logging()
        from torchmoe.train.preemption import stop_signals
        from torchmoe.train.process_link import die_with_launcher
        from torchmoe.train.trainer import NonFiniteLossError, Trainer

        die_with_launcher()

        if cfg.job.description:
            logging.getLogger(__name__).info(cfg.job.description)
        try:
            with stop_signals() as stop:  # a signal while the Trainer is built counts too
                Trainer(cfg).train(stop)
        except NonFiniteLossError as e:
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
