"""MoE token permutation: the plain-torch references against python loops in float64, the
Triton kernels against the references (in Triton's CPU interpreter, and on CUDA when there).

Legend: T tokens, D model dim, E experts, K experts per token, M buffer rows, P padding multiple.
"""

import os

import pytest
import torch

from tests.kernels.interpreter import run_in_interpreter
from torchmoe.kernels import moe_permute_ref as ref

# T, K, E, P, drops: T prime-ish, K up to 3, pad 1 and 16; with drops, about a third of the
# copies are dropped (expert id -1), as a capacity limit does.
CASES = [
    (1, 1, 4, 1, False),
    (13, 2, 8, 1, False),
    (37, 3, 8, 16, False),
    (130, 2, 6, 16, False),
    (67, 1, 5, 4, False),
    (0, 2, 4, 16, False),
    (41, 2, 8, 1, True),
    (53, 3, 6, 16, True),
]


def random_routing(
    T: int, K: int, E: int, seed: int, device="cpu", drops: bool = False
) -> torch.Tensor:
    """Distinct experts per token, drawn from E - 2 of them, so two experts stay empty; with
    ``drops``, a third of the copies dropped."""
    g = torch.Generator().manual_seed(seed)
    used = torch.randperm(E, generator=g)[: max(K, E - 2)]
    rows = [used[torch.randperm(len(used), generator=g)[:K]] for _ in range(T)]
    idx = torch.stack(rows) if T else torch.empty(0, K, dtype=torch.int64)
    if drops:
        idx = torch.where(torch.rand(idx.shape, generator=g) < 1 / 3, -1, idx)
    return idx.to(device)


def fixed_group_rows(idx_TK: torch.Tensor, E: int) -> int:
    """A fixed group size every expert's copies fit in (as a capacity gives), with room left."""
    kept = idx_TK[idx_TK >= 0]
    return int(torch.bincount(kept, minlength=E).max()) + 3


def loop_indices(idx_TK: torch.Tensor, E: int, P: int, G: int = 0) -> tuple[list, list, list]:
    """dest, src, padded counts by walking experts, then tokens, in order; dropped copies -1."""
    T, K = idx_TK.shape
    dest, src, counts = [[-1] * K for _ in range(T)], [], []
    for e in range(E):
        mine = [(t, k) for t in range(T) for k in range(K) if idx_TK[t, k] == e]
        for t, k in mine:
            dest[t][k] = len(src)
            src.append(t * K + k)
        pad = G - len(mine) if G else -len(mine) % P
        src += [-1] * pad
        counts.append(len(mine) + pad)
    src += [-1] * (ref.num_rows(T * K, E, P, G) - len(src))
    return dest, src, counts


def loop_permute(x_TD, dest, M):
    rows = [None] * M
    for t, row in enumerate(dest):
        for r in row:
            if r >= 0:
                rows[r] = x_TD[t]
    zero = x_TD.new_zeros(x_TD.shape[1])
    return torch.stack([r if r is not None else zero for r in rows])


def loop_unpermute(y_MD, dest, w_TK):
    zero = y_MD.new_zeros(y_MD.shape[1])
    return torch.stack(
        [
            sum((w_TK[t, k] * y_MD[r] for k, r in enumerate(row) if r >= 0), zero)
            for t, row in enumerate(dest)
        ]
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fixed_rows", [False, True])
def test_reference_indices_match_loop(case, fixed_rows):
    T, K, E, P, drops = case
    idx = random_routing(T, K, E, seed=T + E, drops=drops)
    G = fixed_group_rows(idx, E) if fixed_rows else 0
    dest, src, counts = ref.permute_indices(idx, E, P, G)
    want_dest, want_src, want_counts = loop_indices(idx, E, P, G)
    assert dest.dtype == src.dtype == counts.dtype == torch.int64
    assert src.shape == (ref.num_rows(T * K, E, P, G),)
    assert dest.tolist() == (want_dest if T else [])
    assert src.tolist() == want_src and counts.tolist() == want_counts
    if G:
        assert counts.tolist() == [G] * E
    else:
        assert all(c % P == 0 for c in counts.tolist()) and 0 in counts.tolist()
    assert (dest < 0).any() == (drops and T > 0)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] > 0])
