"""apply_fsdp: FSDP2 (``fully_shard``) over the data-parallel mesh dimensions."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from torchmoe.models.common.transformer import block_slots
from torchmoe.models.moe.moe import MoE


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    expert_dp_mesh: DeviceMesh | None,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str = "default",
    cpu_offload: bool = False,
    token_mesh: DeviceMesh | None = None,
) -> None:
    """Shard ``model`` with fully_shard: each MoE layer's experts on ``expert_dp_mesh`` (the
    expert view's ``dp_replicate x edp``; given when experts are split by ep/etp or replicated
    over tp), its router and shared experts on ``token_mesh`` (given under tensor parallelism:
    data-parallel x tp ranks, which each route their own tokens), then each transformer block,
    the embedding, final norm + output head together, and the root, all on ``dp_mesh`` (the
    dense view's ``dp_replicate x dp_shard``, x ``cp`` under context parallelism; 2-D means
    HSDP; size 1 without data parallelism,
    which still gives the per-token modules' units the single root FSDP needs).

    Gradients are summed, not averaged, across ranks: the training loop normalises the loss by
    the global token count, which makes the sum the true gradient for dense and expert
    parameters alike (experts also receive gradients from other ranks' tokens).

    ``reshard_after_forward``: "default" (free gathered weights after forward except for the
    last block, which backward needs at once), "always" or "never" (ZeRO-2 style).
    """
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    blocks = [getattr(parent, name) for parent, name in block_slots(model)]
    for i, block in enumerate(blocks):
        reshard = {"always": True, "never": False}.get(reshard_after_forward, i < len(blocks) - 1)
        moe = getattr(block, "feed_forward", None)
        if isinstance(moe, MoE) and expert_dp_mesh is not None:
            fully_shard(moe.experts, mesh=expert_dp_mesh, reshard_after_forward=reshard, **kw)
        if isinstance(moe, MoE) and token_mesh is not None:
            per_token = [m for m in (moe.router, moe.shared_experts) if m is not None]
            fully_shard(per_token, mesh=token_mesh, reshard_after_forward=reshard, **kw)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, **kw)
    if model.tok_embeddings is not None:
        fully_shard(model.tok_embeddings, mesh=dp_mesh, **kw)
    head = [m for m in (model.norm, model.output) if m is not None]
    # MTP depths run the output head again without the final norm: separate units then, as
    # FSDP wants the modules of one unit to run forward together.
    for unit in ([m] for m in head) if getattr(model, "mtp", None) is not None else [head]:
        if unit:
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=False, **kw)
    fully_shard(model, mesh=dp_mesh, **kw)
    _sum_gradients(model)


def _sum_gradients(model: nn.Module) -> None:
    """Every FSDP unit sums gradients instead of averaging (see apply_fsdp)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
