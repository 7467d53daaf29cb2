"""A DCP save planner for a state dict of meta tensors whose values are made one at a time as
they are written: an import writes a model larger than memory, holding one tensor at a time.

DCP asks the planner for each tensor's data (``resolve_data``) while writing; with one file per
tensor (``FileSystemWriter(single_file_per_rank=False)``, one thread) each file is written
before the next tensor is asked for. ``CheckpointWriter.save`` picks that writer whenever a
planner is given. DCP's writer loop still holds the last written tensor while it asks for the
next one, which would double the peak; so the planner frees each tensor's memory when the next
is asked for, and peak memory stays near the largest tensor.
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
        self._written: torch.Tensor | None = None  # the tensor DCP asked for last

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | object:
        fqn = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO or not fqn.startswith(self.prefix):
            return super().resolve_data(write_item)
        written = None if self._written is None else self._written.untyped_storage()
        if written is not None and written.resizable():  # already in its file: free it now
            written.resize_(0)
        self._written = self.make(fqn[len(self.prefix) :])
        return self._written
