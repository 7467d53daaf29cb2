"""Validation: a held-out share that training never reads, the loss of fixed batches in eval
mode equal to a float64 reference, the eval capacity, and one line where it cannot run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchmoe.config.errors import ConfigError
from torchmoe.data.datasets import ListTable
from torchmoe.data.held_out import split_held_out
from torchmoe.models.moe.moe import MoE, MoEArgs
from torchmoe.models.moe.router import RouterArgs
from torchmoe.train.trainer import Trainer


def test_held_out_share_is_disjoint_stable_and_about_the_fraction(rng):
    table = ListTable([f"doc {i}" for i in range(20000)], "docs")
    seed = rng.randrange(1000)
    train, held = split_held_out(table, 0.05, seed)
    texts = lambda t: {t.text(i) for i in range(len(t))}  # noqa: E731
    assert not texts(train) & texts(held) and len(train) + len(held) == 20000
    assert 800 < len(held) < 1200  # 5% of 20000, give or take chance
    again = split_held_out(table, 0.05, seed)[1]
    assert texts(again) == texts(held)
    assert texts(split_held_out(table, 0.05, seed + 1)[1]) != texts(held)
    tiny_train, tiny_held = split_held_out(ListTable(["a", "b"], "t"), 0.01, seed)
    assert len(tiny_train) == len(tiny_held) == 1  # never empty on either side
    with pytest.raises(ConfigError, match=r"holds out a share of the training documents, but"):
        split_held_out(ListTable(["a"], "t"), 0.5, seed)


def test_validation_loss_equals_a_float64_reference(tiny_config):
    keys = {
        "validation.enable": "true",
        "validation.steps": "3",
        "validation.holdout_fraction": "0.2",
        "data.prefetch_batches": "0",
    }
    trainer = Trainer(tiny_config(**keys), device=torch.device("cpu"))
    validator = trainer.validator
    got = validator.run(trainer.model, step=0)
    assert got == validator.run(trainer.model, step=0)  # the same batches every time
    validator.batches.load_state_dict(validator._start)
    model = trainer.model.double().eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for _ in range(3):
            x, y, _ = next(validator.batches)
            logits = model(x)
            nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            tokens += y.numel()
    assert got["val_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["val_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_training_never_reads_the_held_out_documents(tiny_config):
    trainer = Trainer(
        tiny_config(**{"validation.enable": "true", "validation.holdout_fraction": "0.3"}),
        device=torch.device("cpu"),
    )
    train_docs = trainer.dataloader.loader._source
    held = trainer.validator.batches.loader._source
    assert not set(np.asarray(train_docs._indices)) & set(np.asarray(held._indices))


def test_eval_mode_uses_the_eval_capacity_and_records_nothing():
    torch.manual_seed(0)
    common = dict(router=RouterArgs(dim=8, num_experts=4, topk=2), hidden_dim=6, grouped_mm="loop")
    dropping = MoE(MoEArgs(**common, capacity_factor=0.5, eval_capacity_factor=0.0))
    dropless = MoE(MoEArgs(**common))
    dropping.init_weights(0.5, 0.5)
    dropless.load_state_dict(dropping.state_dict())
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        assert not torch.allclose(dropping(x), dropless(x))  # training: capacity 0.5 drops
        dropping.tokens_per_expert.zero_()
        dropping.eval(), dropless.eval()
        torch.testing.assert_close(dropping(x), dropless(x))  # eval: dropless
    assert dropping.tokens_per_expert.sum() == 0  # eval tokens do not move the expert bias


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_validation_with_a_v_shaped_pipeline_is_one_line(tiny_config, schedule):
    keys = {"validation.enable": "true", "parallelism.pp": "2", "parallelism.pp_schedule": schedule}
    with pytest.raises(
        ConfigError,
        match=rf"^validation.enable with parallelism.pp_schedule = '{schedule}' is not supported",
    ):
        tiny_config(**keys)
