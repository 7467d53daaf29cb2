"""Qwen3-MoE (transformers Qwen3MoeForCausalLM): GQA with per-head q/k RMSNorm before
rotate-half RoPE, softmax top-k routing (renormalised when ``norm_topk_prob``), no shared
experts; blocks listed in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense
SwiGLUs of ``intermediate_size``, which torchmoe writes as an explicit ``moe.layer_freq``.
Balancing (transformers' aux loss is averaged over layers, torchmoe's summed) is left to the
flavor and recipe."""

from collections.abc import Collection
from typing import Any

from torchmoe.config.model_args import moe_layer_pattern
from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.adapter import HFAdapter
from torchmoe.convert.hf.common import expressible, get, gqa_to_hf, gqa_to_job, require, with_fixed
from torchmoe.convert.hf.mapping import Rule
from torchmoe.convert.hf.rules import decoder_rules, ffn_rules, gqa_rules

ARCHITECTURE = "Qwen3MoeForCausalLM"
# moe.router_pre_softmax = false (softmax of the top-k logits) matches only with renormalised
# weights (norm_topk_prob).
FIXED = {
    "moe.router_score_function": "softmax",
    "moe.router_topk_scaling_factor": 1.0,
    "moe.router_num_groups": 0,
    "moe.router_group_topk": 0,
    "moe.enable_expert_bias": False,
    "moe.shared_expert_intermediate_size": 0,
    "model.mtp_num_layers": 0,
}


def to_job(hf: dict, names: Collection[str]) -> dict[str, dict[str, Any]]:
    require(hf, "use_sliding_window", (False,), False, "attention is full causal")
    model = gqa_to_job(hf)
    step, dense = get(hf, "decoder_sparse_step", 1), get(hf, "mlp_only_layers", None) or []
    pattern = [i not in dense and (i + 1) % step == 0 for i in range(model["n_layers"])]
    return with_fixed(
        {
            "model": {**model, "n_dense_layers": 0, "inter_dim": get(hf, "intermediate_size")},
            "moe": {
                "num_experts": get(hf, ("num_experts", "num_local_experts")),
                "router_topk": get(hf, "num_experts_per_tok"),
                "ffn_hidden_size": get(hf, "moe_intermediate_size"),
                "router_norm_topk_prob": get(hf, "norm_topk_prob"),
                "router_pre_softmax": True,
                "layer_freq": [1] if all(pattern) else [int(p) for p in pattern],
            },
        },
        FIXED,
    )


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    e = cfg.moe
    expressible(
        cfg,
        FIXED if e.router_norm_topk_prob else {**FIXED, "moe.router_pre_softmax": True},
        ARCHITECTURE,
    )
    pattern = moe_layer_pattern(cfg)
    return {
        **gqa_to_hf(cfg),
        "attention_bias": False,
        "use_sliding_window": False,
        "intermediate_size": cfg.model.inter_dim,
        "moe_intermediate_size": e.ffn_hidden_size,
        "num_experts": e.num_experts,
        "num_experts_per_tok": e.router_topk,
        "norm_topk_prob": e.router_norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, is_moe in enumerate(pattern) if not is_moe],
    }


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    return decoder_rules() + gqa_rules(cfg.model.head_dim) + ffn_rules()


ADAPTER = HFAdapter("qwen3_moe", "qwen3_moe", ARCHITECTURE, to_job, to_hf_config, rules)
