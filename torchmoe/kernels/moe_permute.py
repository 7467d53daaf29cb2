"""Fused Triton MoE token permutation, as PyTorch custom ops (eager, torch.compile, autograd).

Legend (torchmoe/__init__.py): T tokens, D model dim, E experts, K experts per token, N = T * K
routed copies (copy c = t * K + k), M rows of the expert-ordered buffer, P the padding multiple, C
chunks of CHUNK copies.

Same contract as the plain-torch references in ``moe_permute_ref.py`` (read that docstring
first): ``permute_indices``, ``permute`` and ``unpermute`` here are drop-in replacements for
CUDA tensors. Everything is deterministic - no atomics - and needs no host sync:

- indices: each chunk of copies ranks its copies among same-expert copies of the chunk (an
  all-pairs compare) and records its per-expert histogram [E, C]; an exclusive scan of that
  histogram over chunks plus the padded expert starts gives every (chunk, expert) block its
  first row; a second pass writes dest = block start + rank and src[dest] = copy.
- data: one program per token. ``permute`` writes x[t] to its K rows; ``unpermute`` reads its
  K rows and sums them weighted in float32. Their backwards swap roles (gather-sum of the K
  rows, scatter of the scaled gradient) and the weight gradient is a dot product fused into
  the scatter. Rows holding no copy are zeroed by a separate pass over ``src`` and never read.

The kernels take contiguous tensors; they run under TRITON_INTERPRET=1 on CPU for tests.
"""

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from torchmoe.kernels.moe_permute_ref import num_rows

CHUNK = 128  # copies per program of the index kernels (the all-pairs rank is CHUNK x CHUNK)


# ----------------------------------------------------------------------------- indices


@triton.jit
def _chunk_rank_kernel(expert_ptr, rank_ptr, hist_ptr, N, C, CHUNK: tl.constexpr):
    """rank[c] = earlier copies of the chunk with c's expert; hist[e, chunk] = copies of e."""
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < N
    expert = tl.load(expert_ptr + offs, mask=valid, other=-1)
    kept = valid & (expert >= 0)  # expert -1: dropped by a capacity limit, placed nowhere
    same = (expert[:, None] == expert[None, :]) & kept[None, :]  # [copy i, copy j]
    earlier = tl.arange(0, CHUNK)[None, :] < tl.arange(0, CHUNK)[:, None]
    rank = tl.sum((same & earlier).to(tl.int32), axis=1)
    total = tl.sum(same.to(tl.int32), axis=1)
    tl.store(rank_ptr + offs, rank, mask=valid)
    # The last copy of each expert in the chunk writes its count: one writer per entry.
    tl.store(hist_ptr + expert * C + chunk, total, mask=kept & (rank == total - 1))


@triton.jit
def _place_kernel(expert_ptr, rank_ptr, start_ptr, dest_ptr, src_ptr, N, C, CHUNK: tl.constexpr):
    """dest[c] = first row of (c's chunk, c's expert) + rank[c]; src[dest[c]] = c; dest -1
    for a dropped copy."""
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < N
    expert = tl.load(expert_ptr + offs, mask=valid, other=0)
    kept = valid & (expert >= 0)
    rank = tl.load(rank_ptr + offs, mask=kept, other=0)
    dest = tl.load(start_ptr + expert * C + chunk, mask=kept, other=0) + rank
    tl.store(dest_ptr + offs, tl.where(kept, dest, -1), mask=valid)
    tl.store(src_ptr + dest, offs.to(tl.int64), mask=kept)


