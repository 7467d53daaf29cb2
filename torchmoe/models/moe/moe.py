"""The MoE layer: router -> (drop over capacity) -> dispatch -> experts -> combine, plus shared
experts.

Legend (torchmoe/__init__.py): B batch, S sequence, T = B * S tokens, D model dim, E experts, K
experts per token, M rows of the expert-ordered buffer, F expert hidden dim.

Besides its output, the layer keeps two non-persistent buffers for the training loop, summed
over the forwards of one optimizer step and filled only in real forwards, not in
activation-checkpoint recomputation:

- ``tokens_per_expert`` [E]: routed copies per expert; drives the expert-bias update and the
  load metrics.
- ``stats`` [len(StepStats._fields)]: the fields of ``StepStats`` in order: the weighted
  balance-loss terms, the router entropy summed over tokens, the token count, and the dropped
  and routed copy counts.

Balance losses reach the gradient through ``attach_aux_loss`` (see balance.py). Two count
reductions are identities on one process and a parallel plan replaces them: ``batch_counts``
sums expert counts over the ranks holding other tokens of the same sequences (tensor-parallel
sequence shards), so aux_loss and seq_aux_loss see whole sequences; ``global_counts`` sums them
over every rank that routes tokens of the step (the global aux loss).
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.moe.balance import (
    attach_aux_loss,
    entropy_sum,
    expert_counts,
    sequence_aux_loss,
    sequence_counts,
    switch_aux_loss,
    z_loss,
)
from torchmoe.models.moe.capacity import drop_over_capacity, expert_capacity
from torchmoe.models.moe.dispatch import LocalDispatcher
from torchmoe.models.moe.experts import GroupedExperts
from torchmoe.models.moe.router import RouterArgs, Routing, TopKRouter


class StepStats(NamedTuple):
    """What an MoE layer sums over the forwards of one optimizer step, in the order of its
    ``stats`` buffer: the tensors of one layer, or of every layer along a leading dim."""

    aux_loss: torch.Tensor  # weighted balance-loss terms (0 when off)
    seq_aux_loss: torch.Tensor
    global_aux_loss: torch.Tensor
    z_loss: torch.Tensor
    entropy_sum: torch.Tensor  # router entropy summed over tokens (nats)
    tokens: torch.Tensor  # tokens routed
    dropped: torch.Tensor  # copies dropped over capacity
    copies: torch.Tensor  # copies routed (tokens x top-k)

    @classmethod
    def unpack(cls, stats: torch.Tensor) -> "StepStats":
        """The fields of a ``stats`` buffer [Z] (or of a stack of them, [..., Z])."""
        return cls(*stats.unbind(-1))


LOSS_NAMES = StepStats._fields[:4]


@dataclass
class MoEArgs:
    router: RouterArgs
    hidden_dim: int  # per routed expert
    shared_hidden_dim: int = 0  # 0 = no shared experts
    # the shared experts run while the dispatch's exchange is in flight (dispatch's in_flight)
    shared_expert_overlap: bool = False
    balance_coeffs: dict[str, float] = field(default_factory=dict)  # loss type -> weight
    z_loss_coeff: float = 0.0
    capacity_factor: float = 0.0  # 0 = dropless
    eval_capacity_factor: float = 0.0  # in eval mode (validation, generation)
    min_capacity: int = 0  # every expert takes at least this many copies
    drop_policy: str = "probs"  # "probs" | "position"
    pad_to_capacity: bool = False
    grouped_mm: str = "auto"
    permute_backend: str = "auto"  # "auto" | "triton" | "torch" (see models/moe/dispatch.py)


def is_recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. during eager activation recomputation.
    A compiled graph runs its forward once (its own recomputation happens inside the compiled
    backward and does not replay buffer updates), so tracing sees False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Routed experts plus optional shared experts; see the module docstring."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        r = args.router
        self.router = TopKRouter(r)
        self.batch_counts: nn.Module = nn.Identity()
        self.global_counts: nn.Module = nn.Identity()
        self.dispatcher = LocalDispatcher(r.num_experts, args.permute_backend)
        self.experts = GroupedExperts(r.dim, args.hidden_dim, r.num_experts, args.grouped_mm)
        self.shared_experts = (
            FeedForward(r.dim, args.shared_hidden_dim) if args.shared_hidden_dim > 0 else None
        )
        self.register_buffer("tokens_per_expert", torch.zeros(r.num_experts), persistent=False)
        self.register_buffer("stats", torch.zeros(len(StepStats._fields)), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        a = self.args
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        routing = self.router(x_TD)
        counts_E = expert_counts(routing.topk_idx_TK, a.router.num_experts, routing.probs_TE.dtype)
        losses = self._losses(routing, counts_E, B)
        idx_TK, capacity = routing.topk_idx_TK, 0
        factor = a.capacity_factor if self.training else a.eval_capacity_factor
        if factor > 0:
            capacity = expert_capacity(idx_TK.numel(), a.router.num_experts, factor)
            capacity = max(capacity, a.min_capacity)
            idx_TK = drop_over_capacity(
                idx_TK, routing.topk_weight_TK, a.router.num_experts, capacity, a.drop_policy
            )
        if self.training and not is_recomputing():  # eval tokens must not move the bias
            self._record(routing, counts_E, losses, idx_TK)

        shared: list[torch.Tensor] = []  # the shared experts' output, made during dispatch
        overlap = self.shared_experts is not None and a.shared_expert_overlap
        x_MD, group_rows_E, state = self.dispatcher.dispatch(
            x_TD,
            idx_TK,
            capacity if a.pad_to_capacity else 0,
            in_flight=(lambda: shared.append(self.shared_experts(x_TD))) if overlap else None,
        )
        if overlap and not shared:
            raise RuntimeError(
                f"{type(self.dispatcher).__name__}.dispatch did not run its in_flight work "
                "(moe.shared_expert_overlap): a dispatcher must call it once"
            )
        y_MD = self.experts(x_MD, group_rows_E)
        out_TD = self.dispatcher.combine(y_MD, routing.topk_weight_TK, state)
        if self.shared_experts is not None:
            out_TD = out_TD + (shared[0] if overlap else self.shared_experts(x_TD))
        if losses:
            out_TD = attach_aux_loss(out_TD, sum(losses.values()))
        return out_TD.view(B, S, D)

    def _losses(
        self, routing: Routing, counts_E: torch.Tensor, batch: int
    ) -> dict[str, torch.Tensor]:
        """The weighted balance losses and z-loss of this forward, by name (LOSS_NAMES)."""
        a = self.args
        probs, c = routing.probs_TE, a.balance_coeffs
        losses = {}
        if "aux_loss" in c:
            losses["aux_loss"] = c["aux_loss"] * switch_aux_loss(probs, self.batch_counts(counts_E))
        if "seq_aux_loss" in c:
            counts_BE = sequence_counts(
                routing.topk_idx_TK, batch, a.router.num_experts, probs.dtype
            )
            losses["seq_aux_loss"] = c["seq_aux_loss"] * sequence_aux_loss(
                probs, self.batch_counts(counts_BE)
            )
        if "global_aux_loss" in c:
            losses["global_aux_loss"] = c["global_aux_loss"] * switch_aux_loss(
                probs, self.global_counts(counts_E)
            )
        if a.z_loss_coeff > 0:
            losses["z_loss"] = a.z_loss_coeff * z_loss(routing.logits_TE)
        return losses

    @torch.no_grad()
    def _record(
        self,
        routing: Routing,
        counts_E: torch.Tensor,
        losses: dict[str, torch.Tensor],
        idx_TK: torch.Tensor,
    ) -> None:
        """Add this forward's counts and values to the step buffers (module docstring)."""
        self.tokens_per_expert.add_(counts_E.to(self.tokens_per_expert.dtype))
        zero = self.stats.new_zeros(())
        T, K = idx_TK.shape
        values = StepStats(
            *(losses.get(name, zero) for name in LOSS_NAMES),
            entropy_sum=entropy_sum(routing.probs_TE),
            tokens=zero + T,
            dropped=(idx_TK < 0).sum(),
            copies=zero + T * K,
        )
        values = [v.to(self.stats.dtype) for v in values]
        self.stats.add_(torch.stack(values))

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.tokens_per_expert.zero_()
        self.stats.zero_()


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, module) of every MoE layer, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
