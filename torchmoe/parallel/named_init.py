"""Initialisation that does not depend on the layout: each parameter is drawn whole from a
generator seeded by (training.seed, its name, its global shape), then each rank keeps its shard.

Without this, a sharded model drawn from one global generator gets different weights at every
layout (each rank draws its shard's numbers from the same stream), and a pipeline stage's
weights depend on which blocks it holds. With it, the same seed gives the same model on one
process, under FSDP, TP, EP and PP, so the loss curves match without a seed checkpoint. Drawing
the whole tensor costs one parameter's worth of temporary memory at a time, on the device.
"""

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from torchmoe.models.common.init import Sampler, drawing

# Wrappers that activation checkpointing and torch.compile put into parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """The parameter's name in the plain model, without wrapper modules."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def parameter_seed(seed: int, name: str, shape: torch.Size) -> int:
    key = f"{seed}/{name}/{tuple(shape)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@contextmanager
def init_by_name(model: nn.Module, seed: int) -> Iterator[None]:
    """Meanwhile, every random init of one of ``model``'s parameters (models/common/init.py
    ``draw``) is drawn by name; other tensors draw from the global generator as usual."""
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}

    def drawer(t: torch.Tensor, sample: Sampler) -> None:
        name = names.get(id(t))
        if name is None:
            sample(t, None)
            return
        local = t.to_local() if isinstance(t, DTensor) else t
        generator = torch.Generator(device=local.device)
        generator.manual_seed(parameter_seed(seed, name, t.shape))
        whole = torch.empty(t.shape, dtype=t.dtype, device=local.device)
        sample(whole, generator)
        if isinstance(t, DTensor):
            whole = distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None)
            whole = whole.to_local()
        local.copy_(whole)

    with drawing(drawer):
        yield
