"""Upcycle a dense torchmoe checkpoint into the seed checkpoint of an MoE model.

    python scripts/upcycle.py --dense outputs/dense/checkpoint/step-1000 \\
        --config my_moe.toml [--section.key value ...] [--granularity G] --out /path/upcycled

reads the model weights of the dense checkpoint (a seed or a training checkpoint; the optimizer
state is not read), turns every block that ``my_moe.toml`` makes MoE into experts
(torchmoe/models/upcycle.py says how and which [moe] keys that needs), and writes
``<out>/step-0``, a seed checkpoint. Fine-tune from it with

    ./run_train.sh --config my_moe.toml --checkpoint.enable --checkpoint.folder /path/upcycled

Runs in one process; configuration and input errors print one line and exit with status 2.
"""

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import load_config
from torchmoe.config.schema import JobConfig
from torchmoe.models.registry import get_model_spec
from torchmoe.models.upcycle import upcycle_state_dict

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process

# Where torchmoe/train/checkpoint.py keeps the model weights in every checkpoint.
MODEL_KEY = ("train", "model")


def read_model_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint folder, without reading anything else."""
    if not (step_dir / ".metadata").is_file():
        raise ConfigError(f"--dense {step_dir}: not a checkpoint folder (no .metadata); pass "
                          "one step folder, e.g. outputs/<run>/checkpoint/step-1000")
    prefix = ".".join(MODEL_KEY) + "."
    metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    weights = {key[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not weights:
        raise ConfigError(f"--dense {step_dir}: the checkpoint holds no model weights")
    dcp.load({MODEL_KEY[0]: {MODEL_KEY[1]: weights}}, checkpoint_id=str(step_dir))
    return weights


def check_fits(state: dict[str, torch.Tensor], cfg: JobConfig) -> None:
    """The upcycled state must be exactly the parameters of the model ``cfg`` builds: other
    [model] keys than the dense model's (dims, family) show up here."""
    with torch.device("meta"):
        model = get_model_spec(cfg.model.name).build(cfg)
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing:
        raise ConfigError(f"the MoE model needs {missing[0]}, which the dense checkpoint lacks; "
                          "use the dense model's family and [model] keys")
    if extra:
        raise ConfigError(f"the dense checkpoint's {extra[0]} has no place in the MoE model; "
                          "use the dense model's family and [model] keys")
    wrong = [name for name, shape in want.items() if tuple(state[name].shape) != shape]
    if wrong:
        raise ConfigError(f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} in the upcycled "
                          f"checkpoint but {want[wrong[0]]} in the MoE model; use the dense "
                          "model's [model] keys")


def write_seed(state: dict[str, torch.Tensor], out: Path) -> Path:
    """``out/step-0`` as the trainer writes seed checkpoints: into a .tmp folder, renamed when
    complete."""
    final, tmp = out / "step-0", out / "step-0.tmp"
    if final.exists():
        raise ConfigError(f"--out {out} already holds a step-0; choose a new folder")
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save({MODEL_KEY[0]: {MODEL_KEY[1]: state}}, checkpoint_id=str(tmp))
    tmp.rename(final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Upcycle a dense checkpoint into an MoE seed checkpoint; other arguments "
                    "(--config FILE, --section.key value) describe the MoE job.",
        allow_abbrev=False)
    parser.add_argument("--dense", type=Path, required=True, help="dense checkpoint step folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for step-0")
    parser.add_argument("--granularity", type=int, default=1,
                        help="slices of the dense hidden dim per replica (1 = copies)")
    args, job_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, _ = load_config(job_args)
        state = upcycle_state_dict(read_model_weights(args.dense), cfg, args.granularity)
        check_fits(state, cfg)
        path = write_seed(state, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {cfg.moe.num_experts} experts per MoE block, granularity "
          f"{args.granularity}; train with --checkpoint.enable --checkpoint.folder "
          f"{args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
