"""Fold a micro-batch's low-precision gradient into a float32 sum, in plain torch: the reference
the Triton kernel is tested against, and the implementation off CUDA."""

import torch


@torch.no_grad()
def fold(total: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """``total + grad`` in float32, into ``total`` when given (else a new float32 tensor)."""
    if total is None:
        return grad.float()
    return total.add_(grad)
