"""Fold micro-batches' low-precision gradients into a float32 sum, in plain torch: the reference
the Triton kernel is tested against, and the implementation off CUDA."""

from collections.abc import Sequence

import torch

MAX_GRADS = 8  # gradients one pass takes (the kernel's pointer arguments)


def check_count(grads: Sequence[torch.Tensor]) -> None:
    if not 1 <= len(grads) <= MAX_GRADS:
        raise ValueError(f"a fold takes 1 to {MAX_GRADS} gradients, got {len(grads)}")


@torch.no_grad()
def fold(
    total: torch.Tensor | None, grads: Sequence[torch.Tensor], squares: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``total`` plus 1 to ``MAX_GRADS`` gradients, in float32 and in that order, written into
    ``total`` when given, else a new float32 tensor; with ``squares``, the float32 sum of the
    result's squares as a 0-dim tensor, else None)."""
    check_count(grads)
    for grad in grads:
        total = grad.to(torch.float32, copy=True) if total is None else total.add_(grad)
    return total, total.square().sum() if squares else None
