"""One history per checkpoint folder: a resume from an older step never abandons newer steps
silently, pruning never deletes another history or the seed, and metrics.jsonl follows the
step a run resumed from."""

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_cli import run as run_cli
from torchmoe.config.errors import ConfigError
from torchmoe.train import trainer as trainer_module

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": 5}


def run(tiny_config, **overrides):
    trainer = Trainer(tiny_config(**{**CKPT, **overrides}))
    return trainer, trainer.train()


def rows(folder, name="metrics.jsonl"):
    return [json.loads(line)["step"] for line in (folder / name).read_text().splitlines()]


def test_resuming_an_older_step_refuses_and_keeps_every_checkpoint(tiny_config):
    first, _ = run(tiny_config, **{"training.steps": 15})
    folder = first.checkpoint.folder
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(ConfigError, match=r"^checkpoint.load_step = 5: .* holds newer") as err:
        run(tiny_config, **{"training.steps": 12, "checkpoint.load_step": 5})
    assert "step-10, step-15" in str(err.value) and "\n" not in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_discard_newer_moves_the_abandoned_steps_aside_and_pruning_keeps_the_new_run(
    tiny_config,
):
    """The issue's case: steps 5, 10, 15; resume from 5 with keep_latest_k 1 up to step 12.
    Before, the new step-10 and step-12 were pruned and the abandoned step-15 kept."""
    first, _ = run(tiny_config, **{"training.steps": 15})
    folder = first.checkpoint.folder
    resumed, tail = run(
        tiny_config,
        **{
            "training.steps": 12,
            "checkpoint.load_step": 5,
            "checkpoint.keep_latest_k": 1,
            "checkpoint.discard_newer": "true",
        },
    )
    assert len(tail) == 7  # steps 6-12, from step-5
    assert resumed.checkpoint.saved_steps() == [12]
    assert sorted(p.name for p in (folder / "discarded").iterdir()) == ["step-10", "step-15"]
    later, _ = run(tiny_config, **{"training.steps": 13})  # a plain resume: this history
    assert later.checkpoint.saved_steps() == [12, 13]
    assert rows(folder.parent)[-1] == 13 and rows(folder.parent) == list(range(1, 14))


def test_pruning_keeps_the_seed(tiny_config):
    seed = Trainer(tiny_config(**CKPT, **{"checkpoint.create_seed_checkpoint": "true"}))
    seed.train()
    trainer, _ = run(tiny_config, **{"training.steps": 15, "checkpoint.keep_latest_k": 1})
    assert trainer.checkpoint.saved_steps() == [0, 15]


def test_metrics_follow_the_resumed_step_and_a_fresh_run_starts_a_new_file(tiny_config):
    first, _ = run(tiny_config, **{"training.steps": 7})  # logs 1-7, saves 5 and 7
    dump = first.checkpoint.folder.parent
    (first.checkpoint.folder / "step-7").rename(dump / "gone")  # as if preempted after step 7
    run(tiny_config, **{"training.steps": 8})  # resumes from 5
    assert rows(dump) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows(dump, "metrics.after-step-5-1.jsonl") == [6, 7]  # the abandoned rows, kept
    run(tiny_config, **{"training.steps": 2, "checkpoint.enable": "false"})  # fresh, same folder
    assert rows(dump) == [1, 2]
    assert rows(dump, "metrics-1.jsonl") == [1, 2, 3, 4, 5, 6, 7, 8]


def test_the_refusal_is_one_line_and_exit_2_from_the_command_line(tiny_config, data_cache):
    first, _ = run(tiny_config, **{"training.steps": 10})
    refused = ["--checkpoint.enable", "--checkpoint.load_step", "5"]
    # the model tiny_config trains, so that only the lineage is wrong
    refused += ["--model.dim", "64", "--model.inter_dim", "128", "--moe.ffn_hidden_size", "32"]
    refused += ["--moe.shared_expert_intermediate_size", "32"]
    proc = run_cli(
        [sys.executable, "-m", "torchmoe.train", *refused],
        Path(first.cfg.job.dump_folder),
        data_cache,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "holds newer checkpoints (step-10)" in proc.stderr
