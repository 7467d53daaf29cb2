"""Qwen3-MoE: flavors as in the Hugging Face configs, the q/k norms in every block, routing,
and the debug flavor training through the Trainer."""

import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.models.moe.moe import MoE
from torchmoe.train.trainer import Trainer


def meta_model(**overrides):
    values = {"model.name": "qwen3_moe", **{k: str(v) for k, v in overrides.items()}}
    cfg = build_config({}, list(values.items()))
    with torch.device("meta"):
        return build_model(cfg), cfg


def test_real_flavors_have_the_published_sizes():
    expected = {"30B-A3B": 30_532_122_624, "235B-A22B": 235_093_634_560}  # 30.5B, 235B
    for flavor, total in expected.items():
        model, cfg = meta_model(**{"model.flavor": flavor})
        assert sum(p.numel() for p in model.parameters()) == total, flavor
        e = cfg.moe
        assert (e.num_experts, e.router_topk, e.shared_expert_intermediate_size) == (128, 8, 0)
        assert e.router_norm_topk_prob and e.router_score_function == "softmax"
        assert (e.load_balancing_type, e.aux_loss_coeff, e.enable_expert_bias) == (
            ["aux_loss"],
            [1e-3],
            False,
        )


def test_every_block_is_moe_with_qk_norms_and_no_shared_experts():
    model, _ = meta_model()
    for block in model.layers.values():
        assert isinstance(block.feed_forward, MoE) and block.feed_forward.shared_experts is None
        assert block.attention.q_norm.weight.shape == (32,)  # head_dim
        assert block.attention.k_norm.weight.shape == (32,)
        router = block.feed_forward.router
        assert router.expert_bias is None and router.args.norm_topk_prob


def test_debug_flavor_trains(tiny_config):
    cfg = tiny_config(
        **{
            "model.name": "qwen3_moe",
            "moe.shared_expert_intermediate_size": 0,
            "training.steps": 10,
            "optimizer.lr": 1e-2,
        }
    )
    trainer = Trainer(cfg, device=torch.device("cpu"))
    losses = trainer.train()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert len(trainer.moe_layers) == 3
