"""Dense linears in float8 with a bfloat16 weight gradient
(``quantize.float8_linear_weight_grad = "bfloat16"``), the dense twin of ``float8_grouped_mm``.

torchao's Float8Linear wraps the float32 weight and casts it every forward, which turns off
torchmoe's cached bfloat16 weights (``training.compute_weights``) and brings back their casts.
Here the forward and input-gradient GEMMs are float8 with rowwise power-of-two scales (per token
row, per weight row or column), the weight gradient is the plain bf16 GEMM, and the weight
stays a plain parameter, so cached weights and torchmoe's AdamW apply as in bf16 training.
``torch._scaled_mm`` runs on CUDA only; elsewhere the same quantized values are multiplied in
float32 (``emulated``), which the tests compare against.

Legend (torchmoe/__init__.py): M token rows, K the GEMM's input dim, N its output dim.
"""

import torch
from torch import nn

from torchmoe.quant.rowwise import quantize_rowwise


def scaled_mm(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor,
    a_factor_M1: torch.Tensor,
    b_factor_1N: torch.Tensor,
    fast_accum: bool,
) -> torch.Tensor:
    """(a * a_factor) @ (b * b_factor) in bfloat16; ``a`` row-major, ``b`` column-major (as
    ``torch._scaled_mm`` takes them)."""
    if a_MK.is_cuda:
        return torch._scaled_mm(
            a_MK,
            b_KN,
            scale_a=a_factor_M1,
            scale_b=b_factor_1N,
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
    return emulated(a_MK, b_KN, a_factor_M1, b_factor_1N)


def emulated(
    a_MK: torch.Tensor, b_KN: torch.Tensor, a_factor_M1: torch.Tensor, b_factor_1N: torch.Tensor
) -> torch.Tensor:
    """``scaled_mm`` as a float32 GEMM of the dequantized operands."""
    return ((a_MK.float() * a_factor_M1) @ (b_KN.float() * b_factor_1N)).to(torch.bfloat16)


class Float8MM(torch.autograd.Function):
    """y = x @ w.T (``w`` [N, K], nn.Linear's layout), forward and input gradient in float8,
    weight gradient in bfloat16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # row-major a
        w_NK = w_NK.to(torch.bfloat16)
        x_q, x_factor = quantize_rowwise(x_MK, dim=-1)
        w_q, w_factor = quantize_rowwise(w_NK, dim=-1)  # per output n, over K
        ctx.save_for_backward(x_MK, w_NK)
        # [N, K] row-major is the column-major [K, N] operand; the output GEMM accumulates
        # fast, the gradient's below exactly (torchao's rowwise recipe does the same)
        y = scaled_mm(x_q, w_q.t(), x_factor, w_factor.t(), fast_accum=True)
        return y.view(*x.shape[:-1], w_NK.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_MK, w_NK = ctx.saved_tensors
        grad_MN = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_factor = quantize_rowwise(grad_MN, dim=-1)
            # dx = grad @ w: one scale per input k, over its N outputs ([1, K]); the values
            # laid out [K, N] row-major (the column-major [N, K] operand)
            w_q, w_factor = quantize_rowwise(w_NK, dim=0)
            grad_x = scaled_mm(g_q, w_q.t().contiguous().t(), g_factor, w_factor, fast_accum=False)
            grad_x = grad_x.view(*grad.shape[:-1], x_MK.shape[-1])
        if ctx.needs_input_grad[1]:  # a frozen weight skips it
            grad_w = grad_MN.t() @ x_MK  # [N, K], bf16
        return grad_x, grad_w


class Float8Linear(nn.Linear):
    """nn.Linear whose GEMMs run through ``Float8MM``; the same parameters, names and state
    dict, so checkpoints and cached weights see a plain linear."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        """A Float8Linear holding ``linear``'s own parameter objects (meta ones included)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bfloat16 out, as autocast's linear; without autocast, in ``x``'s dtype."""
        y = Float8MM.apply(x, self.weight)
        if not torch.is_autocast_enabled(x.device.type):
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)
