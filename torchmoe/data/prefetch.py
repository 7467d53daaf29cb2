"""Batches made ahead of the training step in a background thread, with the exact data position.

A thread, not worker processes: tokenization (tiktoken) and tensor building release the GIL, the
loader's state stays in one place, and nothing has to be pickled between processes. Each batch
travels with the loader state right after it, so ``state_dict`` is the position after the last
batch the trainer *took*, not after the ones made ahead: a checkpoint resumes at the next batch
the uninterrupted run would have used.
"""

import queue
import threading
from typing import Any, NamedTuple, Protocol

import torch


class Batch(NamedTuple):
    """One micro-batch: token ids and their labels [B, S] (-100: no label), and for
    block-causal attention the packed document of each position [B, S] (else None)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        """On ``device``. To a GPU through pinned memory without blocking: a copy from
        pageable memory makes the host wait until the GPU has finished all queued work (the
        previous step's optimizer, the previous micro-batch's backward), then start launching
        this one's kernels into an idle GPU."""
        return Batch(*(t if t is None else _to(t, device) for t in self))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class StatefulBatches(Protocol):
    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Prefetcher:
    """``loader``'s batches, ``depth`` ahead (0: made on demand in the caller's thread). An
    error in the loader (e.g. too many bad rows) is raised by the ``next`` that reaches it."""

    def __init__(self, loader: StatefulBatches, depth: int) -> None:
        self.loader, self.depth = loader, depth
        self._state = loader.state_dict()
        self._queue: queue.Queue[tuple[Batch, dict[str, Any]] | BaseException] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if not self.depth:
            batch = next(self.loader)
            self._state = self.loader.state_dict()
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()  # type: ignore[union-attr]
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, name="torchmoe-data", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q = self._queue
        assert q is not None
        try:
            while not self._stop.is_set():
                self._put(q, (next(self.loader), self.loader.state_dict()))
        except BaseException as e:  # handed to the trainer, raised at the batch it belongs to
            self._put(q, e)

    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; batches made ahead from the old one are dropped."""
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making) and drop the batches made
        ahead: the loader goes back to the position after the last batch taken."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None
            self.loader.load_state_dict(self._state)
