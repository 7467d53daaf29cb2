"""Pieces every family shares: reading config.json values, RoPE settings both ways, and the
name rules of the decoder skeleton, GQA, MLA, SwiGLU and MoE layers.

torchmoe names (see models/common and models/moe): ``tok_embeddings``, ``layers.{i}.
{attention_norm, attention, ffn_norm, feed_forward}``, ``norm``, ``output``; MoE layers hold
``router.gate.weight`` [E, D], ``router.expert_bias`` [E], ``experts.w1/w3`` [E, F, D],
``experts.w2`` [E, D, F] and ``shared_experts.w1/w2/w3``.
"""

from typing import Any

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.hf.mapping import Rule
from torchmoe.models.hf.rope import halves_to_pairs, on_rope_tail, pairs_to_halves

_REQUIRED = object()


def get(hf: dict, key: str, default: Any = _REQUIRED) -> Any:
    """``hf[key]`` (None included); a missing key without a default is a ConfigError."""
    if key in hf:
        return hf[key]
    if default is _REQUIRED:
        raise ConfigError(f"config.json: '{key}' is missing; it is needed to build the model")
    return default


def job(model: dict[str, Any], moe: dict[str, Any], fixed: dict[str, Any]
        ) -> dict[str, dict[str, Any]]:
    """[model] and [moe] values, plus the ``fixed`` ones ('section.key' -> value)."""
    out = {"model": dict(model), "moe": dict(moe)}
    for dotted, value in fixed.items():
        section, key = dotted.split(".")
        out[section][key] = value
    return out


def require(hf: dict, key: str, allowed: tuple, default: Any, why: str) -> None:
    """Refuse a config.json value torchmoe cannot reproduce (a missing key takes Hugging
    Face's ``default``)."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ConfigError(f"config.json: {key} = {value!r} is not supported ({why}); "
                          f"torchmoe reproduces only {key} = "
                          f"{' or '.join(repr(a) for a in allowed)}")


def expressible(cfg: JobConfig, fixed: dict[str, Any], architecture: str) -> None:
    """Export check: keys whose value the Hugging Face class cannot change."""
    for dotted, value in fixed.items():
        section, key = dotted.split(".")
        have = getattr(getattr(cfg, section), key)
        if have != value:
            raise ConfigError(f"{dotted} = {have!r} cannot be expressed as {architecture} "
                              f"(it always uses {value!r}); export a model trained with "
                              f"{dotted} = {value!r}")


def rope_to_job(hf: dict, allow_yarn: bool) -> dict[str, Any]:
    """[model] RoPE keys from config.json (``rope_parameters``, or the older top-level
    ``rope_theta`` + ``rope_scaling``)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor = "
                          f"{params['partial_rotary_factor']} is not supported; torchmoe "
                          "rotates the whole rotary head dim")
    if kind == "default":
        return {"rope_theta": float(theta), "rope_factor": 1.0}
    if kind != "yarn" or not allow_yarn:
        raise ConfigError(f"config.json: rope type {kind!r} is not supported for this model; "
                          f"torchmoe implements {'default and yarn' if allow_yarn else 'default'}"
                          " RoPE")
    return {"rope_theta": float(theta), **_yarn_to_job(hf, params)}


def _yarn_to_job(hf: dict, p: dict) -> dict[str, Any]:
    """YaRN as DeepSeek uses it: cos/sin unscaled (Hugging Face's attention_factor 1, which
    mscale == mscale_all_dim gives) and the softmax scale multiplied by mscale(mscale_all_dim)^2."""
    factor = p.get("factor")
    if factor is None:
        raise ConfigError("config.json: rope_parameters.factor is missing; YaRN needs it")
    if not p.get("truncate", True):
        raise ConfigError("config.json: rope_parameters.truncate = false is not supported; "
                          "torchmoe rounds the YaRN correction range outwards")
    m, m_all, att = p.get("mscale"), p.get("mscale_all_dim"), p.get("attention_factor")
    if not (att == 1.0 if att is not None else (m and m_all and m == m_all)):
        raise ConfigError(f"config.json: rope_parameters mscale = {m}, mscale_all_dim = {m_all}"
                          f", attention_factor = {att} scale cos/sin, which torchmoe does not; "
                          "it needs mscale == mscale_all_dim (or attention_factor = 1)")
    original = p.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return {"rope_factor": float(factor), "rope_original_seq_len": int(original),
            "rope_beta_fast": float(p.get("beta_fast") or 32.0),
            "rope_beta_slow": float(p.get("beta_slow") or 1.0),
            "rope_mscale": float(m_all or 0.0)}


