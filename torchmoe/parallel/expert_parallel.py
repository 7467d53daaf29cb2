"""apply_ep: the expert-parallel wrapper. Experts are sharded over the ``ep`` mesh dimension and
each MoE layer's dispatcher is swapped for one that moves tokens between ranks.

Legend (torchmoe/__init__.py): T local tokens, D model dim, K experts per token, E experts,
X = E / ep local experts, W ranks of the expert-parallel group, M rows of an expert-ordered
buffer.

Three dispatchers, same contract as ``LocalDispatcher`` (``dispatch`` -> grouped tokens +
counts for this rank's experts; ``combine`` -> [T, D]):

- ``AllToAllDispatcher``: sort copies by expert, exchange per-expert counts, then one
  variable-size ``all_to_all_single`` of tokens; regroup the received blocks per local expert.
  Combine runs the same steps backwards. Traffic: only the routed copies; one host sync per
  layer for the split sizes.
- ``SyncFreeAllToAllDispatcher``: the same exchange with every (rank, expert) block padded to a
  fixed number of rows, so the split sizes are static and the counts stay on the device: no
  host sync, and the MoE block traces into one graph. The block is a bound on the copies one
  rank sends one expert: the capacity when the layer pads to it (``moe.capacity_factor`` with
  ``moe.pad_to_capacity``), else the rank's token count (a token sends an expert at most one
  copy), which is dropless at any routing but moves and holds E x T rows instead of T x K.
- ``AllGatherDispatcher``: all-gather every rank's tokens, keep the copies routed to local
  experts, and reduce-scatter the weighted outputs. More traffic but no count exchange: the
  better choice for small groups or large top-k.

All three pad the groups the local experts see (``pad_multiple``, as the local dispatcher does)
after the exchange, never before: the padding is a matter of this rank's GEMMs, not of the
traffic. It adds at most X * (pad_multiple - 1) rows to buffers sized by the received counts
(all-to-all, all-gather: a host sync) or by the static blocks (sync-free).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from torchmoe.models.moe.dispatch import DispatchState, LocalDispatcher
from torchmoe.models.moe.experts import GroupedExperts
from torchmoe.models.moe.moe import MoE
from torchmoe.parallel.collectives import all_gather_autograd, reduce_scatter_autograd


@dataclass
class AllToAllState:
    local: DispatchState  # this rank's copies sorted by global expert (no padding)
    regroup: DispatchState  # received rows -> padded per-local-expert groups
    send_splits: list[int]
    recv_splits: list[int]


class ExpertParallelDispatcher(LocalDispatcher):
    """A dispatcher that exchanges tokens over the ``ep`` ranks of ``ep_mesh``."""

    def __init__(
        self, num_experts: int, ep_mesh: DeviceMesh, backend: str = "auto", pad_multiple: int = 1
    ):
        super().__init__(num_experts, backend, pad_multiple)
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        # the token all-to-all; parallel/ep_overlap.py swaps in one that hands over a turn
        self.exchange: Callable[..., torch.Tensor] = all_to_all_single_autograd


class AllToAllDispatcher(ExpertParallelDispatcher):
    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        capacity: int = 0,
        in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        x_MD, counts_E, local = self.permute(x_TD, topk_idx_TK, self.num_experts, 1)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_WX = recv_counts.view(self.ep, -1)  # copies from source rank w for local expert x
        # One host sync for both split lists (all_to_all_single needs them on the host).
        send_splits, recv_splits = torch.stack(
            [counts_E.view(self.ep, -1).sum(1), recv_WX.sum(1)]
        ).tolist()
        x_sent = x_MD[: sum(send_splits)]  # rows past the kept copies: room left by drops
        x_recv = self.exchange(x_sent, recv_splits, send_splits, self.group)
        if in_flight is not None:  # before the first use of x_recv, which waits on it
            in_flight()
        # Received blocks are ordered (source, local expert); experts want (local expert,
        # source), padded: a second permutation, one copy per received row, stable in order.
        W, X = recv_WX.shape
        expert_M = torch.repeat_interleave(
            torch.arange(W * X, device=x_MD.device) % X,
            recv_WX.flatten(),
            output_size=sum(recv_splits),
        )
        grouped_MD, counts_X, regroup = self.permute(
            x_recv, expert_M.unsqueeze(1), X, self.pad_multiple, self.group_rows(capacity, W)
        )
        return grouped_MD, counts_X, AllToAllState(local, regroup, send_splits, recv_splits)

    def combine(
        self, y_MD: torch.Tensor, topk_weight_TK: torch.Tensor, state: AllToAllState
    ) -> torch.Tensor:
        y_recv = self.unpermute(y_MD, None, state.regroup)
        y_back = self.exchange(y_recv, state.send_splits, state.recv_splits, self.group)
        # Back to the buffer's full row count (dropped copies left rows unsent at the end).
        missing = state.local.src_M.shape[0] - y_back.shape[0]
        y_back = F.pad(y_back, (0, 0, 0, missing)) if missing else y_back
        return self.unpermute(y_back, topk_weight_TK, state.local)


@dataclass
class SyncFreeState:
    local: DispatchState  # this rank's copies in one fixed-size block per global expert
    regroup: DispatchState  # received slots -> padded per-local-expert groups


class SyncFreeAllToAllDispatcher(ExpertParallelDispatcher):
    """See the module docstring: static all-to-alls of fixed-size blocks, counts on the
    device."""

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        capacity: int = 0,
        in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, SyncFreeState]:
        E, W = self.num_experts, self.ep
        T = topk_idx_TK.shape[0]  # a token sends an expert at most one copy
        block = min(capacity, T) if capacity else T  # copies this rank may send one expert
        x_MD, _, local = self.permute(x_TD, topk_idx_TK, E, 1, block)  # expert e: block e
        sent_E = expert_copies(topk_idx_TK, E)
        recv_WX = funcol.all_to_all_single(sent_E, None, None, self.group).view(W, -1)
        x_recv = self.exchange(x_MD, None, None, self.group)
        if in_flight is not None:  # before the first use of either exchange's output
            in_flight()
        # received rows (source w, local expert x, slot g); slots past the count hold nothing
        X = recv_WX.shape[1]
        slot = torch.arange(block, device=x_TD.device)
        expert = torch.arange(X, device=x_TD.device).view(1, X, 1)
        expert_M = torch.where(slot < recv_WX.unsqueeze(-1), expert, -1).flatten()
        grouped_MD, counts_X, regroup = self.permute(
            x_recv, expert_M.unsqueeze(1), X, self.pad_multiple, self.group_rows(capacity, W)
        )
        return grouped_MD, counts_X, SyncFreeState(local, regroup)

    def combine(
        self, y_MD: torch.Tensor, topk_weight_TK: torch.Tensor, state: SyncFreeState
    ) -> torch.Tensor:
        y_recv = self.unpermute(y_MD, None, state.regroup)  # empty slots come back as zeros
        y_back = self.exchange(y_recv, None, None, self.group)
        return self.unpermute(y_back, topk_weight_TK, state.local)


def expert_copies(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Copies routed to each expert [E] (int64), dropped copies (id -1) not counted."""
    ids = topk_idx_TK.flatten()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, torch.where(ids >= 0, ids, num_experts), torch.ones_like(ids))[
        :num_experts
    ]


