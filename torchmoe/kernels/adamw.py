"""AdamW's update of one tensor as one Triton kernel: each element's parameter, gradient and
moments are read once and written once, the arithmetic in float32 and the moments stored in
their own dtype (float32 or bfloat16), with the gradient-clipping coefficient read from device
memory (no host sync, no separate pass over the gradients); the gradient may be bfloat16 and a
bfloat16 copy of the new parameter may be written in the same pass. Same contract as
``adamw_ref.adamw_update``; the kernel takes contiguous tensors and runs under
TRITON_INTERPRET=1 on CPU for tests.
"""

import torch
import triton
import triton.language as tl

from torchmoe.kernels.adamw_ref import bias_corrections

BLOCK = 4096  # elements per program


@triton.jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    scale_ptr,
    c_ptr,
    n,
    lr,
    beta1,
    beta2,
    eps,
    decay,
    step_size,
    bias2_sqrt,
    HAS_SCALE: tl.constexpr,
    HAS_COPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p * decay
    p = p - step_size * (m / (tl.sqrt(v) / bias2_sqrt + eps))
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    if HAS_COPY:
        c = p.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(c_ptr + offs, c, mask=mask)


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
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place (``step`` counts this one)
    and write ``copy``, if given, from the new parameter."""
    n = param.numel()
    if n == 0:
        return
    bias1, bias2_sqrt = bias_corrections(beta1, beta2, step)
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        grad if grad_scale is None else grad_scale,  # unread without a scale
        param if copy is None else copy,  # unwritten without a copy
        n,
        lr,
        beta1,
        beta2,
        eps,
        1 - lr * weight_decay,
        lr / bias1,
        bias2_sqrt,
        HAS_SCALE=grad_scale is not None,
        HAS_COPY=copy is not None,
        BLOCK=BLOCK,
        num_warps=8,
    )
