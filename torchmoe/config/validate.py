"""Every check that spans several keys, run once the whole config is known: the family's
(config/model_checks.py), parallelism's (parallel_checks.py, pipeline_keys.py), and the rest
here. One ConfigError for the first problem, before anything is built."""

import importlib.util
import os

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.parallel_checks import (
    check_activation_checkpoint,
    check_parallel_shapes,
    check_pp_ep_overlap,
    check_shared_expert_overlap,
    resolve_dp_shard,
)
from torchmoe.config.pipeline_keys import V_SHAPED, check_pipeline
from torchmoe.config.registry import get_model_spec
from torchmoe.config.schema import JobConfig


def validate(cfg: JobConfig) -> None:
    """Raise a ConfigError for the first inconsistency; WORLD_SIZE gives the rank count."""
    spec = get_model_spec(cfg.model.name)
    spec.check(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.checkpoint.load_step != -1 and not cfg.checkpoint.enable:
        raise ConfigError(
            f"checkpoint.load_step = {cfg.checkpoint.load_step} needs checkpoint.enable = true"
        )
    if cfg.model.mtp_num_layers and cfg.parallelism.tp > 1:
        raise ConfigError(
            f"model.mtp_num_layers = {cfg.model.mtp_num_layers} with "
            f"parallelism.tp = {cfg.parallelism.tp} is not supported yet; use "
            "tp = 1 or turn multi-token prediction off"
        )
    if cfg.moe.input_jitter_eps > 0 and cfg.activation_checkpoint.mode != "none":
        raise ConfigError(
            f"moe.input_jitter_eps = {cfg.moe.input_jitter_eps} draws new noise "
            "when activation checkpointing recomputes the router, which would then "
            "pick other experts; set activation_checkpoint.mode = 'none' or "
            "moe.input_jitter_eps = 0"
        )
    check_activation_checkpoint(cfg.activation_checkpoint)
    check_shared_expert_overlap(cfg)
    check_pp_ep_overlap(cfg)
    check_float8(cfg, planning=os.environ.get("COMM_MODE") == "fake")
    if cfg.checkpoint.initial_load_path and not cfg.checkpoint.enable:
        raise ConfigError(
            "checkpoint.initial_load_path needs checkpoint.enable = true (the new run's "
            "checkpoints go to checkpoint.folder)"
        )
    if cfg.validation.enable and cfg.parallelism.pp > 1 and cfg.parallelism.pp_schedule in V_SHAPED:
        raise ConfigError(
            f"validation.enable with parallelism.pp_schedule = {cfg.parallelism.pp_schedule!r} "
            "is not supported (torch's V-shaped schedules cannot run forward only); use 1F1B, "
            "Interleaved1F1B or InterleavedZeroBubble, or turn validation off"
        )
    o = cfg.optimizer
    if o.state_dtype != "float32" and o.implementation not in ("auto", "torchmoe"):
        raise ConfigError(
            f"optimizer.state_dtype = {o.state_dtype!r} needs optimizer.implementation = "
            f"'torchmoe' or 'auto' (torch's {o.implementation!r} AdamW keeps float32 moments)"
        )
    check_cached_weights(cfg)
    prof = cfg.profiling
    if prof.enable_profiling and prof.warmup_steps + prof.active_steps > prof.freq:
        raise ConfigError(
            f"profiling.warmup_steps {prof.warmup_steps} + active_steps {prof.active_steps} "
            f"exceed profiling.freq = {prof.freq}; raise freq or trace fewer steps"
        )
    if cfg.metrics.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "metrics.enable_wandb = true but wandb is not installed; pip install wandb"
        )
    if cfg.metrics.enable_tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "metrics.enable_tensorboard = true but tensorboard is not installed; "
            "pip install tensorboard"
        )
    if cfg.parallelism.fsdp_cpu_offload and not torch.cuda.is_available():
        raise ConfigError(
            "parallelism.fsdp_cpu_offload = true offloads GPU memory to pinned "
            "host memory and needs CUDA; this machine has none"
        )
    p = cfg.parallelism
    dp = p.dp_replicate * resolve_dp_shard(p, world)
    check_parallel_shapes(cfg, spec.heads_keys)
    check_pipeline(cfg)
    t = cfg.training
    per_step = t.local_batch_size * dp
    if t.global_batch_size != -1 and t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size} must be a "
            f"multiple of training.local_batch_size x {dp} data-parallel "
            f"ranks = {per_step}"
        )
    # after every other check, where the plan (which used to refuse it) stood
    if cfg.quantize.float8_linear and p.tp > 1:
        raise ConfigError(
            "quantize.float8_linear with parallelism.tp > 1 is not supported yet; "
            "use tp = 1 or turn float8 off"
        )


