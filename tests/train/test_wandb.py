"""W&B logging with the real wandb in offline mode: the run holds the resolved config, the tags
and the same scalars as TensorBoard at each logged step; a resume continues the same run."""

import json
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from torchmoe.train.trainer import Trainer  # noqa: E402

BLOCK, HEADER = 32768, 7  # the .wandb file: a 7-byte header, then LevelDB-style log records


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of an offline run file (records may span 32 KiB blocks)."""
    data, pos, parts, out = path.read_bytes(), HEADER, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer: padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
    return out


def history(run_file: Path) -> list[dict]:
    rows = []
    for r in records(run_file):
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    return rows


def run_files(dump: Path) -> list[Path]:
    return sorted(dump.glob("wandb/offline-run-*/run-*.wandb"))


def test_offline_run_has_config_tags_and_the_tensorboard_scalars(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    keys = {
        "metrics.enable_wandb": "true",
        "metrics.wandb_tags": "moe,test",
        "checkpoint.enable": "true",
        "checkpoint.interval": "2",
        "training.steps": "2",
    }
    losses = Trainer(tiny_config(**keys)).train()
    [run_file] = run_files(tmp_path / "run")
    rows = history(run_file)
    assert [row["_step"] for row in rows] == [1, 2]
    assert [row["train/loss"] for row in rows] == pytest.approx(losses)
    assert "moe/dead/layer0" in rows[0] and "train/grad_norm" in rows[0]
    [run] = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
    assert list(run.tags) == ["moe", "test"] and run.display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training"]["steps"] == 2 and config["moe"]["num_experts"] > 1
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert run.run_id == run_id
    # a resume continues the same W&B run
    Trainer(tiny_config(**{**keys, "training.steps": "3"})).train()
    resumed = run_files(tmp_path / "run")[-1]
    [again] = [r.run for r in records(resumed) if r.WhichOneof("record_type") == "run"]
    assert again.run_id == run_id and [row["_step"] for row in history(resumed)] == [3]