def test_reference_data_movement_and_gradients_match_loop(case):
    T, K, E, P, drops = case
    D = 5
    idx = random_routing(T, K, E, seed=T, drops=drops)
    dest, src, _ = ref.permute_indices(idx, E, P, fixed_group_rows(idx, E) if drops else 0)
    M = src.numel()
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(M, D, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, generator=g, requires_grad=True)
    x_MD = ref.permute(x, dest, src)
    out = ref.unpermute(y, dest, src, w)
    gx_MD, g_out = torch.randn_like(x_MD), torch.randn_like(out)
    got = torch.autograd.grad([x_MD, out], [x, y, w], [gx_MD, g_out])

    want_x = loop_permute(x, dest.tolist(), M)
    want_out = loop_unpermute(y, dest.tolist(), w)
    want = torch.autograd.grad([want_x, want_out], [x, y, w], [gx_MD, g_out])
    torch.testing.assert_close(x_MD, want_x, rtol=0, atol=0)
    torch.testing.assert_close(out, want_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert (x_MD[src < 0] == 0).all() and (got[1][src < 0] == 0).all()


def test_reference_gradcheck():
    idx = random_routing(7, 2, 5, seed=1)
    dest, src, _ = ref.permute_indices(idx, 5, 4)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(src.numel(), 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ref.permute(x, dest, src), (x,))
    assert torch.autograd.gradcheck(lambda y, w: ref.unpermute(y, dest, src, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: ref.unpermute(y, dest, src, None), (y,))


def test_unpermute_never_reads_rows_without_copies():
    idx = random_routing(11, 2, 6, seed=3)
    dest, src, _ = ref.permute_indices(idx, 6, 16)
    y = torch.randn(src.numel(), 4, requires_grad=True)
    y_nan = y.detach().clone()
    y_nan[src < 0] = float("nan")  # what grouped_mm may leave past the last group
    out = ref.unpermute(y_nan.requires_grad_(), dest, src, torch.rand(11, 2))
    out.sum().backward()
    assert out.isfinite().all() and y_nan.grad.isfinite().all()
    assert (y_nan.grad[src < 0] == 0).all()


def test_reference_accumulates_in_float32_and_returns_y_dtype():
    idx = random_routing(9, 3, 8, seed=4)
    dest, src, _ = ref.permute_indices(idx, 8, 1)
    y = torch.randn(src.numel(), 16).bfloat16()
    w = torch.rand(9, 3)  # float32 weights with bfloat16 activations
    out = ref.unpermute(y, dest, src, w)
    assert out.dtype == torch.bfloat16
    want = loop_unpermute(y.double(), dest.tolist(), w.double())
    torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=8e-3)


# ----------------------------------------------------------------------------- Triton kernels


def compare_fused_to_reference(fused, device: str, dtype: torch.dtype, cases=CASES, D=48) -> None:
    """Forward and backward of the fused ops equal the references on the same inputs."""
    tol = (
        {"rtol": 1e-5, "atol": 3e-4} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    )  # summation order differs
    for T, K, E, P, drops in cases:
        idx = random_routing(T, K, E, seed=T * 7 + P, device=device, drops=drops)
        G = fixed_group_rows(idx, E) if drops and T % 2 else 0
        got_idx, want_idx = fused.permute_indices(idx, E, P, G), ref.permute_indices(idx, E, P, G)
        for a, b in zip(got_idx, want_idx):
            assert torch.equal(a, b), (T, K, E, P)
        dest, src, _ = want_idx
        g = torch.Generator(device=device).manual_seed(T)
        x = torch.randn(T, D, device=device, generator=g).to(dtype)
        y = torch.randn(src.numel(), D, device=device, generator=g).to(dtype)
        y[src < 0] = float("nan")  # rows without copies must never be read
        w = torch.rand(T, K, device=device, generator=g)  # float32 weights
        g_MD = torch.randn(src.numel(), D, device=device, generator=g).to(dtype)
        g_TD = torch.randn(T, D, device=device, generator=g).to(dtype)
        results = []
        for ops in (fused, ref):
            xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
            x_MD = ops.permute(xs, dest, src)
            out = ops.unpermute(ys, dest, src, ws)
            y1 = ops.unpermute(ys, dest, src, None)
            torch.autograd.backward([x_MD, out, y1], [g_MD, g_TD, g_TD])
            results.append([x_MD, out, y1, xs.grad, ys.grad, ws.grad])
        names = ["permute", "unpermute", "unpermute(w=None)", "grad x", "grad y", "grad w"]
        for name, a, b in zip(names, *results):
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, **tol, msg=f"{name} {(T, K, E, P)} {dtype}")
        assert (results[0][0][src < 0] == 0).all() and (results[0][4][src < 0] == 0).all()


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (read when triton is imported)."""
    from torchmoe.kernels import moe_permute as fused
    from torchmoe.models.moe.dispatch import LocalDispatcher

    probe = fused._place_kernel
    try:
        torch.library.wrap_triton(probe)
    except RuntimeError:  # older torch: wrap_triton refuses interpreted kernels
        print("SKIP: this torch's wrap_triton does not take interpreted kernels")
        return
    compare_fused_to_reference(fused, "cpu", torch.float32, cases=CASES[:4] + CASES[5:], D=40)
    compare_fused_to_reference(fused, "cpu", torch.bfloat16, cases=CASES[2:3], D=40)
    # The dispatcher's triton backend is the same computation as its torch one.
    idx = random_routing(20, 2, 6, seed=0)
    x, w = torch.randn(20, 8), torch.rand(20, 2)
    outs = []
    for backend in ("triton", "torch"):
        d = LocalDispatcher(6, backend, pad_multiple=16)
        x_MD, counts, state = d.dispatch(x, idx)
        outs.append((x_MD, counts, d.combine(2 * x_MD, w, state)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # With dropped copies, forward and backward through the dispatcher, both backends.
    idx = random_routing(23, 3, 6, seed=1, drops=True)
    grads = []
    for backend in ("triton", "torch"):
        g = torch.Generator().manual_seed(2)
        xs = torch.randn(23, 8, generator=g).requires_grad_()
        ws = torch.rand(23, 3, generator=g).requires_grad_()
        d = LocalDispatcher(6, backend)
        x_MD, counts, state = d.dispatch(xs, idx, capacity=fixed_group_rows(idx, 6))
        out = d.combine(x_MD.sin(), ws, state)
        out.pow(2).sum().backward()
        grads.append((out, counts, xs.grad, ws.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    print("OK")


def test_triton_kernels_in_interpreter() -> None:
    run_in_interpreter(__file__)


def test_triton_backend_refuses_cpu_tensors():
    """The config check refuses the Triton backend without CUDA up front
    (tests/models/moe/test_dispatch.py); a CPU tensor reaching it anyway is a bug, not a
    user error."""
    from torchmoe.models.moe.dispatch import LocalDispatcher

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors")
    with pytest.raises(RuntimeError, match=r"triton permute backend needs CUDA tensors"):
        LocalDispatcher(4, "triton").dispatch(torch.randn(3, 2), torch.zeros(3, 1).long())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_reference_on_gpu(dtype):
    from torchmoe.kernels import moe_permute as fused

    big = [
        (4096, 8, 64, 16, False),
        (1000, 6, 64, 1, False),
        (3001, 2, 8, 16, False),
        (4097, 8, 64, 16, True),
        (2001, 4, 16, 1, True),
    ]
    compare_fused_to_reference(fused, "cuda", dtype, cases=CASES + big, D=256)
    compare_fused_to_reference(fused, "cuda", dtype, cases=[(300, 4, 16, 16, False)], D=7168)


@pytest.mark.gpu
@needs_cuda
def test_triton_kernels_are_deterministic():
    from torchmoe.kernels import moe_permute as fused

    idx = random_routing(8192, 8, 256, seed=0, device="cuda")
    x = torch.randn(8192, 64, device="cuda")
    w = torch.rand(8192, 8, device="cuda")
    runs = []
    for _ in range(2):
        dest, src, counts = fused.permute_indices(idx, 256, 16)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fused.unpermute(fused.permute(xs, dest, src) * 1.5, dest, src, ws)
        out.pow(2).sum().backward()
        runs.append([dest, src, counts, out, xs.grad, ws.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pad", [1, 16])
def test_dispatcher_compiles_fullgraph_with_triton(pad):
    from torchmoe.models.moe.dispatch import LocalDispatcher

    torch._dynamo.reset()
    T, D, E, K = 257, 64, 8, 2
    idx = random_routing(T, K, E, seed=5, device="cuda")
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    lin = torch.randn(D, D, device="cuda", dtype=torch.bfloat16) / 8

    def step(d, x, w, lin):
        x_MD, counts, state = d.dispatch(x, idx)
        return d.combine(x_MD @ lin, w, state), counts

    results = []
    for backend, compiled in (("triton", True), ("triton", False), ("torch", False)):
        d = LocalDispatcher(E, backend, pad_multiple=pad)
        xs, ws, ls = (t.clone().requires_grad_() for t in (x, w, lin))
        fn = torch.compile(step, fullgraph=True) if compiled else step
        out, counts = fn(d, xs, ws, ls)
        out.float().pow(2).sum().backward()
        results.append([out, counts, xs.grad, ws.grad, ls.grad])
    for got in results[:2]:
        assert torch.equal(got[1], results[2][1])
        for a, b in zip(got, results[2]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pad", [1, 16])
def test_moe_layer_with_triton_permutation_matches_torch_on_gpu(pad):
    """The real pairing: grouped_mm experts leave rows past the last group uninitialised."""
    from torchmoe.models.moe.moe import MoE, MoEArgs
    from torchmoe.models.moe.router import RouterArgs

    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        args = MoEArgs(
            router=RouterArgs(dim=128, num_experts=16, topk=4),
            hidden_dim=64,
            shared_hidden_dim=0,
            grouped_mm="grouped_mm",
            permute_backend=backend,
        )
        layer = MoE(args).cuda()
        layer.init_weights(0.02, 0.02)
        layer.dispatcher.pad_multiple = pad
        x = torch.randn(4, 100, 128, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        out.float().pow(2).sum().backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        assert a.isfinite().all()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


if __name__ == "__main__":
    _interpreter_main()
