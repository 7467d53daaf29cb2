"""The LR schedule and AdamW's parameter groups."""

import itertools
import math

import pytest
import torch

from torchmoe.config.schema import LRScheduler, Optimizer
from torchmoe.train.optim import build_optimizer, lr_factor


def schedule(total=100, **kw):
    return [lr_factor(step, total, LRScheduler(**kw)) for step in range(total)]


def test_warmup_is_linear_then_cosine_reaches_min():
    f = schedule(warmup_steps=10, decay_type="cosine", min_lr_factor=0.1)
    assert f[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_linear_decay_and_constant():
    f = schedule(warmup_steps=0, decay_type="linear", min_lr_factor=0.0)
    assert f[50] == pytest.approx(0.5)
    assert schedule(warmup_steps=5, decay_type="constant")[5:] == [1.0] * 95


def test_warmup_stable_decay():
    f = schedule(warmup_steps=10, decay_type="linear", decay_ratio=0.2, min_lr_factor=0.0)
    assert f[10:80] == [1.0] * 70  # stable phase
    assert f[90] == pytest.approx(0.5)


def test_decay_never_starts_inside_warmup():
    f = schedule(warmup_steps=20, decay_type="linear", decay_ratio=0.95, min_lr_factor=0.0)
    assert f[19] < f[20] == pytest.approx(1.0)  # peak right after warm-up, then decay
    assert f[60] == pytest.approx(1 - 40 / 80)


def test_no_weight_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, Optimizer(weight_decay=0.3), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
