"""Packs documents into fixed-length training rows, laid out so that the data does not depend on
the layout, and resumable to the exact token at any data-parallel size.

Every global batch has R rows (``training.global_batch_size``, or local batch x dp when that is
-1). Row j of every batch comes from stream j: the documents at global positions j, j + R, ...
(global_order.py), each tokenized and followed by EOS, joined into one token stream. Batch b's row
j is the window [b * seq_len, (b + 1) * seq_len + 1) of stream j: consecutive windows share one
token, so every token is a label exactly once and none is dropped. A rank owns the streams of its
rows: rank r's a-th micro-batch (gradient accumulation) holds rows (r * A + a) * L ... + L - 1 for
local batch L. The state is one entry per stream (next position, unread tokens, rows read and
skipped), so a checkpoint from any data-parallel size restores exactly.
"""

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Data, Validation
from torchmoe.data.bad_rows import BadRow, BadRowCounter, BlankRow
from torchmoe.data.datasets import DocumentTable, StreamedDocuments, open_source
from torchmoe.data.formats import Encoded, build_encoder
from torchmoe.data.global_order import GlobalOrder
from torchmoe.data.held_out import split_held_out
from torchmoe.data.prefetch import Batch, Prefetcher
from torchmoe.data.tokenizer import Tokenizer

IGNORE = -100  # a label the loss skips (torch's cross_entropy ignore_index)
_RESUME_AFRESH = "set checkpoint.exclude_from_loading = ['dataloader'] to read the data afresh"


class _Stream:
    """One row of every global batch: its next global position (tables only), the tokens read
    but not yet emitted (where each document among them starts, and, for prompt/chat data,
    which of them are no label), and its share of the rows read and skipped."""

    def __init__(self, index: int) -> None:
        self.index, self.position = index, 0
        self.tokens: list[int] = []
        self.ignored: list[bool] = []  # parallel to tokens, for formats with a loss mask
        self.window_ignored: list[bool] = []  # of the window just emitted
        self.starts: list[int] = []  # indices into tokens where a document begins
        self.window_starts: list[int] = []  # of the window just emitted (its inputs)
        self.rows = self.bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "tokens": list(self.tokens),  # a copy: the prefetcher keeps it while this one grows
            "ignored": [i for i, x in enumerate(self.ignored) if x],
            "starts": list(self.starts),
            "rows": self.rows,
            "bad": self.bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.tokens = state["position"], list(state["tokens"])
        ignored = set(state.get("ignored", ()))
        self.ignored = [i in ignored for i in range(len(self.tokens))]
        # a state from before document starts were kept: its unread tokens count as one
        # document (block-causal attention may let them see each other, for one window)
        self.starts = list(state.get("starts", [0]))
        self.rows, self.bad = state["rows"], state["bad"]


