"""Checks that span several keys, run once the whole config is known."""

import importlib.util
import os

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import ActivationCheckpoint, JobConfig
from torchmoe.models.registry import get_model_spec
from torchmoe.parallel.activation_checkpoint import RECOMPUTE_MODULES
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.pipeline import validate_pipeline
from torchmoe.quant.float8 import validate_float8


def validate(cfg: JobConfig) -> None:
    """Raise a ConfigError for the first inconsistency; WORLD_SIZE gives the rank count."""
    get_model_spec(cfg.model.name).validate(cfg)
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
    validate_activation_checkpoint(cfg.activation_checkpoint)
    validate_float8(cfg, planning=os.environ.get("COMM_MODE") == "fake")
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
    dims = ParallelDims.from_config(cfg.parallelism, world)
    dims.check_model(cfg)
    validate_pipeline(cfg)
    t = cfg.training
    per_step = t.local_batch_size * dims.dp
    if t.global_batch_size != -1 and t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size} must be a "
            f"multiple of training.local_batch_size x {dims.dp} data-parallel "
            f"ranks = {per_step}"
        )


def validate_activation_checkpoint(ac: ActivationCheckpoint) -> None:
    """Keys of [activation_checkpoint] that contradict the mode or name no known module."""
    modules = ac.recompute_modules
    if modules and ac.mode != "selective":
        raise ConfigError(
            f"activation_checkpoint.recompute_modules = {modules} needs "
            f"activation_checkpoint.mode = 'selective', not {ac.mode!r}"
        )
    for name in modules:
        if name not in RECOMPUTE_MODULES:
            raise ConfigError(
                f"activation_checkpoint.recompute_modules = {modules}: unknown "
                f"module {name!r}; choose from {', '.join(RECOMPUTE_MODULES)}"
            )
        if modules.count(name) > 1:
            raise ConfigError(
                f"activation_checkpoint.recompute_modules = {modules} lists {name!r} twice"
            )
    if ac.mode == "none" and ac.every_n_layers != 1:
        raise ConfigError(
            f"activation_checkpoint.every_n_layers = {ac.every_n_layers} has no "
            "effect with activation_checkpoint.mode = 'none'; pick full or "
            "selective"
        )
