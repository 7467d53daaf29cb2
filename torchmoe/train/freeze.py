"""Freezing parts of an MoE model while fine-tuning (``moe.freeze_router``,
``moe.freeze_experts``).

A router gate is a whole parameter, so ``requires_grad`` freezes it. A frozen expert is one row
of the expert weights (``w13 [E, 2, F, D]``, ``w2 [E, D, F]``), which ``requires_grad``
cannot express: its gradient rows are zeroed before clipping (so they count in neither the
norm nor Adam's moments) and its values are copied back after the optimizer step (AdamW's
decoupled weight decay moves weights whose gradient is zero).
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchmoe.models.moe.moe import MoE


def freeze_routers(model: nn.Module) -> None:
    """Stop training the router gate of every MoE layer. Call on the model before the parallel
    plan, so FSDP and the optimizer (which takes only parameters that require gradients) see
    it. The expert bias is a buffer with its own update rule (``moe.bias_update_rate``)."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.router.requires_grad_(False)


@dataclass
class _FrozenRows:
    param: nn.Parameter
    rows: torch.Tensor  # indices into the local shard's dim 0
    saved: torch.Tensor  # those rows' values when the freezer was built


class ExpertFreezer:
    """Keeps the routed experts ``expert_ids`` of every MoE layer at the values they have when
    the freezer is built (after the checkpoint is loaded). In each step call ``zero_grads()``
    before gradient clipping and ``restore()`` after ``optimizer.step()``.

    Expert weights may be DTensors (FSDP2 and expert parallelism shard the expert dim, expert
    tensor parallelism the hidden dim); each rank then works on its local shard, on the global
    expert rows that shard holds.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, expert_ids: list[int]):
        self.frozen: list[_FrozenRows] = []
        for module in model.modules():
            if not isinstance(module, MoE):
                continue
            for param in module.experts.parameters(recurse=False):
                first, count = _local_expert_rows(param)
                rows = [e - first for e in sorted(set(expert_ids)) if first <= e < first + count]
                if rows:
                    local = _local(param)
                    index = torch.tensor(rows, device=local.device)
                    self.frozen.append(_FrozenRows(param, index, local.index_select(0, index)))

    @torch.no_grad()
    def zero_grads(self) -> None:
        for f in self.frozen:
            if f.param.grad is not None:
                _local(f.param.grad).index_fill_(0, f.rows, 0)

    @torch.no_grad()
    def restore(self) -> None:
        for f in self.frozen:
            _local(f.param).index_copy_(0, f.rows, f.saved)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores (a view: writing into it writes into the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_expert_rows(param: torch.Tensor) -> tuple[int, int]:
    """(first global expert, number of experts) of this rank's shard of ``param``."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return offset[0], shape[0]
