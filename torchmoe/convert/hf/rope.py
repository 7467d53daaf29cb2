"""RoPE channel layouts. torchmoe rotates adjacent channel pairs (2i, 2i+1); Hugging Face's
Llama-style models rotate channel i with i + R/2 ("rotate half"). Both give pair i the same
frequency, so permuting the rows of the q/k projections (and of per-head q/k norm weights)
moves a checkpoint between the two without changing any q.k product."""

from collections.abc import Callable

import torch


def halves_to_pairs(w: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rows grouped in heads of ``rope_dim`` channels, rotate-half layout -> adjacent pairs."""
    rest = w.shape[1:]
    return w.reshape(-1, 2, rope_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def pairs_to_halves(w: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Inverse of ``halves_to_pairs``."""
    rest = w.shape[1:]
    return w.reshape(-1, rope_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def on_rope_tail(
    w: torch.Tensor, group: int, rope_dim: int, fn: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn(rows, rope_dim)`` to the last ``rope_dim`` rows of each group of ``group``
    rows (MLA: the rotary part of each query head, or of the key/value down projection)."""
    rest = w.shape[1:]
    g = w.reshape(-1, group, *rest)
    plain, rot = g.split([group - rope_dim, rope_dim], dim=1)
    rot = fn(rot.reshape(-1, *rest), rope_dim).reshape(rot.shape)
    return torch.cat([plain, rot], dim=1).reshape(w.shape)
