"""Upcycle a dense torchmoe checkpoint into the seed checkpoint of an MoE model.

    python scripts/upcycle.py --dense outputs/dense/checkpoint/step-1000 \\
        --config my_moe.toml [--section.key value ...] [--granularity G] --out /path/upcycled

reads the model weights of the dense checkpoint (a seed or a training checkpoint; the optimizer
state is not read), turns every block that ``my_moe.toml`` makes MoE into experts
(torchmoe/convert/upcycle.py says how and which [moe] keys that needs), and writes
``<out>/step-0``, a seed checkpoint. Fine-tune from it with

    ./run_train.sh --config my_moe.toml --checkpoint.enable --checkpoint.folder /path/upcycled

(that run saves its own checkpoints next to step-0 and resumes from them).
Runs in one process; configuration and input errors print one line and exit with status 2.
"""

import argparse
import sys
from pathlib import Path

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import load_config
from torchmoe.config.registry import build_model
from torchmoe.config.schema import Checkpoint, JobConfig
from torchmoe.convert.upcycle import upcycle_state_dict
from torchmoe.train.checkpoint import CheckpointManager, TrainState, read_model_weights
from torchmoe.train.fingerprint import job_fingerprint


def write_seed(state: dict[str, torch.Tensor], cfg: JobConfig, out: Path) -> Path:
    """``out/step-0``, written the way the trainer writes seed checkpoints."""
    if (out / "step-0").exists():
        raise ConfigError(f"--out {out} already holds a step-0; choose a new folder")
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)  # upcycle_state_dict checked names
    job = job_fingerprint(cfg, model, tokenizer_digest=None)  # weights: no tokenizer yet
    CheckpointManager(
        Checkpoint(enable=True), out, model, None, None, None, TrainState(), job=job
    ).save_seed()
    return out / "step-0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Upcycle a dense checkpoint into an MoE seed checkpoint; other arguments "
        "(--config FILE, --section.key value) describe the MoE job.",
        allow_abbrev=False,
    )
    parser.add_argument("--dense", type=Path, required=True, help="dense checkpoint step folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for step-0")
    parser.add_argument(
        "--granularity",
        type=int,
        default=1,
        help="slices of the dense hidden dim per replica (1 = copies)",
    )
    args, job_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, _ = load_config(job_args)
        state = upcycle_state_dict(read_model_weights(args.dense, "--dense"), cfg, args.granularity)
        path = write_seed(state, cfg, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {path}: {cfg.moe.num_experts} experts per MoE block, granularity "
        f"{args.granularity}; train with --checkpoint.enable --checkpoint.folder "
        f"{args.out.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
