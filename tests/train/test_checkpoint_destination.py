"""A bad checkpoint destination is found before the first step, in one line; a save that fails
(a full disk) removes its partial folder, keeps the last good checkpoint and says why."""

import errno
import functools
from collections import namedtuple
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.train import checkpoint as checkpoint_module
from torchmoe.train import checkpoint_writer
from torchmoe.train import trainer as trainer_module

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": 2, "training.steps": 2}


def one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_folder_that_is_a_file_is_refused_before_the_first_step(tiny_config):
    cfg = tiny_config(**CKPT)
    target = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    target.parent.mkdir(parents=True)
    target.write_text("not a folder")
    trainer = Trainer(cfg)
    with pytest.raises(ConfigError, match=r"checkpoint.folder: .* is a file, not a folder") as err:
        trainer.train()
    one_line(err)
    assert trainer.state.step == 0


def test_too_little_free_space_is_refused_before_the_first_step(tiny_config, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: usage(1, 0, 2**20))
    trainer = Trainer(tiny_config(**CKPT))
    with pytest.raises(ConfigError, match=r"has 0.00 GiB free but two checkpoints need") as err:
        trainer.train()
    one_line(err)
    assert trainer.state.step == 0


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_a_failed_save_keeps_the_last_good_checkpoint_and_leaves_no_tmp(
    tiny_config, monkeypatch, mode
):
    first = Trainer(tiny_config(**CKPT))
    first.train()
    folder = first.checkpoint.folder
    full = OSError(errno.ENOSPC, "No space left on device")

    def full_disk(*args, **kwargs):
        raise full

    def full_disk_later(*args, **kwargs):  # the writer thread fails; the loop learns it later
        future = Future()
        future.set_exception(full)
        return future

    if mode == "async":
        monkeypatch.setattr(checkpoint_writer.dcp, "async_save", full_disk_later)
    else:
        monkeypatch.setattr(checkpoint_writer.dcp, "save", full_disk)
    with pytest.raises(ConfigError, match=r"step-4 could not be written .*No space left") as err:
        cfg = tiny_config(**{**CKPT, "training.steps": 4, "checkpoint.async_mode": mode})
        Trainer(cfg).train()
    assert "the last good checkpoint is step-2" in one_line(err)
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]
    monkeypatch.undo()
    resumed = Trainer(tiny_config(**{**CKPT, "training.steps": 4}))
    assert len(resumed.train()) == 2  # resumes from the kept step-2


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_a_failed_read_back_or_manifest_write_fails_the_save_in_one_line(
    tiny_config, monkeypatch, mode
):
    Trainer(tiny_config(**CKPT)).train()
    cfg = tiny_config(**{**CKPT, "training.steps": 4, "checkpoint.async_mode": mode})

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for patch, reason in (
        (("digest_share", unreadable), "Input/output error"),
        (("write", full), "No space left on device"),
    ):
        monkeypatch.setattr(checkpoint_writer.manifest, *patch)
        with pytest.raises(ConfigError, match=rf"step-4 could not be written .*{reason}") as err:
            Trainer(cfg).train()
        assert "the last good checkpoint is step-2" in one_line(err)
        folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
        assert sorted(p.name for p in folder.iterdir()) == ["step-2"]
        monkeypatch.undo()
