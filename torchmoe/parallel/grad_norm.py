"""Gradient clipping with one global norm over parameters that live on different meshes."""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _grads_by_mesh(params: list[torch.nn.Parameter]) -> dict[object, list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    return groups


@torch.no_grad()
def grad_norm_and_clip_coef(
    params: list[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The total gradient norm and the factor that clips the gradients to ``max_norm`` (None
    when ``max_norm`` is 0), both device tensors: no host sync, the GPU keeps its queue.

    Dense parameters (dense mesh), sharded experts (expert mesh) and plain tensors cannot share
    one foreach call, so norms are taken per mesh, completed across ranks with ``full_tensor``,
    and combined as the root of their summed squares; with ``pp_group`` (pipeline stages hold
    different parameters) the squares are summed over the stages too.
    """
    squares = []
    for grads in _grads_by_mesh(params).values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    total = (
        torch.stack(squares).sum()
        if squares
        else torch.zeros((), device=params[0].device if params else None)
    )
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    total = total.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0) if max_norm > 0 else None
    return total, coef


@torch.no_grad()
def clip_grad_norm_(
    params: list[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Clip in place to ``max_norm`` (no clipping when it is 0) and return the total norm (a
    non-finite norm makes the gradients non-finite too; the trainer stops before the update).
    For optimizers that take the coefficient in their update, use ``grad_norm_and_clip_coef``."""
    total, coef = grad_norm_and_clip_coef(params, max_norm, pp_group)
    if coef is not None:
        for mesh, grads in _grads_by_mesh(params).items():
            scale = (
                coef
                if mesh is None
                else DTensor.from_local(coef, mesh, [Replicate()] * mesh.ndim, run_check=False)
            )
            torch._foreach_mul_(grads, scale)
    return total
