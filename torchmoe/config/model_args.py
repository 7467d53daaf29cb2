"""[model] and [moe] -> the Args dataclasses the model builders take (models/ never reads the
job config). One function per kind of argument; the registry names each family's."""

import torch

from torchmoe.config.schema import JobConfig
from torchmoe.models.common.attention import GQAArgs
from torchmoe.models.common.rope import RopeArgs, yarn_softmax_mscale
from torchmoe.models.deepseek_v3.mla import MLAArgs
from torchmoe.models.deepseek_v3.model import DeepSeekV3Args
from torchmoe.models.llama.model import GQADecoderArgs
from torchmoe.models.moe.moe import MoEArgs
from torchmoe.models.moe.router import RouterArgs

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
BALANCE_LOSSES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def moe_layer_pattern(cfg: JobConfig) -> list[bool]:
    """For each block, whether it is an MoE layer: not one of the first ``n_dense_layers``,
    selected by ``moe.layer_freq``, and the model has experts at all."""
    m, e = cfg.model, cfg.moe
    freq = e.layer_freq
    if len(freq) == 1:
        chosen = [i % freq[0] == 0 for i in range(m.n_layers)]
    else:
        chosen = [bool(v) for v in freq]
    return [e.num_experts > 0 and i >= m.n_dense_layers and chosen[i] for i in range(m.n_layers)]


def balance_coeffs(cfg: JobConfig) -> dict[str, float]:
    """Balance-loss type -> its coefficient, for the loss types ``load_balancing_type`` names
    (one coefficient for all, or one each)."""
    e = cfg.moe
    types = [t for t in e.load_balancing_type if t in BALANCE_LOSSES]
    coeffs = e.aux_loss_coeff if len(e.aux_loss_coeff) > 1 else e.aux_loss_coeff * len(types)
    return dict(zip(types, coeffs))


def moe_args(cfg: JobConfig) -> MoEArgs:
    """The MoE layer arguments the [moe] section (and model.dim) describe."""
    e = cfg.moe
    return MoEArgs(
        router=RouterArgs(
            dim=cfg.model.dim,
            num_experts=e.num_experts,
            topk=e.router_topk,
            score_function=e.router_score_function,
            pre_softmax=e.router_pre_softmax,
            norm_topk_prob=e.router_norm_topk_prob,
            scaling_factor=e.router_topk_scaling_factor,
            num_groups=e.router_num_groups,
            group_topk=e.router_group_topk,
            enable_expert_bias=e.enable_expert_bias,
            sinkhorn="sinkhorn" in e.load_balancing_type,
            force_load_balance=e.force_load_balance,
            input_jitter_eps=e.input_jitter_eps,
            dtype=_ROUTER_DTYPES[e.router_dtype],
        ),
        hidden_dim=e.ffn_hidden_size,
        shared_hidden_dim=e.shared_expert_intermediate_size,
        shared_expert_overlap=e.shared_expert_overlap,
        balance_coeffs=balance_coeffs(cfg),
        z_loss_coeff=e.z_loss_coeff,
        capacity_factor=e.capacity_factor,
        eval_capacity_factor=e.capacity_factor
        if e.eval_capacity_factor < 0
        else e.eval_capacity_factor,
        min_capacity=e.min_capacity,
        drop_policy=e.drop_policy,
        pad_to_capacity=e.pad_to_capacity,
        grouped_mm=e.grouped_mm,
        permute_backend=e.permute_backend,
    )


def mla_rope_args(cfg: JobConfig) -> RopeArgs:
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


def _decoder_kwargs(cfg: JobConfig, rope: RopeArgs) -> dict:
    """The DecoderArgs fields every family shares."""
    m = cfg.model
    return {
        "vocab_size": m.vocab_size,
        "dim": m.dim,
        "inter_dim": m.inter_dim,
        "norm_eps": m.norm_eps,
        "rope": rope,
        "max_seq_len": cfg.training.seq_len,
        "moe": moe_args(cfg),
        "moe_layers": moe_layer_pattern(cfg),
        "mtp_num_layers": m.mtp_num_layers,
        "mtp_loss_scale": m.mtp_loss_scale,
    }


def deepseek_v3_args(cfg: JobConfig) -> DeepSeekV3Args:
    """DeepSeek-V2/V3: MLA with YaRN's softmax scale."""
    m = cfg.model
    rope = mla_rope_args(cfg)
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
    return DeepSeekV3Args(mla=mla, **_decoder_kwargs(cfg, rope))


def gqa_args(cfg: JobConfig) -> GQADecoderArgs:
    """Llama, Mixtral and Qwen3-MoE: grouped-query attention with plain RoPE (Qwen3's builder
    turns its q/k norms on)."""
    m = cfg.model
    attention = GQAArgs(
        dim=m.dim,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        softmax_scale=m.head_dim**-0.5,
        norm_eps=m.norm_eps,
    )
    rope = RopeArgs(head_dim=m.head_dim, theta=m.rope_theta)
    return GQADecoderArgs(attention=attention, **_decoder_kwargs(cfg, rope))
