"""Local .txt / .jsonl files read row by row through a byte-offset index of their lines.

Hand-written rather than ``datasets.load_dataset``: that builds the whole file into Arrow first and
fails the whole build on one undecodable or mistyped row, with no row number. Here each row is
decoded only when the loader reaches it, a bad one is skipped with its file and line number
(bad_rows.py), and the index costs 12 bytes per line (start, length), built by one vectorised
pass over the file. A line number is counted only when a bad row is named.
"""

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from torchmoe.data.bad_rows import BadRow, BlankRow

_CHUNK = 1 << 24  # bytes scanned at a time while indexing
_OPEN_FILES = 64  # file descriptors kept open between reads


def index_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, length without the line end) of every non-empty line; a final line
    without a newline counts, and CRLF line ends are handled."""
    starts, ends, crs = [np.zeros(1, np.int64)], [], []
    offset, last_byte = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            data = np.frombuffer(chunk, np.uint8)
            newlines = np.flatnonzero(data == 10)
            before = np.where(newlines > 0, data[np.maximum(newlines - 1, 0)], last_byte)
            crs.append(before == 13)
            ends.append(newlines + offset)
            starts.append(newlines + offset + 1)
            offset, last_byte = offset + len(chunk), int(data[-1])
    ends.append(np.array([offset], np.int64))
    crs.append(np.array([last_byte == 13]))
    start, end, cr = np.concatenate(starts), np.concatenate(ends), np.concatenate(crs)
    length = end - start - (cr & (end > start))
    keep = length > 0
    return start[keep], length[keep].astype(np.int32)


def line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte ``offset``."""
    newlines = 0
    with open(path, "rb") as f:
        while offset > 0 and (chunk := f.read(min(_CHUNK, offset))):
            newlines += chunk.count(b"\n")
            offset -= len(chunk)
    return newlines + 1


class LineFiles:
    """Every non-blank line of some .txt files (one document per line) or .jsonl files (one
    JSON object per line, the document under ``field``), as one random-access table."""

    def __init__(self, files: list[Path], jsonl: bool, field: str) -> None:
        self.files, self._jsonl, self._field = files, jsonl, field
        indexes = [index_lines(f) for f in files]
        self._starts = [s for s, _ in indexes]
        self._lengths = [n for _, n in indexes]
        self._first = np.cumsum([0] + [len(s) for s in self._starts])
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return int(self._first[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        file = int(np.searchsorted(self._first, index, side="right")) - 1
        return file, index - int(self._first[file])

    def file_of(self, index: int) -> str:
        return str(self.files[self._locate(index)[0]])

    def line_of(self, index: int) -> int:
        """The 1-based line number of row ``index`` in its file (reads the file up to it)."""
        file, row = self._locate(index)
        return line_number(self.files[file], int(self._starts[file][row]))

    def text(self, index: int) -> str:
        """The document of row ``index``; raises BadRow saying why there is none."""
        if self._jsonl:
            return field_text(self.record(index), self._field)
        line = self._decoded(index)
        if not line.strip():
            raise BlankRow("a blank line")
        return line

    def record(self, index: int) -> dict:
        """The JSON object of row ``index`` (JSON lines files); raises BadRow otherwise."""
        line = self._decoded(index)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRow(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise BadRow(f"not a JSON object but {type(record).__name__}")
        return record

    def _decoded(self, index: int) -> str:
        try:
            return self._raw(index).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow(f"not valid UTF-8 (byte {e.start})") from None

    def first_records(self, n: int = 100) -> list[dict]:
        """The JSON objects among the first ``n`` rows, to check the text field up front."""
        records = []
        for index in range(min(len(self), n)):
            try:
                record = json.loads(self._raw(index))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def _raw(self, index: int) -> bytes:
        file, row = self._locate(index)
        return os.pread(self._fd(file), int(self._lengths[file][row]), int(self._starts[file][row]))

    def _fd(self, file: int) -> int:
        """An open descriptor of file ``file``; the least recently used one closes past 64."""
        fd = self._fds.pop(file, None)
        if fd is None:
            fd = os.open(self.files[file], os.O_RDONLY)
            if len(self._fds) >= _OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[file] = fd
        return fd

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def field_text(record: object, field: str) -> str:
    """The document under ``field`` of one record; raises BadRow if it is not non-blank text."""
    if not isinstance(record, dict):
        raise BadRow(f"not a JSON object but {type(record).__name__}")
    if field not in record or record[field] is None:
        raise BadRow(f"no {field!r} value")
    text = record[field]
    if not isinstance(text, str):
        raise BadRow(f"{field!r} is {type(text).__name__}, not text")
    if not text.strip():
        raise BadRow("empty document")
    return text
