"""Checks that span several keys, run once the whole config is known."""

import os

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.registry import get_model_spec
from torchmoe.parallel.dims import ParallelDims


def validate(cfg: JobConfig) -> None:
    get_model_spec(cfg.model.name).validate(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg.parallelism, world)
    dims.check_model(cfg)
    t = cfg.training
    per_step = t.local_batch_size * dims.dp
    if t.global_batch_size != -1 and t.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size = {t.global_batch_size} must be a "
                          f"multiple of training.local_batch_size x {dims.dp} data-parallel "
                          f"ranks = {per_step}")
