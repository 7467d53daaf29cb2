"""Where documents come from: a random-access table of rows, or a streamed hub dataset.

Tables (stdlib_docs, local files, downloaded hub datasets) are read in the job's global order
(global_order.py), which makes the data independent of the layout. Streamed hub datasets have no
random access: each data-parallel rank reads its ``split_dataset_by_node`` share and resumes
through the dataset's own state_dict, so they resume only at the same data-parallel size.
A row without a usable document raises BadRow, which the loader counts and skips.
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import pyarrow.parquet as pq
from datasets.distributed import split_dataset_by_node

from torchmoe.config.errors import ConfigError, first_line
from torchmoe.config.schema import Data
from torchmoe.data.bad_rows import BadRow
from torchmoe.data.line_files import LineFiles, field_text
from torchmoe.data.stdlib_docs import load_stdlib_docs, resolve_cache_dir

# Short names for well-known corpora: (hub name, default config).
HUB_ALIASES = {"c4": ("allenai/c4", "en"), "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT")}
# Local file suffixes and their kind. A .txt file gives one document per line; .json is JSON
# lines or one JSON list of objects.
KINDS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SUFFIXES = ", ".join(KINDS)


class DocumentTable(Protocol):
    """Rows by index; ``text`` raises BadRow for a row without a usable document.
    ``file_of`` and ``line_of`` name a row for the log (file or dataset, 1-based line or row
    number); ``line_of`` may read the file, so it is called only for a row that is named."""

    def __len__(self) -> int: ...

    def text(self, index: int) -> str: ...

    def record(self, index: int) -> dict: ...

    def file_of(self, index: int) -> str: ...

    def line_of(self, index: int) -> int: ...


class ListTable:
    """Documents held in memory (stdlib_docs), or the records of JSON list files."""

    def __init__(self, rows: Sequence[Any], name: str, field: str | None = None) -> None:
        self._rows, self._name, self._field = rows, name, field

    def __len__(self) -> int:
        return len(self._rows)

    def text(self, index: int) -> str:
        row = self._rows[index]
        return row if self._field is None else field_text(row, self._field)

    def record(self, index: int) -> dict:
        row = self._rows[index]
        if not isinstance(row, dict):
            raise BadRow(f"not a JSON object but {type(row).__name__}")
        return row

    def file_of(self, index: int) -> str:
        return self._name

    def line_of(self, index: int) -> int:
        return index + 1


class ArrowTable:
    """One text column of an Arrow-backed (memory-mapped) HF dataset: parquet files, or a
    downloaded hub dataset. ``files`` with their row counts name the file of a row."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        columns: list[str],
        name: str,
        files: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._ds, self._field, self._name = dataset.select_columns(columns), columns[0], name
        self._files = [f for f, _ in files]
        self._first = np.cumsum([0] + [n for _, n in files])

    def __len__(self) -> int:
        return len(self._ds)

    def text(self, index: int) -> str:
        return field_text(self._ds[index], self._field)

    def record(self, index: int) -> dict:
        return self._ds[index]

    def _file(self, index: int) -> int:
        return int(np.searchsorted(self._first, index, side="right")) - 1

    def file_of(self, index: int) -> str:
        return self._files[self._file(index)] if self._files else self._name

    def line_of(self, index: int) -> int:
        return index - int(self._first[self._file(index)]) + 1 if self._files else index + 1


class ConcatTable:
    """Several tables read as one."""

    def __init__(self, tables: list[DocumentTable]) -> None:
        self._tables = tables
        self._first = np.cumsum([0] + [len(t) for t in tables])

    def __len__(self) -> int:
        return int(self._first[-1])

    def _locate(self, index: int) -> tuple[DocumentTable, int]:
        table = int(np.searchsorted(self._first, index, side="right")) - 1
        return self._tables[table], index - int(self._first[table])

    def text(self, index: int) -> str:
        table, row = self._locate(index)
        return table.text(row)

    def record(self, index: int) -> dict:
        table, row = self._locate(index)
        return table.record(row)

    def file_of(self, index: int) -> str:
        table, row = self._locate(index)
        return table.file_of(row)

    def line_of(self, index: int) -> int:
        table, row = self._locate(index)
        return table.line_of(row)


