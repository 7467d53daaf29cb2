"""Refuse, before allocating, a model whose weights and optimizer state cannot fit."""

import os

import torch
from torch import nn

from torchmoe.config.errors import ConfigError

# fp32 master weight + fp32 gradient (AdamW's two moments come on top, by their dtype).
BYTES_PER_PARAM = 4 + 4


def device_memory_bytes(device: torch.device) -> int:
    """GPU memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_fits(
    model: nn.Module,
    device: torch.device,
    shards: int = 1,
    moment_bytes: int = 4,
    extra_bytes: int = 0,
) -> None:
    """Raise a ConfigError when parameters + gradients + AdamW state (two moments of
    ``moment_bytes`` each) + ``extra_bytes`` per parameter (cached weights' float32 gradient
    sums and waiting gradients under accumulation), split over ``shards`` data-parallel ranks,
    exceed the device's memory. Activations come on top, uncounted."""
    n_params = sum(p.numel() for p in model.parameters())
    need = n_params * (BYTES_PER_PARAM + 2 * moment_bytes + extra_bytes) // shards
    have = device_memory_bytes(device)
    if need > have:
        raise ConfigError(
            f"model.flavor: {n_params / 1e9:.1f}B parameters need ~{need / 2**30:.0f} GiB for "
            f"weights, gradients and AdamW state, but {device} has {have / 2**30:.0f} GiB; pick "
            "a smaller flavor, fewer --model.n_layers, or more GPUs with [parallelism]"
        )
