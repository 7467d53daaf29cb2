"""apply_ac: activation checkpointing, applied from outside the model (``[activation_checkpoint]``).

- ``mode = "full"``: a chosen block keeps only its input; backward reruns its whole forward.
- ``mode = "selective"``, ``recompute_modules = []``: op-level policy in each chosen block. The
  outputs of the costly ops (matmuls, attention kernels, top-k, max, collectives) are saved and
  everything else (norms, activations, rotary, element-wise) is recomputed from them, so backward
  repeats no GEMM and no collective. Every matmul is saved; saving every other one (a torchtitan
  option) would free half of those outputs for rerunning half the GEMMs, a trade that full
  checkpointing of some blocks (``every_n_layers``) already offers more simply.
- ``mode = "selective"`` with names (Megatron's): only those parts of the chosen blocks - whole
  submodules, or named methods of them (``RECOMPUTE_MODULES``) - keep just their inputs and rerun
  in backward. Their outputs stay held by the layers that consume them, as without
  checkpointing, so a part saves what it keeps *inside*: ``core_attn`` the repeated or padded k/v
  copies (and, with the math kernel, the scores), ``layernorm`` only the norm statistics,
  ``mla_up_proj`` the norms' outputs and rotary temporaries, ``moe_act`` silu(gate) (off CUDA;
  torchmoe's CUDA SwiGLU kernel saves only its input, so on CUDA it frees nothing);
  ``mlp`` and ``moe`` everything but their input. The chosen method (or ``forward``) is
  replaced on the instance rather than the module wrapped, so types and parameter names stay:
  plans find MoE layers by type (``isinstance(block.feed_forward, MoE)`` in FSDP and the dry
  run).

``every_n_layers = n`` chooses the blocks at positions 0, n, 2n, ... of ``model.layers`` and the
MTP depths after them (position, not layer id, so each pipeline stage starts with a
checkpointed block); the others keep all their activations.

Recomputation is exact: the router sees the same input and expert bias (the bias moves only in
the optimizer step), so it picks the same experts again; the op-level policy even reuses the
saved top-k. MoE layers do not count tokens again while backward recomputes them (moe.py).
"""

import functools
import importlib

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import ActivationCheckpoint
from torchmoe.models.common.attention import Attention
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.common.transformer import block_slots
from torchmoe.models.deepseek_v3.mla import MLA
from torchmoe.models.moe.experts import GroupedExperts
from torchmoe.models.moe.moe import MoE

# recompute_modules name -> (the module class it selects inside a block, the method of it that
# backward reruns; None = the whole module, its forward).
RECOMPUTE_MODULES: dict[str, tuple[type[nn.Module], str | None]] = {
    "core_attn": (Attention, "core_attention"),  # the attention kernel (MLA and GQA)
    "mla_up_proj": (MLA, "up_project"),  # MLA latents -> per-head q, k, v (norms, up proj, rotary)
    "layernorm": (nn.RMSNorm, None),  # every norm of the block, MLA's q_norm / kv_norm included
    "mlp": (FeedForward, None),  # dense SwiGLU layers and the MoE's shared experts
    "moe": (MoE, None),  # the whole MoE layer
    "moe_act": (GroupedExperts, "activation"),  # silu(gate) * up inside the routed experts
}

# Children that a selected method runs although they are its module's children: MLA.up_project
# runs q_norm / kv_norm, so ``layernorm`` does not wrap them again.
_METHOD_RUNS = {(MLA, "up_project"): ("q_norm", "kv_norm")}


def apply_ac(model: nn.Module, cfg: ActivationCheckpoint) -> None:
    """Checkpoint the blocks (``model.layers``, then MTP depths) that ``every_n_layers`` chooses, as
    ``cfg.mode`` says (see the module docstring). Full and op-level modes wrap whole blocks in
    ``checkpoint_wrapper``; module-level recompute replaces the chosen method (or ``forward``) of
    the chosen submodules on the instance. Non-reentrant checkpointing throughout, so it composes
    with compile and FSDP. Blocks are counted by their index in the whole model, so a pipeline
    stage checkpoints the blocks it would in one piece. Module names are checked against the whole
    model by ``check_recompute_modules`` (a stage may lack some). Uses no mesh dimension."""
    if cfg.mode == "none":
        return
    chosen = [
        (parent, name)
        for i, (parent, name) in enumerate(block_slots(model))
        if (int(name) if name.isdigit() else i) % cfg.every_n_layers == 0
    ]
    if cfg.mode == "selective" and cfg.recompute_modules:
        for parent, name in chosen:
            for module, method in selected_parts(getattr(parent, name), cfg.recompute_modules):
                # an instance attribute shadows the class's method; one a plan set before (tensor
                # parallelism's core_attention) is what gets checkpointed
                setattr(
                    module,
                    method,
                    functools.partial(
                        checkpoint,
                        getattr(module, method),
                        use_reentrant=False,
                        preserve_rng_state=False,
                    ),
                )
        return
    # full: no context_fn at all (torch.compile rejects torch's default one passed explicitly)
    op_level = {"context_fn": _op_level_contexts} if cfg.mode == "selective" else {}
    for parent, name in chosen:
        parent.register_module(
            name, checkpoint_wrapper(getattr(parent, name), preserve_rng_state=False, **op_level)
        )