class StreamedDocuments:
    """A streamed HF dataset, this rank's share, restarted when it runs out (``set_epoch``
    reshuffles the next epoch only if the dataset was ``.shuffle()``d); resumption uses its own
    state_dict. ``next_text`` raises BadRow for a bad row (the stream has moved past it)."""

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        name: str,
        columns: list[str],
        dp_rank: int,
        dp_world: int,
    ) -> None:
        if dataset.column_names is not None:
            for column in columns:
                _check_column(dataset.column_names, column, name)
        self._ds = split_dataset_by_node(dataset, rank=dp_rank, world_size=dp_world)
        self.name, self._field, self._columns = name, columns[0], columns
        self._rows: Iterator[dict[str, Any]] | None = None
        self.row = 0  # rows this rank read in this process, to name a bad one

    def next_text(self) -> str:
        return field_text(self.next_record(), self._field)

    def next_record(self) -> dict:
        for _ in range(2):  # the rest of this epoch, else a fresh one
            if self._rows is None:
                self._rows = iter(self._ds)
            row = next(self._rows, None)
            if row is not None:
                self.row += 1
                if self.row == 1:
                    for column in self._columns:
                        _check_column(list(row), column, self.name)
                return row
            self._ds.set_epoch(self._ds.epoch + 1)
            self._rows = None
        raise ConfigError(
            f"data.dataset = {self.name!r}: this rank's share of the dataset is "
            "empty; use a larger dataset or fewer data-parallel ranks"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._ds.epoch, "dataset": self._ds.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ds.load_state_dict(state["dataset"])
        self._ds.set_epoch(state["epoch"])  # the dataset applies a saved state only in its epoch
        self._rows = None


def open_source(cfg: Data, dp_rank: int, dp_world: int) -> DocumentTable | StreamedDocuments:
    """The documents ``data.dataset`` names: a table, or this rank's share of a stream."""
    if cfg.dataset == "stdlib_docs":
        return _non_empty(ListTable(load_stdlib_docs(cfg.cache_dir), cfg.dataset), cfg)
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        return _non_empty(_open_local(path, cfg), cfg)
    if cfg.dataset.startswith(("/", ".", "~")) or path.suffix in KINDS:
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: no such file or folder; give an "
            f"existing {_SUFFIXES} file or folder, or the default 'stdlib_docs'"
        )
    dataset = _load_hub(cfg)
    if isinstance(dataset, datasets.IterableDataset):
        return StreamedDocuments(dataset, cfg.dataset, columns_of(cfg), dp_rank, dp_world)
    _check_columns(dataset, cfg)
    return _non_empty(ArrowTable(dataset, columns_of(cfg), cfg.dataset), cfg)


def columns_of(cfg: Data) -> list[str]:
    """The fields a row of ``data.format`` needs (formats.py)."""
    return {"text": [cfg.text_field], "chat": ["messages"]}.get(
        cfg.format, ["prompt", "completion"]
    )


def _non_empty(table: DocumentTable, cfg: Data) -> DocumentTable:
    if not len(table):
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r} holds no documents (every file is empty); "
            "point it at a file or folder with data"
        )
    return table


