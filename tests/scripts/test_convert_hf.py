"""scripts/convert_hf.py end to end: import a transformers save_pretrained folder, train from
it, export (seed or training step, single file or shards) for transformers' from_pretrained;
import then export gives back the same files, export then import the same checkpoint; mistakes
are one line and exit status 2."""

import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.models.test_hf_parity import TINY, assert_same_logits, tiny_hf  # noqa: E402
from torchmoe.config.load import load_config, to_toml  # noqa: E402
from torchmoe.config.registry import build_model  # noqa: E402
from torchmoe.convert.hf.convert import import_hf  # noqa: E402
from torchmoe.convert.hf.io import read_safetensors  # noqa: E402
from torchmoe.train.checkpoint import CheckpointManager, TrainState  # noqa: E402
from torchmoe.train.trainer import Trainer  # noqa: E402

Trainer = functools.partial(Trainer, device=torch.device("cpu"))
ROOT = Path(__file__).resolve().parents[2]


def load_seed(folder: Path, step: str = "step-0") -> dict[str, torch.Tensor]:
    """Every model tensor of a torchmoe checkpoint, by name."""
    meta = dcp.FileSystemReader(str(folder / step)).read_metadata().state_dict_metadata
    state = {
        k.removeprefix("train.model."): torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in meta.items()
        if k.startswith("train.model.")
    }
    dcp.load({"train": {"model": state}}, checkpoint_id=str(folder / step))
    return state


