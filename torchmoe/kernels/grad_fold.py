"""Fold micro-batches' bfloat16 gradients into a float32 sum in one pass at memory speed.

torch's ``total.add_(grad)`` across dtypes takes its unvectorised elementwise path: on one H100,
4 accumulated micro-batches of DeepSeek-V3-16B-L4 spent ~26 ms a step there, plus ~7 ms in
``grad.float()`` for the first. One pass takes up to ``MAX_GRADS`` gradients and reads and
writes the sum once for all of them (``training.grads_per_fold``). The step's last pass can also
return the sum of squares of the finished sum, so the gradient norm needs no pass of its own.
Same contract as ``grad_fold_ref.fold``; contiguous tensors; runs under TRITON_INTERPRET=1 on CPU
for tests.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from torchmoe.kernels.grad_fold_ref import MAX_GRADS, check_count

BLOCK = 4096  # elements per program


@triton.jit
def _add(acc, g_ptr, offs, mask):
    return acc + tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fold_kernel(
    total_ptr,
    squares_ptr,
    g0,
    g1,
    g2,
    g3,
    g4,
    g5,
    g6,
    g7,
    n,
    HAS_TOTAL: tl.constexpr,
    N_GRADS: tl.constexpr,
    SQUARES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(g0 + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_TOTAL:  # the sum first, then the gradients in order: the reference's additions
        acc = tl.load(total_ptr + offs, mask=mask, other=0.0) + acc
    if N_GRADS > 1:
        acc = _add(acc, g1, offs, mask)
    if N_GRADS > 2:
        acc = _add(acc, g2, offs, mask)
    if N_GRADS > 3:
        acc = _add(acc, g3, offs, mask)
    if N_GRADS > 4:
        acc = _add(acc, g4, offs, mask)
    if N_GRADS > 5:
        acc = _add(acc, g5, offs, mask)
    if N_GRADS > 6:
        acc = _add(acc, g6, offs, mask)
    if N_GRADS > 7:
        acc = _add(acc, g7, offs, mask)
    tl.store(total_ptr + offs, acc, mask=mask)
    if SQUARES:  # one partial per program, summed by the caller in a fixed order
        tl.store(squares_ptr + pid, tl.sum(acc * acc, axis=0))


@torch.no_grad()
def fold(
    total: torch.Tensor | None, grads: Sequence[torch.Tensor], squares: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grad_fold_ref.fold`` in one pass (the squares summed per program, then in order)."""
    check_count(grads)
    has_total = total is not None
    if not has_total:
        total = torch.empty_like(grads[0], dtype=torch.float32)
    n = total.numel()
    programs = triton.cdiv(n, BLOCK)
    partials = torch.empty(programs, dtype=torch.float32, device=total.device) if squares else None
    if n:
        pointers = list(grads) + [grads[0]] * (MAX_GRADS - len(grads))
        _fold_kernel[(programs,)](
            total,
            total if partials is None else partials,
            *pointers,
            n,
            HAS_TOTAL=has_total,
            N_GRADS=len(grads),
            SQUARES=squares,
            BLOCK=BLOCK,
        )
    return total, partials.sum() if squares else None
