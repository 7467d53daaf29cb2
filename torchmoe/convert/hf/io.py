"""Files: Hugging Face folders (config.json + safetensors, one file or shards with an index)
and the model part of torchmoe DCP checkpoints (saved as ``train.model.<name>``, see
torchmoe/train/checkpoint.py)."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from torchmoe.config.errors import ConfigError
from torchmoe.train.checkpoint import read_model_weights

INDEX = "model.safetensors.index.json"


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


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in safetensors_files(folder):
        try:
            shard = load_file(f)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None
        if tensors.keys() & shard.keys():
            raise ConfigError(
                f"{f}: repeats tensor {sorted(tensors.keys() & shard.keys())[0]} of another shard"
            )
        tensors.update(shard)
    return tensors


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Write ``tensors`` (in order) into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own) plus an index, or into model.safetensors when one shard will do."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    for names, file in zip(shards, files):  # copies one shard at a time (experts are views)
        save_file(
            {k: tensors[k].clone(memory_format=torch.contiguous_format) for k in names},
            folder / file,
            metadata={"format": "pt"},
        )
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: f for names, f in zip(shards, files) for k in names},
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_dcp_model(step_dir: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors of a torchmoe checkpoint (a seed or a training step; optimizer state is
    not read), in their saved dtype. ``expected`` (meta tensors of the model the config builds)
    must match the saved names and shapes."""
    stored = read_model_weights(step_dir, "--checkpoint")
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
