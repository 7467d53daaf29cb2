"""The streaming safetensors writer: what safetensors reads back equals what was written
(views of one stack, strided tensors, every dtype an export writes), and out-of-order or
missing tensors are refused."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from torchmoe.convert.hf.safetensors_writer import SafetensorsWriter


def test_safetensors_reads_back_what_was_written(tmp_path: Path) -> None:
    stack = torch.randn(3, 5, 7)
    tensors = {
        **{f"experts.{e}.w": stack[e] for e in range(3)},  # views of one storage
        "transposed": torch.randn(6, 4).t(),  # strided
        "bf16": torch.randn(9).to(torch.bfloat16),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "ints": torch.arange(5),
        "odd": torch.ones(3, dtype=torch.bool),
    }
    with SafetensorsWriter(tmp_path / "a.safetensors", tensors, {"format": "pt"}) as out:
        for name, t in tensors.items():
            out.write(name, t)
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(
                got.view(torch.uint8), t.contiguous().view(torch.uint8)
            )


def test_out_of_order_or_missing_tensors_are_refused(tmp_path: Path) -> None:
    layout = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"wrote b .*expected \('a'"):
        with SafetensorsWriter(tmp_path / "x.safetensors", layout, {}) as out:
            out.write("b", layout["b"])
    with pytest.raises(ValueError, match=r"1 tensors not written, b first"):
        with SafetensorsWriter(tmp_path / "y.safetensors", layout, {}) as out:
            out.write("a", layout["a"])
