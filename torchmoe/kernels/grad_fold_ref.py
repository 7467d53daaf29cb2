"""Fold micro-batches' low-precision gradients into a float32 sum, in plain torch: the reference
the Triton kernel is tested against, and the implementation off CUDA."""

from collections.abc import Sequence

import torch


@torch.no_grad()
def fold(total: torch.Tensor | None, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``total`` plus one or two gradients, in float32 and in that order, into ``total`` when
    given (else a new float32 tensor)."""
    if not 1 <= len(grads) <= 2:
        raise ValueError(f"fold takes one or two gradients, got {len(grads)}")
    for grad in grads:
        total = grad.to(torch.float32, copy=True) if total is None else total.add_(grad)
    return total