class PackedLoader:
    """Endless ``Batch(inputs, labels, document_ids)`` of int64 [batch_size, seq_len] for one
    data-parallel rank, micro-batch by micro-batch; ``document_ids`` (int32, the index of each
    position's document within its row) only with ``document_ids=True``, else None.
    ``state_dict`` holds keys ``order`` and ``stream_<j>`` for the rank's streams (and
    ``streamed_<rank>_of_<dp>`` for a streamed dataset), so that the checkpoint gathers every
    stream and any layout finds its own."""

    def __init__(
        self,
        source: DocumentTable | StreamedDocuments,
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        dp_rank: int = 0,
        dp_world: int = 1,
        accumulation: int = 1,
        seed: int = 0,
        bad_rows: BadRowCounter | None = None,
        data_format: str = "text",
        document_ids: bool = False,
    ) -> None:
        self._source = source
        self._encode = build_encoder(data_format, tokenizer, "messages")
        self._masked = data_format != "text"
        self._document_ids = document_ids
        self._seq_len, self._batch_size = seq_len, batch_size
        self.rows_per_batch = batch_size * accumulation * dp_world
        first = dp_rank * accumulation * batch_size
        self._streams = [_Stream(j) for j in range(first, first + accumulation * batch_size)]
        self._next_group, self._groups = 0, accumulation
        self._order = (
            None if isinstance(source, StreamedDocuments) else GlobalOrder(len(source), seed)
        )
        self._streamed_key = f"streamed_{dp_rank}_of_{dp_world}"
        self.bad_rows = bad_rows or BadRowCounter(0.001)
        self._last_row: tuple[str, Callable[[], int]] = ("", lambda: 0)  # set by _read

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> Batch:
        g, L = self._next_group, self._batch_size
        self._next_group = (g + 1) % self._groups
        streams = self._streams[g * L : (g + 1) * L]
        # numpy converts the lists ~10x faster than torch.tensor, and this thread holds the
        # GIL meanwhile: the training thread waits behind it to launch kernels
        window = torch.from_numpy(np.array([self._window(s) for s in streams], dtype=np.int64))
        inputs, labels = window[:, :-1], window[:, 1:]
        if self._masked:  # tokens that are no label (prompts, user turns) do not count
            ignored = np.array([s.window_ignored for s in streams], dtype=bool)
            labels = labels.masked_fill(torch.from_numpy(ignored[:, 1:]), IGNORE)
        if not self._document_ids:
            return Batch(inputs, labels)
        starts = np.zeros(inputs.shape, dtype=np.int32)
        for row, stream in enumerate(streams):
            starts[row, stream.window_starts] = 1
        return Batch(inputs, labels, torch.from_numpy(starts.cumsum(axis=1, dtype=np.int32)))

    def _window(self, stream: _Stream) -> list[int]:
        """The stream's next seq_len + 1 tokens; the last stays as the next window's first."""
        S = self._seq_len
        while len(stream.tokens) < S + 1:
            ids, labels = self._next_document(stream)
            stream.starts.append(len(stream.tokens))
            stream.tokens += ids
            if self._masked:
                stream.ignored += [not x for x in labels] if labels else [False] * len(ids)
        window = stream.tokens[: S + 1]
        del stream.tokens[:S]
        stream.window_starts = [i for i in stream.starts if i < S]
        stream.starts = [i - S for i in stream.starts if i >= S]
        if self._masked:
            stream.window_ignored = stream.ignored[: S + 1]
            del stream.ignored[:S]
        return window

    def _next_document(self, stream: _Stream) -> Encoded:
        """The stream's next document as (ids, labels), skipping blank lines and skipping and
        counting bad rows."""
        while True:
            try:
                document = self._encode(self._read(stream))
            except BlankRow:
                continue
            except BadRow as e:
                stream.rows += 1
                stream.bad += 1
                rows, bad = sum(s.rows for s in self._streams), sum(s.bad for s in self._streams)
                self.bad_rows.skip(*self._last_row, str(e), rows, bad)
                continue
            stream.rows += 1
            return document

    def _read(self, stream: _Stream) -> Any:
        """The next row: its text, or its record for prompt/chat data (raising BadRow);
        ``_last_row`` is its file and a function that finds its line number."""
        if isinstance(self._source, StreamedDocuments):
            source, row = self._source, self._source.row + 1
            self._last_row = (source.name, lambda: row)
            return source.next_record() if self._masked else source.next_text()
        index = self._order[stream.index + stream.position * self.rows_per_batch]
        stream.position += 1
        table = self._source
        self._last_row = (table.file_of(index), lambda: table.line_of(index))
        return table.record(index) if self._masked else table.text(index)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python only (ints, lists, dicts), so it goes into a checkpoint as JSON."""
        state: dict[str, Any] = {"order": self._order_state()}
        state |= {f"stream_{s.index}": s.state_dict() for s in self._streams}
        if self._order is None:
            state[self._streamed_key] = copy.deepcopy(self._source.state_dict())
        state["order"]["next_group"] = self._next_group
        return state

    def _order_state(self) -> dict[str, Any]:
        if self._order is None:
            return {"rows_per_batch": self.rows_per_batch, "documents": "streamed"}
        return {
            "rows_per_batch": self.rows_per_batch,
            "documents": self._order.num_documents,
            "seed": self._order.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: state["order"].get(k) for k in self._order_state()}
        if saved != self._order_state():
            raise ConfigError(
                f"the checkpointed data position was saved with {saved} but this run has "
                f"{self._order_state()}; resume with the same training.seed, global batch size "
                f"(training.global_batch_size) and data.dataset, or {_RESUME_AFRESH}"
            )
        for s in self._streams:
            s.load_state_dict(state[f"stream_{s.index}"])
        if self._order is None:
            self._source.load_state_dict(state[self._streamed_key])
        self._next_group = state["order"]["next_group"]


def row_counts(state: dict[str, Any]) -> tuple[int, int]:
    """(rows read, rows skipped as bad) by the streams of a loader state."""
    streams = [v for k, v in state.items() if k.startswith("stream_")]
    return sum(s["rows"] for s in streams), sum(s["bad"] for s in streams)


def open_training_and_validation(
    cfg: Data, validation: Validation, dp_rank: int, dp_world: int, seed: int
) -> tuple[DocumentTable | StreamedDocuments, DocumentTable | StreamedDocuments | None]:
    """The training documents and, with validation on, the validation documents: another
    dataset, or a share held out from the training table (never read for training)."""
    train = open_source(cfg, dp_rank, dp_world)
    if not validation.enable:
        return train, None
    if validation.dataset:
        return train, open_source(replace(cfg, dataset=validation.dataset), dp_rank, dp_world)
    if isinstance(train, StreamedDocuments):
        raise ConfigError(
            f"validation.dataset = '' holds out a share of data.dataset = {cfg.dataset!r}, "
            "which is streamed (no random access); give validation.dataset"
        )
    return split_held_out(train, validation.holdout_fraction, seed)


def build_loader(
    source: DocumentTable | StreamedDocuments,
    cfg: Data,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int,
    accumulation: int = 1,
    document_ids: bool = False,
) -> Prefetcher:
    """Batches of one data-parallel rank from ``source``, produced ``data.prefetch_batches``
    ahead in a background thread; with ``document_ids`` (block-causal attention) they carry
    each position's document."""
    loader = PackedLoader(
        source,
        tokenizer,
        seq_len,
        batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        accumulation=accumulation,
        seed=seed,
        bad_rows=BadRowCounter(cfg.max_bad_fraction),
        data_format=cfg.format,
        document_ids=document_ids,
    )
    return Prefetcher(loader, cfg.prefetch_batches)
