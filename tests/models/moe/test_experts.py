"""Grouped experts equal a per-expert loop, including experts that receive no tokens."""

import pytest
import torch
import torch.nn.functional as F

from torchmoe.models.moe.experts import GroupedExperts


def per_expert_reference(experts: GroupedExperts, x_MD, counts):
    outs, start = [], 0
    for e, n in enumerate(counts):
        x = x_MD[start : start + n]
        gate, up = experts.w13[e]
        outs.append((F.silu(x @ gate.T) * (x @ up.T)) @ experts.w2[e].T)
        start += n
    return torch.cat(outs)


def make(backend, dtype=torch.float32, device="cpu"):
    torch.manual_seed(1)
    ex = GroupedExperts(dim=16, hidden_dim=32, num_experts=5, backend=backend).to(device, dtype)
    ex.init_weights(0.3, 0.3)
    counts = [4, 0, 7, 0, 9]  # empty experts included
    x = torch.randn(sum(counts), 16, device=device, dtype=dtype)
    return ex, x, counts


def test_loop_backend_matches_reference():
    ex, x, counts = make("loop", torch.float64)
    got = ex(x, torch.tensor(counts))
    torch.testing.assert_close(got, per_expert_reference(ex, x, counts))


def test_grouped_mm_equals_loop_on_cpu():
    """torch._grouped_mm also runs on CPU in recent torch: forward and backward must match."""
    ex, x, counts = make("grouped_mm")
    x1 = x.clone().requires_grad_()
    got = ex(x1, torch.tensor(counts))
    g = torch.randn_like(got)
    got.backward(g)
    grads = [p.grad.clone() for p in ex.parameters()]
    ex.zero_grad()
    ex.backend = "loop"
    x2 = x.clone().requires_grad_()
    ref = ex(x2, torch.tensor(counts))
    ref.backward(g)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for a, p in zip(grads, ex.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_equals_loop_on_gpu_bf16():
    """Forward and backward (the Triton SwiGLU between the grouped GEMMs) against the float64
    loop (the plain-torch SwiGLU: the kernels take float32 and 16-bit inputs only)."""
    ex, x, counts = make("grouped_mm", torch.bfloat16, "cuda")
    x = x.requires_grad_()
    got = ex(x, torch.tensor(counts, device="cuda"))
    g = torch.randn_like(got)
    got.backward(g)
    ex_ref = GroupedExperts(16, 32, 5, "loop").cuda().double()
    ex_ref.load_state_dict({k: v.double() for k, v in ex.state_dict().items()})
    x_ref = x.detach().double().requires_grad_()
    ref = ex_ref(x_ref, torch.tensor(counts, device="cuda"))
    ref.backward(g.double())
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=2e-2, atol=2e-2)
    for p, p_ref in zip(ex.parameters(), ex_ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=2e-2, atol=2e-2)
