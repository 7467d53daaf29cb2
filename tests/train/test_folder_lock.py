"""One run per output folder: a live run's lock refuses a second run in one line (nothing of
the first touched); a dead run's lock is taken over; a finished run leaves none. Through
run_train.sh: tests/train/test_cli.py."""

import functools
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.train import trainer as trainer_module
from torchmoe.train.folder_lock import LOCK_NAME

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": 2, "training.steps": 2}


def plant_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-12-06 10:00:00"}
    lock.write_text(json.dumps(holder))
    return lock


@pytest.mark.parametrize("remote", [False, True])
def test_a_running_runs_lock_refuses_a_second_run_in_one_line(tiny_config, remote):
    cfg = tiny_config(**CKPT)
    folder = Path(cfg.job.dump_folder)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        # on another host the pid says nothing: any lock from there is held
        lock = plant_lock(folder, 1 if remote else other.pid, "elsewhere" if remote else None)
        before = lock.read_text()
        with pytest.raises(ConfigError, match=r"is in use by another run \(host") as err:
            Trainer(cfg).train()
        other.kill()
    assert "\n" not in str(err.value) and str(lock) in str(err.value)
    assert lock.read_text() == before  # the other run's lock stays
    assert not (folder / "checkpoint").exists() and not (folder / "metrics.jsonl").exists()


def test_a_dead_runs_lock_is_taken_over_and_a_finished_run_leaves_none(tiny_config):
    cfg = tiny_config(**CKPT)
    folder = Path(cfg.job.dump_folder)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    plant_lock(folder, int(gone.stdout))  # as a SIGKILLed run leaves it
    Trainer(cfg).train()
    assert (folder / "checkpoint" / "step-2").is_dir()
    assert not (folder / LOCK_NAME).exists()


def test_a_shared_checkpoint_folder_outside_the_output_folder_is_locked_too(tiny_config, tmp_path):
    """Two fine-tunes of one imported model (convert_hf writes an absolute checkpoint.folder)
    would otherwise resume and overwrite each other's steps."""
    shared = tmp_path / "shared"
    first = tiny_config(**{**CKPT, "checkpoint.folder": str(shared)})
    second = tiny_config(
        **{**CKPT, "checkpoint.folder": str(shared), "job.dump_folder": str(tmp_path / "b")}
    )
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        plant_lock(shared, other.pid)  # the first run, training
        with pytest.raises(ConfigError, match=r"^checkpoint.folder = .*shared is in use by"):
            Trainer(second).train()
        other.kill()
    (shared / LOCK_NAME).unlink()
    Trainer(first).train()
    assert not (shared / LOCK_NAME).exists()  # released with the run


def test_an_unwritable_output_folder_is_one_line(tiny_config, tmp_path):
    (tmp_path / "file").write_text("in the way")
    cfg = tiny_config(**{**CKPT, "job.dump_folder": str(tmp_path / "file" / "run")})
    with pytest.raises(ConfigError, match=r"^job.dump_folder = .*: cannot create .torchmoe.lock"):
        Trainer(cfg).train()
