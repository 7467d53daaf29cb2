"""One AdamW update of one tensor in plain torch: the reference the Triton kernel is tested
against, and the implementation wherever Triton does not run (CPU).

The arithmetic is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments), done in
float32 whatever the storage dtypes: the moments may be kept in bfloat16 (half the optimizer
state's memory and traffic) and are rounded only when stored. ``grad_scale`` (a one-element
tensor, e.g. the gradient-clipping coefficient) multiplies the gradient inside the update, so
clipping needs no pass of its own over the gradients and no host sync. The gradient may be
bfloat16 (cached weights' gradients) and a bfloat16 copy of the parameter may be written with it.
"""

import math

import torch


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(1 - beta1^step, sqrt(1 - beta2^step)), computed on the host in float64."""
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


@torch.no_grad()
def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor | None = None,
    copy: torch.Tensor | None = None,
) -> None:
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place (``step`` counts this one);
    ``copy`` (a lower-precision copy of ``param`` that compute runs on) gets the new values
    rounded to its dtype."""
    bias1, bias2_sqrt = bias_corrections(beta1, beta2, step)
    g = grad.float()
    if grad_scale is not None:
        g = g * grad_scale.float()
    m = exp_avg.float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p = param.float().mul_(1 - lr * weight_decay)
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias1)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if copy is not None:
        copy.copy_(p)
