"""Mixtral (transformers MixtralForCausalLM): GQA with rotate-half RoPE, every block a softmax
top-k MoE (softmax over all experts, top-k renormalised), no shared experts. Checkpoints keep
experts as ``block_sparse_moe.experts.{j}.w1/w3/w2``."""

from typing import Any

from torchmoe.config.schema import JobConfig
from torchmoe.models.hf.adapter import HFAdapter
from torchmoe.models.hf.common import (decoder_rules, expressible, get, gqa_rules, job,
                                       moe_rules, require, rope_to_hf, rope_to_job)
from torchmoe.models.hf.mapping import Rule
from torchmoe.models.moe.from_config import balance_coeffs

ARCHITECTURE = "MixtralForCausalLM"
# What MixtralForCausalLM always does, as torchmoe keys.
FIXED = {"model.n_dense_layers": 0, "moe.layer_freq": [1], "moe.router_score_function": "softmax",
         "moe.router_pre_softmax": True, "moe.router_norm_topk_prob": True,
         "moe.router_topk_scaling_factor": 1.0, "moe.router_num_groups": 0,
         "moe.router_group_topk": 0, "moe.enable_expert_bias": False,
         "moe.shared_expert_intermediate_size": 0}


def to_job(hf: dict) -> dict[str, dict[str, Any]]:
    require(hf, "hidden_act", ("silu",), "silu", "experts are SwiGLU")
    require(hf, "sliding_window", (None,), None, "attention is full causal")
    heads = get(hf, "num_attention_heads")
    coeff = get(hf, "router_aux_loss_coef", 0.0)
    return job({"vocab_size": get(hf, "vocab_size"), "dim": get(hf, "hidden_size"),
                "n_layers": get(hf, "num_hidden_layers"), "n_heads": heads,
                "n_kv_heads": get(hf, "num_key_value_heads", None) or heads,
                "head_dim": get(hf, "head_dim", None) or get(hf, "hidden_size") // heads,
                "norm_eps": get(hf, "rms_norm_eps"), **rope_to_job(hf, allow_yarn=False)},
               {"num_experts": get(hf, "num_local_experts"),
                "router_topk": get(hf, "num_experts_per_tok"),
                "ffn_hidden_size": get(hf, "intermediate_size"),
                "load_balancing_type": ["aux_loss" if coeff else "none"],
                "aux_loss_coeff": [coeff], "input_jitter_eps": get(hf, "router_jitter_noise", 0.0)},
               FIXED)


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    expressible(cfg, FIXED, ARCHITECTURE)
    m, e = cfg.model, cfg.moe
    return {"vocab_size": m.vocab_size, "hidden_size": m.dim, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
            "head_dim": m.head_dim, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
            "intermediate_size": e.ffn_hidden_size, "num_local_experts": e.num_experts,
            "num_experts_per_tok": e.router_topk,
            "router_aux_loss_coef": balance_coeffs(cfg).get("aux_loss", 0.0),
            "router_jitter_noise": e.input_jitter_eps, "sliding_window": None,
            "tie_word_embeddings": False, **rope_to_hf(cfg)}


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    return (decoder_rules() + gqa_rules(cfg.model.head_dim)
            + moe_rules("block_sparse_moe", ("w1", "w3", "w2")))


ADAPTER = HFAdapter("mixtral", "mixtral", ARCHITECTURE, to_job, to_hf_config, rules)
