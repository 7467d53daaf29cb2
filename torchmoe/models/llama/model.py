"""Llama family: grouped-query attention and dense SwiGLU blocks (Llama 3). It is also the GQA
decoder Mixtral and Qwen3-MoE build on: blocks that ``moe_layer_pattern`` selects (none while
``moe.num_experts = 0``) get an MoE layer instead of the dense SwiGLU.

Rotary embeddings rotate adjacent channel pairs (as every torchmoe model does); importing
Hugging Face weights, whose rotation pairs channel i with i + head_dim / 2, permutes the q/k
rows of each head (and, with q/k norms, their weights alike).
"""

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.common.attention import GQA, GQAArgs
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.common.rope import RopeArgs
from torchmoe.models.common.transformer import Decoder, TransformerBlock
from torchmoe.models.deepseek_v3.model import validate_mtp
from torchmoe.models.moe.from_config import moe_args, moe_layer_pattern, validate_moe
from torchmoe.models.moe.moe import MoE


def validate(cfg: JobConfig) -> None:
    """Cross-key checks of [model] and [moe] for GQA families."""
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = {m.n_heads}"
        )
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim = {m.head_dim} must be even (channels rotate in pairs)")
    validate_mtp(cfg)
    validate_moe(cfg)


def build_gqa_decoder(cfg: JobConfig, qk_norm: bool = False) -> Decoder:
    """The GQA model for ``cfg`` (``qk_norm``: per-head q/k RMSNorm, as Qwen3); call under
    ``torch.device("meta")`` to allocate nothing."""
    m = cfg.model
    attention = GQAArgs(
        dim=m.dim,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        softmax_scale=m.head_dim**-0.5,
        qk_norm=qk_norm,
        norm_eps=m.norm_eps,
    )
    moe = moe_args(cfg)

    def block(is_moe: bool) -> TransformerBlock:
        ffn = MoE(moe) if is_moe else FeedForward(m.dim, m.inter_dim)
        return TransformerBlock(GQA(attention), ffn, m.dim, m.norm_eps)

    pattern = moe_layer_pattern(cfg)
    rope = RopeArgs(head_dim=m.head_dim, theta=m.rope_theta)
    return Decoder(
        m.vocab_size,
        m.dim,
        [block(is_moe) for is_moe in pattern],
        m.norm_eps,
        rope,
        cfg.training.seq_len,
        mtp_blocks=[block(pattern[-1]) for _ in range(m.mtp_num_layers)],
        mtp_loss_scale=m.mtp_loss_scale,
    )


def build_llama(cfg: JobConfig) -> Decoder:
    """The Llama model for ``cfg``; call under ``torch.device("meta")`` to allocate nothing."""
    return build_gqa_decoder(cfg)
