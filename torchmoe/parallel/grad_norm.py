"""Gradient clipping with one global norm over parameters that live on different meshes."""

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _grads_by_mesh(grads: list[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    return groups


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``grads`` together, accumulated in float32 whatever their dtype (bfloat16
    gradients of cached weights, cached_weights.py, would otherwise give a bfloat16 norm). One
    foreach call per dtype (a mixed list takes torch's one-kernel-per-tensor path), the
    per-tensor norms summed in the gradients' order."""
    if any(isinstance(g, DTensor) or g.dtype == torch.float64 for g in grads):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    norms: list[torch.Tensor] = [torch.empty(())] * len(grads)
    for where in by_dtype.values():
        found = torch._foreach_norm([grads[i] for i in where], 2.0, dtype=torch.float32)
        for i, norm in zip(where, found, strict=True):
            norms[i] = norm
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def grad_norm_and_clip_coef(
    grads: list[torch.Tensor],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
    squares: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The total norm of ``grads`` and the factor that clips them to ``max_norm`` (None
    when ``max_norm`` is 0), both device tensors: no host sync, the GPU keeps its queue
    (``device`` holds them when this rank has no gradients).

    Dense parameters (dense mesh), sharded experts (expert mesh) and plain tensors cannot share
    one foreach call, so norms are taken per mesh, completed across ranks with ``full_tensor``,
    and combined as the root of their summed squares; with ``pp_group`` (pipeline stages hold
    different parameters) the squares are summed over the stages too. ``squares``: sums of
    squares of further gradients, taken already (cached weights' last gradient fold takes
    them in its pass over the sums).
    """
    squares = list(squares)
    for group in _grads_by_mesh(grads).values():
        norm = _norm(group)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    total = (
        torch.stack(squares).sum()
        if squares
        else torch.zeros((), device=grads[0].device if grads else device)
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
    grads = [p.grad for p in params if p.grad is not None]
    device = params[0].device if params else None
    total, coef = grad_norm_and_clip_coef(grads, max_norm, pp_group, device)
    if coef is not None:
        for mesh, group in _grads_by_mesh(grads).items():
            scale = (
                coef
                if mesh is None
                else DTensor.from_local(coef, mesh, [Replicate()] * mesh.ndim, run_check=False)
            )
            torch._foreach_mul_(group, scale)
    return total
