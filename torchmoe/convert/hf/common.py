"""config.json <-> [model]/[moe] pieces every family shares: reading values, refusing what
torchmoe cannot reproduce (import) or the Hugging Face class cannot express (export), RoPE
settings, and the keys of GQA and MLA models."""

from typing import Any

from torchmoe.config.errors import ConfigError
from torchmoe.config.model_args import moe_layer_pattern
from torchmoe.config.schema import JobConfig

_REQUIRED = object()


def get(hf: dict, key: str | tuple[str, ...], default: Any = _REQUIRED) -> Any:
    """``hf[key]`` (None included), or the first of several names present (transformers
    renames some keys, e.g. Qwen3-MoE's num_experts -> num_local_experts); a missing key
    without a default is a ConfigError."""
    for k in (key,) if isinstance(key, str) else key:
        if k in hf:
            return hf[k]
    if default is _REQUIRED:
        name = key if isinstance(key, str) else key[0]
        raise ConfigError(f"config.json: '{name}' is missing; it is needed to build the model")
    return default


def with_fixed(
    values: dict[str, dict[str, Any]], fixed: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """[model] and [moe] ``values`` plus the ``fixed`` ones ('section.key' -> value)."""
    out = {section: dict(values.get(section, {})) for section in ("model", "moe")}
    for dotted, value in fixed.items():
        section, key = dotted.split(".")
        out[section][key] = value
    return out


def require(hf: dict, key: str, allowed: tuple, default: Any, why: str) -> None:
    """Refuse a config.json value torchmoe cannot reproduce (a missing key takes Hugging
    Face's ``default``)."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ConfigError(
            f"config.json: {key} = {value!r} is not supported ({why}); "
            f"torchmoe reproduces only {key} = "
            f"{' or '.join(repr(a) for a in allowed)}"
        )


def expressible(cfg: JobConfig, fixed: dict[str, Any], architecture: str) -> None:
    """Export check: keys whose value the Hugging Face class cannot change."""
    for dotted, value in fixed.items():
        section, key = dotted.split(".")
        have = getattr(getattr(cfg, section), key)
        if have != value:
            raise ConfigError(
                f"{dotted} = {have!r} cannot be expressed as {architecture} "
                f"(it always uses {value!r}); export a model trained with "
                f"{dotted} = {value!r}"
            )


def moe_blocks_are(cfg: JobConfig, expected: list[bool], architecture: str, rule: str) -> None:
    """Export check: the blocks that are MoE must be those ``architecture`` makes MoE."""
    have = moe_layer_pattern(cfg)
    if have != expected:
        raise ConfigError(
            f"model.n_dense_layers = {cfg.model.n_dense_layers} and "
            f"moe.layer_freq = {cfg.moe.layer_freq} make blocks "
            f"{[i for i, x in enumerate(have) if x]} MoE; {architecture} "
            f"makes {rule} MoE"
        )


def rope_to_job(hf: dict, allow_yarn: bool) -> dict[str, Any]:
    """[model] RoPE keys from config.json (``rope_parameters``, or the older top-level
    ``rope_theta`` + ``rope_scaling``)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(
            f"config.json: partial_rotary_factor = "
            f"{params['partial_rotary_factor']} is not supported; torchmoe "
            "rotates the whole rotary head dim"
        )
    if kind == "default":
        return {"rope_theta": float(theta), "rope_factor": 1.0}
    if kind != "yarn" or not allow_yarn:
        raise ConfigError(
            f"config.json: rope type {kind!r} is not supported for this model; "
            f"torchmoe implements {'default and yarn' if allow_yarn else 'default'}"
            " RoPE"
        )
    return {"rope_theta": float(theta), **_yarn_to_job(hf, params)}


def _yarn_to_job(hf: dict, p: dict) -> dict[str, Any]:
    """YaRN as DeepSeek uses it: cos/sin unscaled (Hugging Face's attention_factor 1, which
    mscale == mscale_all_dim gives) and the softmax scale multiplied by mscale(mscale_all_dim)^2."""
    factor = p.get("factor")
    if factor is None:
        raise ConfigError("config.json: rope_parameters.factor is missing; YaRN needs it")
    if not p.get("truncate", True):
        raise ConfigError(
            "config.json: rope_parameters.truncate = false is not supported; "
            "torchmoe rounds the YaRN correction range outwards"
        )
    m, m_all, att = p.get("mscale"), p.get("mscale_all_dim"), p.get("attention_factor")
    if not (att == 1.0 if att is not None else (m and m_all and m == m_all)):
        raise ConfigError(
            f"config.json: rope_parameters mscale = {m}, mscale_all_dim = {m_all}"
            f", attention_factor = {att} scale cos/sin, which torchmoe does not; "
            "it needs mscale == mscale_all_dim (or attention_factor = 1)"
        )
    original = p.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return {
        "rope_factor": float(factor),
        "rope_original_seq_len": int(original),
        "rope_beta_fast": float(p.get("beta_fast") or 32.0),
        "rope_beta_slow": float(p.get("beta_slow") or 1.0),
        "rope_mscale": float(m_all or 0.0),
    }


def rope_to_hf(cfg: JobConfig, yarn: bool) -> dict[str, Any]:
    """config.json ``rope_parameters`` and ``max_position_embeddings`` for cfg's RoPE (``yarn``:
    the family builds YaRN from the model.rope_* keys)."""
    m = cfg.model
    if not yarn or m.rope_factor == 1.0:
        params = {"rope_type": "default", "rope_theta": m.rope_theta}
        longest = cfg.training.seq_len
    else:
        params = {
            "rope_type": "yarn",
            "rope_theta": m.rope_theta,
            "factor": m.rope_factor,
            "original_max_position_embeddings": m.rope_original_seq_len,
            "beta_fast": m.rope_beta_fast,
            "beta_slow": m.rope_beta_slow,
            "mscale": m.rope_mscale,
            "mscale_all_dim": m.rope_mscale,
            "attention_factor": 1.0,
        }
        longest = max(cfg.training.seq_len, int(m.rope_original_seq_len * m.rope_factor))
    return {"rope_parameters": params, "max_position_embeddings": longest}


def gqa_to_job(hf: dict) -> dict[str, Any]:
    """[model] keys of a GQA model (Llama, Mixtral, Qwen3)."""
    require(hf, "hidden_act", ("silu",), "silu", "feed-forward layers are SwiGLU")
    require(hf, "attention_bias", (False,), False, "projections have no bias")
    require(hf, "mlp_bias", (False,), False, "projections have no bias")
    heads, dim = get(hf, "num_attention_heads"), get(hf, "hidden_size")
    return {
        "vocab_size": get(hf, "vocab_size"),
        "dim": dim,
        "n_layers": get(hf, "num_hidden_layers"),
        "n_heads": heads,
        "n_kv_heads": get(hf, "num_key_value_heads", None) or heads,
        "head_dim": get(hf, "head_dim", None) or dim // heads,
        "norm_eps": get(hf, "rms_norm_eps"),
        **rope_to_job(hf, allow_yarn=False),
    }


def gqa_to_hf(cfg: JobConfig) -> dict[str, Any]:
    m = cfg.model
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **rope_to_hf(cfg, yarn=False),
    }


