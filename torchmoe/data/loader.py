"""Packs a rank's documents into fixed-length training batches, resumable to the exact token."""

from typing import Any

import torch

from torchmoe.config.schema import Data
from torchmoe.data.datasets import DocumentStream, open_documents
from torchmoe.data.tokenizer import Tokenizer


class PackedLoader:
    """Endless ``(inputs, labels)`` batches, int64 tensors of shape [batch_size, seq_len].

    Documents are tokenized as they are reached and joined into one token stream, each followed
    by EOS, so a document may continue into the next row or batch. The i-th row (counted across
    batches) is the window [i * seq_len, (i + 1) * seq_len + 1) of the stream: consecutive windows
    of seq_len + 1 share one token, so every token is a label exactly once and none is dropped.
    The unread part of the stream and the document position make up the state, so a restored
    loader continues with identical batches.
    """

    def __init__(
        self, documents: DocumentStream, tokenizer: Tokenizer, seq_len: int, batch_size: int
    ) -> None:
        self._documents, self._tokenizer = documents, tokenizer
        self._seq_len, self._batch_size = seq_len, batch_size
        self._tokens: list[int] = []
        self._start = 0  # _tokens[:_start] was already emitted; trimmed lazily to avoid copies

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_inputs = self._batch_size * self._seq_len
        while len(self._tokens) - self._start < n_inputs + 1:
            self._append_document()
        window = torch.tensor(
            self._tokens[self._start : self._start + n_inputs + 1], dtype=torch.int64
        )
        self._start += n_inputs  # the last label is the next batch's first input
        inputs = window[:-1].view(self._batch_size, self._seq_len)
        labels = window[1:].view(self._batch_size, self._seq_len)
        return inputs, labels

    def _append_document(self) -> None:
        del self._tokens[: self._start]
        self._start = 0
        self._tokens += self._tokenizer.encode(next(self._documents))
        self._tokens.append(self._tokenizer.eos_id)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python only (ints, lists, dicts), so it goes into a checkpoint as JSON."""
        return {"documents": self._documents.state_dict(), "tokens": self._tokens[self._start :]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._documents.load_state_dict(state["documents"])
        self._tokens, self._start = list(state["tokens"]), 0


def build_dataloader(
    cfg: Data,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int,
) -> PackedLoader:
    """The training batches of one data-parallel rank, as configured by ``[data]``."""
    return PackedLoader(
        open_documents(cfg, dp_rank, dp_world, seed), tokenizer, seq_len, batch_size
    )