def _open_local(path: Path, cfg: Data) -> DocumentTable:
    """A local file, or every data file under a folder (one kind), in sorted order."""
    if path.is_file() and path.suffix not in KINDS:
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: unknown file type {path.suffix!r}; "
            f"give a {_SUFFIXES} file or a folder of them"
        )
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in KINDS)
    )
    kinds = {KINDS[p.suffix] for p in files}
    if len(kinds) != 1:
        found = "no" if not kinds else "mixed (" + ", ".join(sorted(kinds)) + ")"
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: the folder has {found} data files; "
            f"give a folder of {_SUFFIXES} files of one kind"
        )
    kind = kinds.pop()
    if kind == "parquet":
        return _open_parquet(files, cfg)
    if kind == "text":
        if cfg.format != "text":
            raise ConfigError(
                f"data.format = {cfg.format!r} reads records: give .jsonl, .json or .parquet "
                f"files, not the .txt files of data.dataset = {cfg.dataset!r}"
            )
        return LineFiles(files, jsonl=False, field=cfg.text_field)
    lists = [f for f in files if f.suffix == ".json" and _starts_with(f, b"[")]
    lines = LineFiles([f for f in files if f not in lists], jsonl=True, field=cfg.text_field)
    records = lines.first_records()
    for column in columns_of(cfg):
        if records and not any(column in r for r in records):  # the wrong field, not a row
            _check_column(list(records[0]), column, cfg.dataset)
    if not lists:
        return lines
    return ConcatTable([lines, *(_json_list(f, cfg) for f in lists)])


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def _json_list(path: Path, cfg: Data) -> ListTable:
    """A .json file holding one list of records, read whole: large data belongs in .jsonl."""
    try:
        rows = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: {path} is not valid JSON ({first_line(e)}); fix it, "
            "or write one record per line as .jsonl so a bad record costs one row"
        ) from None
    if not isinstance(rows, list):
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: {path} holds a JSON {type(rows).__name__}, not a "
            "list of records; write one record per line (.jsonl)"
        )
    return ListTable(rows, str(path), cfg.text_field)


def _open_parquet(files: list[Path], cfg: Data) -> ArrowTable:
    try:
        dataset = datasets.load_dataset(
            "parquet",
            data_files={cfg.split: list(map(str, files))},
            split=cfg.split,
            cache_dir=_hf_cache_dir(cfg),
        )
    except datasets.exceptions.DatasetGenerationError as e:
        reason = first_line(e.__cause__ or e)
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r} could not be read ({reason}); check the file's format"
        ) from e
    _check_columns(dataset, cfg)
    counts = [(str(f), pq.ParquetFile(f).metadata.num_rows) for f in files]
    return ArrowTable(dataset, columns_of(cfg), cfg.dataset, counts)


def _check_columns(dataset: datasets.Dataset, cfg: Data) -> None:
    """The format's columns exist, and a text column holds strings (an int column would make
    every row bad)."""
    for column in columns_of(cfg):
        _check_column(dataset.column_names, column, cfg.dataset)
    if cfg.format != "text":
        return
    dtype = getattr(dataset.features[cfg.text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ConfigError(
            f"data.text_field = {cfg.text_field!r}: the column of {cfg.dataset!r} holds "
            f"{dtype or dataset.features[cfg.text_field]}, not text; choose the text column"
        )


def _load_hub(cfg: Data) -> datasets.Dataset | datasets.IterableDataset:
    name, default_config = HUB_ALIASES.get(cfg.dataset, (cfg.dataset, ""))
    try:
        return datasets.load_dataset(
            name,
            cfg.dataset_config or default_config or None,
            split=cfg.split,
            streaming=cfg.streaming,
            cache_dir=_hf_cache_dir(cfg),
        )
    except OSError as e:  # no network, or no such dataset: ConnectionError, FileNotFoundError
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r} could not be loaded ({first_line(e)}); this machine "
            "may be offline: use the default 'stdlib_docs' or a local file"
        ) from e


def _hf_cache_dir(cfg: Data) -> str | None:
    """HF's own cache (shared with other projects) unless data.cache_dir is set."""
    return str(resolve_cache_dir(cfg.cache_dir) / "huggingface") if cfg.cache_dir else None


def _check_column(columns: list[str], field: str, name: str) -> None:
    if field not in columns:
        raise ConfigError(
            f"data.text_field = {field!r}: {name!r} has no such column; choose one of {columns}"
        )
