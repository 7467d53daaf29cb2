"""Name rules shared by the families: decoder skeleton, GQA, MLA, SwiGLU and MoE layers.

torchmoe names (see models/common and models/moe): ``tok_embeddings``, ``layers.{i}.
{attention_norm, attention, ffn_norm, feed_forward}``, ``norm``, ``output``; MoE layers hold
``router.gate.weight`` [E, D], ``router.expert_bias`` [E], ``experts.w13`` [E, 2, F, D]
(gate, up), ``experts.w2`` [E, D, F] and ``shared_experts.w1/w2/w3``; MTP depth k holds
``mtp.{k}.enorm/hnorm/eh_proj/norm`` and a block ``mtp.{k}.block.*``.
"""

from dataclasses import replace

import torch

from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.mapping import Rule
from torchmoe.convert.hf.rope import halves_to_pairs, on_rope_tail, pairs_to_halves


def relocate(rules: list[Rule], ours: str, hf: str) -> list[Rule]:
    """The block rules (``layers.{layer}.*``) moved under the prefixes ``ours`` and ``hf``."""
    return [
        replace(
            r,
            ours=r.ours.replace("layers.{layer}.", ours, 1),
            hf=r.hf.replace("model.layers.{layer}.", hf, 1),
        )
        for r in rules
        if r.ours.startswith("layers.{layer}.")
    ]


def decoder_rules() -> list[Rule]:
    """Embedding, block norms, final norm and output head."""
    return [
        Rule("tok_embeddings.weight", "model.embed_tokens.weight"),
        Rule("norm.weight", "model.norm.weight"),
        Rule("output.weight", "lm_head.weight"),
        Rule("layers.{layer}.attention_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
        Rule(
            "layers.{layer}.ffn_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"
        ),
    ]


def gqa_rules(head_dim: int) -> list[Rule]:
    """GQA with rotate-half RoPE on the Hugging Face side: q/k rows and the per-head q/k norm
    weights (Qwen3) permuted to torchmoe's adjacent pairs."""

    def imp(w: torch.Tensor) -> torch.Tensor:
        return halves_to_pairs(w, head_dim)

    def exp(w: torch.Tensor) -> torch.Tensor:
        return pairs_to_halves(w, head_dim)

    a, h = "layers.{layer}.attention.", "model.layers.{layer}.self_attn."
    return [
        Rule(a + "wq.weight", h + "q_proj.weight", exp, imp),
        Rule(a + "wk.weight", h + "k_proj.weight", exp, imp),
        Rule(a + "wv.weight", h + "v_proj.weight"),
        Rule(a + "wo.weight", h + "o_proj.weight"),
        Rule(a + "q_norm.weight", h + "q_norm.weight", exp, imp),
        Rule(a + "k_norm.weight", h + "k_norm.weight", exp, imp),
    ]


def mla_rules(cfg: JobConfig, interleaved: bool) -> list[Rule]:
    """MLA; ``interleaved`` = the checkpoint's rotary channels are already adjacent pairs
    (DeepSeek's own layout), otherwise the rotary rows are permuted like GQA's."""
    m = cfg.model
    r, qk = m.qk_rope_head_dim, m.qk_nope_head_dim + m.qk_rope_head_dim
    a, h = "layers.{layer}.attention.", "model.layers.{layer}.self_attn."

    def rotary(group: int) -> tuple:
        if interleaved:
            return ()
        return (
            lambda w: on_rope_tail(w, group, r, pairs_to_halves),
            lambda w: on_rope_tail(w, group, r, halves_to_pairs),
        )

    return [
        Rule(a + "wq.weight", h + "q_proj.weight", *rotary(qk)),
        Rule(a + "wq_a.weight", h + "q_a_proj.weight"),
        Rule(a + "q_norm.weight", h + "q_a_layernorm.weight"),
        Rule(a + "wq_b.weight", h + "q_b_proj.weight", *rotary(qk)),
        Rule(a + "wkv_a.weight", h + "kv_a_proj_with_mqa.weight", *rotary(m.kv_lora_rank + r)),
        Rule(a + "kv_norm.weight", h + "kv_a_layernorm.weight"),
        Rule(a + "wkv_b.weight", h + "kv_b_proj.weight"),
        Rule(a + "wo.weight", h + "o_proj.weight"),
    ]


def swiglu_rules(
    ours: str, hf: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> list[Rule]:
    """A FeedForward (w1 gate, w3 up, w2 down) under prefix ``ours`` <-> ``hf``."""
    return [
        Rule(f"{ours}.{w}.weight", f"{hf}.{n}.weight") for w, n in zip(("w1", "w3", "w2"), names)
    ]


def ffn_rules(
    hf_block: str = "mlp", experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> list[Rule]:
    """Dense SwiGLU blocks, and MoE blocks: router gate and bias, per-expert SwiGLUs <-> grouped
    tensors, shared experts (``hf_block``: the MoE module's Hugging Face name)."""
    ours, hf = "layers.{layer}.feed_forward", "model.layers.{layer}." + hf_block
    return (
        swiglu_rules(ours, "model.layers.{layer}.mlp")
        + [
            Rule(f"{ours}.router.gate.weight", f"{hf}.gate.weight"),
            Rule(f"{ours}.router.expert_bias", f"{hf}.gate.e_score_correction_bias"),
        ]
        + [
            Rule(f"{ours}.experts.w13", f"{hf}.experts.{{expert}}.{n}.weight", part=part)
            for part, n in enumerate(experts[:2])
        ]
        + [Rule(f"{ours}.experts.w2", f"{hf}.experts.{{expert}}.{experts[2]}.weight")]
        + swiglu_rules(f"{ours}.shared_experts", f"{hf}.shared_experts")
    )