def check_float8(cfg: JobConfig, planning: bool) -> None:
    """One-line errors for float8 settings this machine or model cannot run (``planning``: a
    dry run on a CPU may plan a GPU job)."""
    q = cfg.quantize
    if q.float8_linear and q.float8_linear_weight_grad == "bfloat16" and not planning:
        if not _has_sm90():
            raise ConfigError(
                "quantize.float8_linear_weight_grad = 'bfloat16' runs rowwise-scaled float8 "
                "GEMMs, which need a CUDA GPU of compute capability 9.0+; use 'float8' "
                "(torchao) or turn float8_linear off on this machine"
            )
    if not q.float8_experts:
        return
    if cfg.moe.grouped_mm == "loop":
        raise ConfigError(
            "quantize.float8_experts = true runs the experts as float8 grouped "
            "GEMMs; set moe.grouped_mm = 'auto' or 'grouped_mm', not 'loop'"
        )
    hidden = cfg.moe.ffn_hidden_size // cfg.parallelism.etp
    if cfg.model.dim % 16 or hidden % 16:
        raise ConfigError(
            f"quantize.float8_experts = true needs model.dim = {cfg.model.dim} and "
            f"the per-rank expert hidden size {hidden} (moe.ffn_hidden_size / "
            "parallelism.etp) to be multiples of 16"
        )
    if not planning and not _has_sm90():
        raise ConfigError(
            "quantize.float8_experts = true needs a CUDA GPU of compute capability "
            "9.0+ (float8 grouped GEMMs); turn it off on this machine"
        )


def _has_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def cached_weights_conflict(cfg: JobConfig, world_size: int = 1) -> str | None:
    """What keeps ``training.compute_weights = "cached"`` from running in this job on
    ``world_size`` processes, or None."""
    if world_size > 1:
        return f"{world_size} processes (it runs in one only)"
    if cfg.optimizer.implementation not in ("auto", "torchmoe"):
        return f"optimizer.implementation = {cfg.optimizer.implementation!r} (torch's AdamW)"
    q = cfg.quantize
    if q.float8_linear and q.float8_linear_weight_grad == "float8":
        return (
            "quantize.float8_linear_weight_grad = 'float8' (torchao quantizes the float32 "
            "weights; 'bfloat16' computes from the copies)"
        )
    if q.float8_experts and q.float8_experts_weight_grad == "float8":
        return (
            "quantize.float8_experts_weight_grad = 'float8' (torchao wraps the float32 expert "
            "weights; 'bfloat16' computes from the copies)"
        )
    if cfg.moe.freeze_experts:
        return "moe.freeze_experts"
    if cfg.training.mixed_precision_param == "float32":
        return "training.mixed_precision_param = 'float32' (nothing to cast)"
    return None


def check_cached_weights(cfg: JobConfig, world_size: int = 1) -> None:
    """An explicit ``training.compute_weights = "cached"`` where it cannot run is one line
    (the trainer and the dry run pass the number of processes)."""
    if cfg.training.compute_weights != "cached":
        return
    why = cached_weights_conflict(cfg, world_size)
    if why:
        raise ConfigError(
            f"training.compute_weights = 'cached' does not work with {why}; set it to 'auto' "
            "or 'cast'"
        )
