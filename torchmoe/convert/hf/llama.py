"""Llama (transformers LlamaForCausalLM): the dense GQA baseline, rotate-half RoPE. Tied
embeddings import as two tensors (torchmoe's output head is its own)."""

from collections.abc import Collection
from typing import Any

from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.adapter import HFAdapter
from torchmoe.convert.hf.common import expressible, get, gqa_to_hf, gqa_to_job, with_fixed
from torchmoe.convert.hf.mapping import Rule
from torchmoe.convert.hf.rules import decoder_rules, ffn_rules, gqa_rules

ARCHITECTURE = "LlamaForCausalLM"
FIXED = {"moe.num_experts": 0, "model.mtp_num_layers": 0}


def to_job(hf: dict, names: Collection[str]) -> dict[str, dict[str, Any]]:
    return with_fixed(
        {
            "model": {
                **gqa_to_job(hf),
                "n_dense_layers": 0,
                "inter_dim": get(hf, "intermediate_size"),
            }
        },
        FIXED,
    )


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    expressible(cfg, FIXED, ARCHITECTURE)
    return {
        **gqa_to_hf(cfg),
        "attention_bias": False,
        "mlp_bias": False,
        "intermediate_size": cfg.model.inter_dim,
    }


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    return decoder_rules() + gqa_rules(cfg.model.head_dim) + ffn_rules()


ADAPTER = HFAdapter("llama", "llama", ARCHITECTURE, to_job, to_hf_config, rules)
