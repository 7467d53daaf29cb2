"""Folding bfloat16 gradients into a float32 sum: the Triton kernel against the plain-torch
reference (exactly: both add the same float32 values), in Triton's CPU interpreter and on CUDA,
and the reference against a float64 sum."""

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter
from torchmoe.kernels import grad_fold_ref


def _grads(n: int, count: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [
        (torch.randn(n, generator=g) * 10 ** (i - 1)).bfloat16().to(device) for i in range(count)
    ]


def _fold_all(fold, grads: list[torch.Tensor], pairs: bool = False) -> torch.Tensor:
    """Every gradient into one sum, one per pass or (``pairs``) two per pass."""
    total, per_pass = None, 2 if pairs else 1
    for i in range(0, len(grads), per_pass):
        total = fold(total, grads[i : i + per_pass])
    return total


def test_reference_sums_in_float32() -> None:
    grads = _grads(5000, 4, "cpu")
    total = _fold_all(grad_fold_ref.fold, grads)
    assert total.dtype == torch.float32
    want = torch.stack([g.double() for g in grads]).sum(0)
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(_fold_all(grad_fold_ref.fold, grads, pairs=True), total)
    rounded = _fold_all(lambda t, g: g[0].clone() if t is None else t.add_(g[0]), grads)  # bf16
    assert (rounded.double() - want).abs().max() > 10 * (total.double() - want).abs().max()


def compare_kernel_to_reference(device: str, sizes: list[int]) -> None:
    from torchmoe.kernels import grad_fold

    for n in sizes:
        for count, pairs in [(4, False), (4, True), (3, True)]:  # (3, True): a pair, then one
            grads = _grads(n, count, device)
            got = _fold_all(grad_fold.fold, grads, pairs)
            want = _fold_all(grad_fold_ref.fold, grads)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.equal(got, want), f"n={n} count={count} pairs={pairs}"


def test_a_fold_takes_one_or_two_gradients() -> None:
    with pytest.raises(ValueError, match="one or two gradients"):
        grad_fold_ref.fold(None, _grads(8, 3, "cpu"))


def test_triton_kernel_in_interpreter() -> None:
    run_in_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_reference_on_gpu() -> None:
    compare_kernel_to_reference("cuda", [1, 4095, 4096, 1_000_003])


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1)
    compare_kernel_to_reference("cpu", [1, 4095, 4097, 9000])
    print("OK")
