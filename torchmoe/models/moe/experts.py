"""Routed experts as 3-D weights, computed with one grouped GEMM per projection.

Legend (torchmoe/__init__.py): M routed token copies (grouped by expert), D model dim, E experts, F
expert hidden dim.

Weights are stored like a stack of nn.Linear weights (out x in): ``w13`` [E, 2, F, D] holds each
expert's gate (``w13[:, 0]``, Hugging Face's ``gate_proj``) and up projection (``w13[:, 1]``,
``up_proj``), ``w2`` [E, D, F] its down projection. Gate and up are one tensor so that they are one
grouped GEMM of N = 2F (``w13.flatten(1, 2)`` is a view): on one H100, SwiGLU experts forward and
backward compiled ran at 86% of a dense SwiGLU of the same FLOPs this way, against 83% for three
GEMMs (scripts/benchmark_grouped_mm.py). The separate axis of 2 lets expert tensor parallelism
shard F (dim 2) and keep each rank's gate and up rows together. The out x in layout gives
``torch._grouped_mm`` the column-major right operand it wants (``w.transpose(-2, -1)``).
"""

from collections.abc import Callable

import torch
from torch import nn

from torchmoe.kernels import swiglu_ref
from torchmoe.models.common.init import trunc_normal_

try:
    from torchmoe.kernels import swiglu as swiglu_fused
except ImportError:  # no Triton on this platform: the torch SwiGLU only
    swiglu_fused = None

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.compiler.assume_constant_result
def use_grouped_mm(backend: str, device: torch.device) -> bool:
    """``moe.grouped_mm``: "auto" picks torch._grouped_mm where it has fast kernels (CUDA sm90+)
    and the per-expert loop elsewhere."""
    if backend != "auto":
        return backend == "grouped_mm"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


class GroupedExperts(nn.Module):
    """E SwiGLU experts applied to tokens already grouped by expert."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend  # "auto" | "grouped_mm" | "loop"
        self.w13 = nn.Parameter(torch.empty(num_experts, 2, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        # the grouped GEMM y = x @ w[e].T per group: (x_MK, w_ENK, offsets) -> y_MN; None is
        # torch._grouped_mm in the compute dtype (quant/float8.py may set a float8 one)
        self.grouped_mm: GroupedMM | None = None

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_MD: tokens sorted by expert; counts_E: how many rows belong to each expert."""
        return self.compute(x_MD, counts_E, self.w13, self.w2)

    def compute(
        self, x_MD: torch.Tensor, counts_E: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """The SwiGLU experts on given weights (a parallel plan may pass local shards)."""
        if torch.is_autocast_enabled(x_MD.device.type):  # autocast does not cover _grouped_mm
            dtype = torch.get_autocast_dtype(x_MD.device.type)
            x_MD, w13, w2 = (t.to(dtype) for t in (x_MD, w13, w2))
        if use_grouped_mm(self.backend, x_MD.device):
            mm = self.grouped_mm or _grouped_mm
            return _grouped_swiglu(x_MD, counts_E, w13, w2, self.activation, mm)
        return _looped_swiglu(x_MD, counts_E, w13, w2, self.activation)

    def activation(self, h13_MF2: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from the gate-and-up GEMM's output [M, 2F]: torchmoe's Triton
        kernels on CUDA (``kernels/swiglu.py``), plain torch elsewhere. A method of its own so
        activation checkpointing can recompute it in backward (``recompute_modules =
        ["moe_act"]``)."""
        if h13_MF2.is_cuda and swiglu_fused is not None and h13_MF2.dtype in _KERNEL_DTYPES:
            return swiglu_fused.swiglu(h13_MF2)
        return swiglu_ref.swiglu(h13_MF2)  # float64 too: the kernels compute in float32

    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.w13, std)
        trunc_normal_(self.w2, out_std)


def _grouped_swiglu(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    mm: GroupedMM,
) -> torch.Tensor:
    """Gate and up in one grouped GEMM, then down; group e spans rows [offsets[e-1],
    offsets[e]). No host sync."""
    # cumsum then cast (not cumsum(dtype=int32)): inductor folds the cumsum of fixed group
    # sizes (pad_to_capacity) into an int64 constant otherwise.
    offsets = torch.cumsum(counts_E, dim=0).to(torch.int32)
    h13_MF2 = mm(x_MD, w13_E2FD.flatten(1, 2), offsets)
    return mm(act(h13_MF2), w2_EDF, offsets)


def _grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x @ w[e].T for the rows of each group e (w's transpose is the column-major operand)."""
    return torch._grouped_mm(x_MK, w_ENK.transpose(-2, -1), offs=offsets)


def _looped_swiglu(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Reference path: one dense matmul chain per expert (syncs once for the counts). Rows past
    the last group (a dispatcher's static-size padding) come out as zeros."""
    counts = counts_E.tolist()
    outs = []
    for e, x_mD in enumerate(torch.split(x_MD[: sum(counts)], counts)):
        outs.append(act(x_mD @ w13_E2FD[e].flatten(0, 1).T) @ w2_EDF[e].T)
    outs.append(x_MD.new_zeros(x_MD.shape[0] - sum(counts), w2_EDF.shape[1]))
    return torch.cat(outs)
