"""With ``moe.shared_expert_overlap`` the shared experts run while the dispatch's exchange is in
flight: every expert-parallel dispatcher (all-to-all, sync-free, all-gather, and each inside
expert tensor parallelism) launches its exchange, then the MoE layer's shared experts, then
first touches what it received. On CUDA the exchange runs on the communicator's stream, so the
shared experts hide it; on gloo the order is what can be checked. Output and gradients are
those without the overlap, bit for bit."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed.launcher import run_ranks
from tests.distributed.test_ep_padding import TOKENS_PER_RANK, make_layer, tokens
from torchmoe.parallel import expert_parallel
from torchmoe.parallel.expert_parallel import apply_ep


def _events(rank: int, dispatcher: str, etp: int, overlap: bool = True) -> list[str]:
    layer = make_layer()
    layer.args.shared_expert_overlap = overlap
    mesh = init_device_mesh("cpu", (2 // etp, etp), mesh_dim_names=("ep", "etp"))
    apply_ep(layer, mesh, dispatcher)
    events: list[str] = []

    def recorded(name, fn):
        def call(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)

        return call

    expert_parallel.all_gather_autograd = recorded("exchange", expert_parallel.all_gather_autograd)
    inner = getattr(layer.dispatcher, "inner", layer.dispatcher)
    if hasattr(inner, "exchange"):  # the expert-parallel dispatchers' token all-to-all
        inner.exchange = recorded("exchange", inner.exchange)
    inner.permute = recorded("permute", inner.permute)
    layer.dispatcher.combine = recorded("combine", layer.dispatcher.combine)
    layer.shared_experts.register_forward_pre_hook(lambda *_: events.append("shared experts"))
    x = tokens(2)[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK]
    layer(x.view(1, TOKENS_PER_RANK, -1))
    return events


def _dispatch(events: list[str]) -> list[str]:
    return events[: events.index("combine")]


@pytest.mark.parametrize(
    "dispatcher, etp", [("alltoall", 1), ("sync_free", 1), ("allgather", 1), ("alltoall", 2)]
)
def test_shared_experts_run_between_launching_the_exchange_and_using_it(dispatcher, etp):
    for events in map(_dispatch, run_ranks(2, _events, dispatcher, etp)):
        shared = events.index("shared experts")
        assert events.count("shared experts") == 1
        assert "exchange" in events[:shared], events  # launched before
        assert "exchange" not in events[shared + 1 :], events
        if dispatcher != "allgather":  # the received rows are regrouped after, not before
            assert events[shared + 1 :] == ["permute"], events


def test_without_the_overlap_the_shared_experts_run_after_the_combine():
    for events in run_ranks(2, _events, "alltoall", 1, False):
        assert events.index("shared experts") > events.index("combine"), events


def test_the_overlap_is_refused_with_op_level_checkpointing(tiny_config):
    from torchmoe.config.errors import ConfigError

    with pytest.raises(ConfigError, match="does not work with op-level selective") as err:
        tiny_config(
            **{"moe.shared_expert_overlap": "true", "activation_checkpoint.mode": "selective"}
        )
    assert "\n" not in str(err.value)


def _output_and_grads(rank: int, dispatcher: str) -> list[bool]:
    results = []
    for overlap in (False, True):
        layer = make_layer()
        layer.args.shared_expert_overlap = overlap
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("ep", "etp"))
        apply_ep(layer, mesh, dispatcher)
        x = tokens(2)[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK].requires_grad_()
        out = layer(x.view(1, TOKENS_PER_RANK, -1))
        (out * out).sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in layer.parameters())])
    return [
        torch.equal(
            a.to_local() if hasattr(a, "to_local") else a,
            b.to_local() if hasattr(b, "to_local") else b,
        )
        for a, b in zip(*results, strict=True)
    ]


@pytest.mark.parametrize("dispatcher", ["alltoall", "sync_free"])
def test_the_overlap_changes_no_number(dispatcher):
    for same in run_ranks(2, _output_and_grads, dispatcher):
        assert all(same), same
