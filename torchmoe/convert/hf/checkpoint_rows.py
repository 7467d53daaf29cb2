"""Model tensors of a torchmoe checkpoint read straight from DCP's files, a few rows at a time:
an export holds one expert, not an expert stack, and no second copy of what it reads.

DCP's own reader loads a whole stored item (its bytes, then the tensor ``torch.load`` builds
from them). Each item is a ``torch.save`` archive at a known place in a file (the checkpoint's
metadata, read by the restricted unpickler of safe_dcp.py); loading the archive under
FakeTensorMode (``weights_only``, so nothing else is unpickled) reads only its small header
and gives the tensor's layout and where its bytes start, and the rows asked for are then one
plain file read. Tensors stored in several chunks (a multi-rank run's shards) or through a
storage transform are left to DCP (``rows`` says so by returning None).
"""

import io
import math
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf.file_reads import read_into
from torchmoe.train import safe_dcp
from torchmoe.train.split_experts import halves

_Where = tuple[Path, int, tuple[int, ...], torch.dtype]
_MODEL = "train.model."  # where CheckpointManager keeps the model, in every checkpoint


class _FileSlice(io.RawIOBase):
    """``length`` bytes of an open file from ``start``, as a file of their own."""

    def __init__(self, f: io.BufferedReader, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class CheckpointRows:
    """Rows of dim 0 of the model tensors one checkpoint folder holds."""

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = step_dir
        self.metadata = safe_dcp.read_metadata(step_dir)
        self._found: dict[str, _Where] = {}

    def readable(self, name: str) -> bool:
        """Stored as one chunk without a transform (or, in an older checkpoint, the experts'
        joined gate and up as two such tensors): ``rows`` can read it."""
        parts = self._halves(name)
        if parts is not None:
            return all(self.readable(part) for part in parts)
        meta = self.metadata.state_dict_metadata.get(_MODEL + name)
        if not isinstance(meta, TensorStorageMetadata) or len(meta.chunks) != 1 or not meta.size:
            return False
        info = self.metadata.storage_data[MetadataIndex(_MODEL + name, meta.chunks[0].offsets)]
        return not getattr(info, "transform_descriptors", None)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of model tensor ``name`` (dim 0), read from its file."""
        parts = self._halves(name)
        if parts is not None:
            return torch.stack([self.rows(part, start, stop) for part in parts], dim=1)
        path, data, shape, dtype = self._where(name)
        row = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        with open(path, "rb") as f:
            f.seek(data + start * row)
            read_into(f, out, path, name)
        return out

    def _halves(self, name: str) -> tuple[str, str] | None:
        """Where an older checkpoint keeps joined tensor ``name`` (split_experts.py)."""
        if _MODEL + name in self.metadata.state_dict_metadata:
            return None
        return halves(name)

    def _where(self, name: str) -> _Where:
        """(file, where the tensor's bytes start, shape, dtype), from its archive's header,
        read once per tensor."""
        if name not in self._found:
            self._found[name] = self._find(name)
        return self._found[name]

    def _find(self, name: str) -> _Where:
        meta = self.metadata.state_dict_metadata[_MODEL + name]
        info = self.metadata.storage_data[MetadataIndex(_MODEL + name, meta.chunks[0].offsets)]
        path = self.step_dir / info.relative_path
        with open(path, "rb") as f, FakeTensorMode():  # the layout only: no storage is read
            layout = torch.load(
                io.BufferedReader(_FileSlice(f, info.offset, info.length)), weights_only=True
            )
        if tuple(layout.shape) != tuple(meta.size) or not layout.is_contiguous():
            raise ConfigError(f"{path}: {name} is not stored as its metadata says")
        data = info.offset + layout.untyped_storage()._checkpoint_offset
        data += layout.storage_offset() * layout.element_size()
        return path, data, tuple(layout.shape), layout.dtype
