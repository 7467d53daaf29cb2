"""Cross-key checks of [model] and [moe]: those every family shares (multi-token prediction,
the MoE section) and each attention kind's. The registry names each family's check."""

import importlib.util
import os

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.model_args import BALANCE_LOSSES, balance_coeffs, moe_layer_pattern
from torchmoe.config.schema import JobConfig


def check_mla(cfg: JobConfig) -> None:
    """DeepSeek-V2/V3 (MLA attention)."""
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
    check_mtp(cfg)
    check_moe(cfg)


def check_gqa(cfg: JobConfig) -> None:
    """Llama, Mixtral, Qwen3-MoE (grouped-query attention)."""
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = {m.n_heads}"
        )
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim = {m.head_dim} must be even (channels rotate in pairs)")
    check_mtp(cfg)
    check_moe(cfg)


def check_mtp(cfg: JobConfig) -> None:
    """Multi-token prediction needs a target inside the sequence for every depth."""
    depth, seq_len = cfg.model.mtp_num_layers, cfg.training.seq_len
    if depth >= seq_len:
        raise ConfigError(
            f"model.mtp_num_layers = {depth} leaves no token to predict within "
            f"training.seq_len = {seq_len}; lower it below the sequence length"
        )


def check_moe(cfg: JobConfig) -> None:
    """Cross-key checks of [moe]: the layer pattern, top-k and group-limited routing must be
    satisfiable, balancing and capacity keys consistent, and a forced Triton permutation
    needs CUDA (unless a dry run only plans the job)."""
    e = cfg.moe
    if e.num_experts == 0:
        _refuse_moe_only_keys(cfg)
        return
    _check_layer_freq(cfg)
    _check_permute_backend(cfg)
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
    _check_groups(cfg)
    _check_balancing(cfg)
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


def _check_layer_freq(cfg: JobConfig) -> None:
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


def _check_groups(cfg: JobConfig) -> None:
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


def _check_balancing(cfg: JobConfig) -> None:
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
    if len(coeffs) > 1 and len(coeffs) != sum(t in BALANCE_LOSSES for t in types):
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


def _check_permute_backend(cfg: JobConfig) -> None:
    """A forced Triton permutation needs the triton package and CUDA (unless a dry run only
    plans the job)."""
    if cfg.moe.permute_backend != "triton" or os.environ.get("COMM_MODE") == "fake":
        return
    if importlib.util.find_spec("triton") is None:
        raise ConfigError(
            "moe.permute_backend = 'triton' needs the triton package, which is not "
            "installed; use 'auto' or 'torch'"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "moe.permute_backend = 'triton' runs its kernels on CUDA tensors and "
            "this machine has no CUDA; use 'auto' or 'torch'"
        )
