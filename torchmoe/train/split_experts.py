"""Checkpoints written before the routed experts' gate and up projections became one tensor.

Since then ``experts.w13`` [E, 2, F, D] holds both (models/moe/experts.py); older checkpoints
hold ``experts.w1`` and ``experts.w3`` [E, F, D]. They still resume, seed and export: their
names and shapes are read as the joined tensor's (``joined_shapes``, ``joined_names``), and DCP
loads the two saved tensors straight into the halves ``w13[:, 0]`` and ``w13[:, 1]`` of the
model's tensor and of each optimizer moment (``SplitLoad``), which are views: nothing is
copied, and sharded tensors (DTensors) load their local halves the same way.
"""

import re
from collections.abc import Iterable
from typing import Any

import torch

from torchmoe.config.errors import ConfigError

# a routed-experts tensor's name, or one of its optimizer entries (not a module's .weight)
_ENDS = r"(?=$|\.(?!(?:weight|bias)(?:$|\.)))"
_JOINED = re.compile(r"(?<![^.])experts\.w13" + _ENDS)
_GATE = re.compile(r"(?<![^.])experts\.w1" + _ENDS)
_UP = re.compile(r"(?<![^.])experts\.w3" + _ENDS)


def holds_split_experts(names: Iterable[str]) -> bool:
    """Whether a checkpoint with these (DCP) names stores gate and up apart."""
    return any(_GATE.search(n) for n in names)


def joined_shapes(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """A saved fingerprint's model shapes with each gate/up pair as the joined tensor's."""
    out = {}
    for name, shape in shapes.items():
        if _UP.search(name):
            continue
        if _GATE.search(name):
            name, shape = _GATE.sub("experts.w13", name), [shape[0], 2, *shape[1:]]
        out[name] = shape
    return out


def halves(name: str) -> tuple[str, str] | None:
    """The names an older checkpoint stores joined tensor ``name`` under (gate, up)."""
    if not _JOINED.search(name):
        return None
    return _JOINED.sub("experts.w1", name), _JOINED.sub("experts.w3", name)


def joined_names(meta: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Meta tensors of a saved model with each gate/up pair as one joined meta tensor; a half
    without its other half is a ConfigError (``where`` names the checkpoint)."""
    out = {}
    for name, t in meta.items():
        gate = _UP.sub("experts.w1", name)
        up = _GATE.sub("experts.w3", name)
        if gate != name or up != name:
            other = up if up != name else gate
            if other not in meta:
                raise ConfigError(f"{where}: {name} is there but {other} is missing")
        if _UP.search(name):
            continue
        if _GATE.search(name):
            name = _GATE.sub("experts.w13", name)
            t = torch.empty((t.shape[0], 2, *t.shape[1:]), dtype=t.dtype, device="meta")
        out[name] = t
    return out


class SplitLoad:
    """Turns a state dict with joined ``experts.w13`` entries into one DCP fills from a
    checkpoint that stores gate and up apart (``split``), and back after the load (``join``).

    A joined tensor [E, 2, ...] becomes two views, so DCP writes into it in place. Any other
    value of a joined name (a moment's step count, a learning rate) is read from the gate's
    entry: the optimizer kept one for each of the two, and they are equal."""

    def __init__(self) -> None:
        self.whole: dict[tuple[str, ...], Any] = {}  # gate entries' paths -> joined tensors

    def split(self, sd: dict, path: tuple[str, ...] = ()) -> dict:
        out: dict = {}
        for key, value in sd.items():
            if isinstance(value, dict):
                out[key] = self.split(value, (*path, key))
            elif isinstance(key, str) and (parts := halves(key)) is not None:
                gate, up = parts
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == 2:
                    out[gate], out[up] = value[:, 0], value[:, 1]
                    self.whole[(*path, gate)] = value
                else:
                    out[gate] = value
            else:
                out[key] = value
        return out

    def join(self, sd: dict, path: tuple[str, ...] = ()) -> dict:
        out: dict = {}
        for key, value in sd.items():
            if isinstance(value, dict):
                out[key] = self.join(value, (*path, key))
            elif isinstance(key, str) and _UP.search(key):
                continue
            elif isinstance(key, str) and _GATE.search(key):
                out[_GATE.sub("experts.w13", key)] = self.whole.get((*path, key), value)
            else:
                out[key] = value
        return out
