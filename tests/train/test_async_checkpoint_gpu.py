"""Async checkpoints on a GPU: the state is staged into pinned host memory while training goes
on, and a resume from it reproduces the uninterrupted losses exactly (deterministic kernels)."""

import pytest
import torch

from torchmoe.train import manifest
from torchmoe.train.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
JOB = {
    "checkpoint.enable": "true",
    "checkpoint.async_mode": "async",
    "checkpoint.interval": 2,
    "training.steps": 6,
    "training.deterministic": "true",
}


def test_an_async_save_on_gpu_resumes_exactly(tiny_config):
    trainer = Trainer(tiny_config(**JOB))
    losses = trainer.train()
    assert trainer.checkpoint.saved_steps() == [2, 4, 6]
    for step in (2, 4, 6):
        _, problem = manifest.verify(trainer.checkpoint.folder / f"step-{step}", step, False)
        assert problem is None
    resume = {"checkpoint.load_step": 2, "checkpoint.discard_newer": "true"}
    resumed = Trainer(tiny_config(**{**JOB, **resume})).train()
    assert resumed == losses[2:]
