"""The routed experts' grouped GEMM in float8 with a bfloat16 weight gradient
(``quantize.float8_experts_weight_grad = "bfloat16"``).

torchao's float8 grouped GEMM also runs the weight gradient in float8. Its operands need scales
per expert group along the token dimension, and on one H100 the kernel computing them took
18.5 ms of an 81 ms DeepSeek-V3-16B-L4 step, more than the float8 GEMMs saved: float8 ran at
0.74x of bf16. Here the forward and input-gradient GEMMs are float8 with rowwise scales (the
scales of a row of tokens or of an expert's weight column need no group boundaries), and the
weight gradient is the plain bf16 grouped GEMM, as in the bf16 model.

Scales are powers of two (``rowwise.py``). Weights stay plain tensors (no wrapper
subclass), so bfloat16 cached weights and torchmoe's AdamW kernel apply as in bf16 training.
``torch._scaled_grouped_mm`` runs on CUDA only; elsewhere the same quantized values are
multiplied in float32 (``emulated``), which the tests compare against.

Legend (torchmoe/__init__.py): M routed token copies grouped by expert, E experts, K the
GEMM's input dim, N its output dim.
"""

import torch

from torchmoe.quant.rowwise import quantize_rowwise


def scaled_grouped_mm(
    a_MK: torch.Tensor,
    b_EKN: torch.Tensor,
    a_factor_M: torch.Tensor,
    b_factor_EN: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """Per group e: (a rows of e * a_factor) @ (b[e] * b_factor[e]) in bfloat16; ``a`` row-major,
    ``b`` column-major (as ``torch._scaled_grouped_mm`` takes them)."""
    if a_MK.is_cuda:
        return torch._scaled_grouped_mm(
            a_MK,
            b_EKN,
            a_factor_M,
            b_factor_EN,
            offsets,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
    return emulated(a_MK, b_EKN, a_factor_M, b_factor_EN, offsets)


def emulated(
    a_MK: torch.Tensor,
    b_EKN: torch.Tensor,
    a_factor_M: torch.Tensor,
    b_factor_EN: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """``scaled_grouped_mm`` as a float32 grouped GEMM of the dequantized operands."""
    a = a_MK.float() * a_factor_M[:, None]
    b = b_EKN.float() * b_factor_EN[:, None, :]
    return torch._grouped_mm(a, b, offs=offsets).to(torch.bfloat16)


class Float8GroupedMM(torch.autograd.Function):
    """y = x @ w[e].T for the rows of each group e (``w`` [E, N, K], nn.Linear's layout),
    forward and input gradient in float8, weight gradient in bfloat16."""

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets: torch.Tensor):
        x_MK, w_ENK = x_MK.to(torch.bfloat16), w_ENK.to(torch.bfloat16)
        x_q, x_factor = quantize_rowwise(x_MK, dim=-1)
        # one scale per output column n of expert e, over its K inputs; [E, N, K] row-major is
        # the column-major [E, K, N] operand the GEMM wants
        w_q, w_factor = quantize_rowwise(w_ENK, dim=-1)
        ctx.save_for_backward(x_MK, w_ENK, offsets)
        return scaled_grouped_mm(
            x_q, w_q.transpose(-2, -1), x_factor.squeeze(-1), w_factor.squeeze(-1), offsets
        )

    @staticmethod
    def backward(ctx, grad_MN: torch.Tensor):
        x_MK, w_ENK, offsets = ctx.saved_tensors
        grad_MN = grad_MN.to(torch.bfloat16).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_factor = quantize_rowwise(grad_MN, dim=-1)
            # dx = grad @ w[e]: one scale per input k of expert e, over its N outputs
            # ([E, 1, K]); the values laid out [E, K, N] row-major (the column-major [E, N, K]
            # operand)
            w_q, w_factor = quantize_rowwise(w_ENK, dim=-2)
            grad_x = scaled_grouped_mm(
                g_q,
                w_q.transpose(-2, -1).contiguous().transpose(-2, -1),
                g_factor.squeeze(-1),
                w_factor.squeeze(-2),
                offsets,
            )
        if ctx.needs_input_grad[1]:  # frozen experts skip it
            grad_w = torch._grouped_mm(grad_MN.t(), x_MK, offs=offsets)  # [E, N, K], bf16
        return grad_x, grad_w, None


def float8_grouped_mm(
    x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)`` through ``Float8GroupedMM``.
    Every group's row count must be a multiple of 16 (the dispatcher pads them)."""
    return Float8GroupedMM.apply(x_MK, w_ENK, offsets)
