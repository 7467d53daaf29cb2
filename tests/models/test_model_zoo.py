"""Every model family: its debug flavor builds, initialises and is causal; ``moe.layer_freq``
(an interval or a 0/1 list, after ``model.n_dense_layers``) decides dense vs MoE blocks the
same way in all of them; DeepSeek-V2 reuses the V3 builder with V2's balancing."""

import pytest
import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.config.validate import validate
from torchmoe.models.deepseek_v2.flavors import FLAVORS as V2
from torchmoe.models.deepseek_v3.flavors import FLAVORS as V3
from torchmoe.train.trainer import Trainer

FAMILIES = ["deepseek_v3", "deepseek_v2", "mixtral", "qwen3_moe", "llama"]


def config(family, **overrides):
    values = {
        "model.name": family,
        "model.dim": 64,
        "model.inter_dim": 96,
        "moe.ffn_hidden_size": 32,
        "training.seq_len": 16,
        **({"moe.num_experts": 8, "moe.router_topk": 2} if family == "llama" else {}),
        **overrides,
    }
    cfg = build_config({}, [(k, str(v)) for k, v in values.items()])
    validate(cfg)
    return cfg


def build(cfg, seed=0):
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers, buffer_device=torch.device("cpu"))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "layer_freq,n_dense,expected",
    [
        ("1", 0, "MMMM"),
        ("2", 0, "MDMD"),
        ("3", 0, "MDDM"),
        ("0,1,1,0", 0, "DMMD"),
        ("1", 1, "DMMM"),
        ("2", 1, "DDMD"),  # block 0 chosen by the interval, but dense by n_dense_layers
        ("1,0,1,1", 2, "DDMM"),
    ],
)
def test_layer_freq_places_moe_blocks_in_every_family(family, layer_freq, n_dense, expected):
    cfg = config(
        family,
        **{"model.n_layers": 4, "model.n_dense_layers": n_dense, "moe.layer_freq": layer_freq},
    )
    with torch.device("meta"):
        model = build_model(cfg)
    kinds = "".join(
        "M" if type(b.feed_forward).__name__ == "MoE" else "D" for b in model.layers.values()
    )
    assert kinds == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_no_experts_means_a_dense_model(family):
    cfg = config(family, **{"moe.num_experts": 0, "model.n_layers": 2})
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(type(b.feed_forward).__name__ == "FeedForward" for b in model.layers.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_debug_flavor_is_deterministic_finite_and_causal(family):
    cfg = config(family)
    model, again = build(cfg), build(cfg)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q) and torch.isfinite(p).all(), name
    assert_causal(model)


def assert_causal(model: torch.nn.Module) -> None:
    """Changing tokens 10.. changes the logits there and nowhere before."""
    tokens = torch.randint(0, 4000, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = torch.randint(0, 4000, (6,))
    out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[:, :10], out_changed[:, :10])
    assert not torch.allclose(out[:, 10:], out_changed[:, 10:])


def test_deepseek_v2_lite_is_the_v3_16b_architecture_with_v2_balancing():
    assert V2["lite"]["model"] == V3["16B"]["model"]
    differ = {k for k in V3["16B"]["moe"] if V2["lite"]["moe"][k] != V3["16B"]["moe"][k]}
    assert differ == {"load_balancing_type", "aux_loss_coeff", "enable_expert_bias"}
    cfg = build_config({}, [("model.name", "deepseek_v2"), ("model.flavor", "lite")])
    assert (
        cfg.moe.num_experts,
        cfg.moe.router_topk,
        cfg.moe.shared_expert_intermediate_size,
        cfg.moe.router_norm_topk_prob,
        cfg.model.n_dense_layers,
    ) == (64, 6, 2816, False, 1)
    assert (cfg.moe.load_balancing_type, cfg.moe.aux_loss_coeff) == (["seq_aux_loss"], [1e-3])
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 15_706_484_224  # 15.7B


def test_deepseek_v2_debug_flavor_trains(tiny_config):
    cfg = tiny_config(**{"model.name": "deepseek_v2", "training.steps": 10, "optimizer.lr": 1e-2})
    trainer = Trainer(cfg, device=torch.device("cpu"))
    losses = trainer.train()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert all(m.router.expert_bias is None for m in trainer.moe_layers)


def test_training_with_multi_token_prediction(tiny_config):
    cfg = tiny_config(**{"model.mtp_num_layers": 1, "training.steps": 10, "optimizer.lr": 1e-2})
    losses = Trainer(cfg, device=torch.device("cpu")).train()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
