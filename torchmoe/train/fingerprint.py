"""What a checkpoint must match to be resumed: the fingerprint of the job that saved it.

DCP loads the keys a job asks for and ignores the rest, so a job with fewer layers, another
vocabulary or another expert count could resume from a checkpoint and silently drop or misread
state. The fingerprint (model keys and shapes, the [model] and [moe] config, the tokenizer's
digest, the torchmoe version) goes into every manifest; a resume compares it with its own and
refuses on any difference, listing the keys.
"""

from dataclasses import asdict
from importlib import metadata

from torch import nn

from torchmoe.config.schema import JobConfig

SECTIONS = ("model", "moe")
# Keys a resume may change: they steer training (loss weights, routing capacity, kernels,
# freezing experts) without changing what the saved tensors mean. A frozen router has no
# optimizer state, so freeze_router must match. The tokenizer is compared by its digest, not its
# path. Changes to these keys are logged; every other [model]/[moe] key must match.
RESUME_MAY_CHANGE = frozenset(
    {
        "model.tokenizer_path",
        "model.init_std",
        "model.mtp_loss_scale",
        "model.attn_mask",  # what attends to what, not the weights
        "moe.router_dtype",
        "moe.load_balancing_type",
        "moe.aux_loss_coeff",
        "moe.z_loss_coeff",
        "moe.input_jitter_eps",
        "moe.bias_update_rate",
        "moe.force_load_balance",
        "moe.capacity_factor",
        "moe.eval_capacity_factor",
        "moe.min_capacity",
        "moe.drop_policy",
        "moe.pad_to_capacity",
        "moe.freeze_experts",
        "moe.dispatcher",
        "moe.grouped_mm",
        "moe.permute_backend",
    }
)
_LISTED = 4  # differing keys named in one line; the rest are counted


def torchmoe_version() -> str:
    try:
        return metadata.version("torchmoe")
    except metadata.PackageNotFoundError:
        return "unknown"


def job_fingerprint(cfg: JobConfig, model: nn.Module, tokenizer_digest: str | None) -> dict:
    """The fingerprint of a job whose (unsplit, possibly meta) model is ``model``."""
    return {
        "torchmoe": torchmoe_version(),
        "config": {s: asdict(getattr(cfg, s)) for s in SECTIONS},
        "tokenizer": tokenizer_digest,
        "shapes": {k: list(t.shape) for k, t in model.state_dict().items()},
    }


def compare(saved: dict, job: dict) -> tuple[list[str], list[str]]:
    """(differences that forbid the resume, allowed changes), each as 'key: saved -> job'."""
    refused: list[str] = []
    changed: list[str] = []
    for section in SECTIONS:
        old, new = saved.get("config", {}).get(section, {}), job["config"][section]
        for key in sorted(old.keys() & new.keys()):  # a key only one version knows is skipped
            if old[key] != new[key]:
                name = f"{section}.{key}"
                line = f"{name} {old[key]!r} -> {new[key]!r}"
                (changed if name in RESUME_MAY_CHANGE else refused).append(line)
    a, b = saved.get("tokenizer"), job["tokenizer"]
    if a and b and a != b:  # seeds from converted weights carry no tokenizer
        refused.append(f"tokenizer {a[:24]} -> {b[:24]}")
    if not refused:  # the config explains any shape difference; else the code changed
        refused = _shape_differences(saved.get("shapes", {}), job["shapes"])
    return refused, changed


def _shape_differences(old: dict[str, list], new: dict[str, list]) -> list[str]:
    missing = sorted(new.keys() - old.keys())
    extra = sorted(old.keys() - new.keys())
    resized = [
        f"{k} {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]
    ]
    lines = [f"{k} not in the checkpoint" for k in missing]
    lines += [f"{k} not in this model" for k in extra]
    return lines + resized


def summarize(lines: list[str]) -> str:
    """The first few differences, and how many more."""
    more = len(lines) - _LISTED
    return "; ".join(lines[:_LISTED]) + (f"; and {more} more" if more > 0 else "")
