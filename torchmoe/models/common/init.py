"""The init scheme, in one place.

- input projections (attention q/kv, SwiGLU w1/w3, router, routed experts' w13):
  truncated normal, std = ``model.init_std`` (0.02), cut at 3 std;
- output projections (attention wo, SwiGLU w2, experts' w2): the same with
  std = init_std / sqrt(2 * n_layers), so the residual stream's variance does not grow with depth;
- token embedding: normal, std 1 (the first RMSNorm rescales it);
- output head: truncated normal, std = dim ** -0.5;
- RMSNorm weights 1, expert bias 0.

Every random tensor goes through ``draw``: by default from the global torch generator in module
order, so a seed fixes the model. The trainer installs a drawer (``drawing``) that gives each
parameter a generator of its own (torchmoe/parallel/named_init.py), which is how a sharded model
starts from the same weights at every layout; the model code does not know.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Fills a tensor in place from a generator (None: the global one).
Sampler = Callable[[torch.Tensor, torch.Generator | None], None]
Drawer = Callable[[torch.Tensor, Sampler], None]

_drawer: Drawer | None = None


def draw(t: torch.Tensor, sample: Sampler) -> None:
    """Fill ``t`` with ``sample``, through the installed drawer if any."""
    if _drawer is None:
        sample(t, None)
    else:
        _drawer(t, sample)


@contextmanager
def drawing(drawer: Drawer) -> Iterator[None]:
    """Route every ``draw`` through ``drawer`` meanwhile."""
    global _drawer
    previous, _drawer = _drawer, drawer
    try:
        yield
    finally:
        _drawer = previous


def trunc_normal_(t: torch.Tensor, std: float) -> None:
    """Normal(0, std) cut at +-3 std, in place."""
    draw(t, lambda x, g: nn.init.trunc_normal_(x, 0.0, std, -3 * std, 3 * std, generator=g))


def normal_(t: torch.Tensor, std: float) -> None:
    """Normal(0, std), in place."""
    draw(t, lambda x, g: nn.init.normal_(x, 0.0, std, generator=g))