@dataclass
class AllGatherState:
    kept: torch.Tensor  # positions, among all gathered copies, routed to local experts
    num_copies: int
    padding: DispatchState | None  # kept rows -> padded groups, when pad_multiple > 1


class AllGatherDispatcher(ExpertParallelDispatcher):
    def __init__(
        self, num_experts: int, ep_mesh: DeviceMesh, backend: str = "auto", pad_multiple: int = 1
    ):
        super().__init__(num_experts, ep_mesh, backend, pad_multiple)
        self.local_experts = num_experts // self.ep
        self.first = ep_mesh.get_local_rank() * self.local_experts

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        capacity: int = 0,
        in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AllGatherState]:
        x_all = all_gather_autograd(x_TD, gather_dim=0, group=self.group)
        idx_all = all_gather_autograd(topk_idx_TK, gather_dim=0, group=self.group)
        if in_flight is not None:  # before the first use of the gathered tensors
            in_flight()
        K = idx_all.shape[1]
        local = idx_all.flatten() - self.first
        X = self.local_experts
        # X = "not mine" (another rank's expert, or dropped: id -1)
        local = torch.where((idx_all.flatten() >= 0) & (local >= 0) & (local < X), local, X)
        order = torch.argsort(local, stable=True)
        counts = torch.zeros(X + 1, dtype=torch.int64, device=local.device)
        counts.scatter_add_(0, local, torch.ones_like(local))
        kept = order[: int(counts[:X].sum())]
        x_kept = x_all[kept // K]  # grouped by local expert, unpadded
        if self.pad_multiple == 1 and not capacity:
            return x_kept, counts[:X], AllGatherState(kept, local.numel(), None)
        grouped_MD, counts_X, padding = self.permute(
            x_kept,
            local[kept].unsqueeze(1),
            X,
            self.pad_multiple,
            self.group_rows(capacity, self.ep),
        )
        return grouped_MD, counts_X, AllGatherState(kept, local.numel(), padding)

    def combine(
        self, y_MD: torch.Tensor, topk_weight_TK: torch.Tensor, state: AllGatherState
    ) -> torch.Tensor:
        if state.padding is not None:
            y_MD = self.unpermute(y_MD, None, state.padding)
        w_all = all_gather_autograd(topk_weight_TK, gather_dim=0, group=self.group)
        y_all = y_MD.new_zeros(state.num_copies, y_MD.shape[-1]).index_copy(0, state.kept, y_MD)
        y_TKD = y_all.view(w_all.shape[0], -1, y_MD.shape[-1])
        out = torch.bmm(w_all.to(y_MD.dtype).unsqueeze(1), y_TKD).squeeze(1)
        return reduce_scatter_autograd(out, "sum", scatter_dim=0, group=self.group)


DISPATCHERS = {  # moe.dispatcher -> class
    "alltoall": AllToAllDispatcher,
    "sync_free": SyncFreeAllToAllDispatcher,
    "allgather": AllGatherDispatcher,
}


class ExpertTensorParallelDispatcher(nn.Module):
    """Expert tensor parallelism around another dispatcher: the ``etp`` ranks each hold a slice
    of every local expert's hidden dim, so they must see the same tokens. Gather the group's
    tokens, let ``inner`` route them, and reduce-scatter the combined outputs, which sums the
    hidden-dim slices and hands every rank back its own tokens."""

    def __init__(self, inner: nn.Module, etp_mesh: DeviceMesh):
        super().__init__()
        self.inner = inner
        self.group = etp_mesh.get_group()

    @property
    def pad_multiple(self) -> int:
        """The inner dispatcher's, so a quantization plan can set it on any dispatcher."""
        return self.inner.pad_multiple

    @pad_multiple.setter
    def pad_multiple(self, value: int) -> None:
        self.inner.pad_multiple = value

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        capacity: int = 0,
        in_flight: Callable[[], None] | None = None,
    ):
        x_all = all_gather_autograd(x_TD, gather_dim=0, group=self.group)
        idx_all = all_gather_autograd(topk_idx_TK, gather_dim=0, group=self.group)
        return self.inner.dispatch(x_all, idx_all, capacity * self.group.size(), in_flight)

    def combine(self, y_MD: torch.Tensor, topk_weight_TK: torch.Tensor, state) -> torch.Tensor:
        w_all = all_gather_autograd(topk_weight_TK, gather_dim=0, group=self.group)
        out = self.inner.combine(y_MD, w_all, state)
        return reduce_scatter_autograd(out, "sum", scatter_dim=0, group=self.group)


