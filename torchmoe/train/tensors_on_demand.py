"""A DCP save planner for a state dict of meta tensors whose values are made one at a time as
they are written: an import writes a model larger than memory, holding one tensor at a time.

DCP asks the planner for each tensor's data (``resolve_data``) while writing; with one file per
tensor (``FileSystemWriter(single_file_per_rank=False)``, one thread) nothing else keeps it
alive, so peak memory stays near the largest tensor. ``CheckpointWriter.save`` picks that
writer whenever a planner is given.
"""

from collections.abc import Callable

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType


class TensorsOnDemand(DefaultSavePlanner):
    """Plans from the (meta) state dict; writes ``make(name)`` for each tensor whose saved key
    is ``prefix + name``."""

    def __init__(self, make: Callable[[str], torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.make, self.prefix = make, prefix

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | object:
        fqn = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO or not fqn.startswith(self.prefix):
            return super().resolve_data(write_item)
        return self.make(fqn[len(self.prefix) :])
