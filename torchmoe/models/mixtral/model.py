"""Mixtral family: grouped-query attention and, in every block, 8 experts with top-2 softmax
routing (softmax over all experts, then the two weights renormalised, which equals Mixtral's
softmax over the two chosen logits) and a Switch-style auxiliary loss; no shared experts.

Rotary embeddings rotate adjacent channel pairs (as every torchmoe model does); importing
Hugging Face weights, whose rotation pairs channel i with i + head_dim / 2, permutes q/k rows.
"""

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.common.attention import GQA, GQAArgs
from torchmoe.models.common.rope import RopeArgs
from torchmoe.models.common.transformer import Decoder, TransformerBlock
from torchmoe.models.moe.from_config import moe_args, validate_moe
from torchmoe.models.moe.moe import MoE


def validate(cfg: JobConfig) -> None:
    """Cross-key checks of [model] and [moe] for this family."""
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = "
                          f"{m.n_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim = {m.head_dim} must be even (channels rotate in "
                          "pairs)")
    if m.n_dense_layers:
        raise ConfigError(f"model.n_dense_layers = {m.n_dense_layers}: every Mixtral block is "
                          "MoE; set it to 0")
    validate_moe(cfg)


def build_mixtral(cfg: JobConfig) -> Decoder:
    """The model for ``cfg``; call under ``torch.device("meta")`` to allocate nothing."""
    m = cfg.model
    attention = GQAArgs(dim=m.dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                        head_dim=m.head_dim, softmax_scale=m.head_dim ** -0.5)
    moe = moe_args(cfg)
    blocks = [TransformerBlock(GQA(attention), MoE(moe), m.dim, m.norm_eps)
              for _ in range(m.n_layers)]
    rope = RopeArgs(head_dim=m.head_dim, theta=m.rope_theta)
    return Decoder(m.vocab_size, m.dim, blocks, m.norm_eps, rope, cfg.training.seq_len)
