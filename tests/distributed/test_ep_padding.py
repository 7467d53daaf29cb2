"""Expert-parallel dispatchers pad the groups the local experts see (``pad_multiple``, as a
float8 plan sets it) without changing anything: one MoE layer in float64 on gloo ranks gives the
single process's outputs and gradients, and every group the experts get is a multiple of the pad
with zero padding rows at its end."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.distributed.launcher import run_ranks
from torchmoe.models.moe.moe import MoE, MoEArgs, StepStats
from torchmoe.models.moe.router import RouterArgs
from torchmoe.parallel.expert_parallel import apply_ep

TOKENS_PER_RANK, DIM = 11, 16


def make_layer(capacity_factor: float = 0.0) -> MoE:
    torch.manual_seed(0)
    args = MoEArgs(
        router=RouterArgs(
            dim=DIM, num_experts=8, topk=3, enable_expert_bias=True, dtype=torch.float64
        ),
        hidden_dim=12,
        shared_hidden_dim=8,
        grouped_mm="loop",
        capacity_factor=capacity_factor,
        pad_to_capacity=capacity_factor > 0,
    )
    layer = MoE(args).double()
    layer.init_weights(0.5, 0.3)
    layer.router.expert_bias.copy_(torch.tensor([0, 0, 0, -9, 0, 0, 0, -9.0]))  # 2 empty
    return layer


def tokens(world: int) -> torch.Tensor:
    return torch.randn(
        world * TOKENS_PER_RANK,
        DIM,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )


def loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum()


def check_groups(pad: int):
    def hook(module, args) -> None:
        x_MD, counts = args
        assert (counts % pad == 0).all() and x_MD.shape[0] >= counts.sum()
        start = 0
        for n in counts.tolist():
            filled = int((x_MD[start : start + n].abs().sum(1) > 0).sum())
            assert (x_MD[start + filled : start + n] == 0).all()
            start += n

    return hook


def ep_rank(
    rank: int,
    ep: int,
    etp: int,
    dispatcher: str,
    pad: int,
    pad_after_ep: bool,
    capacity_factor: float,
):
    layer = make_layer(capacity_factor)
    if not pad_after_ep:
        layer.dispatcher.pad_multiple = pad  # apply_ep keeps it
    apply_ep(layer, init_device_mesh("cpu", (ep, etp), mesh_dim_names=("ep", "etp")), dispatcher)
    if pad_after_ep:
        layer.dispatcher.pad_multiple = pad
    layer.experts.register_forward_pre_hook(check_groups(pad))
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    x = tokens(dist.get_world_size())[rows].clone().requires_grad_()
    out = layer(x.view(1, -1, DIM)).view(-1, DIM)
    loss(out).backward()
    grads = {}
    for name, p in layer.named_parameters():
        if isinstance(p.grad, DTensor):
            grads[name] = p.grad.full_tensor()
        else:  # replicated: each rank holds its tokens' part
            grads[name] = p.grad.clone()
            dist.all_reduce(grads[name])
    return out.detach(), x.grad, grads


@pytest.mark.parametrize(
    "world,ep,etp,dispatcher,pad_after_ep,capacity_factor",
    [
        (2, 2, 1, "alltoall", False, 0.0),
        (2, 2, 1, "allgather", True, 0.0),
        (4, 2, 2, "alltoall", True, 0.0),
        (4, 4, 1, "allgather", False, 0.0),
        (2, 2, 1, "alltoall", False, 0.7),
        (2, 2, 1, "allgather", False, 0.7),
        (4, 2, 2, "alltoall", True, 0.7),
        (2, 2, 1, "sync_free", False, 0.0),
        (4, 4, 1, "sync_free", True, 0.0),
        (4, 2, 2, "sync_free", False, 0.0),
        (2, 2, 1, "sync_free", False, 0.7),
        (4, 4, 1, "sync_free", True, 0.7),
    ],
)
def test_padded_expert_groups_change_nothing(
    world, ep, etp, dispatcher, pad_after_ep, capacity_factor
):
    """Also in capacity mode (drops, groups padded to capacity): each rank drops over the
    capacity of its own tokens, so the reference runs the ranks' token slices one by one."""
    layer = make_layer(capacity_factor)
    x = tokens(world).requires_grad_()
    out = torch.cat([layer(xs.view(1, -1, DIM)).view(-1, DIM) for xs in x.split(TOKENS_PER_RANK)])
    if capacity_factor:
        assert StepStats.unpack(layer.stats).dropped > 0
    # The same loss as the ranks' sum: each rank's loss weights its own rows from 0.
    sum(loss(o) for o in out.split(TOKENS_PER_RANK)).backward()
    results = run_ranks(world, ep_rank, ep, etp, dispatcher, 16, pad_after_ep, capacity_factor)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(torch.cat([r[0] for r in results]), out.detach(), **tol)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), x.grad, **tol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(results[0][2][name], p.grad, **tol, msg=name)
