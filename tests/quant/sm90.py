"""The float8 grouped GEMMs' GPU tests: marked ``gpu`` (so ``pytest -m gpu`` runs them) and
skipped below sm90."""

from collections.abc import Callable

import pytest
import torch

_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def needs_sm90(test: Callable) -> Callable:
    skip = pytest.mark.skipif(not _SM90, reason="float8 grouped GEMMs need a CUDA sm90+ GPU")
    return pytest.mark.gpu(skip(test))


def float8_trainer(tiny_config: Callable, compiled: bool, **quantize: str):
    """A CUDA Trainer of a small MoE model for 30 steps with the given ``quantize.*`` keys."""
    from torchmoe.train.trainer import Trainer

    cfg = tiny_config(
        **{f"quantize.{key}": value for key, value in quantize.items()},
        **{
            "compile.enable": str(compiled).lower(),
            "training.steps": 30,
            "model.dim": 128,
            "moe.ffn_hidden_size": 128,
            "training.seq_len": 64,
        },
    )
    return Trainer(cfg, device=torch.device("cuda"))
