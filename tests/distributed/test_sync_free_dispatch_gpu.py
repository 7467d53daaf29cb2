"""On a GPU the sync-free dispatcher's MoE layer (dispatch, grouped-GEMM experts, combine, the
shared experts overlapped with the exchange, and their backward) runs under CUDA's sync debug
mode "error" over a one-rank NCCL group, and gives the local dispatcher's outputs and
gradients. The host-sync all-to-all trips the same mode, so the probe is live. And
parallelism.pp_ep_overlap's turn-taking exchange: one micro-batch's forward and another's
backward (run by autograd's CUDA thread) alternate at the exchanges and give the plain run's
results."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from torchmoe.models.moe.moe import MoE, MoEArgs
from torchmoe.models.moe.router import RouterArgs
from torchmoe.parallel.ep_overlap import BATON, handing_over_exchange
from torchmoe.parallel.expert_parallel import DISPATCHERS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def ep_mesh(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cuda", (1,), mesh_dim_names=("ep",))
    finally:
        dist.destroy_process_group()


def _layer(overlap: bool) -> MoE:
    torch.manual_seed(0)
    args = MoEArgs(
        router=RouterArgs(dim=256, num_experts=16, topk=4, enable_expert_bias=True),
        hidden_dim=128,
        shared_hidden_dim=256,
        grouped_mm="grouped_mm",
        shared_expert_overlap=overlap,
    )
    layer = MoE(args).cuda()
    layer.init_weights(0.02, 0.02)
    return layer


def _run(layer: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
    (out.float() * weights).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("overlap", [False, True])
def test_sync_free_layer_makes_no_host_sync_and_equals_local(ep_mesh, overlap):
    x = torch.randn(4, 512, 256, device="cuda")
    expected = _run(_layer(overlap=False), x)
    layer = _layer(overlap)
    local = layer.dispatcher
    layer.dispatcher = DISPATCHERS["sync_free"](16, ep_mesh, local.backend, local.pad_multiple)
    _run(layer, x)  # NCCL's communicator and the allocator's first blocks may sync
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _run(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_host_sync_all_to_all_trips_sync_debug_mode(ep_mesh):
    layer = _layer(overlap=False)
    local = layer.dispatcher
    layer.dispatcher = DISPATCHERS["alltoall"](16, ep_mesh, local.backend, local.pad_multiple)
    x = torch.randn(2, 256, 256, device="cuda")
    _run(layer, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            _run(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_turn_taking_exchange_alternates_forward_and_backward_on_cuda(ep_mesh):
    x1, x2 = torch.randn(2, 2, 256, 256, device="cuda")
    plain = _layer(overlap=False)
    local = plain.dispatcher
    plain.dispatcher = DISPATCHERS["sync_free"](16, ep_mesh, local.backend, local.pad_multiple)
    want1, want2 = _run(plain, x1), _run(plain, x2)  # the second's grads include the first's
    layer = _layer(overlap=False)
    layer.dispatcher = DISPATCHERS["sync_free"](16, ep_mesh, local.backend, local.pad_multiple)
    layer.dispatcher.exchange = handing_over_exchange
    with torch.autocast("cuda", torch.bfloat16):
        first = layer(x1.detach().requires_grad_())
    weights = torch.linspace(-1, 1, first.numel(), device="cuda").view_as(first)
    x2 = x2.detach().requires_grad_()
    outputs = []

    def forward():
        with torch.autocast("cuda", torch.bfloat16):
            outputs.append(layer(x2))

    BATON.turns.clear()
    BATON.run(forward, lambda: (first.float() * weights).sum().backward())
    assert list(BATON.turns)[:4] == ["forward", "backward", "forward", "backward"]
    (outputs[0].float() * weights).sum().backward()
    got = [first.detach(), outputs[0].detach(), x2.grad]
    got += [p.grad for p in layer.parameters() if p.grad is not None]
    want = [want1[0], *want2]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
