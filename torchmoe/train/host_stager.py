"""Staging for async checkpoints: a copy of the state in host memory, taken before training
goes on, that the writer thread then writes at its own pace.

torch's DefaultStager deep-copies the whole state dict generically; on torch 2.11 with pinned
memory its second save fails (``KeyError: <class 'type'>`` in its copy dispatch). The state
here is only tensors (plain or DTensor shards), plain data and containers, so the copy is
explicit: tensors go into host buffers kept from one save to the next (pinned on GPU: one
allocation, then copies at full PCIe speed, all in flight at once), the rest is copied as is.
"""

import copy
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class HostStager(AsyncStager):
    """An ``AsyncStager`` for ``dcp.async_save`` whose buffers live until ``close``."""

    _synchronize_after_execute = False

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.buffers: dict[str, torch.Tensor] = {}

    def stage(self, state_dict: dict) -> dict:
        staged = self._copy(state_dict, "")
        if self.pin_memory:
            torch.cuda.synchronize()  # the non-blocking copies have landed
        return staged

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` returns a finished copy."""

    def close(self) -> None:
        self.buffers.clear()

    def _copy(self, x: Any, key: str) -> Any:
        if isinstance(x, DTensor):  # this rank's shard, with the layout DCP needs
            local = self._tensor(x._local_tensor, key)
            return DTensor(local, x._spec, requires_grad=False)
        if isinstance(x, torch.Tensor):
            return self._tensor(x, key)
        if isinstance(x, dict):
            return type(x)((k, self._copy(v, f"{key}/{k}")) for k, v in x.items())
        if isinstance(x, list | tuple) and type(x) in (list, tuple):
            return type(x)(self._copy(v, f"{key}/{i}") for i, v in enumerate(x))
        return copy.deepcopy(x)

    def _tensor(self, t: torch.Tensor, key: str) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
            self.buffers[key] = buf
        buf.copy_(t, non_blocking=self.pin_memory and t.is_cuda)
        return buf
