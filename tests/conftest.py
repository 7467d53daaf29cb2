"""Shared fixtures: a per-session cache for the generated dataset, and a tiny job config."""

import random

import pytest

from torchmoe.config.load import build_config
from torchmoe.config.validate import validate


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_config(tmp_path, data_cache):
    """A JobConfig for a fast debug-flavor run; keyword overrides use 'section.key' names."""

    def make(**overrides):
        values = {
            "job.dump_folder": str(tmp_path / "run"),
            "data.cache_dir": data_cache,
            "training.seq_len": "32",
            "training.local_batch_size": "4",
            "training.steps": "4",
            "metrics.log_freq": "1",
            "model.dim": "64",
            "model.inter_dim": "128",
            "moe.ffn_hidden_size": "32",
            "moe.shared_expert_intermediate_size": "32",
            "lr_scheduler.warmup_steps": "2",
        }
        values.update({k: str(v) for k, v in overrides.items()})
        cfg = build_config({}, list(values.items()))
        validate(cfg)
        return cfg

    return make


@pytest.fixture
def rng() -> random.Random:
    """Fresh inputs every run; the seed is printed so a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed: {seed}")
    return random.Random(seed)
