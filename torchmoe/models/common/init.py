"""The init scheme, in one place.

- input projections (attention q/kv, SwiGLU w1/w3, router, routed experts' w1/w3):
  truncated normal, std = ``model.init_std`` (0.02), cut at 3 std;
- output projections (attention wo, SwiGLU w2, experts' w2): the same with
  std = init_std / sqrt(2 * n_layers), so the residual stream's variance does not grow with depth;
- token embedding: normal, std 1 (the first RMSNorm rescales it);
- output head: truncated normal, std = dim ** -0.5;
- RMSNorm weights 1, expert bias 0.
Every tensor is drawn from the global torch generator in module order, so a seed fixes the model.
"""

import torch
from torch import nn


def trunc_normal_(t: torch.Tensor, std: float) -> None:
    """Normal(0, std) cut at +-3 std, in place."""
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std)
