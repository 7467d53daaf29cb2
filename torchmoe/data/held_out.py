"""A share of a table's documents held out for validation, the same on every rank and layout:
document i is held out when a hash of (seed, i) falls below the fraction. The training data is
the rest, so the two never overlap. The hash (splitmix64) runs vectorised: a 100M-document
corpus splits in seconds."""

import numpy as np

from torchmoe.config.errors import ConfigError
from torchmoe.data.datasets import DocumentTable

SALT = 0x5EED


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each value (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Subset:
    """The rows ``indices`` of ``table``, as a table of their own."""

    def __init__(self, table: DocumentTable, indices: np.ndarray) -> None:
        self._table, self._indices = table, indices

    def __len__(self) -> int:
        return len(self._indices)

    def text(self, index: int) -> str:
        return self._table.text(int(self._indices[index]))

    def record(self, index: int) -> dict:
        return self._table.record(int(self._indices[index]))

    def file_of(self, index: int) -> str:
        return self._table.file_of(int(self._indices[index]))

    def line_of(self, index: int) -> int:
        return self._table.line_of(int(self._indices[index]))


def split_held_out(table: DocumentTable, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(training part, held-out part) of ``table``; at least one document in each."""
    n = len(table)
    if n < 2:
        raise ConfigError(
            "validation.dataset = '' holds out a share of the training documents, but there "
            "is only one; give validation.dataset"
        )
    hashes = _splitmix64(np.arange(n, dtype=np.uint64) ^ _splitmix64(np.uint64(seed ^ SALT)))
    held = hashes < np.uint64(int(fraction * 2**64))
    if not held.any():  # a tiny table: hold out its smallest hash
        held[int(np.argmin(hashes))] = True
    if held.all():
        held[int(np.argmax(hashes))] = False
    dtype = np.int32 if n < 2**31 else np.int64
    return Subset(table, np.flatnonzero(~held).astype(dtype)), Subset(
        table, np.flatnonzero(held).astype(dtype)
    )
