"""DeepSeek-V3 (transformers DeepseekV3ForCausalLM): MLA, the first ``first_k_dense_replace``
blocks dense, then MoE with a sigmoid router, ``e_score_correction_bias`` as torchmoe's expert
bias, group-limited selection (group score: sum of its two best biased scores) and shared
experts. DeepSeek's checkpoints keep rotary channels as adjacent pairs (``rope_interleave``),
which is torchmoe's layout; with ``rope_interleave = false`` the rotary rows are permuted.

Multi-token prediction depth k is Hugging Face layer ``num_hidden_layers + k``: its block under
the usual layer names plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` (torchmoe
``mtp.{k}.norm``) and copies of the embedding (``embed_tokens``) and output head
(``shared_head.head``), which torchmoe shares with the main model: export writes them, import
reads the main model's. transformers itself does not run these layers."""

from collections.abc import Collection
from typing import Any

from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.adapter import HFAdapter
from torchmoe.convert.hf.common import expressible, get, mla_to_hf, mla_to_job, with_fixed
from torchmoe.convert.hf.mapping import Rule
from torchmoe.convert.hf.rules import decoder_rules, ffn_rules, mla_rules, relocate

ARCHITECTURE = "DeepseekV3ForCausalLM"
FIXED = {
    "moe.router_score_function": "sigmoid",
    "moe.router_pre_softmax": True,
    "moe.enable_expert_bias": True,
}


def _mtp_depth(names: Collection[str], n_layers: int) -> int:
    """How many layers past the decoder's the checkpoint holds (transformers' own
    save_pretrained writes none, whatever num_nextn_predict_layers says)."""
    prefixes = {".".join(n.split(".")[:3]) for n in names if n.startswith("model.layers.")}
    depth = 0
    while f"model.layers.{n_layers + depth}" in prefixes:
        depth += 1
    return depth


def to_job(hf: dict, names: Collection[str]) -> dict[str, dict[str, Any]]:
    values = mla_to_job(hf)
    groups = get(hf, "n_group") or 1
    values["model"]["mtp_num_layers"] = _mtp_depth(names, values["model"]["n_layers"])
    values["moe"].update(
        router_norm_topk_prob=get(hf, "norm_topk_prob"),
        router_num_groups=groups if groups > 1 else 0,
        router_group_topk=get(hf, "topk_group") if groups > 1 else 0,
    )
    return with_fixed(values, FIXED)


def to_hf_config(cfg: JobConfig) -> dict[str, Any]:
    expressible(cfg, FIXED, ARCHITECTURE)
    e = cfg.moe
    return {
        **mla_to_hf(cfg, ARCHITECTURE),
        "rope_interleave": True,
        "norm_topk_prob": e.router_norm_topk_prob,
        "n_group": e.router_num_groups or 1,
        "topk_group": e.router_group_topk or 1,
        "num_nextn_predict_layers": cfg.model.mtp_num_layers,
    }


def rules(cfg: JobConfig, hf: dict) -> list[Rule]:
    block = decoder_rules() + mla_rules(cfg, hf.get("rope_interleave", True)) + ffn_rules()
    mtp = []
    for k in range(cfg.model.mtp_num_layers):
        ours, layer = f"mtp.{k}.", f"model.layers.{cfg.model.n_layers + k}."
        mtp += [
            Rule(ours + "enorm.weight", layer + "enorm.weight"),
            Rule(ours + "hnorm.weight", layer + "hnorm.weight"),
            Rule(ours + "eh_proj.weight", layer + "eh_proj.weight"),
            Rule(ours + "norm.weight", layer + "shared_head.norm.weight"),
            Rule("tok_embeddings.weight", layer + "embed_tokens.weight", copy=True),
            Rule("output.weight", layer + "shared_head.head.weight", copy=True),
            *relocate(block, ours + "block.", layer),
        ]
    return mtp + block  # MTP first: its layer names would also match the block rules


ADAPTER = HFAdapter("deepseek_v3", "deepseek_v3", ARCHITECTURE, to_job, to_hf_config, rules)
