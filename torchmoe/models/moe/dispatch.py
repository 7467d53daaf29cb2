"""Local (single-rank) token dispatcher: permute tokens into expert order and back.

Legend (torchmoe/__init__.py): T tokens, D model dim, E experts, K experts per token, N = T * K
routed copies, M rows of the expert-ordered buffer (N, or N + E * (pad_multiple - 1) rounded up to a
multiple of pad_multiple with padding).

The dispatcher is the seam for expert parallelism: a parallel plan swaps this module for one
that also exchanges tokens between ranks, with the same ``dispatch``/``combine`` contract.
Padding each expert's group to a multiple of ``pad_multiple`` rows (16 for float8 grouped
GEMMs) is the dispatcher's business too; a quantization plan may set ``pad_multiple`` on a
built model. The permutation itself lives in ``torchmoe/kernels``: fused Triton ops on CUDA,
their plain-torch references elsewhere; both keep M static, so nothing here syncs the host.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from torchmoe.kernels import moe_permute_ref

try:
    from torchmoe.kernels import moe_permute as moe_permute_fused
except ImportError:  # no Triton on this platform: the torch backend only
    moe_permute_fused = None

BACKENDS = ("auto", "triton", "torch")


@dataclass
class DispatchState:
    """What ``combine`` needs to undo ``dispatch``."""

    dest_TK: torch.Tensor  # row of each (token, k) copy in the expert-ordered buffer
    src_M: torch.Tensor  # copy (t * K + k) each row holds; -1 for padding and unused rows


class LocalDispatcher(nn.Module):
    """Groups the T*K (token, expert) copies by expert, stable in token order, each group
    padded with zero rows to a multiple of ``pad_multiple``."""

    def __init__(self, num_experts: int, backend: str = "auto", pad_multiple: int = 1):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"permute backend {backend!r} is not one of {BACKENDS}")
        self.num_experts = num_experts
        self.backend = backend
        self.pad_multiple = pad_multiple

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        capacity: int = 0,
        in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Returns tokens grouped by expert [M, D] (padding rows zero), rows per expert [E]
        (padded, int64: the groups the experts see), and the state for ``combine``. Copies
        with expert id -1 (dropped) are not dispatched. ``capacity`` > 0 pads every group to
        exactly the copies an expert may take (times the ranks whose tokens it receives); no
        expert may have more copies (the MoE layer drops over capacity first). ``in_flight``
        is work independent of the dispatch (the shared experts): a dispatcher that exchanges
        tokens between ranks calls it once its exchange is launched and before it waits on
        it, so the work hides the communication; this one has none and calls it first."""
        if in_flight is not None:
            in_flight()
        return self.permute(
            x_TD,
            topk_idx_TK,
            self.num_experts,
            self.pad_multiple,
            self.group_rows(capacity, sources=1),
        )

    def group_rows(self, capacity: int, sources: int) -> int:
        """Fixed rows per group for ``capacity`` copies from each of ``sources`` token sets,
        rounded up to the padding multiple; 0 (no fixed size) without a capacity."""
        P = self.pad_multiple
        return -(-capacity * sources // P) * P if capacity else 0

    def combine(
        self, y_MD: torch.Tensor, topk_weight_TK: torch.Tensor, state: DispatchState
    ) -> torch.Tensor:
        """Weighted sum of each token's K expert outputs -> [T, D] in y's dtype. Reads only
        rows that hold copies: padding and unused rows may hold anything, NaN included."""
        return self.unpermute(y_MD, topk_weight_TK, state)

    def permute(
        self,
        x_TD: torch.Tensor,
        idx_TK: torch.Tensor,
        num_experts: int,
        pad_multiple: int,
        group_rows: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """``dispatch`` over any group ids (expert-parallel dispatchers regroup with it)."""
        ops = self._ops(x_TD.device)
        dest_TK, src_M, counts_E = ops.permute_indices(
            idx_TK, num_experts, pad_multiple, group_rows
        )
        return ops.permute(x_TD, dest_TK, src_M), counts_E, DispatchState(dest_TK, src_M)

    def unpermute(
        self, y_MD: torch.Tensor, weight_TK: torch.Tensor | None, state: DispatchState
    ) -> torch.Tensor:
        """Inverse of ``permute``: per token, the (weighted, if given) sum of its rows."""
        return self._ops(y_MD.device).unpermute(y_MD, state.dest_TK, state.src_M, weight_TK)

    def _ops(self, device: torch.device) -> ModuleType:
        """The kernels module for ``backend`` on ``device`` (Triton runs CPU tensors only in
        its interpreter, TRITON_INTERPRET=1, which tests use)."""
        if self.backend == "torch" or (
            self.backend == "auto" and (device.type != "cuda" or moe_permute_fused is None)
        ):
            return moe_permute_ref
        # The config checks refuse both up front (config/model_checks.py); here they are bugs.
        if moe_permute_fused is None:
            raise RuntimeError("the triton permute backend needs the triton package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"the triton permute backend needs CUDA tensors, not {device.type} ones"
            )
        return moe_permute_fused
