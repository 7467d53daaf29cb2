"""Upcycled MoE models compute the dense model's logits at step 0 (float64, random weights and
tokens), for plain and granular upcycling, one or several replicas, softmax and sigmoid; configs
that cannot do so are one-line errors naming the key."""

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.config.schema import JobConfig
from torchmoe.models.registry import get_model_spec
from torchmoe.models.upcycle import upcycle_state_dict

LAYERS, HIDDEN = 3, 48
SMALL = {"model.dim": 32, "model.n_layers": LAYERS, "model.inter_dim": HIDDEN,
         "model.n_heads": 2, "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8,
         "model.qk_rope_head_dim": 8, "model.v_head_dim": 8, "model.vocab_size": 101,
         "model.init_std": 0.1, "moe.router_dtype": "fp64", "training.seq_len": 16}


def config(**overrides) -> JobConfig:
    values = {**SMALL, **overrides}
    cfg = build_config({}, [(k, str(v)) for k, v in values.items()])
    get_model_spec(cfg.model.name).validate(cfg)
    return cfg


def dense_config() -> JobConfig:
    return config(**{"moe.num_experts": 0, "model.n_dense_layers": LAYERS})


def moe_config(granularity: int, replicas: int, topk: int, score: str, **overrides
               ) -> JobConfig:
    return config(**{"moe.num_experts": granularity * replicas, "moe.router_topk": topk,
                     "moe.ffn_hidden_size": HIDDEN // granularity,
                     "moe.shared_expert_intermediate_size": 0,
                     "moe.router_score_function": score, "moe.router_norm_topk_prob": "true",
                     "moe.router_topk_scaling_factor": float(granularity),
                     "moe.router_num_groups": 0, "moe.router_group_topk": 0,
                     "model.n_dense_layers": 1, "training.seed": int(torch.randint(2**31, ())),
                     **overrides})


def build(cfg: JobConfig) -> torch.nn.Module:
    model = get_model_spec(cfg.model.name).build(cfg)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers)
    return model.double().eval()


@pytest.mark.parametrize("granularity,replicas,topk,score", [
    (1, 4, 2, "softmax"), (1, 4, 1, "sigmoid"), (2, 1, 2, "softmax"), (2, 3, 2, "sigmoid"),
    (2, 3, 4, "softmax"), (4, 2, 4, "sigmoid"), (4, 3, 8, "softmax")])
def test_upcycled_model_computes_the_dense_logits(granularity, replicas, topk, score):
    dense = build(dense_config())
    cfg = moe_config(granularity, replicas, topk, score)
    moe = build(cfg)
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), cfg, granularity), strict=True)
    tokens = torch.randint(0, 101, (3, 16))
    with torch.no_grad():
        want = dense(tokens)
        torch.testing.assert_close(moe(tokens), want, rtol=1e-10, atol=1e-10)
        for name, p in moe.named_parameters():  # the experts do carry the dense MLP
            if name.endswith("experts.w2"):
                p.add_(torch.randn_like(p) * 0.1)
        assert not torch.allclose(moe(tokens), want, rtol=1e-4, atol=1e-4)


def test_layout_of_experts_and_router_rows():
    dense = build(dense_config()).state_dict()
    cfg = moe_config(2, 3, 2, "softmax")
    sd = upcycle_state_dict(dense, cfg, 2)
    w1, w2 = dense["layers.1.feed_forward.w1.weight"], dense["layers.1.feed_forward.w2.weight"]
    gate = sd["layers.1.feed_forward.router.gate.weight"]
    for e in range(6):
        r, g = divmod(e, 2)
        rows = slice(g * HIDDEN // 2, (g + 1) * HIDDEN // 2)
        assert torch.equal(sd["layers.1.feed_forward.experts.w1"][e], w1[rows])
        assert torch.equal(sd["layers.1.feed_forward.experts.w2"][e], w2[:, rows])
        assert torch.equal(gate[e], gate[2 * r])
    assert not torch.equal(gate[0], gate[2]) and gate.std() > 0
    assert torch.equal(sd["layers.1.feed_forward.router.expert_bias"], torch.zeros(6))
    assert sd["layers.0.feed_forward.w1.weight"] is dense["layers.0.feed_forward.w1.weight"]
    assert "layers.1.feed_forward.w1.weight" not in sd


@pytest.mark.parametrize("granularity,overrides,message", [
    (2, {"moe.ffn_hidden_size": 20},
     "moe.ffn_hidden_size = 20 must be the dense hidden size 48 / granularity 2 = 24"),
    (4, {"moe.num_experts": 6, "moe.router_topk": 4},
     "moe.num_experts = 6 must be a multiple of granularity = 4"),
    (2, {"moe.router_topk": 3}, "moe.router_topk = 3 must be a multiple of granularity = 2"),
    (1, {"moe.router_norm_topk_prob": "false"},
     "moe.router_norm_topk_prob = false must be true"),
    (2, {"moe.router_topk_scaling_factor": 1.0},
     "moe.router_topk_scaling_factor = 1.0 must be granularity = 2"),
    (1, {"moe.shared_expert_intermediate_size": 16},
     "moe.shared_expert_intermediate_size = 16 must be 0"),
    (1, {"moe.num_experts": 4, "moe.router_num_groups": 2, "moe.router_group_topk": 1},
     "moe.router_num_groups = 2 must be 0"),
    (1, {"moe.capacity_factor": 1.5}, "moe.capacity_factor = 1.5 must be 0"),
    (5, {"moe.num_experts": 5, "moe.router_topk": 5},
     "granularity = 5 must divide the dense hidden size 48"),
    (0, {}, "granularity = 0 must be >= 1"),
    (1, {"model.n_layers": 4}, "the dense checkpoint has no MLP in block 3"),
    (1, {"moe.num_experts": 0}, "moe.num_experts = 0: the upcycling target must be an MoE"),
])
def test_configs_that_cannot_upcycle_are_one_line_errors(granularity, overrides, message):
    dense = build(dense_config()).state_dict()
    cfg = moe_config(max(granularity, 1), 2, 2 * max(granularity, 1), "softmax", **overrides)
    with pytest.raises(ConfigError) as err:
        upcycle_state_dict(dense, cfg, granularity)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_moe_checkpoint_is_refused():
    cfg = moe_config(1, 4, 2, "softmax")
    with pytest.raises(ConfigError, match="already has routers"):
        upcycle_state_dict(build(cfg).state_dict(), cfg, 1)
