"""Preemption: a stop signal ends the run after the current step with a checkpoint and exit 0,
every rank stopping after the same step; a second signal never cuts the save short, a third
exits at once; the resumed run's losses equal the uninterrupted run's."""

import functools
import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_ranks
from torchmoe.train import checkpoint_writer, manifest
from torchmoe.train import trainer as trainer_module

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": 100, "training.steps": 6}


def signal_during_step(trainer, step: int, signum: int, times: int = 1) -> None:
    """Send ``signum`` to this process while ``trainer`` runs step ``step``."""
    original = trainer.train_step

    def train_step():
        if trainer.state.step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original()

    trainer.train_step = train_step


def signal_during_save(monkeypatch, times: int) -> None:
    """Send SIGTERM ``times`` times from inside the checkpoint write."""
    original = checkpoint_writer.dcp.save

    def save(*args, **kwargs):
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_writer.dcp, "save", save)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_saves_after_the_step_and_the_resume_is_exact(tiny_config, caplog, signum):
    reference = Trainer(tiny_config(**{**CKPT, "checkpoint.enable": "false"})).train()
    trainer = Trainer(tiny_config(**CKPT))
    signal_during_step(trainer, 3, signum)
    with caplog.at_level(logging.INFO):
        losses = trainer.train()
    assert len(losses) == 3 and trainer.checkpoint.saved_steps() == [3]
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step 3: saved checkpoint step-3" in caplog.text
    handler = signal.getsignal(signum)  # restored after the run
    assert not isinstance(getattr(handler, "__self__", None), trainer_module.StopRequest)
    resumed = Trainer(tiny_config(**CKPT)).train()
    assert losses + resumed == reference


def test_a_second_signal_during_the_save_is_ignored_until_it_is_done(
    tiny_config, capfd, monkeypatch
):
    trainer = Trainer(tiny_config(**CKPT))
    signal_during_step(trainer, 2, signal.SIGTERM)
    signal_during_save(monkeypatch, times=1)
    assert len(trainer.train()) == 2
    said = capfd.readouterr().err  # the handler writes to stderr itself (preemption.say)
    assert "SIGTERM received: stopping after this step" in said
    assert "received again: still saving checkpoint step-2" in said
    assert trainer.checkpoint.saved_steps() == [2]


def _third_signal_child(cfg) -> None:
    torch.set_num_threads(1)  # OpenMP's pool does not survive a fork
    trainer = Trainer(cfg)
    signal_during_step(trainer, 2, signal.SIGTERM)
    original = checkpoint_writer.dcp.save

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    checkpoint_writer.dcp.save = save
    trainer.train()
    os._exit(0)


def test_a_third_signal_exits_at_once_and_the_next_run_resumes(tiny_config):
    cfg = tiny_config(**{**CKPT, "checkpoint.interval": 1})
    proc = multiprocessing.get_context("fork").Process(target=_third_signal_child, args=(cfg,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 128 + signal.SIGTERM
    resumed = Trainer(tiny_config(**{**CKPT, "checkpoint.interval": 1}))
    assert resumed.checkpoint.saved_steps() == [1]  # the cut save left only a .tmp
    assert len(resumed.train()) == 5  # from step-1, the .tmp cleared
    assert resumed.checkpoint.saved_steps() == list(range(1, 7))


def _one_rank_signalled(rank: int, cfg) -> tuple[list[float], list[int]]:
    trainer = Trainer(cfg)
    if rank == 1:  # as when Slurm signals the workers and only one has seen it yet
        signal_during_step(trainer, 2, signal.SIGUSR1)
    losses = trainer.train()
    return losses, trainer.checkpoint.saved_steps()


def test_every_rank_stops_after_the_same_step_when_one_is_signalled(tiny_config):
    cfg = tiny_config(**CKPT)  # two data-parallel ranks
    (losses0, steps0), (losses1, steps1) = run_ranks(2, _one_rank_signalled, cfg)
    assert len(losses0) == len(losses1) == 2
    assert steps0 == steps1 == [2]


def test_a_signal_before_the_first_step_saves_nothing_new(tiny_config, caplog):
    trainer = Trainer(tiny_config(**CKPT))
    load = trainer.checkpoint.load

    def load_then_signal():
        step = load()
        os.kill(os.getpid(), signal.SIGTERM)
        return step

    trainer.checkpoint.load = load_then_signal
    with caplog.at_level(logging.INFO):
        assert trainer.train() == []
    assert "stopped by SIGTERM before the first step: nothing new to save" in caplog.text
    assert trainer.checkpoint.saved_steps() == []


def test_async_saves_resume_exactly_and_a_stop_waits_for_the_save_in_flight(tiny_config):
    asynchronous = {**CKPT, "checkpoint.async_mode": "async", "checkpoint.interval": 2}
    reference = Trainer(tiny_config(**{**CKPT, "checkpoint.enable": "false"})).train()
    trainer = Trainer(tiny_config(**asynchronous))
    signal_during_step(trainer, 3, signal.SIGTERM)  # step-2's write may still be in flight
    losses = trainer.train()
    assert trainer.checkpoint.saved_steps() == [2, 3]
    for step in (2, 3):
        _, problem = manifest.verify(trainer.checkpoint.folder / f"step-{step}", step, False)
        assert problem is None
    resumed = Trainer(
        tiny_config(
            **{**asynchronous, "checkpoint.load_step": 2, "checkpoint.discard_newer": "true"}
        )
    ).train()
    assert losses[:2] + resumed == reference  # the staged copy is step 2's state, not later


def _train_ranks(rank: int, cfg) -> list[float]:
    return Trainer(cfg).train()


def test_async_saves_on_two_ranks_verify_and_resume_exactly(tiny_config):
    asynchronous = {**CKPT, "checkpoint.async_mode": "async", "checkpoint.interval": 2}
    cfg = tiny_config(**asynchronous)
    losses, _ = run_ranks(2, _train_ranks, cfg)
    folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    assert checkpoint_writer.step_numbers(folder) == [2, 4, 6]
    for step in (2, 4, 6):
        assert manifest.verify(folder / f"step-{step}", step, collective=False)[1] is None
    resume = {"checkpoint.load_step": 2, "checkpoint.discard_newer": "true"}
    resumed, _ = run_ranks(2, _train_ranks, tiny_config(**{**asynchronous, **resume}))
    assert resumed == losses[2:]
