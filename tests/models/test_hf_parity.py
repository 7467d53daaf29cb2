"""Hugging Face parity: a tiny random transformers model, converted by torchmoe's import code,
gives the same logits in torchmoe (attention, RoPE layout, router semantics, experts).

The tiny models are built here and reused by tests/scripts/test_convert_hf.py."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchmoe.config.load import build_config  # noqa: E402
from torchmoe.config.registry import build_model  # noqa: E402
from torchmoe.convert.hf.convert import config_from_hf, read_hf  # noqa: E402

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    rms_norm_eps=1e-6,
    initializer_range=0.05,
    tie_word_embeddings=False,
)

TINY = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    # q low-rank, group-limited routing, routed scaling, two shared experts, one dense block
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_interleave=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        ),
    ),
    # no q low-rank, rotate-half RoPE (rope_interleave false), YaRN, no groups, no renorm
    "deepseek_v3_yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_interleave=False,
            max_position_embeddings=32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        ),
    ),
    # q/k norms; block 1 dense (mlp_only_layers), so an explicit moe.layer_freq
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    # dense, tied embeddings (save_pretrained writes no lm_head)
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        ),
    ),
    # softmax router, group-limited greedy, unnormalised weights x routed scaling, YaRN
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            q_lora_rank=None,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            max_position_embeddings=32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        ),
    ),
}


@torch.no_grad()
def tiny_hf(case: str, seed: int = 0, **overrides):
    """A random float32 transformers model of ``case`` (config keys ``overrides`` changed);
    norms and expert biases are random too, so a swapped or dropped tensor shows in the
    logits."""
    config_cls, model_cls, kwargs = TINY[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**_COMMON, **kwargs, **overrides})
    model = getattr(transformers, model_cls)._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            t.copy_(1 + 0.2 * torch.randn_like(t))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.05 * torch.randn_like(t))
    return model.eval()


def torchmoe_from_hf(hf_dir: Path, family: str | None = None):
    cfg, _, state = read_hf(hf_dir, family)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return cfg, model.eval()


def assert_same_logits(ours_model, hf_model, vocab: int, seed: int = 1) -> None:
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = ours_model(tokens), hf_model(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("case", list(TINY))
def test_logits_match_transformers(case, tmp_path):
    hf_model = tiny_hf(case)
    hf_model.save_pretrained(tmp_path)
    cfg, model = torchmoe_from_hf(tmp_path)
    assert cfg.model.name == case.split("_yarn")[0]
    assert_same_logits(model, hf_model, cfg.model.vocab_size)


# config.json of released models (the keys the converter reads; older files keep rope_theta
# and rope_scaling at the top level), and the torchmoe flavor each must land on.
_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
}
_MLA = dict(
    hidden_act="silu",
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=10000,
)
RELEASED = {
    "deepseek-ai/DeepSeek-V3": (
        "deepseek_v3",
        "671B",
        dict(
            _MLA,
            model_type="deepseek_v3",
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            first_k_dense_replace=3,
            num_attention_heads=128,
            q_lora_rank=1536,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_scaling=dict(_YARN, mscale=1.0, mscale_all_dim=1.0),
        ),
    ),
    "deepseek-ai/DeepSeek-V2-Lite": (
        "deepseek_v2",
        "lite",
        dict(
            _MLA,
            model_type="deepseek_v2",
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            first_k_dense_replace=1,
            num_attention_heads=16,
            q_lora_rank=None,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_scaling=dict(_YARN, mscale=0.707, mscale_all_dim=0.707),
        ),
    ),
    "mistralai/Mixtral-8x7B-v0.1": (
        "mixtral",
        "8x7B",
        dict(
            model_type="mixtral",
            hidden_act="silu",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            sliding_window=None,
        ),
    ),
    "Qwen/Qwen3-30B-A3B": (
        "qwen3_moe",
        "30B-A3B",
        dict(
            model_type="qwen3_moe",
            hidden_act="silu",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            rope_scaling=None,
            use_sliding_window=False,
        ),
    ),
    "meta-llama/Meta-Llama-3-8B": (
        "llama",
        "8B",
        dict(
            model_type="llama",
            hidden_act="silu",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=5e5,
            rope_scaling=None,
        ),
    ),
}


@pytest.mark.parametrize("repo", list(RELEASED))
def test_released_configs_land_on_their_flavors(repo):
    family, flavor, hf = RELEASED[repo]
    cfg, values = config_from_hf(hf, names=[])
    assert (cfg.model.name, cfg.model.flavor) == (family, flavor)
    expected = build_config({"model": {"name": family, "flavor": flavor}}, [])
    for section in ("model", "moe"):
        for key in values[section]:
            assert getattr(getattr(cfg, section), key) == getattr(
                getattr(expected, section), key
            ), f"{section}.{key}"
