"""apply_compile: torch.compile per transformer block."""

import torch
from torch import nn

from torchmoe.config.schema import Compile


def apply_compile(model: nn.Module, cfg: Compile) -> None:
    """Compile each block of ``model.layers`` separately: blocks share one compiled graph shape,
    so compile time does not grow with depth."""
    if not cfg.enable:
        return
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block))
