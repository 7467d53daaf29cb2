"""The experts' SwiGLU: the plain-torch reference against float64, and the Triton kernels
(forward and backward) against float64 and the reference, in Triton's CPU interpreter and on
CUDA, eager and compiled."""

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter
from torchmoe.kernels import swiglu_ref


def _exact(h13: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up, its gradient wrt h13) in float64, from the closed forms."""
    gate, up = h13.double().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    g = grad.double()
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return gate * sig * up, torch.cat([d_gate, g * gate * sig], dim=-1)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):
    """h13 [..., 2F] as a strided view into a wider buffer (rows not contiguous), and a
    gradient for the output [..., F]; magnitudes up to ~8 reach silu's flat and steep parts."""
    g = torch.Generator().manual_seed(seed)
    *lead, two_f = shape
    wide = torch.randn(*lead, two_f + 6, generator=g) * 3
    grad = torch.randn(*lead, two_f // 2, generator=g)
    return wide.to(device, dtype)[..., 3 : 3 + two_f], grad.to(device, dtype)


def test_reference_matches_float64() -> None:
    h13, grad = _inputs((37, 2 * 50), torch.float64, "cpu", 0)
    h13.requires_grad_()
    out = swiglu_ref.swiglu(h13)
    out.backward(grad)
    want, want_grad = _exact(h13.detach(), grad)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h13.grad, want_grad, rtol=1e-12, atol=1e-12)


SHAPES = [(0, 256), (1, 2), (37, 2 * 200), (64, 2 * 128), (3, 11, 2 * 70)]


def compare_kernel(device: str, dtype: torch.dtype, compiled: bool = False) -> None:
    """The kernels against float64: in bfloat16 within one rounding (they compute in float32
    and round once) and, on CUDA, closer on average than the reference, which rounds silu
    before the product (Triton's interpreter truncates instead of rounding to nearest); in
    float32 within a few roundings of the float32 math."""
    from torchmoe.kernels import swiglu

    fn = torch.compile(swiglu.swiglu, fullgraph=True) if compiled else swiglu.swiglu
    bf16 = dtype == torch.bfloat16
    rtol = torch.finfo(dtype).eps * (1 if bf16 else 8)
    for seed, shape in enumerate(SHAPES):
        h13, grad = _inputs(shape, dtype, device, seed)
        want, want_grad = _exact(h13, grad)
        got = {}
        for name, op in (("kernel", fn), ("reference", swiglu_ref.swiglu)):
            leaf = h13.detach().requires_grad_()
            out = op(leaf)
            out.backward(grad)
            assert out.dtype == dtype and out.shape == want.shape, (name, shape)
            assert leaf.grad.shape == h13.shape, (name, shape)
            got[name] = (out.double(), leaf.grad.double())
        case = f"{device} {dtype} shape={shape} compiled={compiled}"
        out, grad13 = got["kernel"]
        # atol: the gate gradient's terms cancel near gate = -1.28, in float32 first
        torch.testing.assert_close(out, want, rtol=rtol, atol=1e-5, msg=case)
        torch.testing.assert_close(grad13, want_grad, rtol=rtol, atol=1e-5, msg=case)
        if bf16 and device == "cuda" and h13.numel() >= 1000:  # one element may round either way
            ref_out, ref_grad = got["reference"]
            assert (out - want).abs().mean() < (ref_out - want).abs().mean(), case
            assert (grad13 - want_grad).abs().mean() < (ref_grad - want_grad).abs().mean(), case


def test_kernels_in_interpreter() -> None:
    run_in_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_kernels_on_gpu(compiled: bool) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        compare_kernel("cuda", dtype, compiled)


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1)
    compare_kernel("cpu", torch.float32)
    compare_kernel("cpu", torch.bfloat16)
    print("OK")
