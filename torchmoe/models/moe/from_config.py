"""The [moe] config section -> MoEArgs, which blocks are MoE, and the section's cross-key
checks, shared by every family."""

import os

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.moe.moe import MoEArgs
from torchmoe.models.moe.router import RouterArgs

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


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
    types = [t for t in e.load_balancing_type if t in _LOSS_TYPES]
    coeffs = e.aux_loss_coeff if len(e.aux_loss_coeff) > 1 else e.aux_loss_coeff * len(types)
    return dict(zip(types, coeffs))


def validate_moe(cfg: JobConfig) -> None:
    """Cross-key checks of [moe]: the layer pattern, top-k and group-limited routing must be
    satisfiable, balancing and capacity keys consistent, and a forced Triton permutation
    needs CUDA (unless a dry run only plans the job)."""
    e = cfg.moe
    if e.num_experts == 0:
        _refuse_moe_only_keys(cfg)
        return
    _validate_layer_freq(cfg)
    if (
        e.permute_backend == "triton"
        and not torch.cuda.is_available()
        and os.environ.get("COMM_MODE") != "fake"
    ):
        raise ConfigError(
            "moe.permute_backend = 'triton' runs its kernels on CUDA tensors and "
            "this machine has no CUDA; use 'auto' or 'torch'"
        )
    if e.router_topk > e.num_experts:
        raise ConfigError(
            f"moe.router_topk = {e.router_topk} exceeds moe.num_experts = {e.num_experts}"
        )
    if not e.router_pre_softmax and e.router_score_function != "softmax":
        raise ConfigError(
            "moe.router_pre_softmax = false only applies to "
            "moe.router_score_function = 'softmax', not "
            f"{e.router_score_function!r}; set it to true"
        )
    _validate_groups(cfg)
    _validate_balancing(cfg)
    if e.pad_to_capacity and e.capacity_factor == 0:
        raise ConfigError(
            "moe.pad_to_capacity = true needs token dropping; set moe.capacity_factor > 0"
        )
    bad = [i for i in e.freeze_experts if not 0 <= i < e.num_experts]
    if bad or len(set(e.freeze_experts)) != len(e.freeze_experts):
        raise ConfigError(
            f"moe.freeze_experts = {e.freeze_experts}: list distinct expert ids "
            f"in [0, {e.num_experts})"
        )


def _refuse_moe_only_keys(cfg: JobConfig) -> None:
    """A dense model (no experts) would silently ignore these. (Routing and balancing keys a
    family's flavor fills are let be, so ``--moe.num_experts 0`` makes any family dense.)"""
    e = cfg.moe
    on = {
        "capacity_factor": e.capacity_factor > 0,
        "freeze_experts": bool(e.freeze_experts),
        "freeze_router": e.freeze_router,
        "force_load_balance": e.force_load_balance,
        "input_jitter_eps": e.input_jitter_eps > 0,
        "z_loss_coeff": e.z_loss_coeff > 0,
    }
    for key in (k for k, v in on.items() if v):
        raise ConfigError(
            f"moe.{key} = {getattr(e, key)} has no effect in a dense model "
            "(moe.num_experts = 0); remove it or give the model experts"
        )


def _validate_layer_freq(cfg: JobConfig) -> None:
    freq, n = cfg.moe.layer_freq, cfg.model.n_layers
    if len(freq) == 1 and freq[0] < 1:
        raise ConfigError(
            f"moe.layer_freq = {freq}: an interval must be >= 1, or give a 0/1 list of {n} entries"
        )
    if len(freq) > 1 and (len(freq) != n or any(v not in (0, 1) for v in freq)):
        raise ConfigError(
            f"moe.layer_freq = {freq} must be one 0/1 entry per block "
            f"(model.n_layers = {n}) or a single interval"
        )
    if not any(moe_layer_pattern(cfg)):
        raise ConfigError(
            f"moe.layer_freq = {freq} with model.n_dense_layers = "
            f"{cfg.model.n_dense_layers} leaves no MoE block; for a dense model "
            "set moe.num_experts = 0"
        )


def _validate_groups(cfg: JobConfig) -> None:
    e = cfg.moe
    if (e.router_num_groups == 0) != (e.router_group_topk == 0):
        raise ConfigError(
            f"moe.router_num_groups = {e.router_num_groups} and "
            f"moe.router_group_topk = {e.router_group_topk}: set both (> 0) for "
            "group-limited routing, or both to 0"
        )
    if e.router_num_groups:
        if e.num_experts % e.router_num_groups:
            raise ConfigError(
                f"moe.router_num_groups = {e.router_num_groups} must divide "
                f"moe.num_experts = {e.num_experts}"
            )
        if e.router_group_topk > e.router_num_groups:
            raise ConfigError(
                f"moe.router_group_topk = {e.router_group_topk} exceeds "
                f"moe.router_num_groups = {e.router_num_groups}"
            )
        reachable = e.router_group_topk * e.num_experts // e.router_num_groups
        if e.router_topk > reachable:
            raise ConfigError(
                f"moe.router_topk = {e.router_topk} exceeds the {reachable} experts "
                f"in moe.router_group_topk = {e.router_group_topk} groups; raise "
                "router_group_topk"
            )


def _validate_balancing(cfg: JobConfig) -> None:
    e = cfg.moe
    types, coeffs = e.load_balancing_type, e.aux_loss_coeff
    if len(set(types)) != len(types):
        raise ConfigError(f"moe.load_balancing_type = {types} lists a type twice")
    if len(types) > 1 and ("none" in types or "sinkhorn" in types):
        raise ConfigError(
            f"moe.load_balancing_type = {types}: 'none' and 'sinkhorn' stand "
            "alone; combine only aux_loss, seq_aux_loss and global_aux_loss"
        )
    losses = balance_coeffs(cfg)
    if len(coeffs) > 1 and len(coeffs) != sum(t in _LOSS_TYPES for t in types):
        raise ConfigError(
            f"moe.aux_loss_coeff = {coeffs} needs one value, or one per loss in "
            f"moe.load_balancing_type = {types}"
        )
    if not losses and any(c > 0 for c in coeffs):
        raise ConfigError(
            f"moe.aux_loss_coeff = {coeffs} has no effect with "
            f"moe.load_balancing_type = {types}; set moe.aux_loss_coeff = 0 or "
            "pick aux_loss, seq_aux_loss or global_aux_loss"
        )
    unweighted = [t for t, c in losses.items() if c == 0]
    if unweighted:
        raise ConfigError(
            f"moe.aux_loss_coeff = {coeffs} gives {', '.join(unweighted)} no "
            f"weight; set a coefficient > 0 for each loss in "
            f"moe.load_balancing_type = {types}"
        )
    if "sinkhorn" in types and (e.enable_expert_bias or e.router_num_groups):
        raise ConfigError(
            "moe.load_balancing_type = ['sinkhorn'] selects experts itself; set "
            "moe.enable_expert_bias = false and moe.router_num_groups = 0"
        )
    if e.force_load_balance and "sinkhorn" in types:
        raise ConfigError(
            "moe.force_load_balance = true replaces expert selection; it cannot "
            "be combined with moe.load_balancing_type = ['sinkhorn']"
        )


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
        balance_coeffs=balance_coeffs(cfg),
        z_loss_coeff=e.z_loss_coeff,
        capacity_factor=e.capacity_factor,
        drop_policy=e.drop_policy,
        pad_to_capacity=e.pad_to_capacity,
        grouped_mm=e.grouped_mm,
        permute_backend=e.permute_backend,
    )
