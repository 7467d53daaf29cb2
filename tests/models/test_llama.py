"""Llama: the dense baseline (Llama-3-8B sizes), training without any MoE layer, and the same
builder making the blocks ``moe.layer_freq`` selects MoE once experts are configured."""

import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.config.validate import validate
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.moe.moe import MoE
from torchmoe.train.trainer import Trainer


def meta_model(**overrides):
    values = {"model.name": "llama", **{k: str(v) for k, v in overrides.items()}}
    cfg = build_config({}, list(values.items()))
    validate(cfg)
    with torch.device("meta"):
        return build_model(cfg)


def test_8b_flavor_is_llama_3_8b():
    model = meta_model(**{"model.flavor": "8B"})
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert all(type(b.feed_forward) is FeedForward for b in model.layers.values())
    assert not hasattr(model.layers["0"].attention, "q_norm")


def test_experts_make_a_llama_style_moe():
    model = meta_model(**{"moe.num_experts": 8, "moe.layer_freq": 2, "model.n_layers": 4})
    kinds = [type(b.feed_forward) for b in model.layers.values()]
    assert kinds == [MoE, FeedForward, MoE, FeedForward]


def test_debug_flavor_trains_without_moe_layers(tiny_config):
    trainer = Trainer(
        tiny_config(**{"model.name": "llama", "training.steps": 10, "optimizer.lr": 1e-2}),
        device=torch.device("cpu"),
    )
    assert trainer.moe_layers == []
    losses = trainer.train()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
