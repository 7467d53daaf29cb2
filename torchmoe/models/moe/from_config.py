"""The [moe] config section -> MoEArgs, and its cross-key checks, shared by every family."""

import os

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.moe.moe import MoEArgs
from torchmoe.models.moe.router import RouterArgs

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def validate_moe(cfg: JobConfig) -> None:
    """Cross-key checks of [moe]: top-k and group-limited routing must be satisfiable, and a
    forced Triton permutation needs CUDA (unless a dry run only plans the job)."""
    e = cfg.moe
    if (e.permute_backend == "triton" and not torch.cuda.is_available()
            and os.environ.get("COMM_MODE") != "fake"):
        raise ConfigError("moe.permute_backend = 'triton' runs its kernels on CUDA tensors and "
                          "this machine has no CUDA; use 'auto' or 'torch'")
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


def moe_args(cfg: JobConfig) -> MoEArgs:
    """The MoE layer arguments the [moe] section (and model.dim) describe."""
    e = cfg.moe
    return MoEArgs(
        router=RouterArgs(dim=cfg.model.dim, num_experts=e.num_experts, topk=e.router_topk,
                          score_function=e.router_score_function,
                          norm_topk_prob=e.router_norm_topk_prob,
                          scaling_factor=e.router_topk_scaling_factor,
                          num_groups=e.router_num_groups, group_topk=e.router_group_topk,
                          enable_expert_bias=e.enable_expert_bias,
                          dtype=_ROUTER_DTYPES[e.router_dtype]),
        hidden_dim=e.ffn_hidden_size, shared_hidden_dim=e.shared_expert_intermediate_size,
        load_balancing_type=e.load_balancing_type, aux_loss_coeff=e.aux_loss_coeff,
        grouped_mm=e.grouped_mm, permute_backend=e.permute_backend)