def mla_to_job(hf: dict) -> dict[str, dict[str, Any]]:
    """[model] and [moe] keys of a DeepSeek-V2/V3 model, router semantics aside."""
    require(hf, "hidden_act", ("silu",), "silu", "feed-forward layers are SwiGLU")
    require(hf, "attention_bias", (False,), False, "projections have no bias")
    require(hf, "mlp_bias", (False,), False, "projections have no bias")
    require(
        hf,
        "rms_norm_eps",
        (1e-6,),
        1e-6,
        "transformers normalises the MLA latents with "
        "eps 1e-6 whatever it says, torchmoe with model.norm_eps",
    )
    ffn = get(hf, "moe_intermediate_size")
    model = {
        "vocab_size": get(hf, "vocab_size"),
        "dim": get(hf, "hidden_size"),
        "n_layers": get(hf, "num_hidden_layers"),
        "n_dense_layers": get(hf, "first_k_dense_replace"),
        "n_heads": get(hf, "num_attention_heads"),
        "inter_dim": get(hf, "intermediate_size"),
        "q_lora_rank": get(hf, "q_lora_rank") or 0,
        "kv_lora_rank": get(hf, "kv_lora_rank"),
        "qk_nope_head_dim": get(hf, "qk_nope_head_dim"),
        "qk_rope_head_dim": get(hf, "qk_rope_head_dim"),
        "v_head_dim": get(hf, "v_head_dim"),
        "norm_eps": get(hf, "rms_norm_eps"),
        **rope_to_job(hf, allow_yarn=True),
    }
    moe = {
        "num_experts": get(hf, "n_routed_experts"),
        "router_topk": get(hf, "num_experts_per_tok"),
        "ffn_hidden_size": ffn,
        "shared_expert_intermediate_size": ffn * get(hf, "n_shared_experts"),
        "router_topk_scaling_factor": get(hf, "routed_scaling_factor"),
        "layer_freq": [1],
    }
    return {"model": model, "moe": moe}


def mla_to_hf(cfg: JobConfig, architecture: str) -> dict[str, Any]:
    m, e = cfg.model, cfg.moe
    expressible(cfg, {"model.norm_eps": 1e-6}, architecture)  # its MLA latent norms' eps
    moe_blocks_are(
        cfg,
        [i >= m.n_dense_layers for i in range(m.n_layers)],
        architecture,
        f"the blocks from first_k_dense_replace = {m.n_dense_layers} on",
    )
    if e.shared_expert_intermediate_size % e.ffn_hidden_size:
        raise ConfigError(
            f"moe.shared_expert_intermediate_size = "
            f"{e.shared_expert_intermediate_size} must be a multiple of "
            f"moe.ffn_hidden_size = {e.ffn_hidden_size} for {architecture} "
            "(n_shared_experts experts of that size)"
        )
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "first_k_dense_replace": m.n_dense_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "intermediate_size": m.inter_dim,
        "q_lora_rank": m.q_lora_rank or None,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "n_routed_experts": e.num_experts,
        "num_experts_per_tok": e.router_topk,
        "moe_intermediate_size": e.ffn_hidden_size,
        "n_shared_experts": e.shared_expert_intermediate_size // e.ffn_hidden_size,
        "routed_scaling_factor": e.router_topk_scaling_factor,
        "tie_word_embeddings": False,
        **rope_to_hf(cfg, yarn=True),
    }
