"""The environment variables a launch reads (torchtitan's names, so its users' scripts work),
each checked with a one-line error instead of being ignored or crashing."""

import os

from torchmoe.config.errors import ConfigError

USAGE = """\
usage: ./run_train.sh [--config FILE] [--section.key value ...] [--print-config] [-h]
       python -m torchmoe.train (or torchmoe-train) [same arguments]: one process

environment:
  CONFIG_FILE  the recipe when --config is not given (--config wins)
  NGPU         processes on this node (run_train.sh; default: the CUDA devices, or 1)
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ENDPOINT   several nodes (run_train.sh)
  LOG_RANK     the global rank(s) whose log is shown: 0 (default) or a list such as 0,8
  COMM_MODE    fake (or fake_backend): plan the layout for NGPU x NNODES ranks on the meta
               device, without training

config reference (every key, its meaning and range; the values below are this command's):
"""
_FAKE = ("fake", "fake_backend")


def with_config_file(argv: list[str]) -> list[str]:
    """``argv`` with ``--config $CONFIG_FILE`` added when it names no recipe itself."""
    given = any(a == "--config" or a.startswith("--config=") for a in argv)
    recipe = os.environ.get("CONFIG_FILE")
    return argv if given or not recipe else ["--config", recipe, *argv]


def log_ranks() -> set[int]:
    """The ranks ``LOG_RANK`` names (default 0)."""
    raw = os.environ.get("LOG_RANK", "0")
    try:
        ranks = {int(r) for r in raw.split(",") if r.strip()}
    except ValueError:
        ranks = set()
    if not ranks or min(ranks) < 0:
        raise ConfigError(f"LOG_RANK={raw!r}: give a rank or a list of ranks, e.g. 0 or 0,8")
    return ranks


def dry_run_requested() -> bool:
    """``COMM_MODE`` asks for the dry run; any other value would silently start a real run."""
    mode = os.environ.get("COMM_MODE", "")
    if mode and mode not in _FAKE:
        raise ConfigError(
            f"COMM_MODE={mode!r}: the only mode is fake (or fake_backend), a dry run; unset it "
            "to train"
        )
    return bool(mode)
