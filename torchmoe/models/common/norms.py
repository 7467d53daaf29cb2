"""RMSNorm that stays on the fused kernel under autocast."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, but the weight is cast to the input's dtype: under bf16 autocast a norm fed
    by a linear layer sees bf16 input, and a dtype mismatch sends torch to a slow unfused path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)
