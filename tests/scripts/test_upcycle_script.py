"""scripts/upcycle.py end to end: a dense training checkpoint (model + optimizer) becomes a seed
checkpoint the Trainer starts from, with the dense model's logits; mistakes are one line and
exit status 2."""

import functools

import pytest
import torch

from torchmoe.config.load import to_toml
from torchmoe.train.trainer import Trainer

Trainer = functools.partial(Trainer, device=torch.device("cpu"))
DENSE = {"moe.num_experts": 0, "model.n_dense_layers": 3}
MOE = {
    "moe.num_experts": 6,
    "moe.router_topk": 2,
    "moe.ffn_hidden_size": 64,  # 128 / 2
    "moe.shared_expert_intermediate_size": 0,
    "moe.router_topk_scaling_factor": 2.0,
    "moe.router_num_groups": 0,
    "moe.router_group_topk": 0,
    "moe.router_score_function": "softmax",
}


@pytest.fixture
def dense(tiny_config):
    """A dense model trained one step, checkpointed with its optimizer state."""
    trainer = Trainer(
        tiny_config(
            **DENSE,
            **{"checkpoint.enable": "true", "training.steps": 1, "checkpoint.folder": "dense"},
        )
    )
    trainer.train()
    return trainer


def moe_recipe(tiny_config, tmp_path, **overrides):
    """The MoE job as a recipe file, and its config."""
    cfg = tiny_config(**{**MOE, **overrides})
    path = tmp_path / "moe.toml"
    path.write_text(to_toml(cfg))
    return str(path), cfg


def test_upcycled_checkpoint_starts_training_from_the_dense_model(
    dense, tiny_config, tmp_path, script
):
    recipe, _ = moe_recipe(tiny_config, tmp_path)
    out = tmp_path / "upcycled"
    code = script("upcycle").main(
        [
            "--dense",
            str(dense.checkpoint.folder / "step-1"),
            "--config",
            recipe,
            "--granularity",
            "2",
            "--out",
            str(out),
            "--training.seed",
            str(int(torch.randint(1000, ()))),
        ]
    )
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["step-0"]
    moe = Trainer(
        tiny_config(**MOE, **{"checkpoint.enable": "true", "checkpoint.folder": str(out)})
    )
    assert moe.checkpoint.load() == 0
    tokens = torch.randint(0, moe.cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(moe.model(tokens), dense.model(tokens), rtol=1e-5, atol=1e-5)
    assert moe.train()  # and trains on from there


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_checkpoint", "not a torchmoe checkpoint"),
        ("granularity", "moe.num_experts = 6 must be a multiple of granularity = 4"),
        ("other_dim", "has shape"),
        ("out_taken", "already holds a step-0"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    case, message, dense, tiny_config, tmp_path, script, capsys
):
    recipe, _ = moe_recipe(
        tiny_config, tmp_path, **{"model.dim": 32} if case == "other_dim" else {}
    )
    step = dense.checkpoint.folder / ("step-9" if case == "no_checkpoint" else "step-1")
    out = tmp_path / "upcycled"
    if case == "out_taken":
        (out / "step-0").mkdir(parents=True)
    granularity = "4" if case == "granularity" else "2"
    code = script("upcycle").main(
        ["--dense", str(step), "--config", recipe, "--granularity", granularity, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