def from_pretrained(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


def run(script, *args: str) -> int:
    return script("convert_hf").main([str(a) for a in args])


@pytest.mark.parametrize("case", list(TINY))
def test_import_then_export_gives_back_the_files(case, tmp_path, script):
    hf = tiny_hf(case)
    hf.save_pretrained(tmp_path / "hf")
    assert run(script, "import", "--hf", tmp_path / "hf", "--out", tmp_path / "ckpt") == 0
    assert (
        run(
            script,
            "export",
            "--checkpoint",
            tmp_path / "ckpt" / "step-0",
            "--config",
            tmp_path / "ckpt" / "model.toml",
            "--out",
            tmp_path / "out",
            "--max-shard-size",
            "40KB",
            "--dtype",
            "fp32",
        )
        == 0
    )
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    released = json.loads((tmp_path / "hf" / "config.json").read_text())
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    # the released config is carried through: its keys kept, max_position_embeddings untouched
    assert released.keys() - {"torch_dtype"} <= exported.keys()
    assert exported["max_position_embeddings"] == released["max_position_embeddings"]
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "generation_config.json").read_text()
    )
    before, after = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    if hf.config.tie_word_embeddings:  # written untied: torchmoe's head is its own tensor
        assert torch.equal(after.pop("lm_head.weight"), before["model.embed_tokens.weight"])
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if getattr(hf.config, "rope_interleave", True):
        assert not changed
    else:  # exported with DeepSeek's own (interleaved) rotary layout
        assert {k.split(".")[-2] for k in changed} == {"q_proj", "kv_a_proj_with_mqa"}
    assert_same_logits(
        lambda t: from_pretrained(tmp_path / "out")(t).logits, hf, hf.config.vocab_size
    )
    # by default the weights are written in bfloat16
    args = [
        "--checkpoint",
        tmp_path / "ckpt" / "step-0",
        "--config",
        tmp_path / "ckpt" / "model.toml",
    ]
    assert run(script, "export", *args, "--out", tmp_path / "bf16") == 0
    bf16 = read_safetensors(tmp_path / "bf16")
    router = (".gate.weight", "e_score_correction_bias")  # kept float32, as transformers does
    assert all(t.dtype == torch.bfloat16 for k, t in bf16.items() if not k.endswith(router))
    assert all(t.dtype == torch.float32 for k, t in bf16.items() if k.endswith(router))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = read_safetensors(tmp_path / "out")
    assert bf16.keys() == fp32.keys()
    for k, t in bf16.items():
        torch.testing.assert_close(t.float(), fp32[k], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("deepseek_v3", {"model.mtp_num_layers": 2}),  # MTP layers, random expert bias
        ("qwen3_moe", {"moe.layer_freq": "0,1,1", "moe.shared_expert_intermediate_size": 0}),
        # softmax over the top-k logits equals Mixtral's renormalised top-k of the full softmax
        ("mixtral", {"moe.router_pre_softmax": "false", "moe.shared_expert_intermediate_size": 0}),
    ],
)
def test_export_then_import_is_the_identity(family, overrides, tiny_config, tmp_path, script):
    cfg = tiny_config(**{"model.name": family, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "norm" in name or name.endswith("expert_bias"):
                t.normal_()
    CheckpointManager(
        cfg.checkpoint, tmp_path / "seed", model, None, None, None, TrainState()
    ).save_seed()
    (tmp_path / "recipe.toml").write_text(to_toml(cfg))
    assert (
        run(
            script,
            "export",
            "--checkpoint",
            tmp_path / "seed" / "step-0",
            "--config",
            tmp_path / "recipe.toml",
            "--out",
            tmp_path / "hf",
            "--dtype",
            "fp32",
        )
        == 0
    )
    assert run(script, "import", "--hf", tmp_path / "hf", "--out", tmp_path / "back") == 0
    before, after = load_seed(tmp_path / "seed"), load_seed(tmp_path / "back")
    assert before.keys() == after.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    assert_same_logits(model, from_pretrained(tmp_path / "hf"), cfg.model.vocab_size)


def test_training_starts_from_an_import_and_its_steps_export(tmp_path, script, capsys):
    hf = tiny_hf("mixtral", vocab_size=4224)  # the bundled tokenizer's vocabulary
    hf.save_pretrained(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert run(script, "import", "--hf", tmp_path / "hf", "--out", ckpt) == 0
    overrides = capsys.readouterr().out.splitlines()[-1]
    assert "--model.name mixtral" in overrides and f"--checkpoint.folder {ckpt}" in overrides
    text = tmp_path / "text.txt"
    text.write_text("Experts route tokens; routers pick experts.\n" * 200)
    train = [
        "--job.dump_folder",
        str(tmp_path / "run"),
        "--data.dataset",
        str(text),
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--training.steps",
        "2",
        "--checkpoint.interval",
        "2",
        "--lr_scheduler.warmup_steps",
        "1",
    ]
    cfg, _ = load_config(["--config", str(ckpt / "model.toml"), *train])
    same, _ = load_config(shlex.split(overrides) + train)  # the printed overrides say the same
    assert (same.model, same.moe, same.checkpoint) == (cfg.model, cfg.moe, cfg.checkpoint)
    trainer = Trainer(cfg)
    assert trainer.checkpoint.load() == 0
    trainer.model.eval()
    assert_same_logits(trainer.model, hf, 4224)
    trainer.model.train()
    trainer.train()
    assert trainer.checkpoint.saved_steps() == [0, 2]  # step-2 holds the optimizer state too
    assert (
        run(
            script,
            "export",
            "--checkpoint",
            ckpt / "step-2",
            "--config",
            ckpt / "model.toml",
            *train,
            "--out",
            tmp_path / "out",
            "--dtype",
            "fp32",
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    trainer.model.eval()
    assert_same_logits(trainer.model, from_pretrained(tmp_path / "out"), 4224)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Mixtral: its transformers folder and its import."""
    root = tmp_path_factory.mktemp("imported")
    tiny_hf("mixtral").save_pretrained(root / "hf")
    import_hf(root / "hf", root / "ckpt")
    return root


def _broken_hf(root: Path, tmp_path: Path, case: str) -> Path:
    """A copy of the imported model's transformers folder with one mistake."""
    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.loads((root / "hf" / "config.json").read_text())
    tensors = load_file(root / "hf" / "model.safetensors")
    if case == "model_type":
        config["model_type"] = "gpt2"
    elif case == "unsupported":
        config["sliding_window"] = 4096
    elif case == "missing_tensor":
        del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    elif case == "shape":
        config["intermediate_size"] = 40
    if case != "no_config":
        (hf / "config.json").write_text(json.dumps(config))
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_config", "config.json: no such file"),
        ("model_type", "model_type = 'gpt2' has no torchmoe converter"),
        ("unsupported", "sliding_window = 4096 is not supported"),
        ("missing_tensor", "tensor model.layers.1.block_sparse_moe.experts.3.w2.weight is missing"),
        ("shape", "has shape [32, 64], config.json implies [40, 64]"),
        ("out_taken", "already exists and is not an empty folder"),
        ("no_hf_flag", "the following arguments are required: --hf"),
    ],
)
def test_import_mistakes_are_one_line_and_exit_2(case, message, imported, tmp_path, script, capsys):
    hf = _broken_hf(imported, tmp_path, case)
    out = imported / "ckpt" if case == "out_taken" else tmp_path / "ckpt"
    args = ["import", "--out", out] + ([] if case == "no_hf_flag" else ["--hf", hf])
    code = run(script, *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("no_checkpoint", [], "not a torchmoe checkpoint"),
        ("other_model", ["--model.n_layers", "1"], "which the recipe's model lacks"),
        (
            "inexpressible",
            ["--moe.router_norm_topk_prob", "false"],
            "moe.router_norm_topk_prob = False cannot be expressed as MixtralForCausalLM",
        ),
        ("shard_size", ["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        ("recipe_key", ["--model.dimm", "3"], "unknown key 'model.dimm'"),
    ],
)
def test_export_mistakes_are_one_line_and_exit_2(
    case, extra, message, imported, tmp_path, script, capsys
):
    ckpt = imported / "ckpt"
    step = ckpt / ("step-7" if case == "no_checkpoint" else "step-0")
    code = run(
        script,
        "export",
        "--checkpoint",
        step,
        "--config",
        ckpt / "model.toml",
        "--out",
        tmp_path / "out",
        *extra,
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_the_script_prints_one_line_not_a_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_hf.py"),
            "import",
            "--hf",
            str(tmp_path),
            "--out",
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_export_drops_released_keys_that_no_longer_hold(tmp_path, script):
    """auto_map names remote code the folder does not carry; quantization_config describes
    weights written dequantized; rope_scaling would be read instead of our rope_parameters."""
    tiny_hf("qwen3_moe").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert run(script, "import", "--hf", tmp_path / "hf", "--out", tmp_path / "ckpt") == 0
    (tmp_path / "ckpt" / "hf_original" / "config.json").write_text(
        json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 8.0}})
    )
    recipe = ["--config", tmp_path / "ckpt" / "model.toml"]
    out = tmp_path / "out"
    assert (
        run(script, "export", "--checkpoint", tmp_path / "ckpt" / "step-0", *recipe, "--out", out)
        == 0
    )
    exported = json.loads((out / "config.json").read_text())
    assert not {"auto_map", "rope_scaling", "torch_dtype"} & exported.keys()
    loaded = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert loaded.rope_parameters["rope_type"] == "default"
