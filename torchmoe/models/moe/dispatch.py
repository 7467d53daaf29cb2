"""Local (single-rank) token dispatcher: permute tokens into expert order and back.

Legend: T tokens, D model dim, E experts, K experts per token, M = T * K routed copies.

The dispatcher is the seam for expert parallelism: a parallel plan swaps this module for one
that also exchanges tokens between ranks, with the same ``dispatch``/``combine`` contract.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DispatchState:
    """What ``combine`` needs to undo ``dispatch``."""

    inverse_order_M: torch.Tensor  # position in expert order of each (token, k) copy
    num_tokens: int


class LocalDispatcher(nn.Module):
    """Sorts the T*K (token, expert) copies by expert, stable in token order."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Returns tokens grouped by expert [M, D], tokens per expert [E] (int64), state."""
        T, K = topk_idx_TK.shape
        flat_M = topk_idx_TK.flatten()
        order_M = torch.argsort(flat_M, stable=True)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=flat_M.device)
        counts_E.scatter_add_(0, flat_M, torch.ones_like(flat_M))
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        return x_TD[order_M // K], counts_E, DispatchState(inverse_M, T)

    def combine(self, y_MD: torch.Tensor, topk_weight_TK: torch.Tensor, state: DispatchState
                ) -> torch.Tensor:
        """Weighted sum of each token's K expert outputs -> [T, D] in y's dtype."""
        y_TKD = y_MD[state.inverse_order_M].view(state.num_tokens, -1, y_MD.shape[-1])
        w_T1K = topk_weight_TK.to(y_MD.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, y_TKD).squeeze(1)
