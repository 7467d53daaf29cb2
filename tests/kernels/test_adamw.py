"""AdamW's update: the plain-torch reference against torch.optim.AdamW (bit for bit with float32
moments), the folded clip coefficient against pre-scaled gradients, bfloat16 moments against
float32 ones, and the Triton kernel against the reference (in Triton's CPU interpreter, and on
CUDA when there)."""

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter
from torchmoe.kernels import adamw_ref

HYPER = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _tensors(n: int, state_dtype: torch.dtype, seed: int, device: str = "cpu") -> list:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g)
    return [
        p.to(device),
        torch.zeros(n, dtype=state_dtype, device=device),
        torch.zeros(n, dtype=state_dtype, device=device),
    ]


def _grads(n: int, steps: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * (1 + s)).to(device) for s in range(steps)]


def _run(update, n: int, state_dtype: torch.dtype, steps: int, scales=None, device="cpu"):
    p, m, v = _tensors(n, state_dtype, seed=1, device=device)
    for step, grad in enumerate(_grads(n, steps, seed=2, device=device), start=1):
        scale = None if scales is None else torch.tensor(scales[step - 1], device=device)
        update(p, grad, m, v, **HYPER, step=step, grad_scale=scale)
    return p, m, v


def test_reference_is_torch_adamw_bit_for_bit() -> None:
    n, steps = 1000, 6
    p_ref = torch.nn.Parameter(_tensors(n, torch.float32, seed=1)[0].clone())
    opt = torch.optim.AdamW(
        [p_ref],
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
        foreach=False,
    )
    for grad in _grads(n, steps, seed=2):
        p_ref.grad = grad
        opt.step()
    p, m, v = _run(adamw_ref.adamw_update, n, torch.float32, steps)
    assert torch.equal(p, p_ref.detach())
    assert torch.equal(m, opt.state[p_ref]["exp_avg"])
    assert torch.equal(v, opt.state[p_ref]["exp_avg_sq"])


def test_folded_scale_equals_scaled_gradients() -> None:
    n, scales = 500, [0.5, 1.0, 0.125, 0.3]
    p, m, v = _tensors(n, torch.float32, seed=1)
    for step, (grad, c) in enumerate(zip(_grads(n, 4, seed=2), scales), start=1):
        adamw_ref.adamw_update(p, grad * c, m, v, **HYPER, step=step)
    folded = _run(adamw_ref.adamw_update, n, torch.float32, 4, scales)
    for a, b in zip(folded, (p, m, v)):
        assert torch.equal(a, b)


def test_bf16_moments_follow_float32_ones() -> None:
    n, steps = 4000, 20
    p32, m32, v32 = _run(adamw_ref.adamw_update, n, torch.float32, 1)
    p16, m16, v16 = _run(adamw_ref.adamw_update, n, torch.bfloat16, 1)
    # the first step computes in float32 and only rounds what it stores
    assert torch.equal(p16, p32)
    assert torch.equal(m16, m32.bfloat16()) and torch.equal(v16, v32.bfloat16())
    start = _tensors(n, torch.float32, seed=1)[0]
    p32 = _run(adamw_ref.adamw_update, n, torch.float32, steps)[0]
    p16 = _run(adamw_ref.adamw_update, n, torch.bfloat16, steps)[0]
    moved = (p32 - start).abs().mean()
    assert (p16 - p32).abs().mean() < 0.01 * moved  # rounding, not a different update
    assert (p16 - start).abs().mean() > 0.5 * moved


def compare_kernel_to_reference(device: str, sizes: list[int]) -> None:
    from torchmoe.kernels import adamw as fused

    # bfloat16 moments may differ by a unit in the last place: Triton's CPU interpreter
    # truncates float32 -> bfloat16, and on the GPU a float32 value one unit off torch's (fused
    # multiply-adds) can round the other way (measured on an H100: 18 of 1e6 moments, up to
    # 0.002 after 3 steps); the next steps' updates then differ by ~1% of a step. float32
    # moments are held to float32 rounding.
    for n in sizes:
        for state_dtype in (torch.float32, torch.bfloat16):
            bf16 = state_dtype == torch.bfloat16
            tol = {
                "param": (1e-4, 1e-4) if bf16 else (1e-5, 1e-7),  # a step moves 3e-3
                "exp_avg": (2**-7, 2e-2) if bf16 else (1e-5, 1e-7),  # moments ~1
            }
            tol["exp_avg_sq"] = tol["exp_avg"]
            for scales in (None, [0.7, 1.0, 0.2]):
                got = _run(fused.adamw_update, n, state_dtype, 3, scales, device)
                want = _run(adamw_ref.adamw_update, n, state_dtype, 3, scales, device)
                for name, a, b in zip(tol, got, want):
                    assert a.dtype == b.dtype
                    rtol, atol = tol[name]
                    where = f"{name} n={n} {state_dtype} scales={scales}"
                    torch.testing.assert_close(
                        a.float(),
                        b.float(),
                        rtol=rtol,
                        atol=atol,
                        msg=lambda m, where=where: f"{where}: {m}",
                    )


def compare_copies_from_bf16_grads(device: str, sizes: list[int]) -> None:
    """Cached weights' update: bfloat16 gradients in, a bfloat16 copy of the new parameter out
    (the parameter itself as from float32 gradients of the same values)."""
    from torchmoe.kernels import adamw as fused

    exact = device != "cpu"  # the CPU interpreter truncates float32 -> bfloat16
    for n in sizes:
        results = []
        for update in (fused.adamw_update, adamw_ref.adamw_update):
            p, m, v = _tensors(n, torch.float32, seed=1, device=device)
            copy = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device)
            for step, grad in enumerate(_grads(n, 3, seed=2, device=device), start=1):
                update(p, grad.bfloat16(), m, v, **HYPER, step=step, copy=copy)
            results.append((p, copy))
        (p, copy), (p_ref, copy_ref) = results
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-7)
        assert torch.equal(copy_ref, p_ref.bfloat16())
        if exact:
            assert torch.equal(copy, p.bfloat16()), f"n={n}"
        else:
            torch.testing.assert_close(copy.float(), p, rtol=2**-7, atol=0)


def test_triton_kernel_in_interpreter() -> None:
    run_in_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_reference_on_gpu() -> None:
    compare_kernel_to_reference("cuda", [1, 4095, 4096, 1_000_003, 3 * 2**22 + 17])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_writes_bf16_copies_on_gpu() -> None:
    compare_copies_from_bf16_grads("cuda", [1, 4095, 1_000_003])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_addresses_past_2_31_elements() -> None:
    from torchmoe.kernels import adamw as fused

    n = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    p = torch.zeros(n, device="cuda")
    m, v = (torch.zeros(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad = torch.zeros(n, device="cuda")
    grad[-5:] = 1.0  # only the tail moves: elements past 2**31 are reached
    fused.adamw_update(p, grad, m, v, **HYPER, step=1)
    tail = p[-5:].clone()
    assert bool((tail < 0).all()) and int((p != 0).sum()) == 5
    torch.testing.assert_close(tail, torch.full_like(tail, -HYPER["lr"]), rtol=1e-4, atol=0)


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1)
    compare_kernel_to_reference("cpu", [1, 4095, 4097, 9000])
    compare_copies_from_bf16_grads("cpu", [1, 4097])
    print("OK")
