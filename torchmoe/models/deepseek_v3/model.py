"""DeepSeek-V3 family: MLA attention, the first ``n_dense_layers`` blocks dense SwiGLU, the rest
MoE with shared experts. Built from the job config's [model] and [moe] sections."""

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.common.attention import MLA, MLAArgs
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.common.rope import RopeArgs, yarn_softmax_mscale
from torchmoe.models.common.transformer import Decoder, TransformerBlock
from torchmoe.models.moe.from_config import moe_args, validate_moe
from torchmoe.models.moe.moe import MoE


def validate(cfg: JobConfig) -> None:
    """Cross-key checks of [model] and [moe] for this family."""
    m = cfg.model
    if m.n_dense_layers > m.n_layers:
        raise ConfigError(f"model.n_dense_layers = {m.n_dense_layers} exceeds model.n_layers = "
                          f"{m.n_layers}; lower it or add layers")
    if m.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim = {m.qk_rope_head_dim} must be even "
                          "(channels rotate in pairs)")
    validate_moe(cfg)


def rope_args(cfg: JobConfig) -> RopeArgs:
    """YaRN applies only when training beyond the original context, as in DeepSeek's code."""
    m = cfg.model
    extend = m.rope_factor > 1 and cfg.training.seq_len > m.rope_original_seq_len
    return RopeArgs(head_dim=m.qk_rope_head_dim, theta=m.rope_theta,
                    factor=m.rope_factor if extend else 1.0,
                    original_seq_len=m.rope_original_seq_len, beta_fast=m.rope_beta_fast,
                    beta_slow=m.rope_beta_slow, mscale=m.rope_mscale)


def build_deepseek_v3(cfg: JobConfig) -> Decoder:
    """The model for ``cfg``; call under ``torch.device("meta")`` to allocate nothing."""
    m = cfg.model
    rope = rope_args(cfg)
    qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    mla = MLAArgs(dim=m.dim, n_heads=m.n_heads, q_lora_rank=m.q_lora_rank,
                  kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                  qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
                  norm_eps=m.norm_eps,
                  softmax_scale=qk_head_dim ** -0.5 * yarn_softmax_mscale(rope))
    moe = moe_args(cfg)
    blocks = []
    for i in range(m.n_layers):
        ffn = FeedForward(m.dim, m.inter_dim) if i < m.n_dense_layers else MoE(moe)
        blocks.append(TransformerBlock(MLA(mla), ffn, m.dim, m.norm_eps))
    return Decoder(m.vocab_size, m.dim, blocks, m.norm_eps, rope, cfg.training.seq_len)
