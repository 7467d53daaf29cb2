"""DeepSeek-V3 family (and DeepSeek-V2, which shares it): MLA attention, the blocks that
``moe_layer_pattern`` selects (all after the first ``n_dense_layers`` by default) MoE with
shared experts, the rest dense SwiGLU; optionally ``model.mtp_num_layers`` multi-token
prediction depths, whose blocks are MoE when the last block is. Built from the job config's
[model] and [moe] sections."""

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.common.rope import RopeArgs, yarn_softmax_mscale
from torchmoe.models.common.transformer import Decoder, TransformerBlock
from torchmoe.models.deepseek_v3.mla import MLA, MLAArgs
from torchmoe.models.moe.from_config import moe_args, moe_layer_pattern, validate_moe
from torchmoe.models.moe.moe import MoE


def validate(cfg: JobConfig) -> None:
    """Cross-key checks of [model] and [moe] for this family."""
    m = cfg.model
    if m.n_dense_layers > m.n_layers:
        raise ConfigError(
            f"model.n_dense_layers = {m.n_dense_layers} exceeds model.n_layers = "
            f"{m.n_layers}; lower it or add layers"
        )
    if m.qk_rope_head_dim % 2:
        raise ConfigError(
            f"model.qk_rope_head_dim = {m.qk_rope_head_dim} must be even (channels rotate in pairs)"
        )
    validate_mtp(cfg)
    validate_moe(cfg)


def validate_mtp(cfg: JobConfig) -> None:
    """Multi-token prediction needs a target inside the sequence for every depth (any family
    may use it: the Decoder builds it)."""
    depth, seq_len = cfg.model.mtp_num_layers, cfg.training.seq_len
    if depth >= seq_len:
        raise ConfigError(
            f"model.mtp_num_layers = {depth} leaves no token to predict within "
            f"training.seq_len = {seq_len}; lower it below the sequence length"
        )


def rope_args(cfg: JobConfig) -> RopeArgs:
    """YaRN applies whenever ``rope_factor`` > 1, at every sequence length: released
    DeepSeek-V2/V3 weights were extended with it and are served with it (as transformers
    does), so fine-tuning them at a short context must keep the same positions."""
    m = cfg.model
    return RopeArgs(
        head_dim=m.qk_rope_head_dim,
        theta=m.rope_theta,
        factor=m.rope_factor,
        original_seq_len=m.rope_original_seq_len,
        beta_fast=m.rope_beta_fast,
        beta_slow=m.rope_beta_slow,
        mscale=m.rope_mscale,
    )


def build_deepseek_v3(cfg: JobConfig) -> Decoder:
    """The model for ``cfg``; call under ``torch.device("meta")`` to allocate nothing."""
    m = cfg.model
    rope = rope_args(cfg)
    qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    mla = MLAArgs(
        dim=m.dim,
        n_heads=m.n_heads,
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        norm_eps=m.norm_eps,
        softmax_scale=qk_head_dim**-0.5 * yarn_softmax_mscale(rope),
    )
    moe = moe_args(cfg)

    def block(is_moe: bool) -> TransformerBlock:
        ffn = MoE(moe) if is_moe else FeedForward(m.dim, m.inter_dim)
        return TransformerBlock(MLA(mla), ffn, m.dim, m.norm_eps)

    pattern = moe_layer_pattern(cfg)
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
