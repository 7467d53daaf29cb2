"""Reading DCP checkpoints without running anything they hold.

DCP unpickles a checkpoint's ``.metadata`` and loads its non-tensor items with
``torch.load(weights_only=False)``: a crafted checkpoint folder could run code as the trainer.
Here the metadata goes through an unpickler that resolves only the classes DCP's own metadata
is made of, and non-tensor items through ``torch.load(weights_only=True)`` (plain numbers,
strings, bytes, lists and dicts). Checkpoints carry no code; ``parallelism.plan`` imports code
by design, from the command line or recipe, never from a checkpoint.
"""

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from torchmoe.config.errors import ConfigError

# (module, name) pairs a DCP .metadata may name; a module mapped to None allows every name in it.
_ALLOWED: dict[str, set[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if allowed is None or name in allowed or _is_torch_constant(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _is_torch_constant(module: str, name: str) -> bool:
    """torch.float32, torch.contiguous_format, torch.strided: values, not code."""
    value = getattr(torch, name, None) if module == "torch" else None
    return isinstance(value, torch.dtype | torch.memory_format | torch.layout)


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata unpickling resolves only DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ConfigError(
                f"checkpoint {self.path}: .metadata names {e}, which no checkpoint holds; "
                "refusing to load it (checkpoints carry no code)"
            ) from None
        if not isinstance(metadata, Metadata):
            raise ConfigError(f"checkpoint {self.path}: .metadata is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items load with ``weights_only=True``: data, never objects. They are stored
    as DefaultLoadPlanner.load_bytes stores them (which would load with ``weights_only=False``)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(
                f"checkpoint item {fqn} is not plain data ({e}); refusing to load it "
                "(checkpoints carry no code)"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def read_metadata(path: Path) -> Metadata:
    return SafeReader(str(path)).read_metadata()


def load(states: dict, path: Path) -> None:
    """``dcp.load`` of ``states`` from the checkpoint folder ``path``, safely."""
    dcp.load(states, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
