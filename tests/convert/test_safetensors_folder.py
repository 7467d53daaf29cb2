"""Reading a Hugging Face folder tensor by tensor: what safetensors wrote comes back bit for
bit, in memory torch owns (an import frees each tensor once written), and a shard cut short
after its header was checked is one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf.io import INDEX, SafetensorsFolder


def _folder(tmp_path: Path) -> dict[str, torch.Tensor]:
    shards = {
        "model-00001-of-00002.safetensors": {
            "a": torch.randn(3, 5),
            "bf16": torch.randn(7, 2).to(torch.bfloat16),
        },
        "model-00002-of-00002.safetensors": {
            "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
            "ints": torch.randint(-9, 9, (6,)),
            "scalar": torch.tensor(2.5),
        },
    }
    for file, tensors in shards.items():
        save_file(tensors, tmp_path / file, metadata={"format": "pt"})
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return {name: t for tensors in shards.values() for name, t in tensors.items()}


def test_each_tensor_reads_back_bit_for_bit_into_owned_memory(tmp_path: Path) -> None:
    written = _folder(tmp_path)
    folder = SafetensorsFolder(tmp_path)
    assert set(folder.meta) == set(written)
    for name, t in written.items():
        got = folder.read_one(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        got.untyped_storage().resize_(0)  # torch's own memory: freed early by an import


def test_a_shard_cut_short_after_the_scan_is_one_line(tmp_path: Path) -> None:
    _folder(tmp_path)
    folder = SafetensorsFolder(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=r"model-00002-of-00002.safetensors: tensor \w+ is cut"):
        for name in folder.meta:
            folder.read_one(name)
