"""Rows of a checkpoint's model tensors read straight from DCP's files equal the tensors DCP
saved, whether each tensor has a file of its own (an import's seed) or shares one with others
at an offset (a training checkpoint); tensors DCP stored in several chunks are left to DCP."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchmoe.convert.hf.checkpoint_rows import CheckpointRows


@pytest.mark.parametrize("one_file_per_tensor", [True, False])
def test_rows_equal_what_dcp_saved(tmp_path: Path, one_file_per_tensor: bool) -> None:
    model = {
        "experts.w1": torch.randn(6, 5, 7),
        "norm": torch.randn(9),
        "embed": torch.randn(11, 4).to(torch.bfloat16),
    }
    writer = dcp.FileSystemWriter(
        str(tmp_path), single_file_per_rank=not one_file_per_tensor, thread_count=1
    )
    dcp.save({"train": {"model": model}}, storage_writer=writer, no_dist=True)
    rows = CheckpointRows(tmp_path)
    for name, t in model.items():
        assert rows.readable(name)
        assert torch.equal(rows.rows(name, 0, t.shape[0]), t)
    got = rows.rows("experts.w1", 2, 4)
    assert got.shape == (2, 5, 7) and torch.equal(got, model["experts.w1"][2:4])
    assert got.untyped_storage().nbytes() == got.nbytes  # the rows only, not the stack
    assert not rows.readable("absent")
