"""Plain-torch MoE token permutation: the specification of the Triton kernels in
``moe_permute.py`` and the path every non-CUDA device runs.

Legend: T tokens, D model dim, E experts, K experts per token, N = T * K routed copies
(copy c = t * K + k), M rows of the expert-ordered buffer, P the padding multiple.

The buffer holds each expert's copies in token order, its group padded with zero rows up to a
multiple of P (float8 grouped GEMMs want 16-row groups). M is static so that torch.compile
needs no host sync: M = N when P == 1, else N + E * (P - 1), the most padding E groups can
need; rows past the last group are unused. Every row that holds no copy is zero going out of
``permute`` and is never read by ``unpermute`` (grouped GEMMs leave rows past the last group
uninitialised, possibly NaN).

The three functions below and their namesakes in ``moe_permute.py`` are interchangeable.
"""

import torch


def num_rows(num_copies: int, num_experts: int, pad_multiple: int) -> int:
    """M, the static row count of the expert-ordered buffer: room for every group's padding,
    rounded up to a multiple of ``pad_multiple`` so that strides of the buffer's transpose
    stay aligned too (float8 grouped GEMMs need 16-byte strides)."""
    if pad_multiple == 1:
        return num_copies
    rows = num_copies + num_experts * (pad_multiple - 1)
    return -(-rows // pad_multiple) * pad_multiple


def permute_indices(topk_idx_TK: torch.Tensor, num_experts: int, pad_multiple: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each copy goes. Returns ``dest_TK`` (row of copy (t, k)), ``src_M`` (copy held by
    each row, -1 for padding/unused rows) and ``counts_E`` (padded rows per expert, int64:
    the groups the experts see). A stable sort keeps token order within each expert."""
    T, K = topk_idx_TK.shape
    E, P = num_experts, pad_multiple
    expert_N = topk_idx_TK.flatten()
    N = expert_N.numel()
    counts_E = torch.zeros(E, dtype=torch.int64, device=expert_N.device)
    counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    padded_E = (counts_E + P - 1) // P * P
    pad_E = padded_E - counts_E
    shift_E = torch.cumsum(pad_E, 0) - pad_E  # padding rows inserted before expert e's group
    order_N = torch.argsort(expert_N, stable=True)  # copies in expert order
    arange_N = torch.arange(N, device=expert_N.device)
    dest_N = torch.empty_like(order_N).scatter_(0, order_N, arange_N + shift_E[expert_N[order_N]])
    src_M = torch.full((num_rows(N, E, P),), -1, dtype=torch.int64, device=expert_N.device)
    src_M.scatter_(0, dest_N, arange_N)
    return dest_N.view(T, K), src_M, padded_E


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, src_M: torch.Tensor) -> torch.Tensor:
    """Dispatch gather: row dest[t, k] of the [M, D] result is x[t]; other rows are zero.
    Its gradient is a gather-sum over each token's K rows (no scatter-add)."""
    (T, K), D = dest_TK.shape, x_TD.shape[1]
    x_ND = x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D)
    return x_TD.new_zeros(src_M.shape[0], D).index_copy(0, dest_TK.flatten(), x_ND)


def unpermute(y_MD: torch.Tensor, dest_TK: torch.Tensor, src_M: torch.Tensor,
              weight_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Combine: out[t] = sum_k weight[t, k] * y[dest[t, k]] (weights 1 when None), summed in
    float32 (or y's wider dtype), returned in y's dtype. Reads only rows that hold copies.
    ``src_M`` is unused here; it keeps the signature of the fused op."""
    (T, K), D = dest_TK.shape, y_MD.shape[1]
    acc = torch.promote_types(y_MD.dtype, torch.float32)
    y_TKD = y_MD.index_select(0, dest_TK.flatten()).view(T, K, D).to(acc)
    if weight_TK is None:
        return y_TKD.sum(1).to(y_MD.dtype)
    return torch.bmm(weight_TK.to(acc).unsqueeze(1), y_TKD).squeeze(1).to(y_MD.dtype)
