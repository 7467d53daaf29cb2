"""Token dropping: cap the routed copies each expert takes from one forward's tokens.

Legend (torchmoe/__init__.py): T tokens, E experts, K experts per token, N = T * K routed copies.

An expert's capacity is ceil(capacity_factor * T * K / E) copies. Over capacity, the policy
decides which copies stay: ``probs`` keeps those with the highest router weight, ``position``
the earliest tokens. A dropped copy's expert id becomes -1: the dispatchers give it no row, so
its token gets nothing from that expert and passes through the block's residual connection.
"""

import math

import torch


def expert_capacity(num_copies: int, num_experts: int, capacity_factor: float) -> int:
    """Copies one expert may take from ``num_copies`` routed copies."""
    return math.ceil(capacity_factor * num_copies / num_experts)


def drop_over_capacity(
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str,
) -> torch.Tensor:
    """``topk_idx_TK`` with the copies beyond each expert's capacity set to -1."""
    idx_N = topk_idx_TK.flatten()
    N = idx_N.numel()
    order_N = torch.arange(N, device=idx_N.device)
    if policy == "probs":  # highest weight first, ties in token order
        order_N = torch.argsort(topk_weight_TK.detach().flatten(), descending=True, stable=True)
    # Group copies by expert, keeping the policy's order within each group.
    order_N = order_N[torch.argsort(idx_N[order_N], stable=True)]
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=idx_N.device)
    counts_E = counts_E.scatter_add_(0, idx_N, torch.ones_like(idx_N))
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(N, device=idx_N.device) - start_E[idx_N[order_N]]
    rank_N = torch.empty_like(rank_sorted).scatter_(0, order_N, rank_sorted)
    return torch.where(rank_N < capacity, idx_N, -1).view_as(topk_idx_TK)
