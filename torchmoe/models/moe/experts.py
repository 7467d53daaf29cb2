"""Routed experts as 3-D weights, computed with one grouped GEMM per projection.

Legend (torchmoe/__init__.py): M routed token copies (grouped by expert), D model dim, E experts, F
expert hidden dim.

Weights are stored like a stack of nn.Linear weights (out x in): w1, w3 [E, F, D], w2 [E, D, F].
That layout matches Hugging Face's per-expert linears (conversion is a stack) and gives
``torch._grouped_mm`` the column-major right operand it wants (``w.transpose(-2, -1)``).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchmoe.models.common.init import trunc_normal_

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        # the grouped GEMM y = x @ w[e].T per group: (x_MK, w_ENK, offsets) -> y_MN; None is
        # torch._grouped_mm in the compute dtype (quant/float8.py may set a float8 one)
        self.grouped_mm: GroupedMM | None = None

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_MD: tokens sorted by expert; counts_E: how many rows belong to each expert."""
        return self.compute(x_MD, counts_E, self.w1, self.w2, self.w3)

    def compute(
        self,
        x_MD: torch.Tensor,
        counts_E: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
    ) -> torch.Tensor:
        """The SwiGLU experts on given weights (a parallel plan may pass local shards)."""
        if torch.is_autocast_enabled(x_MD.device.type):  # autocast does not cover _grouped_mm
            dtype = torch.get_autocast_dtype(x_MD.device.type)
            x_MD, w1, w2, w3 = (t.to(dtype) for t in (x_MD, w1, w2, w3))
        if use_grouped_mm(self.backend, x_MD.device):
            mm = self.grouped_mm or _grouped_mm
            return _grouped_swiglu(x_MD, counts_E, w1, w2, w3, self.activation, mm)
        return _looped_swiglu(x_MD, counts_E, w1, w2, w3, self.activation)

    def activation(self, h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
        """silu(h1) * h3. A method of its own so activation checkpointing can recompute it in
        backward instead of saving silu(h1) (``recompute_modules = ["moe_act"]``)."""
        return F.silu(h1) * h3

    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.w1, std)
        trunc_normal_(self.w3, std)
        trunc_normal_(self.w2, out_std)


def _grouped_swiglu(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mm: GroupedMM,
) -> torch.Tensor:
    """Three grouped GEMMs; group e spans rows [offsets[e-1], offsets[e]). No host sync."""
    # cumsum then cast (not cumsum(dtype=int32)): inductor folds the cumsum of fixed group
    # sizes (pad_to_capacity) into an int64 constant otherwise.
    offsets = torch.cumsum(counts_E, dim=0).to(torch.int32)
    h_MF = act(mm(x_MD, w1_EFD, offsets), mm(x_MD, w3_EFD, offsets))
    return mm(h_MF, w2_EDF, offsets)


def _grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x @ w[e].T for the rows of each group e (w's transpose is the column-major operand)."""
    return torch._grouped_mm(x_MK, w_ENK.transpose(-2, -1), offs=offsets)


def _looped_swiglu(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Reference path: one dense matmul chain per expert (syncs once for the counts). Rows past
    the last group (a dispatcher's static-size padding) come out as zeros."""
    counts = counts_E.tolist()
    outs = []
    for e, x_mD in enumerate(torch.split(x_MD[: sum(counts)], counts)):
        h = act(x_mD @ w1_EFD[e].T, x_mD @ w3_EFD[e].T)
        outs.append(h @ w2_EDF[e].T)
    outs.append(x_MD.new_zeros(x_MD.shape[0] - sum(counts), w2_EDF.shape[1]))
    return torch.cat(outs)
