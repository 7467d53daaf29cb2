"""Mixtral (transformers MixtralForCausalLM): GQA with rotate-half RoPE, every block a softmax
top-k MoE (softmax over all experts, top-k renormalised), no shared experts. Checkpoints keep
experts as ``block_sparse_moe.experts.{j}.w1/w3/w2``. Balancing (transformers' aux loss
and jitter are not torchmoe's) is left to the flavor and recipe."""

from collections.abc import Collection
from typing import Any

from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.adapter import HFAdapter
from torchmoe.convert.hf.common import (
    expressible,
    get,
    gqa_to_hf,
    gqa_to_job,
    moe_blocks_are,
    require,
    with_fixed,
)
from torchmoe.convert.hf.mapping import Rule
from torchmoe.convert.hf.rules import decoder_rules, ffn_rules, gqa_rules

ARCHITECTURE = "MixtralForCausalLM"
# What MixtralForCausalLM always does, as torchmoe keys. (moe.router_pre_softmax may be either:
# renormalised top-k of the full softmax = softmax of the top-k logits.)
FIXED = {
    "moe.router_score_function": "softmax",
    "moe.router_norm_topk_prob": True,
    "moe.router_topk_scaling_factor": 1.0,
    "moe.router_num_groups": 0,
    "moe.router_group_topk": 0,
    "moe.enable_expert_bias": False,
    "moe.shared_expert_intermediate_size": 0,
    "model.mtp_num_layers": 0,
}


def to_job(hf: dict, names: Collection[str]) -> dict[str, dict[str, Any]]:
    require(hf, "sliding_window", (None,), None, "attention is full causal")
    return with_fixed(
        {
            "model": {**gqa_to_job(hf), "n_dense_layers": 0},
            "moe": {
                "num_experts": get(hf, "num_local_experts"),
                "router_topk": get(hf, "num_experts_per_tok"),
                "ffn_hidden_size": get(hf, "intermediate_size"),
                "layer_freq": [1],
                "router_pre_softmax": True,
            },
        },
        FIXED,
    )


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    expressible(cfg, FIXED, ARCHITECTURE)
    moe_blocks_are(cfg, [True] * cfg.model.n_layers, ARCHITECTURE, "every block")
    e = cfg.moe
    return {
        **gqa_to_hf(cfg),
        "intermediate_size": e.ffn_hidden_size,
        "num_local_experts": e.num_experts,
        "num_experts_per_tok": e.router_topk,
        "sliding_window": None,
    }


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    return (
        decoder_rules()
        + gqa_rules(cfg.model.head_dim)
        + ffn_rules("block_sparse_moe", ("w1", "w3", "w2"))
    )


ADAPTER = HFAdapter("mixtral", "mixtral", ARCHITECTURE, to_job, to_hf_config, rules)