def rope_to_hf(cfg: JobConfig) -> dict[str, Any]:
    """config.json ``rope_parameters`` and ``max_position_embeddings`` for cfg's RoPE."""
    m = cfg.model
    if m.rope_factor == 1.0:
        params = {"rope_type": "default", "rope_theta": m.rope_theta}
        longest = cfg.training.seq_len
    else:
        params = {"rope_type": "yarn", "rope_theta": m.rope_theta, "factor": m.rope_factor,
                  "original_max_position_embeddings": m.rope_original_seq_len,
                  "beta_fast": m.rope_beta_fast, "beta_slow": m.rope_beta_slow,
                  "mscale": m.rope_mscale, "mscale_all_dim": m.rope_mscale,
                  "attention_factor": 1.0}
        longest = max(cfg.training.seq_len, int(m.rope_original_seq_len * m.rope_factor))
    return {"rope_parameters": params, "max_position_embeddings": longest}


def decoder_rules() -> list[Rule]:
    """Embedding, block norms, final norm and output head."""
    return [Rule("tok_embeddings.weight", "model.embed_tokens.weight"),
            Rule("norm.weight", "model.norm.weight"),
            Rule("output.weight", "lm_head.weight"),
            Rule("layers.{layer}.attention_norm.weight",
                 "model.layers.{layer}.input_layernorm.weight"),
            Rule("layers.{layer}.ffn_norm.weight",
                 "model.layers.{layer}.post_attention_layernorm.weight")]


def gqa_rules(head_dim: int, qk_norm: bool = False) -> list[Rule]:
    """GQA with rotate-half RoPE on the Hugging Face side: q/k rows (and q/k norm weights)
    permuted to torchmoe's adjacent pairs."""
    def imp(w):
        return halves_to_pairs(w, head_dim)

    def exp(w):
        return pairs_to_halves(w, head_dim)

    a, h = "layers.{layer}.attention.", "model.layers.{layer}.self_attn."
    rules = [Rule(a + "wq.weight", h + "q_proj.weight", exp, imp),
             Rule(a + "wk.weight", h + "k_proj.weight", exp, imp),
             Rule(a + "wv.weight", h + "v_proj.weight"),
             Rule(a + "wo.weight", h + "o_proj.weight")]
    if qk_norm:
        rules += [Rule(a + "q_norm.weight", h + "q_norm.weight", exp, imp),
                  Rule(a + "k_norm.weight", h + "k_norm.weight", exp, imp)]
    return rules


def mla_rules(cfg: JobConfig, interleaved: bool) -> list[Rule]:
    """MLA; ``interleaved`` = the checkpoint's rotary channels are already adjacent pairs
    (DeepSeek's own layout), otherwise the rotary rows are permuted like GQA's."""
    m = cfg.model
    r, qk = m.qk_rope_head_dim, m.qk_nope_head_dim + m.qk_rope_head_dim
    kv_a = m.kv_lora_rank + r
    a, h = "layers.{layer}.attention.", "model.layers.{layer}.self_attn."

    def rotary(group: int) -> tuple:
        if interleaved:
            return ()
        return (lambda w: on_rope_tail(w, group, r, pairs_to_halves),
                lambda w: on_rope_tail(w, group, r, halves_to_pairs))

    q = ([Rule(a + "wq.weight", h + "q_proj.weight", *rotary(qk))] if m.q_lora_rank == 0 else
         [Rule(a + "wq_a.weight", h + "q_a_proj.weight"),
          Rule(a + "q_norm.weight", h + "q_a_layernorm.weight"),
          Rule(a + "wq_b.weight", h + "q_b_proj.weight", *rotary(qk))])
    return q + [Rule(a + "wkv_a.weight", h + "kv_a_proj_with_mqa.weight", *rotary(kv_a)),
                Rule(a + "kv_norm.weight", h + "kv_a_layernorm.weight"),
                Rule(a + "wkv_b.weight", h + "kv_b_proj.weight"),
                Rule(a + "wo.weight", h + "o_proj.weight")]


def swiglu_rules(ours: str, hf: str, names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                       "down_proj")
                 ) -> list[Rule]:
    """A FeedForward (w1 gate, w3 up, w2 down) under prefix ``ours`` <-> ``hf``."""
    return [Rule(f"{ours}.{w}.weight", f"{hf}.{n}.weight")
            for w, n in zip(("w1", "w3", "w2"), names)]


def moe_rules(hf_block: str = "mlp", experts: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                        "down_proj")
              ) -> list[Rule]:
    """Router gate and bias, per-expert SwiGLUs <-> grouped tensors, shared experts."""
    ours, hf = "layers.{layer}.feed_forward", "model.layers.{layer}." + hf_block
    return ([Rule(f"{ours}.router.gate.weight", f"{hf}.gate.weight"),
             Rule(f"{ours}.router.expert_bias", f"{hf}.gate.e_score_correction_bias")]
            + [Rule(f"{ours}.experts.{w}", f"{hf}.experts.{{expert}}.{n}.weight")
               for w, n in zip(("w1", "w3", "w2"), experts)]
            + swiglu_rules(f"{ours}.shared_experts", f"{hf}.shared_experts"))


def dense_mlp_rules() -> list[Rule]:
    """Dense SwiGLU blocks."""
    return swiglu_rules("layers.{layer}.feed_forward", "model.layers.{layer}.mlp")
