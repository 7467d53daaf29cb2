"""Where documents come from, and which of them each data-parallel rank reads.

A source is an endless, resumable iterator of document texts for one rank. Sources that allow
random access (stdlib_docs, local files, downloaded hub datasets) are reshuffled every epoch and
dealt out round-robin, so ranks see disjoint documents; streamed hub datasets are split with
``datasets.distributed.split_dataset_by_node`` and resume through their own state_dict.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Data
from torchmoe.data.stdlib_docs import load_stdlib_docs, resolve_cache_dir

# Short names for well-known corpora: (hub name, default config).
HUB_ALIASES = {"c4": ("allenai/c4", "en"), "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT")}
# Local file suffix -> the datasets builder that reads it. A .txt file gives one document per line.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SUFFIXES = ", ".join(BUILDERS)


class DocumentStream(Protocol):
    """Endless document texts for one rank; the state marks the next document exactly."""

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShuffledDocuments:
    """Random-access documents in a fresh order each epoch, drawn from (seed, epoch) alone so every
    rank computes the same permutation; rank r reads positions r, r + dp_world, ..."""

    def __init__(
        self, docs: Sequence[str], name: str, dp_rank: int, dp_world: int, seed: int
    ) -> None:
        if len(docs) < dp_world:
            raise ConfigError(
                f"data.dataset = {name!r}: {len(docs)} documents cannot feed {dp_world} "
                "data-parallel ranks; use a larger dataset"
            )
        self._docs, self._rank, self._world, self._seed = docs, dp_rank, dp_world, seed
        self._epoch, self._index = 0, 0
        self._order = self._epoch_order()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._index == len(self._order):
            self._epoch, self._index = self._epoch + 1, 0
            self._order = self._epoch_order()
        doc = self._docs[int(self._order[self._index])]
        self._index += 1
        return doc

    def _epoch_order(self) -> np.ndarray:
        """This rank's document indices for the epoch; a numpy array, 8 bytes per document."""
        permutation = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._docs))
        return permutation[self._rank :: self._world]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self._seed,
            "dp_world": self._world,
            "num_documents": len(self._docs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = {"seed": self._seed, "dp_world": self._world, "num_documents": len(self._docs)}
        saved = {key: state[key] for key in now}
        if saved != now:
            raise ConfigError(
                f"the checkpointed data position was saved with {saved} but this run has {now}; "
                "resume with the same training.seed, data-parallel size and data.dataset, or "
                "set checkpoint.exclude_from_loading = ['dataloader'] to read the data afresh"
            )
        self._epoch, self._index = state["epoch"], state["index"]
        self._order = self._epoch_order()


class StreamedDocuments:
    """A streamed HF dataset, restarted when it runs out (``set_epoch`` reshuffles the next
    epoch only if the dataset was ``.shuffle()``d); resumption uses its own state_dict."""

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        name: str,
        text_field: str,
        dp_rank: int,
        dp_world: int,
    ) -> None:
        if dataset.column_names is not None:
            _check_column(dataset.column_names, text_field, name)
        self._ds = split_dataset_by_node(dataset, rank=dp_rank, world_size=dp_world)
        self._name, self._field = name, text_field
        self._rows: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        for _ in range(2):  # the rest of this epoch, else a fresh one
            if self._rows is None:
                self._rows = iter(self._ds)
            row = next(self._rows, None)
            if row is not None:
                if self._field not in row:
                    _check_column(list(row), self._field, self._name)
                return row[self._field]
            self._ds.set_epoch(self._ds.epoch + 1)
            self._rows = None
        raise ConfigError(
            f"data.dataset = {self._name!r}: this rank's share of the dataset is "
            "empty; use a larger dataset or fewer data-parallel ranks"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._ds.epoch, "dataset": self._ds.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ds.load_state_dict(state["dataset"])
        self._ds.set_epoch(state["epoch"])  # the dataset applies a saved state only in its epoch
        self._rows = None


class _TextColumn(Sequence[str]):
    """One column of an Arrow-backed dataset, read row by row so it need not fit in memory."""

    def __init__(self, dataset: datasets.Dataset, field: str) -> None:
        self._ds, self._field = dataset.select_columns([field]), field

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._ds[index][self._field]


def open_documents(cfg: Data, dp_rank: int, dp_world: int, seed: int) -> DocumentStream:
    """The document source ``data.dataset`` names, as seen by one data-parallel rank."""
    if cfg.dataset == "stdlib_docs":
        return ShuffledDocuments(
            load_stdlib_docs(cfg.cache_dir), cfg.dataset, dp_rank, dp_world, seed
        )
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        dataset = _load_local(path, cfg)
    elif cfg.dataset.startswith(("/", ".", "~")) or path.suffix in BUILDERS:
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: no such file or folder; give an "
            f"existing {_SUFFIXES} file or folder, or the default 'stdlib_docs'"
        )
    else:
        dataset = _load_hub(cfg)
    if isinstance(dataset, datasets.IterableDataset):
        return StreamedDocuments(dataset, cfg.dataset, cfg.text_field, dp_rank, dp_world)
    _check_column(dataset.column_names, cfg.text_field, cfg.dataset)
    return ShuffledDocuments(
        _TextColumn(dataset, cfg.text_field), cfg.dataset, dp_rank, dp_world, seed
    )


def _load_local(path: Path, cfg: Data) -> datasets.Dataset:
    """A local file, or every data file under a folder, read fully (memory-mapped Arrow)."""
    if path.is_file() and path.suffix not in BUILDERS:
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: unknown file type {path.suffix!r}; "
            f"give a {_SUFFIXES} file or a folder of them"
        )
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    )
    builders = {BUILDERS[p.suffix] for p in files}
    if len(builders) != 1:
        found = "no" if not builders else "mixed (" + ", ".join(sorted(builders)) + ")"
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r}: the folder has {found} data files; "
            f"give a folder of {_SUFFIXES} files of one kind"
        )
    try:
        return datasets.load_dataset(
            builders.pop(),
            data_files={cfg.split: list(map(str, files))},
            split=cfg.split,
            cache_dir=_hf_cache_dir(cfg),
        )
    except datasets.exceptions.DatasetGenerationError as e:
        reason = _short(e.__cause__ or e)
        raise ConfigError(
            f"data.dataset = {cfg.dataset!r} could not be read ({reason}); check the file's format"
        ) from e


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
            f"data.dataset = {cfg.dataset!r} could not be loaded ({_short(e)}); this machine may "
            "be offline: use the default 'stdlib_docs' or a local file"
        ) from e


def _hf_cache_dir(cfg: Data) -> str | None:
    """HF's own cache (shared with other projects) unless data.cache_dir is set."""
    return str(resolve_cache_dir(cfg.cache_dir) / "huggingface") if cfg.cache_dir else None


def _check_column(columns: list[str], field: str, name: str) -> None:
    if field not in columns:
        raise ConfigError(
            f"data.text_field = {field!r}: {name!r} has no such column; choose one of {columns}"
        )


def _short(error: BaseException) -> str:
    """The first line of an error message, trimmed to fit in a one-line ConfigError."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
