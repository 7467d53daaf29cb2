"""apply_compile: torch.compile per transformer block."""

import logging

import torch
from torch import nn

from torchmoe.config.schema import Compile
from torchmoe.models.common.transformer import block_slots

logger = logging.getLogger(__name__)


def apply_compile(model: nn.Module, cfg: Compile, fullgraph: bool) -> None:
    """Compile each transformer block (``model.layers`` and MTP depths) separately: blocks of one
    kind share a compiled graph, so compile time does not grow with depth. ``fullgraph`` (the MoE
    layer has no host sync: grouped GEMM experts behind the local or the sync-free dispatcher)
    turns any graph break into an error instead of a silent slowdown; the other expert-parallel
    dispatchers need the token counts on the host and compile with a break there."""
    if not cfg.enable:
        return
    slots = block_slots(model)
    for parent, name in slots:
        parent.register_module(name, torch.compile(getattr(parent, name), fullgraph=fullgraph))
    logger.info("compiled %d blocks (fullgraph=%s)", len(slots), fullgraph)
