"""torchmoe's float8 grouped GEMM (``quantize.float8_experts_weight_grad = "bfloat16"``): the
rowwise quantization, forward and input gradient against float64 within float8's rounding, the
weight gradient exactly the bf16 grouped GEMM, the experts converted without wrapping their
weights; on an sm90 GPU the kernel against the emulation and a training run."""

import copy

import pytest
import torch

from tests.quant.sm90 import float8_trainer, needs_sm90
from tests.quant.test_float8_experts import _moe_layer
from torchmoe.config.load import build_config
from torchmoe.models.moe.moe import MoE
from torchmoe.quant.float8 import apply_float8_experts
from torchmoe.quant.float8_grouped_mm import emulated, float8_grouped_mm
from torchmoe.quant.rowwise import FLOAT8_MAX, quantize_rowwise


def _problem(device: str = "cpu", seed: int = 0):
    """x [M, K], w [E, N, K] (bf16) and offsets with an empty group, groups of 16-row multiples."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([32, 0, 48, 16, 64])
    M, K, N = int(counts.sum()), 64, 96
    x = (torch.randn(M, K, generator=g) * 3).bfloat16().to(device)
    w = (torch.randn(len(counts), N, K, generator=g) * 0.05).bfloat16().to(device)
    offsets = torch.cumsum(counts, 0).to(torch.int32).to(device)
    return x, w, offsets


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rowwise_scales_are_powers_of_two_that_fill_float8s_range():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(7, 300, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    t[3] = 0.0  # an all-zero row stays zero, with a finite factor
    data, factor = quantize_rowwise(t, dim=-1)
    assert data.dtype == torch.float8_e4m3fn and factor.shape == (7, 1)
    assert torch.isfinite(factor).all()
    assert torch.equal(torch.exp2(torch.round(torch.log2(factor))), factor)
    peak = data.float().abs().amax(-1)
    nonzero = torch.arange(7) != 3
    assert (peak[nonzero] > FLOAT8_MAX / 2).all() and (peak <= FLOAT8_MAX).all()
    assert (data[3].float() == 0).all()
    back = data.float() * factor
    # e4m3 keeps 3 mantissa bits: each normal value within 2^-4 of itself
    normal = back.abs() >= 2.0**-6 * factor
    assert ((back - t).abs() <= t.abs() * 2.0**-4 + 1e-30)[normal].all()


def test_forward_and_gradients_against_float64():
    x, w, offsets = _problem()
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = float8_grouped_mm(x, w, offsets)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rows = torch.repeat_interleave(torch.diff(offsets, prepend=offsets.new_zeros(1)).long())
    y64 = torch.einsum("mk,mnk->mn", x64, w64[rows])
    y64.backward(grad.double())
    assert y.dtype == torch.bfloat16
    assert _relative(y, y64) < 0.06  # float8 inputs, 3 mantissa bits
    assert _relative(x.grad, x64.grad) < 0.06
    assert _relative(w.grad, w64.grad) < 0.01  # bf16 only
    # the weight gradient is the bf16 grouped GEMM itself, not a float8 one
    want = torch._grouped_mm(grad.t(), x.detach(), offs=offsets)
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, want)


def _moe() -> MoE:
    torch.manual_seed(0)
    return _moe_layer(dim=128, hidden=64, experts=8)


def _bf16_weight_grad() -> object:
    return build_config(
        {},
        [
            ("quantize.float8_experts", "true"),
            ("quantize.float8_experts_weight_grad", "bfloat16"),
        ],
    ).quantize


def test_conversion_keeps_plain_weights_and_sets_the_float8_gemm():
    layer = _moe()
    apply_float8_experts(layer, _bf16_weight_grad())
    assert layer.experts.grouped_mm is float8_grouped_mm
    for w in (layer.experts.w13, layer.experts.w2):
        assert type(w) is torch.nn.Parameter and type(w.data) is torch.Tensor
    assert layer.dispatcher.pad_multiple == 16


def test_a_float8_layer_follows_the_bf16_layer():
    bf16 = _moe().to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    apply_float8_experts(fp8, _bf16_weight_grad())
    x = torch.randn(2, 64, 128, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    ref, out = bf16(x), fp8(x)
    assert _relative(out, ref) < 0.1
    grad = torch.randn_like(out)
    ref.backward(grad)
    out.backward(grad)
    assert _relative(fp8.experts.w13.grad, bf16.experts.w13.grad) < 0.1
    assert _relative(fp8.experts.w2.grad, bf16.experts.w2.grad) < 0.1


@needs_sm90
def test_the_kernel_matches_the_emulation():
    x, w, offsets = _problem("cuda")
    x_q, x_f = quantize_rowwise(x, -1)
    w_q, w_f = quantize_rowwise(w, -1)
    args = (x_q, w_q.transpose(-2, -1), x_f.squeeze(-1), w_f.squeeze(-1), offsets)
    got = torch._scaled_grouped_mm(*args, out_dtype=torch.bfloat16, use_fast_accum=True)
    assert _relative(got, emulated(*args)) < 1e-2
    x.requires_grad_(True)
    w.requires_grad_(True)
    float8_grouped_mm(x, w, offsets).sum().backward()  # the kernel's backward runs
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@needs_sm90
@pytest.mark.parametrize("compiled", [False, True])
def test_float8_experts_with_a_bf16_weight_gradient_train(tiny_config, compiled):
    trainer = float8_trainer(
        tiny_config, compiled, float8_experts="true", float8_experts_weight_grad="bfloat16"
    )
    assert trainer.cached_weights is not None  # plain expert weights: the bf16 copies apply
    losses = trainer.train()
    assert losses[-1] < losses[0] - 1.0, losses


def test_frozen_weights_get_no_gradient_and_inputs_still_do():
    x, w, offsets = _problem()
    x.requires_grad_(True)
    float8_grouped_mm(x, w, offsets).float().sum().backward()  # w needs no gradient
    assert w.grad is None and x.grad is not None and torch.isfinite(x.grad).all()