# An opaque custom op rather than a triton_op: inductor (torch 2.11) fails to generate code
# for the small torch glue between the two kernels when it can see inside.
@custom_op("torchmoe::permute_indices", mutates_args=())
def permute_indices(
    topk_idx_TK: torch.Tensor, num_experts: int, pad_multiple: int = 1, group_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dest_TK, src_M, padded counts_E); see ``moe_permute_ref.permute_indices``."""
    T, K = topk_idx_TK.shape
    E, P, N = num_experts, pad_multiple, T * K
    device = topk_idx_TK.device
    expert_N = topk_idx_TK.reshape(N).contiguous()
    C = triton.cdiv(N, CHUNK)
    rank_N = torch.empty(N, dtype=torch.int32, device=device)
    # expert-major, so the scan over chunks runs along the inner dimension (torch's scan of an
    # outer dimension took 64 us here on an H100 for 384 chunks x 64 experts)
    hist_EC = torch.zeros(E, C, dtype=torch.int64, device=device)
    dest_N = torch.empty(N, dtype=torch.int64, device=device)
    src_M = torch.full((num_rows(N, E, P, group_rows),), -1, dtype=torch.int64, device=device)
    if N > 0:
        wrap_triton(_chunk_rank_kernel)[(C,)](expert_N, rank_N, hist_EC, N, C, CHUNK=CHUNK)
    counts_E = hist_EC.sum(1)
    padded_E = torch.full_like(counts_E, group_rows) if group_rows else (counts_E + P - 1) // P * P
    # First row of each (chunk, expert) block: the expert's padded start plus the copies of
    # that expert in earlier chunks (an exclusive scan over chunks).
    start_EC = torch.cumsum(hist_EC, 1) - hist_EC + (torch.cumsum(padded_E, 0) - padded_E)[:, None]
    if N > 0:
        wrap_triton(_place_kernel)[(C,)](
            expert_N, rank_N, start_EC, dest_N, src_M, N, C, CHUNK=CHUNK
        )
    return dest_N.view(T, K), src_M, padded_E


@permute_indices.register_fake
def _(
    topk_idx_TK: torch.Tensor, num_experts: int, pad_multiple: int = 1, group_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = topk_idx_TK.shape
    rows = num_rows(T * K, num_experts, pad_multiple, group_rows)
    new = topk_idx_TK.new_empty
    return (
        new((T, K), dtype=torch.int64),
        new((rows,), dtype=torch.int64),
        new((num_experts,), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------- data movement


@triton.jit
def _scatter_rows_kernel(
    x_ptr,
    dest_ptr,
    w_ptr,
    y_ptr,
    out_ptr,
    dw_ptr,
    K,
    D,
    HAS_W: tl.constexpr,
    WITH_DW: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[dest[t, k]] = x[t] (times w[t, k] if HAS_W); with WITH_DW also
    dw[t, k] = dot(y[dest[t, k]], x[t]). One program per token t, looping over D."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    rows = tl.load(dest_ptr + t * K + ks, mask=k_ok, other=-1)
    k_ok = rows >= 0  # a dropped copy (dest -1) moves nothing
    if HAS_W:
        w = tl.load(w_ptr + t * K + ks, mask=k_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        tile_ok = k_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + t * D + ds, mask=d_ok, other=0.0)
        row_ptrs = rows[:, None] * D + ds[None, :]
        if HAS_W:
            tl.store(out_ptr + row_ptrs, w[:, None] * x.to(tl.float32)[None, :], mask=tile_ok)
        else:
            tl.store(
                out_ptr + row_ptrs, tl.broadcast_to(x[None, :], (BLOCK_K, BLOCK_D)), mask=tile_ok
            )
        if WITH_DW:
            y = tl.load(y_ptr + row_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            dw += tl.sum(y * x.to(tl.float32)[None, :], axis=1)
    if WITH_DW:
        tl.store(dw_ptr + t * K + ks, dw, mask=ks < K)


@triton.jit
def _gather_sum_kernel(
    y_ptr,
    dest_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    HAS_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum_k y[dest[t, k]] (times w[t, k] if HAS_W), in float32. One program per t."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    rows = tl.load(dest_ptr + t * K + ks, mask=k_ok, other=-1)
    k_ok = rows >= 0  # a dropped copy (dest -1) adds nothing
    if HAS_W:
        w = tl.load(w_ptr + t * K + ks, mask=k_ok, other=0.0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        y = tl.load(
            y_ptr + rows[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        if HAS_W:
            y = y * w[:, None]
        tl.store(out_ptr + t * D + ds, tl.sum(y, axis=0), mask=d_ok)


@triton.jit
def _zero_empty_rows_kernel(out_ptr, src_ptr, M, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = 0 for every row r that holds no copy (src[r] < 0)."""
    rs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    src = tl.load(src_ptr + rs, mask=rs < M, other=0)
    empty = (rs < M) & (src < 0)
    zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    d_end = D * tl.max(empty.to(tl.int32), axis=0)  # most blocks have nothing to zero
    for d0 in range(0, d_end, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        tl.store(
            out_ptr + rs[:, None] * D + ds[None, :], zeros, mask=empty[:, None] & (ds < D)[None, :]
        )


def _tiles(K: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps): a [BLOCK_K, BLOCK_D] tile of up to 8192 elements (more
    only where K > 64 or 128 columns do not fit, fewer where D is narrow), 64 elements a
    thread. On an H100 (T = 8192, D = 2048, K = 6) the weighted
    gather-sum ran 171 us at 32 elements a thread (4096-element tiles, 4 warps) and 87-88 us at
    64 to 256 (scripts/benchmark_permute.py); at 16 it took 605 us."""
    block_k = triton.next_power_of_2(K)
    block_d = min(triton.next_power_of_2(D), max(128, 8192 // block_k))
    return block_k, block_d, max(1, min(4, block_k * block_d // (64 * 32)))


def _scatter_rows(
    x_TD: torch.Tensor,
    dest_TK: torch.Tensor,
    src_M: torch.Tensor,
    w_TK: torch.Tensor | None = None,
    y_MD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[M, D] rows: (w *) x at each copy's row, zero elsewhere; plus dot(y row, x) per copy when
    ``y_MD`` is given (the weight gradient, in w's dtype)."""
    (T, K), D, M = dest_TK.shape, x_TD.shape[1], src_M.shape[0]
    out_MD = x_TD.new_empty(M, D)
    dw_TK = torch.empty_like(w_TK) if y_MD is not None else None
    block_k, block_d, warps = _tiles(K, D)
    if T > 0:
        wrap_triton(_scatter_rows_kernel)[(T,)](
            x_TD,
            dest_TK,
            w_TK if w_TK is not None else x_TD,
            y_MD if y_MD is not None else x_TD,
            out_MD,
            dw_TK if dw_TK is not None else x_TD,
            K,
            D,
            HAS_W=w_TK is not None,
            WITH_DW=y_MD is not None,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    if M > 0:  # padding, unused rows or rows left by dropped copies may exist
        block_r = 16
        wrap_triton(_zero_empty_rows_kernel)[(triton.cdiv(M, block_r),)](
            out_MD, src_M, M, D, BLOCK_R=block_r, BLOCK_D=min(triton.next_power_of_2(D), 256)
        )
    return out_MD, dw_TK


def _gather_sum(
    y_MD: torch.Tensor, dest_TK: torch.Tensor, w_TK: torch.Tensor | None
) -> torch.Tensor:
    (T, K), D = dest_TK.shape, y_MD.shape[1]
    out_TD = y_MD.new_empty(T, D)
    block_k, block_d, warps = _tiles(K, D)
    if T > 0:
        wrap_triton(_gather_sum_kernel)[(T,)](
            y_MD,
            dest_TK,
            w_TK if w_TK is not None else y_MD,
            out_TD,
            K,
            D,
            HAS_W=w_TK is not None,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    return out_TD


# ----------------------------------------------------------------------------- custom ops


@triton_op("torchmoe::permute", mutates_args=())
def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, src_M: torch.Tensor) -> torch.Tensor:
    """Dispatch gather [M, D]; see ``moe_permute_ref.permute``."""
    return _scatter_rows(x_TD.contiguous(), dest_TK.contiguous(), src_M)[0]


@triton_op("torchmoe::unpermute", mutates_args=())
def unpermute(
    y_MD: torch.Tensor,
    dest_TK: torch.Tensor,
    src_M: torch.Tensor,
    weight_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine [T, D]; see ``moe_permute_ref.unpermute``. ``src_M`` serves the backward."""
    w_TK = weight_TK.contiguous() if weight_TK is not None else None
    return _gather_sum(y_MD.contiguous(), dest_TK.contiguous(), w_TK)


@triton_op("torchmoe::unpermute_backward", mutates_args=())
def unpermute_backward(
    grad_TD: torch.Tensor,
    y_MD: torch.Tensor,
    dest_TK: torch.Tensor,
    src_M: torch.Tensor,
    weight_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y [M, D], grad_weight [T, K]) of the weighted ``unpermute``, in one pass."""
    grad_y, grad_w = _scatter_rows(
        grad_TD.contiguous(), dest_TK.contiguous(), src_M, weight_TK.contiguous(), y_MD.contiguous()
    )
    return grad_y, grad_w


def _permute_setup(ctx, inputs, output) -> None:
    _, dest_TK, src_M = inputs
    ctx.save_for_backward(dest_TK, src_M)


def _permute_backward(ctx, grad_MD: torch.Tensor):
    dest_TK, src_M = ctx.saved_tensors
    return unpermute(grad_MD, dest_TK, src_M, None), None, None


def _unpermute_setup(ctx, inputs, output) -> None:
    y_MD, dest_TK, src_M, weight_TK = inputs
    ctx.has_weight = weight_TK is not None
    ctx.save_for_backward(y_MD if ctx.has_weight else None, dest_TK, src_M, weight_TK)


def _unpermute_backward(ctx, grad_TD: torch.Tensor):
    y_MD, dest_TK, src_M, weight_TK = ctx.saved_tensors
    if not ctx.has_weight:
        return permute(grad_TD, dest_TK, src_M), None, None, None
    grad_y, grad_w = unpermute_backward(grad_TD, y_MD, dest_TK, src_M, weight_TK)
    return grad_y, None, None, grad_w


permute.register_autograd(_permute_backward, setup_context=_permute_setup)
unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)