class LocalShardExperts(GroupedExperts):
    """GroupedExperts whose weights are DTensors sharded over experts: compute with the local
    shard (this rank's experts). Swapped in by class, like fully_shard does, so parameter
    names - and checkpoints - stay those of the plain model."""

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        local = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w13, self.w2))
        return self.compute(x_MD, counts_E, *local)


def apply_ep(model: nn.Module, expert_mesh: DeviceMesh, dispatcher: str) -> None:
    """Expert parallelism over the expert view's ``ep`` dimension and expert tensor
    parallelism over its ``etp`` dimension, for every MoE layer.

    Experts are sharded on dim 0 (which experts) over ``ep`` and on their hidden dim over
    ``etp``; the layer's dispatcher becomes an all-to-all or all-gather one over ``ep``, wrapped
    in an ``etp`` gather/reduce-scatter when ``etp`` > 1. Touches ``MoE.experts`` (parameters
    become DTensors) and ``MoE.dispatcher``; nothing else.
    """
    names = [n for n in ("ep", "etp") if expert_mesh[n].size() > 1]
    weight_mesh = expert_mesh[tuple(names)]
    hidden_dim = {"w13": 2, "w2": 2}  # F's position in each weight
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            placements = [Shard(0) if n == "ep" else Shard(hidden_dim[name]) for n in names]
            sharded = distribute_tensor(param.data, weight_mesh, placements)
            experts.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
        experts.__class__ = LocalShardExperts
        num_experts = moe.args.router.num_experts
        if "ep" in names:
            cls = DISPATCHERS[dispatcher]
            local = moe.dispatcher  # keeps its permute backend and padding
            moe.dispatcher = cls(num_experts, expert_mesh["ep"], local.backend, local.pad_multiple)
        if "etp" in names:
            moe.dispatcher = ExpertTensorParallelDispatcher(moe.dispatcher, expert_mesh["etp"])
