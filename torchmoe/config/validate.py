"""Checks that span several keys, run once the whole config is known."""

import os

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.registry import get_model_spec


def validate(cfg: JobConfig) -> None:
    get_model_spec(cfg.model.name).validate(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"WORLD_SIZE = {world}: multi-rank training is not available yet; "
                          "run with NGPU=1")
    t = cfg.training
    if t.global_batch_size != -1 and t.global_batch_size % t.local_batch_size:
        raise ConfigError(f"training.global_batch_size = {t.global_batch_size} must be a "
                          f"multiple of training.local_batch_size = {t.local_batch_size} "
                          "(x data-parallel ranks)")
