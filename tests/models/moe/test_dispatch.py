"""The local dispatcher: expert groups in token order, padding rows that change nothing, and a
torch path that compiles without graph breaks (static sizes, no host sync)."""

import pytest
import torch

from torchmoe.models.moe.dispatch import LocalDispatcher
from torchmoe.models.moe.moe import MoE, MoEArgs
from torchmoe.models.moe.router import RouterArgs


def routing(T: int, K: int, E: int, seed: int) -> torch.Tensor:
    """Distinct experts per token; expert E - 1 never chosen (an empty group)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])


@pytest.mark.parametrize("pad", [1, 4, 16])
def test_groups_hold_each_experts_tokens_in_order_then_zero_padding(pad):
    T, K, E, D = 23, 3, 6, 5
    idx = routing(T, K, E, seed=pad)
    x = torch.randn(T, D)
    x_MD, counts, state = LocalDispatcher(E, "torch", pad).dispatch(x, idx)
    rows = T * K + (E * (pad - 1) if pad > 1 else 0)
    assert x_MD.shape == (-(-rows // pad) * pad, D)
    assert counts.dtype == torch.int64 and (counts % pad == 0).all() and counts[-1] == 0
    start = 0
    for e, n in enumerate(counts.tolist()):
        mine = x[[t for t in range(T) if e in idx[t]]]
        assert torch.equal(x_MD[start : start + len(mine)], mine)
        assert (x_MD[start + len(mine) : start + n] == 0).all()
        start += n
    assert (x_MD[start:] == 0).all()
    y = torch.randn_like(x_MD)
    y[start:] = float("nan")  # grouped_mm leaves rows past the last group uninitialised
    out = LocalDispatcher(E, "torch", pad).combine(y, torch.ones(T, K), state)
    assert out.isfinite().all()


def moe_layer(grouped_mm: str, dtype: torch.dtype) -> MoE:
    torch.manual_seed(0)
    args = MoEArgs(
        router=RouterArgs(dim=16, num_experts=8, topk=3, dtype=dtype, enable_expert_bias=True),
        hidden_dim=12,
        shared_hidden_dim=8,
        grouped_mm=grouped_mm,
    )
    layer = MoE(args).to(dtype)
    layer.init_weights(0.5, 0.3)
    layer.router.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, -9, -9.0]))  # 2 empty
    return layer


@pytest.mark.parametrize(
    "grouped_mm,dtype", [("loop", torch.float64), ("grouped_mm", torch.float32)]
)
def test_padded_dispatch_gives_the_same_moe_outputs_and_gradients(grouped_mm, dtype):
    x = torch.randn(2, 19, 16, dtype=dtype)
    results = []
    for pad in (1, 16):
        layer = moe_layer(grouped_mm, dtype)
        layer.dispatcher.pad_multiple = pad  # what a quantization plan does after the build
        xs = x.clone().requires_grad_()
        out = layer(xs)
        out.backward(torch.ones_like(out))
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results.append((out, xs.grad, grads, layer.tokens_per_expert.clone()))
    (out1, gx1, g1, tpe1), (out16, gx16, g16, tpe16) = results
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(out16, out1, **tol)
    torch.testing.assert_close(gx16, gx1, **tol)
    for n in g1:
        torch.testing.assert_close(g16[n], g1[n], **tol, msg=n)
    # Load statistics count routed tokens, never padding rows.
    assert torch.equal(tpe16, tpe1) and tpe1.sum() == 2 * 19 * 3 and tpe1[-2:].sum() == 0


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="permute backend"):
        LocalDispatcher(4, "cuda")


@pytest.mark.parametrize("pad", [1, 16])
def test_torch_backend_compiles_without_graph_breaks(pad):
    torch._dynamo.reset()
    T, D, E, K = 29, 8, 6, 2
    idx = routing(T, K, E, seed=0)
    d = LocalDispatcher(E, "torch", pad)

    def step(x, w, lin):
        x_MD, counts, state = d.dispatch(x, idx)
        return d.combine(x_MD @ lin, w, state) * counts.sum()

    x, w, lin = torch.randn(T, D), torch.rand(T, K), torch.randn(D, D)
    grads = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        args = [t.clone().requires_grad_() for t in (x, w, lin)]
        fn(*args).sum().backward()
        grads.append([a.grad for a in args])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_config_refuses_triton_permutation_without_cuda(tiny_config):
    from torchmoe.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"moe.permute_backend = 'triton'.*no CUDA"):
        tiny_config(**{"moe.permute_backend": "triton"})
    tiny_config(**{"moe.permute_backend": "torch"})


def test_config_refuses_triton_permutation_without_triton_but_a_dry_run_plans_it(
    tiny_config, monkeypatch
):
    import importlib.util

    from torchmoe.config.errors import ConfigError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name)
    )
    with pytest.raises(ConfigError, match=r"moe.permute_backend = 'triton' needs the triton"):
        tiny_config(**{"moe.permute_backend": "triton"})
    monkeypatch.setenv("COMM_MODE", "fake")  # planning a GPU job on this machine
    assert tiny_config(**{"moe.permute_backend": "triton"}).moe.permute_backend == "triton"
