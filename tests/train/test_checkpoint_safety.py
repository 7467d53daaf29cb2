"""Nothing in a checkpoint folder runs: DCP's metadata goes through a restricted unpickler,
non-tensor items load as plain data, and the loop's own state is JSON."""

import functools
import io
import json
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.train import checkpoint_states, manifest
from torchmoe.train import trainer as trainer_module
from torchmoe.train.safe_dcp import SafeLoadPlanner

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": 2, "training.steps": 2}


class WritesAFile:
    """A pickle payload: unpickling it runs a shell command that creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def reseal(step_dir):
    """Rewrite a step's manifest to match its files, as someone crafting a checkpoint would."""
    body = json.loads((step_dir / manifest.MANIFEST).read_text())
    manifest.write(step_dir, body["step"], body["job"], manifest.digest_share(step_dir, False))


def test_a_crafted_metadata_file_is_refused_and_runs_nothing(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(**CKPT))
    trainer.train()
    marker = tmp_path / "pwned"
    step_dir = trainer.checkpoint.folder / "step-2"
    (step_dir / ".metadata").write_bytes(pickle.dumps(WritesAFile(marker)))
    reseal(step_dir)  # an attacker writes a matching manifest too: the unpickler must hold
    with pytest.raises(ConfigError, match=r"\.metadata names posix\.system.*carry no code") as err:
        Trainer(tiny_config(**{**CKPT, "training.steps": 3})).train()
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_crafted_non_tensor_item_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(WritesAFile(marker), payload)
    payload.seek(0)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="train_state.blob"))
    with pytest.raises(ConfigError, match=r"train_state.blob is not plain data"):
        SafeLoadPlanner().load_bytes(item, payload)
    assert not marker.exists()


def test_loop_state_is_saved_as_json_and_resumes(tiny_config):
    trainer = Trainer(tiny_config(**CKPT))
    trainer.train()
    resumed = Trainer(tiny_config(**{**CKPT, "training.steps": 3}))
    assert resumed.train() and resumed.state.step == 3
    blob = checkpoint_states.JSONState(resumed.state, "step").state_dict()["blob"]
    assert blob == b'{"step": 3}'


def test_a_checkpoint_with_pickled_loop_state_is_refused_in_one_line(tiny_config, monkeypatch):
    """Checkpoints written before the JSON format: their state is never unpickled."""
    as_json = checkpoint_states.JSONState.state_dict
    monkeypatch.setattr(
        checkpoint_states.JSONState,
        "state_dict",
        lambda self: {k: pickle.dumps(json.loads(v)) for k, v in as_json(self).items()},
    )
    Trainer(tiny_config(**CKPT)).train()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"state pickled .* never unpickles") as err:
        Trainer(tiny_config(**{**CKPT, "training.steps": 3})).train()
    assert "\n" not in str(err.value)
