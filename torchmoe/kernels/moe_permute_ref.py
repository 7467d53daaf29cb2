"""Plain-torch MoE token permutation: the specification of the Triton kernels in
``moe_permute.py`` and the path every non-CUDA device runs.

Legend (torchmoe/__init__.py): T tokens, D model dim, E experts, K experts per token, N = T * K
routed copies (copy c = t * K + k), M rows of the expert-ordered buffer, P the padding multiple.

The buffer holds each expert's copies in token order, its group padded with zero rows up to a
multiple of P (float8 grouped GEMMs want 16-row groups). M is static so that torch.compile
needs no host sync: M = N when P == 1, else N + E * (P - 1), the most padding E groups can
need; rows past the last group are unused. Every row that holds no copy is zero going out of
``permute`` and is never read by ``unpermute`` (grouped GEMMs leave rows past the last group
uninitialised, possibly NaN).

Capacity mode marks copies an expert cannot take with expert id -1: they get no row
(``dest`` -1), move no data and add nothing to their token's combined output, and every
group may be padded to one fixed size instead (``group_rows``, static GEMM shapes).

The three functions below and their namesakes in ``moe_permute.py`` are interchangeable.
"""

import torch


def num_rows(num_copies: int, num_experts: int, pad_multiple: int, group_rows: int = 0) -> int:
    """M, the static row count of the expert-ordered buffer: ``num_experts * group_rows`` when
    every group has a fixed size, else room for every group's padding, rounded up to a
    multiple of ``pad_multiple`` so that strides of the buffer's transpose stay aligned too
    (float8 grouped GEMMs need 16-byte strides)."""
    if group_rows:
        return num_experts * group_rows
    if pad_multiple == 1:
        return num_copies
    rows = num_copies + num_experts * (pad_multiple - 1)
    return -(-rows // pad_multiple) * pad_multiple


def permute_indices(
    topk_idx_TK: torch.Tensor, num_experts: int, pad_multiple: int = 1, group_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each copy goes. Returns ``dest_TK`` (row of copy (t, k); -1 for a dropped copy,
    whose expert id is -1), ``src_M`` (copy held by each row, -1 for padding/unused rows) and
    ``counts_E`` (padded rows per expert, int64: the groups the experts see). Groups are padded
    to a multiple of ``pad_multiple``, or to exactly ``group_rows`` when that is set (no group
    may hold more). A stable sort keeps token order within each expert."""
    T, K = topk_idx_TK.shape
    E, P = num_experts, pad_multiple
    expert_N = topk_idx_TK.flatten()
    N = expert_N.numel()
    kept_N = expert_N >= 0
    group_N = torch.where(kept_N, expert_N, E)  # dropped copies form a last, unplaced group
    counts_E = torch.zeros(E + 1, dtype=torch.int64, device=expert_N.device)
    counts_E = counts_E.scatter_add_(0, group_N, torch.ones_like(group_N))[:E]
    padded_E = torch.full_like(counts_E, group_rows) if group_rows else (counts_E + P - 1) // P * P
    pad_E = padded_E - counts_E
    shift_E = torch.cumsum(pad_E, 0) - pad_E  # padding rows inserted before expert e's group
    shift_G = torch.cat([shift_E, shift_E.new_zeros(1)])
    order_N = torch.argsort(group_N, stable=True)  # copies in expert order
    arange_N = torch.arange(N, device=expert_N.device)
    dest_N = torch.empty_like(order_N).scatter_(0, order_N, arange_N + shift_G[group_N[order_N]])
    rows = num_rows(N, E, P, group_rows)
    dest_N = torch.where(kept_N, dest_N, -1)
    src_M = torch.full((rows + 1,), -1, dtype=torch.int64, device=expert_N.device)
    src_M = src_M.scatter_(0, torch.where(kept_N, dest_N, rows), arange_N)[:rows]
    return dest_N.view(T, K), src_M, padded_E


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, src_M: torch.Tensor) -> torch.Tensor:
    """Dispatch gather: row dest[t, k] of the [M, D] result is x[t]; other rows are zero;
    dropped copies (dest -1) go nowhere. Its gradient is a gather-sum over each token's rows."""
    (T, K), D, M = dest_TK.shape, x_TD.shape[1], src_M.shape[0]
    x_ND = x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D)
    dest_N = dest_TK.flatten()
    rows = x_TD.new_zeros(M + 1, D).index_copy(0, torch.where(dest_N >= 0, dest_N, M), x_ND)
    return rows[:M]


def unpermute(
    y_MD: torch.Tensor,
    dest_TK: torch.Tensor,
    src_M: torch.Tensor,
    weight_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine: out[t] = sum_k weight[t, k] * y[dest[t, k]] (weights 1 when None) over the
    copies that were not dropped, summed in float32 (or y's wider dtype), returned in y's
    dtype. Reads only rows that hold copies. ``src_M`` is unused here; it keeps the signature
    of the fused op."""
    (T, K), D = dest_TK.shape, y_MD.shape[1]
    acc = torch.promote_types(y_MD.dtype, torch.float32)
    kept_TK1 = (dest_TK >= 0).unsqueeze(-1)
    y_TKD = y_MD.index_select(0, dest_TK.flatten().clamp_min(0)).view(T, K, D).to(acc)
    y_TKD = torch.where(kept_TK1, y_TKD, 0.0)
    if weight_TK is None:
        return y_TKD.sum(1).to(y_MD.dtype)
    return torch.bmm(weight_TK.to(acc).unsqueeze(1), y_TKD).squeeze(1).to(y_MD.dtype)
