"""Checks that span several keys, run once the whole config is known."""

import importlib.util
import os

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.registry import get_model_spec
from torchmoe.parallel.dims import ParallelDims


def validate(cfg: JobConfig) -> None:
    """Raise a ConfigError for the first inconsistency; WORLD_SIZE gives the rank count."""
    get_model_spec(cfg.model.name).validate(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.checkpoint.load_step != -1 and not cfg.checkpoint.enable:
        raise ConfigError(f"checkpoint.load_step = {cfg.checkpoint.load_step} needs "
                          "checkpoint.enable = true")
    if cfg.moe.aux_loss_coeff > 0 and cfg.moe.load_balancing_type == "none":
        raise ConfigError(f"moe.aux_loss_coeff = {cfg.moe.aux_loss_coeff} has no effect with "
                          "moe.load_balancing_type = 'none'; pick aux_loss or seq_aux_loss")
    if cfg.metrics.enable_tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("metrics.enable_tensorboard = true but tensorboard is not installed; "
                          "pip install tensorboard")
    if cfg.parallelism.fsdp_cpu_offload and not torch.cuda.is_available():
        raise ConfigError("parallelism.fsdp_cpu_offload = true offloads GPU memory to pinned "
                          "host memory and needs CUDA; this machine has none")
    dims = ParallelDims.from_config(cfg.parallelism, world)
    dims.check_model(cfg, planning=os.environ.get("COMM_MODE") == "fake")
    t = cfg.training
    per_step = t.local_batch_size * dims.dp
    if t.global_batch_size != -1 and t.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size = {t.global_batch_size} must be a "
                          f"multiple of training.local_batch_size x {dims.dp} data-parallel "
                          f"ranks = {per_step}")
