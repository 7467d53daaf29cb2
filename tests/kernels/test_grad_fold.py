"""Folding bfloat16 gradients into a float32 sum: the Triton kernel against the plain-torch
reference (exactly: both add the same float32 values in the same order), in Triton's CPU
interpreter and on CUDA, and the reference against a float64 sum; the sum of squares the last
fold takes against float64."""

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter
from torchmoe.kernels import grad_fold_ref
from torchmoe.kernels.grad_fold_ref import MAX_GRADS


def _grads(n: int, count: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n + count)
    return [
        (torch.randn(n, generator=g) * 10 ** (i % 3 - 1)).bfloat16().to(device)
        for i in range(count)
    ]


def _fold_all(fold, grads: list[torch.Tensor], per_pass: int = 1) -> tuple:
    """Every gradient into one sum, ``per_pass`` per pass; the last pass takes the squares."""
    total = squares = None
    for i in range(0, len(grads), per_pass):
        last = i + per_pass >= len(grads)
        total, squares = fold(total, grads[i : i + per_pass], squares=last)
    return total, squares


def test_reference_sums_in_float32() -> None:
    grads = _grads(5000, 4, "cpu")
    total, squares = _fold_all(grad_fold_ref.fold, grads)
    assert total.dtype == torch.float32
    want = torch.stack([g.double() for g in grads]).sum(0)
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(squares.double(), want.square().sum(), rtol=1e-5, atol=0)
    for per_pass in (2, 3, 4):
        assert torch.equal(_fold_all(grad_fold_ref.fold, grads, per_pass)[0], total)
    rounded = grads[0].clone()
    for g in grads[1:]:
        rounded += g  # bfloat16 sums
    assert (rounded.double() - want).abs().max() > 10 * (total.double() - want).abs().max()


def compare_kernel_to_reference(device: str, sizes: list[int]) -> None:
    from torchmoe.kernels import grad_fold

    for n in sizes:
        # (count, per pass): one at a time, pairs, a pair then one, all in one pass, the most
        for count, per_pass in [(4, 1), (4, 2), (3, 2), (4, 4), (5, 3), (MAX_GRADS, MAX_GRADS)]:
            grads = _grads(n, count, device)
            got, got_squares = _fold_all(grad_fold.fold, grads, per_pass)
            want, _ = _fold_all(grad_fold_ref.fold, grads)
            case = f"n={n} count={count} per_pass={per_pass}"
            assert got.dtype == torch.float32 and got.shape == want.shape, case
            assert torch.equal(got, want), case
            exact = want.double().square().sum()
            torch.testing.assert_close(got_squares.double(), exact, rtol=1e-5, atol=0, msg=case)
        none = grad_fold.fold(None, _grads(n, 2, device), squares=False)[1]
        assert none is None
    total, squares = grad_fold.fold(None, _grads(0, 2, device), squares=True)
    assert total.numel() == 0 and squares.item() == 0.0


@pytest.mark.parametrize("count", [0, MAX_GRADS + 1])
def test_a_fold_takes_one_to_max_gradients(count: int) -> None:
    with pytest.raises(ValueError, match=f"1 to {MAX_GRADS} gradients"):
        grad_fold_ref.fold(None, _grads(8, count, "cpu"))


def test_triton_kernel_in_interpreter() -> None:
    run_in_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_reference_on_gpu() -> None:
    compare_kernel_to_reference("cuda", [1, 4095, 4096, 1_000_003])


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1)
    compare_kernel_to_reference("cpu", [1, 4095, 4097, 9000])
    print("OK")
