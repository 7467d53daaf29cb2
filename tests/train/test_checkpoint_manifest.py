"""Every checkpoint carries a manifest written last: a damaged step is refused naming the newest
good one (or skipped with on_corrupt = fallback), another job's checkpoint is refused listing
the differing keys, and what interrupted saves left behind never blocks or misleads a run."""

import functools
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_cli import run as run_cli
from torchmoe.config.errors import ConfigError
from torchmoe.data.tokenizer import BUNDLED_RANKS
from torchmoe.train import fingerprint, manifest
from torchmoe.train import trainer as trainer_module
from torchmoe.train.checkpoint import read_model_weights

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": 2, "training.steps": 4}


def run(tiny_config, **overrides):
    trainer = Trainer(tiny_config(**{**CKPT, **overrides}))
    return trainer, trainer.train()


def listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size: what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def largest_shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def zeros_into_a_shard(step_dir: Path) -> str:
    shard = largest_shard(step_dir)
    with open(shard, "r+b") as f:
        f.seek(64)
        f.write(bytes(min(64 * 1024, shard.stat().st_size - 64)))
    return rf"{shard.name}: contents differ from the manifest's checksum"


def random_bytes_into_a_shard(step_dir: Path) -> str:
    shard = largest_shard(step_dir)
    shard.write_bytes(os.urandom(shard.stat().st_size))
    return rf"{shard.name}: contents differ"


def truncated_shard(step_dir: Path) -> str:
    shard = largest_shard(step_dir)
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    return rf"{shard.name}: {size // 2} bytes, the manifest says {size}"


def missing_metadata(step_dir: Path) -> str:
    (step_dir / ".metadata").unlink()
    return r"\.metadata: missing"


def missing_manifest(step_dir: Path) -> str:
    (step_dir / manifest.MANIFEST).unlink()
    return r"no manifest.json: its save did not finish"


def garbled_manifest(step_dir: Path) -> str:
    (step_dir / manifest.MANIFEST).write_text('{"format": 1, "step": ')
    return r"manifest.json is unreadable"


def renamed_step(step_dir: Path) -> str:
    """A step folder copied under another step's name."""
    body = json.loads((step_dir / manifest.MANIFEST).read_text())
    manifest.write(step_dir, 6, body["job"], body["files"])
    return r"its manifest.json is for step 6"


