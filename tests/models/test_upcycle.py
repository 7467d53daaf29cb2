"""Upcycled MoE models compute the dense model's logits at step 0 (float64, random weights and
tokens), for plain and granular upcycling, one or several replicas, softmax and sigmoid,
group-limited routing over whole replicas, round-robin and Sinkhorn selection, MLA and GQA
families, MTP blocks; configs that cannot do so are one-line errors naming the key."""

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model, get_model_spec
from torchmoe.config.schema import JobConfig
from torchmoe.convert.upcycle import upcycle_state_dict

LAYERS, HIDDEN, VOCAB, SEQ = 3, 48, 101, 16
COMMON = {
    "model.dim": 32,
    "model.n_layers": LAYERS,
    "model.inter_dim": HIDDEN,
    "model.vocab_size": VOCAB,
    "model.init_std": 0.1,
    "model.rope_theta": 10000.0,
    "moe.router_dtype": "fp64",
    "training.seq_len": SEQ,
}
SHAPES = {
    "mla": {
        "model.n_heads": 2,
        "model.kv_lora_rank": 16,
        "model.qk_nope_head_dim": 8,
        "model.qk_rope_head_dim": 8,
        "model.v_head_dim": 8,
    },
    "gqa": {"model.n_heads": 4, "model.n_kv_heads": 2, "model.head_dim": 8},
}
ATTENTION = {"deepseek_v3": "mla", "llama": "gqa", "mixtral": "gqa"}


def config(family: str, **overrides) -> JobConfig:
    values = {"model.name": family, **COMMON, **SHAPES[ATTENTION[family]], **overrides}
    cfg = build_config({}, [(k, str(v)) for k, v in values.items()])
    get_model_spec(family).check(cfg)
    return cfg


def dense_config(family: str = "deepseek_v3", **overrides) -> JobConfig:
    return config(family, **{"moe.num_experts": 0, **overrides})


def moe_config(
    granularity: int,
    replicas: int,
    topk: int,
    score: str = "softmax",
    family: str = "deepseek_v3",
    **overrides,
) -> JobConfig:
    return config(
        family,
        **{
            "moe.num_experts": granularity * replicas,
            "moe.router_topk": topk,
            "moe.ffn_hidden_size": HIDDEN // granularity,
            "moe.shared_expert_intermediate_size": 0,
            "moe.router_score_function": score,
            "moe.router_norm_topk_prob": "true",
            "moe.router_topk_scaling_factor": float(granularity),
            "moe.router_num_groups": 0,
            "moe.router_group_topk": 0,
            "training.seed": int(torch.randint(2**31, ())),
            **overrides,
        },
    )


def build(cfg: JobConfig) -> torch.nn.Module:
    model = build_model(cfg)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers)
    return model.double().eval()


def upcycled(dense: torch.nn.Module, cfg: JobConfig, granularity: int) -> torch.nn.Module:
    moe = build(cfg)
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), cfg, granularity), strict=True)
    return moe


def assert_same_logits_and_experts_matter(moe: torch.nn.Module, dense: torch.nn.Module) -> None:
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    with torch.no_grad():
        want = dense(tokens)
        torch.testing.assert_close(moe(tokens), want, rtol=1e-10, atol=1e-10)
        for name, p in moe.named_parameters():  # the experts do carry the dense MLPs
            if name.endswith("experts.w2"):
                p.add_(torch.randn_like(p) * 0.1)
        assert not torch.allclose(moe(tokens), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "granularity,replicas,topk,score,overrides",
    [
        (1, 4, 2, "softmax", {}),
        (1, 4, 1, "sigmoid", {}),
        (2, 1, 2, "softmax", {}),
        (2, 3, 2, "sigmoid", {}),
        (2, 3, 4, "softmax", {}),
        (4, 2, 4, "sigmoid", {}),
        (4, 3, 8, "softmax", {}),
        (2, 4, 2, "sigmoid", {"moe.router_num_groups": 2, "moe.router_group_topk": 1}),
        (
            2,
            3,
            4,
            "softmax",
            {"moe.router_pre_softmax": "false", "moe.router_norm_topk_prob": "false"},
        ),
    ],
)
def test_upcycled_model_computes_the_dense_logits(granularity, replicas, topk, score, overrides):
    dense = build(dense_config())
    moe = upcycled(dense, moe_config(granularity, replicas, topk, score, **overrides), granularity)
    assert_same_logits_and_experts_matter(moe, dense)


@pytest.mark.parametrize(
    "dense_family,moe_family,overrides,pattern",
    [
        ("llama", "mixtral", {}, [1, 1, 1]),
        ("llama", "llama", {"moe.layer_freq": 2}, [1, 0, 1]),
        (
            "deepseek_v3",
            "deepseek_v3",
            {"model.n_dense_layers": 0, "moe.layer_freq": "0,1,1"},
            [0, 1, 1],
        ),
    ],
)
def test_families_and_layer_patterns(dense_family, moe_family, overrides, pattern):
    dense = build(dense_config(dense_family))
    moe = upcycled(dense, moe_config(2, 2, 2, family=moe_family, **overrides), 2)
    assert [type(block.feed_forward).__name__ == "MoE" for block in moe.layers.values()] == [
        bool(p) for p in pattern
    ]
    assert_same_logits_and_experts_matter(moe, dense)


