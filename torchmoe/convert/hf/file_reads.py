"""Filling a tensor's memory straight from a file, no intermediate copy."""

import ctypes
import io
from pathlib import Path

import torch

from torchmoe.config.errors import ConfigError


def read_into(
    f: io.BufferedIOBase | io.RawIOBase, out: torch.Tensor, path: Path, name: str
) -> None:
    """Fill ``out`` (contiguous, on the CPU) with the next ``out.nbytes`` bytes of ``f``; a file
    that ends first is one line naming ``path`` and ``name``. The buffer is a view of torch's
    own memory (a numpy view would pin the storage's size, and a freed-early tensor needs it
    resizable)."""
    buffer = memoryview((ctypes.c_char * out.nbytes).from_address(out.data_ptr()))
    done = 0
    while done < out.nbytes:
        n = f.readinto(buffer[done:])
        if not n:
            raise ConfigError(f"{path}: tensor {name} is cut short")
        done += n
