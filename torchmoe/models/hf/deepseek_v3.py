"""DeepSeek-V3 (transformers DeepseekV3ForCausalLM): MLA, the first ``first_k_dense_replace``
blocks dense, then MoE with a sigmoid router, ``e_score_correction_bias`` as torchmoe's expert
bias, group-limited selection (group score: sum of its two best biased scores) and shared
experts. DeepSeek's checkpoints keep rotary channels as adjacent pairs (``rope_interleave``),
which is torchmoe's layout; with ``rope_interleave = false`` the rotary rows are permuted."""

from typing import Any

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.hf.adapter import HFAdapter
from torchmoe.models.hf.common import (decoder_rules, dense_mlp_rules, expressible, get, job,
                                       mla_rules, moe_rules, require, rope_to_hf, rope_to_job)
from torchmoe.models.hf.mapping import Rule

ARCHITECTURE = "DeepseekV3ForCausalLM"
FIXED = {"moe.layer_freq": [1], "moe.router_score_function": "sigmoid",
         "moe.router_pre_softmax": True, "moe.enable_expert_bias": True}


def to_job(hf: dict) -> dict[str, dict[str, Any]]:
    require(hf, "hidden_act", ("silu",), "silu", "feed-forward layers are SwiGLU")
    require(hf, "attention_bias", (False,), False, "projections have no bias")
    groups = get(hf, "n_group") or 1
    ffn = get(hf, "moe_intermediate_size")
    return job({"vocab_size": get(hf, "vocab_size"), "dim": get(hf, "hidden_size"),
                "n_layers": get(hf, "num_hidden_layers"),
                "n_dense_layers": get(hf, "first_k_dense_replace"),
                "n_heads": get(hf, "num_attention_heads"),
                "inter_dim": get(hf, "intermediate_size"),
                "q_lora_rank": get(hf, "q_lora_rank") or 0, "kv_lora_rank": get(hf, "kv_lora_rank"),
                "qk_nope_head_dim": get(hf, "qk_nope_head_dim"),
                "qk_rope_head_dim": get(hf, "qk_rope_head_dim"),
                "v_head_dim": get(hf, "v_head_dim"), "norm_eps": get(hf, "rms_norm_eps"),
                **rope_to_job(hf, allow_yarn=True)},
               {"num_experts": get(hf, "n_routed_experts"),
                "router_topk": get(hf, "num_experts_per_tok"), "ffn_hidden_size": ffn,
                "shared_expert_intermediate_size": ffn * get(hf, "n_shared_experts"),
                "router_norm_topk_prob": get(hf, "norm_topk_prob"),
                "router_topk_scaling_factor": get(hf, "routed_scaling_factor"),
                "router_num_groups": groups if groups > 1 else 0,
                "router_group_topk": get(hf, "topk_group") if groups > 1 else 0},
               FIXED)


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    expressible(cfg, FIXED, ARCHITECTURE)
    m, e = cfg.model, cfg.moe
    if e.shared_expert_intermediate_size % e.ffn_hidden_size:
        raise ConfigError(f"moe.shared_expert_intermediate_size = "
                          f"{e.shared_expert_intermediate_size} must be a multiple of "
                          f"moe.ffn_hidden_size = {e.ffn_hidden_size} for {ARCHITECTURE} "
                          "(n_shared_experts experts of that size)")
    return {"vocab_size": m.vocab_size, "hidden_size": m.dim, "num_hidden_layers": m.n_layers,
            "first_k_dense_replace": m.n_dense_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_heads, "intermediate_size": m.inter_dim,
            "q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
            "attention_bias": False, "rope_interleave": True,
            "n_routed_experts": e.num_experts, "num_experts_per_tok": e.router_topk,
            "moe_intermediate_size": e.ffn_hidden_size,
            "n_shared_experts": e.shared_expert_intermediate_size // e.ffn_hidden_size,
            "norm_topk_prob": e.router_norm_topk_prob,
            "routed_scaling_factor": e.router_topk_scaling_factor,
            "n_group": e.router_num_groups or 1, "topk_group": e.router_group_topk or 1,
            "num_nextn_predict_layers": m.mtp_num_layers, "tie_word_embeddings": False,
            **rope_to_hf(cfg)}


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    interleaved = hf.get("rope_interleave", True)
    return decoder_rules() + mla_rules(cfg, interleaved) + dense_mlp_rules() + moe_rules()


ADAPTER = HFAdapter("deepseek_v3", "deepseek_v3", ARCHITECTURE, to_job, to_hf_config, rules)
