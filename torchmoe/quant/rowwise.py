"""Rowwise float8 quantization shared by torchmoe's float8 GEMMs (``float8_linear.py``,
``float8_grouped_mm.py``).

Scales are powers of two (exact to apply and invert). Inside a compiled region the quantization
is traced with it and fused into its neighbours; called eagerly on CUDA (the output head, which
runs outside the compiled blocks, or an uncompiled run) it goes through its own compiled graph,
one fused reduction and cast instead of about ten passes over the tensor.
"""

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max


def _quantize(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.detach().abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(FLOAT8_MAX / amax)))
    data = (t.float() * scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
    return data, scale.reciprocal()


# dynamic: one graph serves every shape (a model's linears have many; static shapes ran into
# dynamo's recompile limit); past the limit it would run eagerly rather than fail.
_quantize_compiled = torch.compile(_quantize, dynamic=True)


def quantize_rowwise(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 dequantization factors): ``t`` scaled along ``dim`` by the
    largest power of two that keeps its largest magnitude within float8's range. The factors
    keep ``dim`` as a size-1 dimension; values times factors approximate ``t``."""
    if t.is_cuda and not torch.compiler.is_compiling():
        # detached and outside autocast, so that forward and backward calls look alike to
        # dynamo's guards (grad and autocast state would each add graphs)
        with torch.autocast(t.device.type, enabled=False):
            return _quantize_compiled(t.detach(), dim)
    return _quantize(t, dim)
