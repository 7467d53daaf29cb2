"""Config loading: precedence, typed overrides, round trip, and every error class."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config, load_config, read_toml, to_toml
from torchmoe.config.schema import section_types
from torchmoe.models.deepseek_v3.flavors import FLAVORS

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> str:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return str(p)


def test_flavor_fills_unset_keys_and_overrides_win(tmp_path):
    path = write(tmp_path, '[model]\nflavor = "16B"\ndim = 512\n')
    cfg, _ = load_config(["--config", path, "--model.n_layers", "4", "--moe.router_topk=3"])
    assert cfg.model.dim == 512  # recipe beats flavor
    assert cfg.model.n_layers == 4  # CLI beats flavor
    assert cfg.moe.router_topk == 3
    assert cfg.model.n_heads == FLAVORS["16B"]["model"]["n_heads"]  # from the flavor
    assert cfg.moe.num_experts == 64


def test_cli_overrides_recipe_and_types_are_converted(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 10\n[checkpoint]\nenable = false\n")
    cfg, _ = load_config(
        [
            "--config",
            path,
            "--training.steps",
            "20",
            "--checkpoint.enable",
            "--optimizer.lr",
            "1e-4",
            "--quantize.float8_exclude",
            "output,gate",
        ]
    )
    assert cfg.training.steps == 20
    assert cfg.checkpoint.enable is True
    assert cfg.optimizer.lr == 1e-4
    assert cfg.quantize.float8_exclude == ["output", "gate"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train_configs").glob("*.toml")))
def test_print_config_round_trips(tmp_path, recipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # recipes for one 8-GPU node validate against 8 ranks
    cfg, _ = load_config(
        [
            "--config",
            str(REPO / "train_configs" / recipe),
            "--training.seed",
            "7",
            "--job.description",
            'say "hi"\n\\ é \x7f',
        ]
    )
    again = build_config(read_toml(write(tmp_path, to_toml(cfg))), [])
    assert again == cfg


def test_help_is_the_resolved_config_with_every_key_explained():
    cfg = build_config({}, [("model.flavor", "16B")])
    text = to_toml(cfg, with_help=True)
    assert "# Router scores. (one of softmax, sigmoid)" in text
    assert 'router_score_function = "softmax"' in text  # the flavor's value, not the default
    comments = [line for line in text.splitlines() if line.startswith("# ")]
    keys = [line for line in text.splitlines() if " = " in line and not line.startswith("#")]
    n_fields = sum(len(dataclasses.fields(t)) for t in section_types().values())
    assert len(comments) == len(keys) == n_fields


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--modle.dim", "3"], "unknown section [modle]; did you mean 'model'?"),
        (["--model.dimm", "3"], "unknown key 'model.dimm'; did you mean 'dim'?"),
        (["--model.dim", "big"], "model.dim = 'big' is not a valid int"),
        (["--checkpoint.enable", "maybe"], "checkpoint.enable = 'maybe' is not a valid bool"),
        (["--model.dim", "0"], "model.dim = 0 is out of range; it must be > 0"),
        (["--optimizer.beta1", "1.5"], "optimizer.beta1 = 1.5 is out of range; it must be <= 1"),
        (
            ["--training.grads_per_fold", "9"],
            "training.grads_per_fold = 9 is out of range; it must be <= 8",
        ),
        (["--moe.router_score_function", "relu"], "choose one of: softmax, sigmoid"),
        (["--model.flavor", "17B"], "model.flavor = '17B' is not a flavor of deepseek_v3"),
        (["--model.name", "gpt"], "model.name = 'gpt' is not a model family"),
        (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
        (["--model.dim"], "--model.dim needs a value"),
        (["model.dim", "3"], "unexpected argument 'model.dim'"),
        (["--config="], "--config takes one recipe file"),
        (["--config", "a.toml", "--config", "b.toml"], "--config takes one recipe file"),
        (
            ["--checkpoint.load_step", "5"],
            "checkpoint.load_step = 5 needs checkpoint.enable = true",
        ),
        pytest.param(
            ["--parallelism.fsdp_cpu_offload"],
            "needs CUDA; this machine has none",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check"),
        ),
        (
            ["--moe.load_balancing_type", "none", "--moe.aux_loss_coeff", "0.01"],
            'moe.load_balancing_type = ["none"] needs moe.aux_loss_coeff = [0.0] (you set [0.01])',
        ),
        (["--moe.router_topk", "9"], "moe.router_topk = 9 exceeds moe.num_experts = 8"),
        (["--moe.router_num_groups", "3"], "must divide moe.num_experts"),
        (["--training.global_batch_size", "12"], "must be a multiple of training.local_batch_size"),
        (
            [
                "--moe.load_balancing_type",
                "aux_loss,seq_aux_loss",
                "--moe.aux_loss_coeff",
                "0.1,0.2,0.3",
            ],
            "needs one value, or one per loss",
        ),
        (["--moe.load_balancing_type", "aux_loss,aux_loss"], "lists a type twice"),
        (
            [
                "--moe.load_balancing_type",
                "aux_loss,seq_aux_loss,global_aux_loss",
                "--moe.aux_loss_coeff",
                "0.1,0.2",
            ],
            "needs one value, or one per loss",
        ),
        (["--moe.load_balancing_type", "sinkhorn,aux_loss"], "'none' and 'sinkhorn' stand alone"),
        (
            ["--moe.load_balancing_type", "sinkhorn", "--moe.enable_expert_bias", "true"],
            "needs moe.enable_expert_bias = false (you set true)",
        ),
        (["--moe.load_balancing_type", "balanced"], "choose from: aux_loss, seq_aux_loss"),
        (
            ["--moe.router_pre_softmax", "false"],
            "only applies to moe.router_score_function = 'softmax'",
        ),
        (["--moe.pad_to_capacity"], "moe.pad_to_capacity = true needs token dropping"),
        (["--moe.capacity_factor", "-1"], "moe.capacity_factor = -1.0 is out of range"),
        (["--moe.layer_freq", "0,1"], "must be one 0/1 entry per block (model.n_layers = 3)"),
        (["--moe.layer_freq", "0"], "an interval must be >= 1"),
        (["--moe.layer_freq", "1,0,0"], "leaves no MoE block"),
        (["--moe.freeze_experts", "3,8"], "list distinct expert ids in [0, 8)"),
        (["--moe.input_jitter_eps", "2"], "moe.input_jitter_eps = 2.0 is out of range"),
        (
            ["--model.name", "llama", "--moe.capacity_factor", "1.0"],
            "moe.capacity_factor = 1.0 has no effect in a dense model",
        ),
        (
            ["--moe.input_jitter_eps", "0.01", "--activation_checkpoint.mode", "full"],
            "draws new noise when activation checkpointing recomputes the router",
        ),
        (
            ["--model.flavor", "16B", "--moe.load_balancing_type", "global_aux_loss"],
            "moe.aux_loss_coeff = [0.0] gives global_aux_loss no weight",
        ),
        (
            ["--moe.load_balancing_type", "aux_loss,z", "--moe.aux_loss_coeff", "0.1"],
            "is not allowed",
        ),
        (
            ["--moe.load_balancing_type", "aux_loss,seq_aux_loss", "--moe.aux_loss_coeff", "0.1,0"],
            "gives seq_aux_loss no weight",
        ),
    ],
)
def test_errors_are_one_clear_line(argv, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "line,fragment",
    [
        ('[training]\nsteps = "ten"', "training.steps = 'ten' is not a valid int"),
        ('[training]\nsteps = "10"', "training.steps = '10' is not a valid int"),
        ("[training]\nsteps = 1.5", "training.steps = 1.5 is not a valid int"),
        ('[checkpoint]\nenable = "yes"', "checkpoint.enable = 'yes' is not a valid bool"),
        ('[quantize]\nfloat8_exclude = "a,b"', "write several values as a TOML list"),
        ("[quantize]\nfloat8_exclude = 3", "quantize.float8_exclude = 3 is not a str or a list"),
        (
            '[moe]\naux_loss_coeff = ["0.1"]',
            "moe.aux_loss_coeff = ['0.1'] is not a float or a list",
        ),
        ("[optimizer]\nlr = true", "optimizer.lr = True is not a valid float"),
    ],
)
def test_toml_values_are_not_converted_like_cli_strings(tmp_path, line, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(["--config", write(tmp_path, line + "\n")])


def test_toml_file_errors(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[job]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"malformed TOML: .*line 2"):
        load_config(["--config", write(tmp_path, "[training]\nsteps = = 3\n")])
    with pytest.raises(ConfigError, match=r"'training' must be a \[training\] table"):
        load_config(["--config", write(tmp_path, "training = 3\n")])


def test_entry_point_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "torchmoe.train", "--training.stepz", "3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --training.stepz: unknown key 'training.stepz'; did you mean 'steps'?"
    ]
