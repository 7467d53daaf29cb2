"""SIGKILL at random moments, mid-save included, never leaves a checkpoint that loads wrongly or
a folder that blocks the next run; twenty kills later the loss curve is the uninterrupted one."""

import functools
import json
import multiprocessing
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from torchmoe.train import checkpoint_writer, manifest
from torchmoe.train import trainer as trainer_module

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
STEPS = 120
CKPT = {
    "checkpoint.enable": "true",
    "checkpoint.interval": 1,
    "checkpoint.keep_latest_k": 2,
    "training.steps": STEPS,
}
# Where a round stops its run: inside the save at a chosen point, or at a random time.
STAGES = ["shards written", "manifest written", "pruning", "random", "random"]


def _hold(ready: Path, module, name: str) -> None:
    """Make ``module.name`` announce itself in ``ready`` and hang after its first call, so the
    parent kills the run exactly there."""
    original = getattr(module, name)

    def held(*args, **kwargs):
        result = original(*args, **kwargs)
        ready.touch()
        time.sleep(3600)
        return result

    setattr(module, name, held)


def _child(cfg, stage: str, ready: Path) -> None:
    torch.set_num_threads(1)  # OpenMP's pool does not survive a fork
    if stage == "shards written":
        _hold(ready, checkpoint_writer.dcp, "save")
    elif stage == "manifest written":
        _hold(ready, checkpoint_writer.manifest, "write")
    elif stage == "pruning":  # mid-delete of an old step, after its rename to .deleting
        rmtree = shutil.rmtree

        def held_rmtree(path, *args, **kwargs):
            if str(path).endswith(".deleting") and not kwargs.get("ignore_errors"):
                ready.touch()
                time.sleep(3600)
            rmtree(path, *args, **kwargs)

        checkpoint_writer.shutil = SimpleNamespace(rmtree=held_rmtree, disk_usage=shutil.disk_usage)
    Trainer(cfg).train()


def rows(folder: Path) -> dict[int, float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def assert_every_step_folder_verifies(folder: Path) -> None:
    for step in checkpoint_writer.step_numbers(folder):
        _, problem = manifest.verify(folder / f"step-{step}", step, collective=False)
        assert problem is None, f"step-{step}: {problem}"


def test_twenty_kills_never_leave_a_wrong_checkpoint_or_a_blocked_folder(tiny_config, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the forked runs: sums in one order, for exact losses
    try:
        _kill_twenty_times(tiny_config, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_twenty_times(tiny_config, tmp_path):
    uninterrupted = {"job.dump_folder": str(tmp_path / "reference"), "checkpoint.enable": False}
    Trainer(tiny_config(**{**CKPT, **uninterrupted})).train()
    cfg = tiny_config(**CKPT)
    folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    rng = random.Random(13)
    ctx = multiprocessing.get_context("fork")
    mid_save = 0
    for kill in range(20):
        stage = STAGES[kill % len(STAGES)]
        ready = tmp_path / f"ready-{kill}"
        proc = ctx.Process(target=_child, args=(cfg, stage, ready))
        proc.start()
        deadline = time.monotonic() + (120 if stage != "random" else rng.uniform(0.2, 1.5))
        while time.monotonic() < deadline and not ready.exists() and proc.is_alive():
            time.sleep(0.01)
        proc.kill()
        proc.join()
        assert proc.exitcode in (-9, 0), f"round {kill} ({stage}) failed: {proc.exitcode}"
        mid_save += any(p.name.endswith((".tmp", ".deleting")) for p in folder.iterdir())
        assert_every_step_folder_verifies(folder)
    assert mid_save >= 12  # the held stages leave a .tmp or .deleting each time
    final = Trainer(cfg)
    final.train()  # takes over the killed runs' lock, clears their leftovers, resumes
    assert final.state.step == STEPS
    assert_every_step_folder_verifies(folder)
    assert not [p for p in folder.iterdir() if not p.name.startswith("step-")]
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{STEPS - 1}", f"step-{STEPS}"]
    assert rows(Path(cfg.job.dump_folder)) == rows(tmp_path / "reference")
