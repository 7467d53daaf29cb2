"""apply_offload: fine-grained activation offloading (``activation_checkpoint.offload_modules``).

The tensors that the named parts of each block (recompute_modules' names: ``moe_act``,
``core_attn``, ``layernorm``, ...) save for backward are copied to pinned host memory on a side
stream as forward produces them, and their GPU memory is freed once the copy is done. In
backward, the first tensor read back from one part's call starts copying the previous call's
tensors back on the side stream (backward reaches them next), so they are usually on the GPU
before they are needed; a tensor not prefetched comes back on the compute stream. Where
recompute buys memory with FLOPs, offloading buys it with PCIe traffic that overlaps compute.

A part's parameters and views of them (nn.Linear saves ``weight.t()``; the bf16 copies of
cached weights and FSDP's unsharded parameters are the module's parameters while it runs)
stay: they live anyway. So do tensors under ``MIN_BYTES``, for which a copy costs more than it
frees, strided views, and DTensors (tensor parallelism's sequence-parallel activations). A
tensor saved twice in one call (an input two layers read) is copied once. Off CUDA a saved
tensor is copied in host memory: the same path, no memory saved (for tests). Like autograd
without hooks, it expects saved tensors not to be modified in place after they are saved
(autograd's own check cannot see through the hooks).

The parts run eagerly: saved-tensor hooks cannot run inside a compiled graph, so under
``compile.enable`` the block compiles around them (a graph break on each side).
"""

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from torchmoe.config.schema import ActivationCheckpoint
from torchmoe.models.common.transformer import block_slots
from torchmoe.parallel.activation_checkpoint import selected_parts

MIN_BYTES = 1 << 20


@dataclass(eq=False)
class _Call:
    """One call of an offloaded part. Its saved tensors hold it (``_Saved.call``); it refers
    back to them weakly, so it goes when autograd frees them, backward run or not."""

    index: int
    weights: frozenset[int]  # storages of the part's parameters: saved views of them stay
    saved: dict[int, weakref.ref] = field(default_factory=dict)  # id(tensor) -> _Saved
    prefetched: bool = False


@dataclass(eq=False)
class _Saved:
    """One offloaded tensor: its host copy, and once back, its GPU copy (kept for later
    unpacks of the same tensor until autograd frees this)."""

    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None  # the host copy is complete (None off CUDA)
    call: _Call
    source: weakref.ref  # the tensor saved (an id is only its while it lives)
    back: torch.Tensor | None = None
    back_ready: torch.cuda.Event | None = None


class ActivationOffloader:
    """Saved-tensor hooks for the offloaded parts of one model (one device), with their side
    stream."""

    def __init__(self) -> None:
        self._calls: list[weakref.ref] = []  # of _Call, forward order
        self._count = 0
        self._stream: torch.cuda.Stream | None = None
        self.offloaded_bytes = 0  # total copied to the host

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @contextmanager
    def offloading(self, part: nn.Module | None = None) -> Iterator[None]:
        """Forward of one call of an offloaded ``part``: what it saves goes to the host, but
        for its parameters (and views of them: nn.Linear saves ``weight.t()``)."""
        weights = frozenset(_storage(p) for p in (part.parameters() if part else ()))
        call = _Call(self._count, weights)
        self._count += 1
        self._calls = [r for r in self._calls if r() is not None] + [weakref.ref(call)]
        with torch.autograd.graph.saved_tensors_hooks(
            functools.partial(self._pack, call), self._unpack
        ):
            yield

    def _pack(self, call: _Call, t: torch.Tensor) -> torch.Tensor | _Saved:
        # DTensors (tensor parallelism), strided views and weights stay where they are
        if (
            type(t) is not torch.Tensor  # a parameter, a DTensor, a wrapper subclass
            or not t.is_contiguous()
            or t.numel() * t.element_size() < MIN_BYTES
            or _storage(t) in call.weights
        ):
            return t
        known = call.saved.get(id(t))
        known = known() if known is not None else None
        if known is not None and known.source() is t:  # saved twice (an input two ops read)
            return known
        source = weakref.ref(t)
        if not t.is_cuda:
            saved = _Saved(
                torch.empty(t.shape, dtype=t.dtype).copy_(t), t.device, None, call, source
            )
        else:
            side, main = self._side(t.device), torch.cuda.current_stream(t.device)
            side.wait_stream(main)  # t is written
            with torch.cuda.stream(side):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                copied = side.record_event()
            t.record_stream(side)  # its memory is not reused before the copy is done
            saved = _Saved(host, t.device, copied, call, source)
        self.offloaded_bytes += t.numel() * t.element_size()
        call.saved[id(t)] = weakref.ref(saved)
        return saved

    def _unpack(self, saved: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if not saved.call.prefetched:
            saved.call.prefetched = True  # its own tensors come back now, on demand
            self._prefetch_before(saved.call)
        if saved.copied is None:  # off CUDA
            return saved.host
        main = torch.cuda.current_stream(saved.device)
        if saved.back is None:  # not prefetched: back on this stream
            main.wait_event(saved.copied)
            saved.back = saved.host.to(saved.device, non_blocking=True)
        elif saved.back_ready is not None:
            main.wait_event(saved.back_ready)
            saved.back_ready = None
        return saved.back

    def _prefetch_before(self, call: _Call) -> None:
        """Start copying back the call before ``call`` in forward order (the one backward
        reaches next) on the side stream, into memory of the compute stream (the one that
        uses and frees it)."""
        earlier = [c for c in (r() for r in self._calls) if c is not None and c.index < call.index]
        if not earlier or earlier[-1].prefetched:
            return
        previous = earlier[-1]
        previous.prefetched = True
        for saved in (r() for r in previous.saved.values()):
            if saved is None or saved.copied is None or saved.back is not None:
                continue
            side, main = self._side(saved.device), torch.cuda.current_stream(saved.device)
            back = torch.empty_like(saved.host, device=saved.device)  # on the compute stream
            side.wait_stream(main)  # back's memory is free to write
            with torch.cuda.stream(side):
                side.wait_event(saved.copied)
                back.copy_(saved.host, non_blocking=True)
                saved.back_ready = side.record_event()
            back.record_stream(side)
            saved.back = back


def _storage(t: torch.Tensor) -> int:
    """The address of the memory holding ``t``'s values (a DTensor's local shard)."""
    local = getattr(t, "_local_tensor", t)
    return local.untyped_storage().data_ptr()


def apply_offload(model: nn.Module, cfg: ActivationCheckpoint) -> ActivationOffloader | None:
    """Offload what the ``offload_modules`` parts of every block save (module docstring): each
    chosen method (or ``forward``) is replaced on the instance by one that runs it under the
    offloader's hooks, outside any compiled graph. Uses no mesh dimension."""
    if not cfg.offload_modules:
        return None
    offloader = ActivationOffloader()
    for parent, name in block_slots(model):
        for module, method in selected_parts(getattr(parent, name), cfg.offload_modules):
            setattr(module, method, _offloaded(getattr(module, method), offloader, module))
    return offloader


def _offloaded(fn: Callable, offloader: ActivationOffloader, part: nn.Module) -> Callable:
    @torch._dynamo.disable
    def run(*args, **kwargs):
        with offloader.offloading(part):
            return fn(*args, **kwargs)

    return run
