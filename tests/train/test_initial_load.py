"""checkpoint.initial_load_path starts a new run from another run's weights (and optionally its
optimizer moments) at step 0; the run's own checkpoints take over once it has some."""

import functools
import logging

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from torchmoe.config.errors import ConfigError
from torchmoe.train.trainer import Trainer

Trainer = functools.partial(Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": "4"}


@pytest.fixture
def base(tiny_config, tmp_path):
    """A finished run's step-4 and its weights."""
    trainer = Trainer(tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "base"}))
    trainer.train()
    return tmp_path / "base" / "checkpoint" / "step-4", get_model_state_dict(trainer.model)


def test_weights_only_at_step_0_with_a_fresh_optimizer(base, tiny_config, tmp_path, caplog):
    step4, weights = base
    cfg = tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "new"})
    cfg.checkpoint.initial_load_path = str(step4)
    trainer = Trainer(cfg)
    with caplog.at_level(logging.INFO):
        assert trainer.checkpoint.load() == 0 and trainer.state.step == 0
    for name, value in get_model_state_dict(trainer.model).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert not trainer.optimizer.state  # fresh moments
    assert "weights only" in caplog.text
    losses = Trainer(cfg).train()
    assert len(losses) == 4  # steps 1-4 of the new run
    # the new run's own checkpoint now wins over initial_load_path
    resumed = Trainer(cfg)
    assert resumed.checkpoint.load() == 4


def test_with_the_optimizer_moments(base, tiny_config, tmp_path):
    step4, _ = base
    cfg = tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "new"})
    cfg.checkpoint.initial_load_path = str(step4)
    cfg.checkpoint.initial_load_model_only = False
    cfg.optimizer.lr, cfg.optimizer.weight_decay = 5e-5, 0.0  # another run's settings
    trainer = Trainer(cfg)
    own = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    assert trainer.checkpoint.load() == 0 and trainer.state.step == 0
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert moments and all(m.abs().sum() > 0 for m in moments)
    # only the moments come from the other run: lr, weight decay... stay this run's
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups
    ] == own


def test_mistakes_are_one_line(base, tiny_config, tmp_path):
    step4, _ = base
    cfg = tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "a"})
    cfg.checkpoint.initial_load_path = str(tmp_path)
    with pytest.raises(ConfigError, match=r"is not a checkpoint step folder \(no \.metadata\)"):
        Trainer(cfg).checkpoint.load()
    other = tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "b", "model.dim": "32"})
    other.checkpoint.initial_load_path = str(step4)
    with pytest.raises(
        ConfigError,
        match=r"step-4 was saved by a different job \(.*-> \[80, 32\].*"
        r"give checkpoint.initial_load_path a checkpoint of this model$",
    ):
        Trainer(other).checkpoint.load()
    seed = tiny_config(**{"job.dump_folder": tmp_path / "seed", "checkpoint.enable": "true"})
    seed.checkpoint.create_seed_checkpoint = True
    Trainer(seed).train()
    cfg = tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "c"})
    cfg.checkpoint.initial_load_path = str(tmp_path / "seed" / "checkpoint" / "step-0")
    cfg.checkpoint.initial_load_model_only = False
    with pytest.raises(
        ConfigError,
        match=r"holds no optimizer state \(a seed or an import\); "
        r"set checkpoint.initial_load_model_only = true$",
    ):
        Trainer(cfg).checkpoint.load()


def test_initial_load_needs_checkpoints_on(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint.initial_load_path needs checkpoint.enable"):
        tiny_config(**{"checkpoint.initial_load_path": str(tmp_path)})
