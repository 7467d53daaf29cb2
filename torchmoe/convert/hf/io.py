"""Files: Hugging Face folders (config.json + safetensors, one file or shards with an index)
and the model part of torchmoe DCP checkpoints (saved as ``train.model.<name>``, see
torchmoe/train/checkpoint.py)."""

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open

from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf.file_reads import read_into
from torchmoe.convert.hf.safetensors_writer import SAFETENSORS_DTYPES, SafetensorsWriter
from torchmoe.train.checkpoint import load_model_weights, model_weights_metadata

INDEX = "model.safetensors.index.json"
G = TypeVar("G")  # a group of tensors write_hf_shards plans, loads and converts


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such file; a Hugging Face model folder holds config.json and *.safetensors"
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def safetensors_files(folder: Path) -> list[Path]:
    """The shards the index names, or every *.safetensors when there is no index."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: 'weight_map' is missing; it maps tensor names to shards")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"{folder}: no *.safetensors files; convert .bin checkpoints with "
            "transformers' save_pretrained first"
        )
    for f in files:
        if not f.is_file():
            raise ConfigError(f"{index}: shard {f.name} is missing from {folder}")
    return files


class SafetensorsFolder:
    """A Hugging Face folder's tensors, listed from the shards' headers (checked by
    safetensors) and read one at a time with a plain file read into memory torch owns: an
    import holds one torchmoe tensor's sources, not the model, and can free each tensor as
    soon as it is written (safetensors' own tensors are views of its buffers)."""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, Path] = {}
        self.meta: dict[str, torch.Tensor] = {}  # name -> meta tensor (shape, dtype)
        self.offset: dict[str, int] = {}  # name -> where its bytes start in its shard
        for f in safetensors_files(folder):
            _check_readable(f)
            for name, (dtype_name, shape, offset) in _header(f).items():
                if name in self.where:
                    raise ConfigError(f"{f}: repeats tensor {name} of another shard")
                dtype = SAFETENSORS_DTYPES.get(dtype_name)
                if dtype is None:
                    raise ConfigError(f"{f}: tensor {name} has dtype {dtype_name}")
                self.where[name], self.offset[name] = f, offset
                self.meta[name] = torch.empty(shape, dtype=dtype, device="meta")

    def read_one(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard into a new tensor."""
        meta = self.meta[name]
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        with open(self.where[name], "rb", buffering=0) as f:
            f.seek(self.offset[name])
            read_into(f, tensor, self.where[name], name)
        return tensor

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, loaded."""
        return {name: self.read_one(name) for name in names}


def _header(f: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, where its bytes start) from a safetensors file's header (8-byte
    length, then JSON; data offsets count from the header's end)."""
    with open(f, "rb") as stream:
        [length] = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(length))
    return {
        name: (entry["dtype"], entry["shape"], 8 + length + entry["data_offsets"][0])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _check_readable(f: Path) -> None:
    """safetensors checks the header (offsets, sizes, dtypes) when it opens a file."""
    try:
        with safe_open(f, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (for tests and small models)."""
    files = SafetensorsFolder(folder)
    return files.read(list(files.where))


def write_hf_shards(
    folder: Path,
    groups: list[G],
    load: Callable[[G], G],
    convert: Callable[[G], dict[str, torch.Tensor]],
    max_shard_bytes: int,
) -> None:
    """Write safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets a shard
    of its own) plus an index, or one model.safetensors when one shard will do; one shard in
    memory at a time. ``groups`` are meta tensors that ``convert`` turns into the tensors
    written (on the meta tensors it plans the shards); each shard ``load``s the values of the
    groups it takes tensors from, one group at a time."""
    shards: list[list[tuple[int, str]]] = [[]]  # (group, written name)
    size, layout = 0, {}
    for i, group in enumerate(groups):
        for name, t in convert(group).items():
            layout[name] = t
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((i, name))
            size += nbytes
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard, file in zip(shards, files):
        names: dict[int, list[str]] = {}
        for i, name in shard:
            names.setdefault(i, []).append(name)
        shard_layout = {name: layout[name] for _, name in shard}
        with SafetensorsWriter(folder / file, shard_layout, {"format": "pt"}) as out:
            for i, wanted in names.items():  # one group read and written at a time
                written = convert(load(groups[i]))
                for name in wanted:
                    out.write(name, written[name])
                del written
        weight_map |= dict.fromkeys(shard_layout, file)
        total += sum(t.numel() * t.element_size() for t in shard_layout.values())
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_dcp_model(step_dir: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors of a torchmoe checkpoint (a seed or a training step; optimizer state is
    not read), in their saved dtype. ``expected`` (meta tensors of the model the config builds)
    must match the saved names and shapes."""
    stored = dcp_model_metadata(step_dir, expected)
    load_model_weights(step_dir, stored)
    return stored


def dcp_model_metadata(
    step_dir: Path, expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Meta tensors of the model a torchmoe checkpoint holds (verified against its manifest),
    checked against ``expected``; ``load_model_weights`` reads them."""
    stored = model_weights_metadata(step_dir, "--checkpoint")
    for name, t in expected.items():
        if name not in stored:
            raise ConfigError(
                f"--checkpoint {step_dir} has no tensor {name}; the recipe describes "
                "another model than the one saved (use the recipe and overrides "
                "it was trained with)"
            )
        if stored[name].shape != t.shape:
            raise ConfigError(
                f"--checkpoint {step_dir}: {name} has shape "
                f"{list(stored[name].shape)}, the recipe builds {list(t.shape)}; use "
                "the recipe and overrides it was trained with"
            )
    extra = sorted(stored.keys() - expected.keys())
    if extra:
        raise ConfigError(
            f"--checkpoint {step_dir} holds {extra[0]}, which the recipe's model "
            f"lacks ({len(extra)} such tensors); use the recipe it was trained with"
        )
    return stored
