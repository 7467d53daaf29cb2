"""Checkpoints that store the experts' gate and up apart (``experts.w1``/``experts.w3``, as
torchmoe did before ``experts.w13``) still resume, seed and read, and resume exactly as a
checkpoint of the joined layout does."""

import functools

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import to_toml
from torchmoe.convert.hf.checkpoint_rows import CheckpointRows
from torchmoe.convert.hf.convert import export_hf
from torchmoe.train import safe_dcp
from torchmoe.train.checkpoint import read_model_weights
from torchmoe.train.checkpoint_states import ModelAndOptimizer
from torchmoe.train.split_experts import holds_split_experts
from torchmoe.train.trainer import Trainer

Trainer = functools.partial(Trainer, device=torch.device("cpu"))
CKPT = {"checkpoint.enable": "true", "checkpoint.interval": "4"}


def split_shapes(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The fingerprint shapes an older torchmoe wrote."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith("experts.w13"):
            for part in ("w1", "w3"):
                out[name.removesuffix("w13") + part] = [shape[0], *shape[2:]]
        else:
            out[name] = shape
    return out


def older_layout(sd: dict) -> dict:
    """``sd`` as an older torchmoe saved it: each joined expert tensor as two tensors of their
    own, gate then up; a joined name's other entries (a step count, a learning rate) once
    per half. Written independently of split_experts.py, so a swap there shows."""
    out: dict = {}
    for key, value in sd.items():
        if isinstance(value, dict):
            out[key] = older_layout(value)
        elif isinstance(key, str) and "experts.w13" in key:
            whole = isinstance(value, torch.Tensor) and value.dim() >= 2
            for i, half in enumerate(("experts.w1", "experts.w3")):
                out[key.replace("experts.w13", half)] = value[:, i].clone() if whole else value
        else:
            out[key] = value
    return out


def run(cfg, monkeypatch, split: bool, flat: bool = True) -> list[float]:
    """Train ``cfg``; with ``split`` its checkpoints are written as an older torchmoe did."""
    with monkeypatch.context() as m:
        if split:
            joined = ModelAndOptimizer.state_dict
            m.setattr(ModelAndOptimizer, "state_dict", lambda s: older_layout(joined(s)))
        if not flat:
            m.setattr(ModelAndOptimizer, "flat", False, raising=False)
        trainer = Trainer(cfg)
        if not flat:
            trainer.checkpoint.states["train"].flat = False
        if split:
            trainer.checkpoint.job["shapes"] = split_shapes(trainer.checkpoint.job["shapes"])
        return trainer.train()


def model_names(step_dir) -> set[str]:
    saved = safe_dcp.read_metadata(step_dir).state_dict_metadata
    return {k.removeprefix("train.model.") for k in saved if k.startswith("train.model.")}


@pytest.fixture
def two_runs(tiny_config, tmp_path, monkeypatch):
    """The same 4 steps saved in the older layout ("split") and in the joined one."""
    cfgs = {}
    for name in ("split", "joined"):
        cfgs[name] = lambda steps, name=name: tiny_config(
            **CKPT, **{"job.dump_folder": tmp_path / name, "training.steps": steps}
        )
        run(cfgs[name](4), monkeypatch, split=name == "split")
    return cfgs, {name: tmp_path / name / "checkpoint" for name in cfgs}


def test_an_older_checkpoint_resumes_exactly_as_a_joined_one(two_runs, monkeypatch):
    cfgs, folders = two_runs
    split_names = model_names(folders["split"] / "step-4")
    assert any(n.endswith("experts.w1") for n in split_names)
    assert not any(n.endswith("experts.w13") for n in split_names)
    assert any(n.endswith("experts.w13") for n in model_names(folders["joined"] / "step-4"))

    resumed = {name: run(cfgs[name](6), monkeypatch, split=False) for name in cfgs}
    assert len(resumed["split"]) == 2  # steps 5 and 6, after the checkpoint of step 4
    assert resumed["split"] == resumed["joined"]
    # the resumed run saves the joined layout
    assert any(n.endswith("experts.w13") for n in model_names(folders["split"] / "step-6"))


def test_an_older_checkpoint_reads_seeds_and_exports(two_runs, tiny_config, tmp_path):
    cfgs, folders = two_runs
    split = read_model_weights(folders["split"] / "step-4", "--checkpoint")
    joined = read_model_weights(folders["joined"] / "step-4", "--checkpoint")
    assert split.keys() == joined.keys()
    for name, t in joined.items():
        assert torch.equal(split[name], t), name

    cfg = tiny_config(**CKPT, **{"job.dump_folder": tmp_path / "seeded"})
    cfg.checkpoint.initial_load_path = str(folders["split"] / "step-4")
    trainer = Trainer(cfg)
    assert trainer.checkpoint.load() == 0
    for name, t in get_model_state_dict(trainer.model).items():
        assert torch.equal(t, joined[name]), name

    rows = CheckpointRows(folders["split"] / "step-4")  # an export reads it an expert at a time
    stack = next(n for n in joined if n.endswith("experts.w13"))
    assert rows.readable(stack)
    assert torch.equal(rows.rows(stack, 1, 3), joined[stack][1:3])

    (tmp_path / "recipe.toml").write_text(to_toml(cfgs["split"](4)))
    exported = {}
    for name, folder in folders.items():
        recipe = ["--config", str(tmp_path / "recipe.toml")]
        export_hf(folder / "step-4", recipe, tmp_path / f"hf_{name}", 1 << 30, "fp32")
        exported[name] = load_file(tmp_path / f"hf_{name}" / "model.safetensors")
    assert any(".experts.0.up_proj." in n for n in exported["joined"])
    assert exported["split"].keys() == exported["joined"].keys()
    for name, t in exported["joined"].items():
        assert torch.equal(exported["split"][name], t), name


def test_an_older_optimizer_format_with_split_experts_is_one_line(
    tiny_config, tmp_path, monkeypatch
):
    cfg = lambda steps: tiny_config(  # noqa: E731
        **CKPT, **{"job.dump_folder": tmp_path / "old", "training.steps": steps}
    )
    run(cfg(4), monkeypatch, split=True, flat=False)
    with pytest.raises(
        ConfigError, match=r"step-4 predates two changes .*\(a seed: weights only\)$"
    ):
        Trainer(cfg(6)).checkpoint.load()


@pytest.mark.parametrize("there,missing", [("w1", "w3"), ("w3", "w1")])
def test_a_half_without_its_other_half_is_one_line(there, missing, tmp_path):
    dcp.save(
        {"train": {"model": {f"layers.1.feed_forward.experts.{there}": torch.randn(3, 4, 5)}}},
        checkpoint_id=str(tmp_path / "step-4"),
    )
    with pytest.raises(
        ConfigError,
        match=rf"^--checkpoint .*step-4: layers.1.feed_forward.experts.{there} is there but "
        rf"layers.1.feed_forward.experts.{missing} is missing$",
    ):
        read_model_weights(tmp_path / "step-4", "--checkpoint")


@pytest.mark.parametrize(
    "name,older",
    [
        ("layers.1.feed_forward.experts.w1", True),
        ("state.layers.1.feed_forward.experts.w1.exp_avg", True),
        ("layers.1.feed_forward.experts.w13", False),
        ("layers.1.feed_forward.shared_experts.w1.weight", False),
        ("layers.1.experts.w1.weight", False),  # a module's linear, not the routed experts
        ("state.layers.1.experts.w1.weight.exp_avg", False),  # and that linear's moments
    ],
)
def test_which_names_are_the_older_layout(name, older):
    assert holds_split_experts([name]) is older
