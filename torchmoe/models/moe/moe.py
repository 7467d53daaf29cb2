"""The MoE layer: router -> dispatch -> experts -> combine, plus shared experts.

Legend: B batch, S sequence, T = B * S tokens, D model dim, E experts, K experts per token,
M = T * K routed token copies, F expert hidden dim.

Besides its output, the layer keeps two non-persistent buffers for the training loop:
``tokens_per_expert`` (summed over the forwards of one optimizer step; drives the expert-bias
update and the load metrics) and ``aux_loss_sum`` (the balance loss values, for logging). Both
are filled only in real forwards, not in activation-checkpoint recomputation.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.moe.balance import attach_aux_loss, sequence_aux_loss, switch_aux_loss
from torchmoe.models.moe.dispatch import LocalDispatcher
from torchmoe.models.moe.experts import GroupedExperts
from torchmoe.models.moe.router import RouterArgs, TopKRouter


@dataclass
class MoEArgs:
    router: RouterArgs
    hidden_dim: int  # per routed expert
    shared_hidden_dim: int = 0  # 0 = no shared experts
    balance_coeffs: dict[str, float] = field(default_factory=dict)  # loss type -> weight
    z_loss_coeff: float = 0.0
    capacity_factor: float = 0.0  # 0 = dropless
    drop_policy: str = "probs"  # "probs" | "position"
    pad_to_capacity: bool = False
    grouped_mm: str = "auto"
    permute_backend: str = "auto"  # "auto" | "triton" | "torch" (see models/moe/dispatch.py)


def _in_backward() -> bool:
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
        self.dispatcher = LocalDispatcher(r.num_experts, args.permute_backend)
        self.experts = GroupedExperts(r.dim, args.hidden_dim, r.num_experts, args.grouped_mm)
        self.shared_experts = (FeedForward(r.dim, args.shared_hidden_dim)
                               if args.shared_hidden_dim > 0 else None)
        self.register_buffer("tokens_per_expert", torch.zeros(r.num_experts), persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        routing = self.router(x_TD)
        aux = self._balance_loss(routing.probs_TE, routing.topk_idx_TK, B)
        if not _in_backward():
            with torch.no_grad():
                flat = routing.topk_idx_TK.flatten()
                self.tokens_per_expert.scatter_add_(
                    0, flat, torch.ones_like(flat, dtype=self.tokens_per_expert.dtype))
                if aux is not None:
                    self.aux_loss_sum.add_(aux.detach())

        x_MD, counts_E, state = self.dispatcher.dispatch(x_TD, routing.topk_idx_TK)
        y_MD = self.experts(x_MD, counts_E)
        out_TD = self.dispatcher.combine(y_MD, routing.topk_weight_TK, state)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        if aux is not None:
            out_TD = attach_aux_loss(out_TD, aux)
        return out_TD.view(B, S, D)

    def _balance_loss(self, probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, batch: int
                      ) -> torch.Tensor | None:
        """The weighted balance loss of this forward, or None when balancing by loss is off."""
        c = self.args.balance_coeffs
        if not c:
            return None
        if "aux_loss" in c:
            return c["aux_loss"] * switch_aux_loss(probs_TE, topk_idx_TK)
        return c["seq_aux_loss"] * sequence_aux_loss(probs_TE, topk_idx_TK, batch)

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.tokens_per_expert.zero_()
        self.aux_loss_sum.zero_()
