"""The routed experts' SwiGLU on the gate-and-up GEMM's output, in plain torch (the reference
and the path off CUDA).

Legend (torchmoe/__init__.py): M routed token copies, F expert hidden dim. ``h13`` [M, 2F] holds
each row's gate half (columns [0, F)) then its up half ([F, 2F)), as ``experts.w13`` produces.
"""

import torch
import torch.nn.functional as F


def swiglu(h13_MF2: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, [M, F]."""
    h1_MF, h3_MF = h13_MF2.chunk(2, dim=-1)
    return F.silu(h1_MF) * h3_MF
