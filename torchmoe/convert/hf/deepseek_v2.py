"""DeepSeek-V2 (transformers DeepseekV2ForCausalLM, e.g. DeepSeek-V2-Lite): MLA like V3, with a
softmax router: top-k of the softmax over all experts (``greedy``) or within the
``topk_group`` groups of best maximum score (``group_limited_greedy``), weights times
``routed_scaling_factor`` and never renormalised (transformers ignores ``norm_topk_prob``
here), no expert bias. Rotary channels are adjacent pairs, as in torchmoe. Balancing is left
to the family's flavor (V2: a per-sequence auxiliary loss)."""

from collections.abc import Collection
from typing import Any

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.adapter import HFAdapter
from torchmoe.convert.hf.common import expressible, get, mla_to_hf, mla_to_job, with_fixed
from torchmoe.convert.hf.mapping import Rule
from torchmoe.convert.hf.rules import decoder_rules, ffn_rules, mla_rules

ARCHITECTURE = "DeepseekV2ForCausalLM"
FIXED = {
    "moe.router_score_function": "softmax",
    "moe.router_pre_softmax": True,
    "moe.router_norm_topk_prob": False,
    "moe.enable_expert_bias": False,
    "model.mtp_num_layers": 0,
}


def to_job(hf: dict, names: Collection[str]) -> dict[str, dict[str, Any]]:
    values = mla_to_job(hf)
    method, groups = get(hf, "topk_method", "greedy"), get(hf, "n_group", None) or 1
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(
            f"config.json: topk_method = {method!r} is not supported; "
            f"{ARCHITECTURE} implements 'greedy' and 'group_limited_greedy'"
        )
    grouped = method == "group_limited_greedy" and groups > 1
    values["moe"].update(
        router_num_groups=groups if grouped else 0,
        router_group_topk=get(hf, "topk_group") if grouped else 0,
    )
    return with_fixed(values, FIXED)


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    expressible(cfg, FIXED, ARCHITECTURE)
    e = cfg.moe
    return {
        **mla_to_hf(cfg, ARCHITECTURE),
        "norm_topk_prob": False,
        "topk_method": "group_limited_greedy" if e.router_num_groups else "greedy",
        "n_group": e.router_num_groups or 1,
        "topk_group": e.router_group_topk or 1,
    }


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    return decoder_rules() + mla_rules(cfg, interleaved=True) + ffn_rules()


ADAPTER = HFAdapter("deepseek_v2", "deepseek_v2", ARCHITECTURE, to_job, to_hf_config, rules)