@pytest.mark.parametrize(
    "overrides",
    [
        {"moe.force_load_balance": "true"},
        {
            "moe.load_balancing_type": "sinkhorn",
            "moe.enable_expert_bias": "false",
            "moe.aux_loss_coeff": 0.0,
        },
    ],
)
def test_training_mode_selections_keep_replicas_whole(overrides):
    """Round-robin and Sinkhorn selection (training only) pick other replicas, whole ones."""
    dense = build(dense_config()).train()
    assert_same_logits_and_experts_matter(
        upcycled(dense, moe_config(2, 3, 4, **overrides), 2).train(), dense
    )


def test_multi_token_prediction_blocks_are_upcycled():
    dense = build(dense_config(**{"model.mtp_num_layers": 1}))
    moe = upcycled(dense, moe_config(2, 3, 2, **{"model.mtp_num_layers": 1}), 2)
    assert type(moe.mtp[0].block.feed_forward).__name__ == "MoE"
    tokens, labels = torch.randint(0, VOCAB, (2, 2, SEQ))
    losses = []
    with torch.no_grad():  # eval mode (dropless), where the MTP loss is returned, not logged
        for model in (dense, moe):
            h = model.run_layers(model.tok_embeddings(tokens))
            mtp = model.mtp_inputs(tokens, labels)
            losses.append(model.mtp.loss(h, mtp, labels, model.rope_cos_sin, model.output))
    assert losses[0] > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=0)


def test_layout_of_experts_and_router_rows():
    dense = build(dense_config()).state_dict()
    sd = upcycle_state_dict(dense, moe_config(2, 3, 2), 2)
    w1, w2, w3 = (dense[f"layers.1.feed_forward.{w}.weight"] for w in ("w1", "w2", "w3"))
    gate = sd["layers.1.feed_forward.router.gate.weight"]
    for e in range(6):
        r, g = divmod(e, 2)
        rows = slice(g * HIDDEN // 2, (g + 1) * HIDDEN // 2)
        assert torch.equal(sd["layers.1.feed_forward.experts.w13"][e, 0], w1[rows])
        assert torch.equal(sd["layers.1.feed_forward.experts.w13"][e, 1], w3[rows])
        assert torch.equal(sd["layers.1.feed_forward.experts.w2"][e], w2[:, rows])
        assert torch.equal(gate[e], gate[2 * r])
    assert not torch.equal(gate[0], gate[2]) and gate.std() > 0
    assert torch.equal(sd["layers.1.feed_forward.router.expert_bias"], torch.zeros(6))
    assert sd["layers.0.feed_forward.w1.weight"] is dense["layers.0.feed_forward.w1.weight"]
    assert "layers.1.feed_forward.w1.weight" not in sd


@pytest.mark.parametrize(
    "granularity,overrides,message",
    [
        (
            2,
            {"moe.ffn_hidden_size": 20},
            "moe.ffn_hidden_size = 20 must be the dense hidden size 48 / granularity 2 = 24",
        ),
        (
            4,
            {"moe.num_experts": 6, "moe.router_topk": 4},
            "moe.num_experts = 6 must be a multiple of granularity = 4",
        ),
        (2, {"moe.router_topk": 3}, "moe.router_topk = 3 must be a multiple of granularity = 2"),
        (
            1,
            {"moe.router_norm_topk_prob": "false"},
            "moe.router_norm_topk_prob = false must be true",
        ),
        (
            2,
            {"moe.router_topk_scaling_factor": 1.0},
            "moe.router_topk_scaling_factor = 1.0 must be granularity = 2",
        ),
        (
            1,
            {"moe.shared_expert_intermediate_size": 16},
            "moe.shared_expert_intermediate_size = 16 must be 0",
        ),
        (
            2,
            {"moe.router_num_groups": 4, "moe.router_group_topk": 2, "moe.router_topk": 2},
            "moe.router_num_groups = 4 must be 0 or leave groups of whole replicas",
        ),
        (1, {"moe.capacity_factor": 1.5}, "moe.capacity_factor = 1.5 must be 0"),
        (
            5,
            {"moe.num_experts": 5, "moe.router_topk": 5},
            "granularity = 5 must divide the dense hidden size 48",
        ),
        (0, {}, "granularity = 0 must be >= 1"),
        (
            1,
            {"model.n_layers": 4},
            "the dense checkpoint has no MLP layers.3.feed_forward.w1.weight",
        ),
        (1, {"moe.num_experts": 0}, "moe.num_experts = 0: the upcycling target must be an MoE"),
        (
            1,
            {"model.dim": 64},
            "tok_embeddings.weight has shape (101, 32) in the dense checkpoint "
            "but (101, 64) in the MoE model",
        ),
    ],
)
def test_configs_that_cannot_upcycle_are_one_line_errors(granularity, overrides, message):
    dense = build(dense_config()).state_dict()
    g = max(granularity, 1)
    cfg = moe_config(g, 2, 2 * g, **overrides)
    with pytest.raises(ConfigError) as err:
        upcycle_state_dict(dense, cfg, granularity)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_moe_checkpoint_is_refused():
    cfg = moe_config(1, 4, 2)
    with pytest.raises(ConfigError, match="already has routers"):
        upcycle_state_dict(build(cfg).state_dict(), cfg, 1)