def check_recompute_modules(model: nn.Module, cfg: ActivationCheckpoint) -> None:
    """A one-line ConfigError for a ``recompute_modules`` or ``offload_modules`` name the whole
    model (before any pipeline split) has no module for, e.g. mla_up_proj on GQA."""
    kinds = {type(m) for block in model.layers.values() for m in block.modules()}
    for key in ("recompute_modules", "offload_modules"):
        names = getattr(cfg, key)
        for name in names:
            cls, method = RECOMPUTE_MODULES[name]
            if not any(issubclass(k, cls) for k in kinds):
                what = f"{cls.__name__}.{method}" if method else cls.__name__
                raise ConfigError(
                    f"activation_checkpoint.{key} = {names}: this model has no "
                    f"{name!r} module ({what}); remove {name!r}"
                )


def selected_parts(block: nn.Module, names: list[str]) -> list[tuple[nn.Module, str]]:
    """(submodule, method name) of ``block`` for each part that ``names`` (recompute_modules'
    names) select, minus those that already run inside another selected one (``moe`` covers
    ``moe_act`` and the shared experts' ``mlp``, ``mla_up_proj`` covers MLA's norms):
    checkpointing them again would only add a second recomputation. Offloading selects the
    same way (activation_offload.py)."""
    targets = [RECOMPUTE_MODULES[n] for n in names]
    selected = [
        (fqn, module, method)
        for fqn, module in block.named_modules()
        for cls, method in targets
        if isinstance(module, cls)
    ]
    wholes = {fqn for fqn, _, method in selected if method is None}
    covered = {
        f"{fqn}.{child}" if fqn else child
        for fqn, module, method in selected
        for (cls, runs), children in _METHOD_RUNS.items()
        if method == runs and isinstance(module, cls)
        for child in children
    }
    return [
        (module, method or "forward")
        for fqn, module, method in selected
        if fqn not in covered
        and not any(fqn.startswith(f"{whole}.") for whole in wholes)
        and not (method is not None and fqn in wholes)
    ]


# Ops whose outputs the op-level policy saves: costly to recompute, cheap to keep. max is the
# full reduction (float8 scales); the collectives are those of DTensor redistributes and the
# dispatchers' functional collectives (their autograd wrappers call these).
_SAVE_OPS = (
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten._grouped_mm.default",
    "aten._scaled_mm.default",
    "aten._scaled_grouped_mm.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "aten.topk.default",
    "aten.max.default",
    "_c10d_functional.all_to_all_single.default",
    "_c10d_functional.all_gather_into_tensor.default",
    "_c10d_functional.reduce_scatter_tensor.default",
    "_c10d_functional.all_reduce.default",
)


@functools.cache
def _ops_to_save() -> frozenset[torch._ops.OperatorBase]:
    """``_SAVE_OPS`` that this torch build has."""
    if torch.distributed.is_available():  # importing it registers the _c10d_functional ops
        importlib.import_module("torch.distributed._functional_collectives")
    ops = set()
    for path in _SAVE_OPS:
        namespace, op, overload = path.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and overload in packet.overloads():
            ops.add(getattr(packet, overload))
    flex = getattr(torch.ops.higher_order, "flex_attention", None)  # block-causal attention
    return frozenset(ops | ({flex} if flex is not None else set()))


def _op_policy(ctx: SelectiveCheckpointContext, func, *args, **kwargs) -> CheckpointPolicy:
    """Stateless, so forward and recomputation (which older torch asks again) agree."""
    if func in _ops_to_save():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _op_level_contexts():
    """A fresh pair of SAC contexts per checkpointed forward (torch's ``context_fn``)."""
    return create_selective_checkpoint_contexts(_op_policy)
