"""Gradient clipping with one global norm over parameters that live on different meshes."""

import math

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip in place to ``max_norm`` (no clipping when it is 0) and return the total norm.

    Dense parameters (dense mesh), sharded experts (expert mesh) and plain tensors cannot share
    one foreach call, so norms are taken per mesh, completed across ranks with ``full_tensor``,
    and combined as the root of their summed squares.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm > 0:
        scale = min(max_norm / (total.item() + 1e-6), 1.0)
        if scale < 1.0 and math.isfinite(scale):
            for grads in groups.values():
                torch._foreach_mul_(grads, scale)
    return total
