"""The default parallelize plan, and loading a user's plan from ``parallelism.plan``.

A plan is any function ``(model, parallel_dims, job_config) -> model`` that transforms a model
built on the meta device. Swap it without touching torchmoe:

    [parallelism]
    plan = "my_pkg.plans:my_parallelize"
"""

import importlib
from collections.abc import Callable

import torch
from torch import nn

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.moe.experts import use_grouped_mm
from torchmoe.parallel.activation_checkpoint import apply_ac
from torchmoe.parallel.activation_offload import apply_offload
from torchmoe.parallel.compile import apply_compile
from torchmoe.parallel.context_parallel import apply_cp
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.expert_parallel import apply_ep
from torchmoe.parallel.fsdp import apply_fsdp
from torchmoe.parallel.global_balance import apply_balance_counts
from torchmoe.parallel.tensor_parallel import apply_tp
from torchmoe.quant.float8 import apply_float8_experts, apply_float8_linears

ParallelizeFn = Callable[[nn.Module, ParallelDims, JobConfig], nn.Module]


def parallelize(model: nn.Module, dims: ParallelDims, cfg: JobConfig) -> nn.Module:
    """float8 (linears, experts) -> context parallel -> tensor parallel -> expert parallel
    (and the balance losses' count all-reduces) -> activation checkpointing and offloading ->
    compile -> FSDP. Each step is a public ``apply_*`` a custom plan can reuse, reorder or
    replace."""
    apply_float8_linears(model, cfg.quantize)
    apply_float8_experts(model, cfg.quantize)
    if dims.cp > 1:
        apply_cp(model, dims.meshes.dense["cp"], cfg.training.seq_len)
    if dims.tp_enabled:
        apply_tp(model, dims.meshes.dense["tp"])
    if dims.ep_enabled:
        apply_ep(model, dims.meshes.expert, cfg.moe.dispatcher)
    if dims.meshes is not None:
        apply_balance_counts(model, dims.meshes.tokens, dims.meshes.sequence)
    apply_ac(model, cfg.activation_checkpoint)
    apply_offload(model, cfg.activation_checkpoint)
    apply_compile(model, cfg.compile, fullgraph=_one_graph_blocks(dims, cfg))
    if dims.fsdp_enabled:
        meshes = dims.meshes
        device_type = meshes.dense.device_type
        apply_fsdp(
            model,
            meshes.dp_mesh(),
            meshes.expert_dp_mesh() if dims.experts_split else None,
            param_dtype=resolve_dtype(cfg.training.mixed_precision_param, device_type),
            reduce_dtype=resolve_dtype(cfg.training.mixed_precision_reduce, device_type),
            reshard_after_forward=_reshard_policy(dims, cfg),
            cpu_offload=cfg.parallelism.fsdp_cpu_offload,
            token_mesh=meshes.tokens if dims.tp_enabled else None,
        )
    return model


def _reshard_policy(dims: ParallelDims, cfg: JobConfig) -> str:
    """'default' under pipeline parallelism keeps the gathered weights ('never'): every
    micro-batch's forward would gather them again."""
    policy = cfg.parallelism.fsdp_reshard_after_forward
    return "never" if policy == "default" and dims.pp_enabled else policy


def _one_graph_blocks(dims: ParallelDims, cfg: JobConfig) -> bool:
    """Blocks trace into one graph when no MoE layer needs its token counts on the host
    (experts on torch._grouped_mm rather than the loop, and no expert or tensor parallelism,
    or expert parallelism (no etp, no tp) through the sync-free dispatcher) and no part runs
    eagerly for activation offloading."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync_free_ep = cfg.moe.dispatcher == "sync_free" and dims.etp == 1 and dims.tp == 1
    dispatch_free = not dims.experts_split or sync_free_ep
    offloads = bool(cfg.activation_checkpoint.offload_modules)
    return dispatch_free and use_grouped_mm(cfg.moe.grouped_mm, device) and not offloads


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """A dtype config value; 'auto' = bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        name = "bfloat16" if device_type == "cuda" else "float32"
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_plan(spec: str) -> ParallelizeFn:
    """'package.module:function' -> the function, or a one-line ConfigError."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"parallelism.plan = {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"parallelism.plan = {spec!r}: cannot import {module_name!r} ({e})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"parallelism.plan = {spec!r}: {module_name} has no function {attr!r}")
    return fn
