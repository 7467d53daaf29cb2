"""DeepSeek-V3 family: MLA attention, the first ``n_dense_layers`` blocks dense SwiGLU, the rest
MoE with shared experts. Built from the job config's [model] and [moe] sections."""

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.common.attention import MLA, MLAArgs
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.common.rope import RopeArgs, yarn_softmax_mscale
from torchmoe.models.common.transformer import Decoder, TransformerBlock
from torchmoe.models.moe.moe import MoE, MoEArgs
from torchmoe.models.moe.router import RouterArgs

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def validate(cfg: JobConfig) -> None:
    """Cross-key checks of [model] and [moe] for this family."""
    m, e = cfg.model, cfg.moe
    if m.n_dense_layers > m.n_layers:
        raise ConfigError(f"model.n_dense_layers = {m.n_dense_layers} exceeds model.n_layers = "
                          f"{m.n_layers}; lower it or add layers")
    if m.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim = {m.qk_rope_head_dim} must be even "
                          "(channels rotate in pairs)")
    if e.router_topk > e.num_experts:
        raise ConfigError(f"moe.router_topk = {e.router_topk} exceeds moe.num_experts = "
                          f"{e.num_experts}")
    if (e.router_num_groups == 0) != (e.router_group_topk == 0):
        raise ConfigError(f"moe.router_num_groups = {e.router_num_groups} and "
                          f"moe.router_group_topk = {e.router_group_topk}: set both (> 0) for "
                          "group-limited routing, or both to 0")
    if e.router_num_groups:
        if e.num_experts % e.router_num_groups:
            raise ConfigError(f"moe.router_num_groups = {e.router_num_groups} must divide "
                              f"moe.num_experts = {e.num_experts}")
        if e.router_group_topk > e.router_num_groups:
            raise ConfigError(f"moe.router_group_topk = {e.router_group_topk} exceeds "
                              f"moe.router_num_groups = {e.router_num_groups}")
        reachable = e.router_group_topk * e.num_experts // e.router_num_groups
        if e.router_topk > reachable:
            raise ConfigError(f"moe.router_topk = {e.router_topk} exceeds the {reachable} experts "
                              f"in moe.router_group_topk = {e.router_group_topk} groups; raise "
                              "router_group_topk")


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
    m, e = cfg.model, cfg.moe
    rope = rope_args(cfg)
    qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    mla = MLAArgs(dim=m.dim, n_heads=m.n_heads, q_lora_rank=m.q_lora_rank,
                  kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                  qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
                  norm_eps=m.norm_eps,
                  softmax_scale=qk_head_dim ** -0.5 * yarn_softmax_mscale(rope))
    moe = MoEArgs(
        router=RouterArgs(dim=m.dim, num_experts=e.num_experts, topk=e.router_topk,
                          score_function=e.router_score_function,
                          norm_topk_prob=e.router_norm_topk_prob,
                          scaling_factor=e.router_topk_scaling_factor,
                          num_groups=e.router_num_groups, group_topk=e.router_group_topk,
                          enable_expert_bias=e.enable_expert_bias,
                          dtype=_ROUTER_DTYPES[e.router_dtype]),
        hidden_dim=e.ffn_hidden_size, shared_hidden_dim=e.shared_expert_intermediate_size,
        load_balancing_type=e.load_balancing_type, aux_loss_coeff=e.aux_loss_coeff,
        grouped_mm=e.grouped_mm)
    blocks = []
    for i in range(m.n_layers):
        ffn = FeedForward(m.dim, m.inter_dim) if i < m.n_dense_layers else MoE(moe)
        blocks.append(TransformerBlock(MLA(mla), ffn, m.dim, m.norm_eps))
    return Decoder(m.vocab_size, m.dim, blocks, m.norm_eps, rope, cfg.training.seq_len)
