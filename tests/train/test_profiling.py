"""[profiling]: chrome traces of a window of steps every freq steps; a CUDA memory snapshot at a
step; running out of device memory is one line (exit 1) naming the step and the fix."""

import json

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.train import trainer as trainer_module
from torchmoe.train.__main__ import main
from torchmoe.train.trainer import Trainer


def test_traces_of_a_window_every_freq_steps(tiny_config, tmp_path):
    keys = {
        "profiling.enable_profiling": "true",
        "profiling.freq": "3",
        "profiling.warmup_steps": "1",
        "profiling.active_steps": "1",
        "training.steps": "6",
    }
    Trainer(tiny_config(**keys), device=torch.device("cpu")).train()
    traces = sorted(p.name for p in (tmp_path / "run" / "profile").iterdir())
    assert traces == ["trace-step-3-rank0.json", "trace-step-6-rank0.json"]
    events = json.loads((tmp_path / "run" / "profile" / traces[0]).read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)  # the step's ops were recorded


def test_a_window_longer_than_freq_is_one_line(tiny_config):
    with pytest.raises(ConfigError, match=r"profiling.warmup_steps 2 \+ active_steps 2 exceed"):
        tiny_config(
            **{
                "profiling.enable_profiling": "true",
                "profiling.freq": "3",
                "profiling.warmup_steps": "2",
                "profiling.active_steps": "2",
            }
        )


def test_out_of_memory_is_one_line_and_exit_1(tmp_path, data_cache, monkeypatch, capsys):
    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", out_of_memory)
    status = main(["--job.dump_folder", str(tmp_path / "run"), "--data.cache_dir", data_cache])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert err[0].startswith("error: step 1 ran out of device memory (CUDA out of memory. Tried")
    assert "training.local_batch_size" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshots need CUDA")
def test_memory_snapshot_at_a_step_on_cuda(tiny_config, tmp_path):
    keys = {
        "profiling.enable_memory_snapshot": "true",
        "profiling.memory_snapshot_step": "2",
        "training.steps": "3",
    }
    Trainer(tiny_config(**keys), device=torch.device("cuda")).train()
    snapshot = tmp_path / "run" / "profile" / "memory-step-2-rank0.pickle"
    assert snapshot.is_file() and snapshot.stat().st_size > 1000