DAMAGE = [
    zeros_into_a_shard,
    random_bytes_into_a_shard,
    truncated_shard,
    missing_metadata,
    missing_manifest,
    garbled_manifest,
    renamed_step,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_latest_step_is_refused_naming_the_newest_good_one(tiny_config, damage):
    first, _ = run(tiny_config)
    folder = first.checkpoint.folder
    reason = damage(folder / "step-4")
    before = listing(folder)
    with pytest.raises(ConfigError) as err:
        run(tiny_config, **{"training.steps": 6})
    message = str(err.value)
    assert "\n" not in message
    assert "step-4 is damaged (" in message and "the newest good checkpoint is step-2" in message
    assert 'checkpoint.on_corrupt = "fallback"' in message
    assert re.search(reason, message), message
    assert listing(folder) == before  # nothing moved, nothing deleted


def test_fallback_moves_the_damaged_step_aside_and_resumes_the_good_one_exactly(tiny_config):
    first, losses = run(tiny_config)
    folder = first.checkpoint.folder
    truncated_shard(folder / "step-4")
    resumed, tail = run(tiny_config, **{"checkpoint.on_corrupt": "fallback"})
    assert tail == losses[2:]  # steps 3 and 4 again, from step-2, bit for bit
    assert resumed.checkpoint.saved_steps() == [2, 4]  # the new step-4
    assert [p.name for p in (folder / "damaged").iterdir()] == ["step-4"]
    _, problem = manifest.verify(folder / "step-4", 4, collective=False)
    assert problem is None


def test_an_explicitly_asked_damaged_step_is_refused_even_with_fallback(tiny_config):
    first, _ = run(tiny_config)
    zeros_into_a_shard(first.checkpoint.folder / "step-2")
    with pytest.raises(ConfigError, match=r"step-2 is damaged .*no older checkpoint"):
        run(tiny_config, **{"checkpoint.load_step": 2, "checkpoint.on_corrupt": "fallback"})
    zeros_into_a_shard(first.checkpoint.folder / "step-4")
    with pytest.raises(ConfigError, match=r"step-4 is damaged .*no older checkpoint .* verifies"):
        run(tiny_config, **{"checkpoint.on_corrupt": "fallback"})


def test_an_explicit_load_step_names_the_flag_for_the_good_step(tiny_config):
    run(tiny_config, **{"training.steps": 6})
    first, _ = run(tiny_config, **{"training.steps": 6})
    missing_metadata(first.checkpoint.folder / "step-6")
    with pytest.raises(ConfigError, match=r"set --checkpoint.load_step 4 "):
        run(tiny_config, **{"training.steps": 8, "checkpoint.load_step": 6})


def test_what_interrupted_saves_left_is_cleared_or_completed(tiny_config, caplog):
    first, _ = run(tiny_config)
    folder = first.checkpoint.folder
    # killed between the manifest and the rename: complete, so it becomes step-4 again
    (folder / "step-4").rename(folder / "step-4.tmp")
    # killed mid-write: no manifest, never loadable
    shutil.copytree(folder / "step-2", folder / "step-6.tmp")
    (folder / "step-6.tmp" / manifest.MANIFEST).unlink()
    # killed while pruning
    shutil.copytree(folder / "step-2", folder / "step-0.deleting")
    with caplog.at_level(logging.INFO):
        _, tail = run(tiny_config, **{"training.steps": 5})
    assert len(tail) == 1  # from step-4
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4", "step-5"]
    assert "completed the interrupted save of step-4" in caplog.text
    assert "removed step-6.tmp, a save that did not finish" in caplog.text


def test_another_model_config_is_refused_listing_the_keys(tiny_config):
    first, _ = run(tiny_config, **{"training.steps": 2})
    before = listing(first.checkpoint.folder)
    with pytest.raises(ConfigError) as err:
        run(tiny_config, **{"model.n_layers": 2, "moe.num_experts": 4})
    message = str(err.value)
    assert "step-2 was saved by a different job (" in message and "\n" not in message
    assert "model.n_layers 3 -> 2" in message and "moe.num_experts 8 -> 4" in message
    assert listing(first.checkpoint.folder) == before


def test_another_tokenizer_is_refused(tiny_config, tmp_path):
    run(tiny_config, **{"training.steps": 2})
    ranks = tmp_path / "smaller.tiktoken"
    ranks.write_text("".join(BUNDLED_RANKS.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ConfigError, match=r"saved by a different job \(tokenizer ranks:"):
        run(tiny_config, **{"model.tokenizer_path": str(ranks)})


def test_settings_a_resume_may_change_are_logged_not_refused(tiny_config, caplog):
    run(tiny_config, **{"training.steps": 2})
    with caplog.at_level(logging.INFO):
        _, tail = run(tiny_config, **{"moe.z_loss_coeff": 0.001})
    assert len(tail) == 2
    assert "resuming with changed settings: moe.z_loss_coeff 0.0 -> 0.001" in caplog.text


def test_shapes_decide_when_the_config_agrees():
    saved = {"config": {"model": {}, "moe": {}}, "shapes": {"a": [2, 3], "b": [4]}}
    job = {"config": {"model": {}, "moe": {}}, "tokenizer": None, "shapes": {"a": [2, 5], "c": [1]}}
    refused, _ = fingerprint.compare(saved, job)
    assert refused == ["c not in the checkpoint", "b not in this model", "a [2, 3] -> [2, 5]"]


def test_offline_tools_refuse_a_damaged_step(tiny_config):
    first, _ = run(tiny_config, **{"training.steps": 2})
    step_dir = first.checkpoint.folder / "step-2"
    assert "tok_embeddings.weight" in read_model_weights(step_dir, "--dense")
    truncated_shard(step_dir)
    with pytest.raises(ConfigError, match=r"--dense .*step-2: the checkpoint is damaged"):
        read_model_weights(step_dir, "--dense")


def test_a_damaged_step_is_one_line_and_exit_2_from_the_command_line(tmp_path, data_cache):
    cmd = [sys.executable, "-m", "torchmoe.train", "--checkpoint.enable"]
    first = run_cli(cmd + ["--checkpoint.interval", "2"], tmp_path, data_cache)
    assert first.returncode == 0, first.stderr[-2000:]
    truncated_shard(tmp_path / "checkpoint" / "step-3")
    proc = run_cli(cmd, tmp_path, data_cache)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step-3 is damaged" in errors[0]
    assert "newest good checkpoint is step-2" in errors[0]


def edit_manifest(step_dir: Path, change) -> None:
    body = json.loads((step_dir / manifest.MANIFEST).read_text())
    change(body)
    (step_dir / manifest.MANIFEST).write_text(json.dumps(body))


MALFORMED = {
    "a file entry that is a number": lambda b: b["files"].update({".metadata": 7}),
    "no job": lambda b: b.update(job=None),
    "a boolean step": lambda b: b.update(step=True),
    "no file list": lambda b: b.update(files={}),
}


@pytest.mark.parametrize("change", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_manifest_is_damage_in_one_line(tiny_config, change):
    first, _ = run(tiny_config)
    edit_manifest(first.checkpoint.folder / "step-4", change)
    with pytest.raises(ConfigError, match=r"step-4 is damaged \(manifest.json is malformed"):
        run(tiny_config, **{"training.steps": 6})


def test_a_deeply_nested_manifest_is_damage_in_one_line(tiny_config):
    first, _ = run(tiny_config)
    (first.checkpoint.folder / "step-4" / manifest.MANIFEST).write_text("[" * 100000)
    with pytest.raises(ConfigError, match=r"step-4 is damaged \(manifest.json is unreadable"):
        run(tiny_config, **{"training.steps": 6})


def test_the_suggested_fix_for_an_explicit_damaged_step_works(tiny_config):
    first, losses = run(tiny_config, **{"training.steps": 6})
    folder = first.checkpoint.folder
    zeros_into_a_shard(folder / "step-6")
    with pytest.raises(ConfigError) as err:
        run(tiny_config, **{"training.steps": 6, "checkpoint.load_step": 6})
    fix = "--checkpoint.load_step 4 --checkpoint.discard_newer true"
    assert fix in str(err.value)
    _, tail = run(
        tiny_config,
        **{"training.steps": 6, "checkpoint.load_step": 4, "checkpoint.discard_newer": "true"},
    )
    assert tail == losses[4:]
    assert [p.name for p in (folder / "discarded").iterdir()] == ["step-6"]


def test_fallback_with_a_file_where_damaged_goes_is_one_line(tiny_config):
    first, _ = run(tiny_config)
    folder = first.checkpoint.folder
    truncated_shard(folder / "step-4")
    (folder / "damaged").write_text("mine")
    with pytest.raises(ConfigError, match=r"damaged is a file; .* move the file away"):
        run(tiny_config, **{"checkpoint.on_corrupt": "fallback", "training.steps": 6})
    assert (folder / "step-4").is_dir()


def test_folders_that_only_look_like_steps_or_leftovers_are_left_alone(tiny_config):
    first, _ = run(tiny_config, **{"training.steps": 2})
    folder = first.checkpoint.folder
    shutil.copytree(folder / "step-2", folder / "step-0010")
    (folder / "notes.tmp").mkdir()
    (folder / "notes.tmp" / "mine.txt").write_text("keep")
    (folder / "old.deleting").mkdir()
    trainer, tail = run(tiny_config)
    assert len(tail) == 2 and trainer.checkpoint.saved_steps() == [2, 4]
    assert (folder / "notes.tmp" / "mine.txt").exists() and (folder / "old.deleting").is_dir()
    assert (folder / "step-0010").is_dir()


def test_seeds_without_a_manifest_or_copied_from_a_step_load(tiny_config, tmp_path, caplog):
    first, _ = run(tiny_config, **{"training.steps": 2})
    for name, drop_manifest in (("old-seed", True), ("copied", False)):
        folder = tmp_path / name
        shutil.copytree(first.checkpoint.folder / "step-2", folder / "step-0")
        if drop_manifest:  # as a seed an older torchmoe wrote
            (folder / "step-0" / manifest.MANIFEST).unlink()
        with caplog.at_level(logging.WARNING):
            trainer, tail = run(tiny_config, **{"checkpoint.folder": str(folder)})
        assert len(tail) == 4 and trainer.checkpoint.saved_steps() == [0, 2, 4]
        assert ("load unverified" in caplog.text) == drop_manifest
        caplog.clear()


def test_a_symlinked_step_is_unlinked_when_pruned_and_its_target_kept(tiny_config, tmp_path):
    first, _ = run(tiny_config)
    folder = first.checkpoint.folder
    archive = tmp_path / "archive-2"
    (folder / "step-2").rename(archive)
    (folder / "step-2").symlink_to(archive)
    trainer, _ = run(tiny_config, **{"training.steps": 8, "checkpoint.keep_latest_k": 2})
    assert trainer.checkpoint.saved_steps() == [6, 8]
    assert (archive / manifest.MANIFEST).exists()
    _, tail = run(tiny_config, **{"training.steps": 9, "checkpoint.keep_latest_k": 2})
    assert len(tail) == 1


def test_unfreezing_the_router_is_refused_listing_the_key(tiny_config):
    run(tiny_config, **{"training.steps": 2, "moe.freeze_router": "true"})
    with pytest.raises(ConfigError, match=r"different job \(moe.freeze_router True -> False\)"):
        run(tiny_config)


def test_offline_tools_read_renamed_and_manifestless_folders(tiny_config, tmp_path, caplog):
    first, _ = run(tiny_config, **{"training.steps": 2})
    renamed = tmp_path / "final"
    shutil.copytree(first.checkpoint.folder / "step-2", renamed)
    weights = read_model_weights(renamed, "--checkpoint")
    (renamed / manifest.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        again = read_model_weights(renamed, "--checkpoint")
    assert "has no manifest: its files load unverified" in caplog.text
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_fallback_into_another_job_is_refused_before_anything_moves(tiny_config):
    first, _ = run(tiny_config)
    folder = first.checkpoint.folder
    truncated_shard(folder / "step-4")
    before = listing(folder)
    with pytest.raises(ConfigError, match=r"step-2 was saved by a different job"):
        run(tiny_config, **{"checkpoint.on_corrupt": "fallback", "model.n_layers": 2})
    assert listing(folder) == before
