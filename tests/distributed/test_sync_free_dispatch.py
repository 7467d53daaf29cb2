"""moe.dispatcher = "sync_free" reads nothing back from the device: dispatch, the experts'
counts, combine and their backward run with every host read of tensor data (``.item()``,
``int()``, ``.tolist()``) made to raise. The host-sync all-to-all trips the same probe."""

from contextlib import contextmanager

import pytest
import torch
from torch._dynamo.exc import Unsupported
from torch.distributed.device_mesh import init_device_mesh
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed.launcher import run_ranks
from tests.distributed.test_ep_padding import TOKENS_PER_RANK, make_layer, tokens
from torchmoe.parallel.expert_parallel import apply_ep


class HostRead(AssertionError):
    pass


class _RefuseScalarReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), int(), bool()
            raise HostRead(f"host read: {func}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_reads():
    """Any read of a tensor's values on the host raises HostRead (on CUDA each would wait for
    the device). ``tolist`` bypasses dispatch on CPU tensors, so it is refused directly."""

    def refuse(self, *args, **kwargs):
        raise HostRead("host read: tolist")

    tolist, torch.Tensor.tolist = torch.Tensor.tolist, refuse
    try:
        with _RefuseScalarReads():
            yield
    finally:
        torch.Tensor.tolist = tolist


def _exchange(rank: int, dispatcher: str, capacity: int) -> str:
    layer = make_layer()
    apply_ep(layer, init_device_mesh("cpu", (2, 1), mesh_dim_names=("ep", "etp")), dispatcher)
    x = tokens(2)[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK].requires_grad_()
    routing = layer.router(x)
    try:
        with no_host_reads():
            x_MD, _, state = layer.dispatcher.dispatch(x, routing.topk_idx_TK, capacity)
            out = layer.dispatcher.combine(2 * x_MD, routing.topk_weight_TK, state)
            out.sum().backward()
    except HostRead as e:
        return str(e)
    # what came back: each token's copies, weighted, doubled (no experts in between)
    torch.testing.assert_close(out, 2 * x * routing.topk_weight_TK.sum(1, keepdim=True))
    return "no host read"


@pytest.mark.parametrize("capacity", [0, 20])
def test_sync_free_dispatch_reads_nothing_on_the_host(capacity):
    assert run_ranks(2, _exchange, "sync_free", capacity) == ["no host read"] * 2


def test_the_probe_catches_the_host_sync_all_to_all():
    assert all("host read" in r for r in run_ranks(2, _exchange, "alltoall", 0))


def _compile_block(rank: int, dispatcher: str) -> str:
    """One MLA + MoE block under EP2 with grouped-GEMM experts, traced whole (fullgraph: a
    graph break raises) and run forward and backward: the same output as eager."""
    from tests.parallel.test_compile import _tiny_moe_model

    torch.manual_seed(0)
    model = _tiny_moe_model()
    apply_ep(model, init_device_mesh("cpu", (2, 1), mesh_dim_names=("ep", "etp")), dispatcher)
    tokens_BS = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(tokens_BS).float()
        model.layers["0"] = torch.compile(model.layers["0"], fullgraph=True, backend="aot_eager")
        try:
            compiled = model(tokens_BS).float()
        except (Unsupported, GuardOnDataDependentSymNode) as e:  # a break, a host read
            return f"graph break: {type(e).__name__}"
    compiled.pow(2).mean().backward()
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0.05)
    return "one graph"


def test_sync_free_moe_block_traces_into_one_graph_under_ep():
    assert run_ranks(2, _compile_block, "sync_free") == ["one graph"] * 2


def test_the_host_sync_all_to_all_breaks_the_graph():
    assert all(r.startswith("graph break") for r in run_ranks(2, _compile_block, "alltoall"))
