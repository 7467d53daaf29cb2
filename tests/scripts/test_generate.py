"""scripts/generate.py: greedy generation from an imported model equals transformers' greedy
generate token for token (a batch of prompts of different lengths), from a Hugging Face folder
and from a torchmoe checkpoint; sampling is seeded; mistakes are one line."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.test_hf_parity import tiny_hf  # noqa: E402
from tests.tokenizer_files import CONFIG, train_tokenizer  # noqa: E402
from torchmoe.data.stdlib_docs import load_stdlib_docs  # noqa: E402

PROMPTS = ["def route(tokens):", "The expert", "Return the value of", "x"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, data_cache) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "hf"
    tiny_hf("qwen3_moe", vocab_size=640).save_pretrained(folder)
    train_tokenizer(load_stdlib_docs(data_cache)[:200], folder, CONFIG)
    return folder


def blocks(out: str) -> list[str]:
    return [b.split("\n", 1)[1][:-1] for b in out.split("=== ")[1:]]  # print's newline


def test_greedy_equals_transformers(hf_dir: Path, script, capsys):
    args = ["--hf", str(hf_dir), "--max-new-tokens", "8"]
    assert script("generate").main([*args, *(a for p in PROMPTS for a in ("--prompt", p))]) == 0
    ours = blocks(capsys.readouterr().out)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        out = model.generate(
            ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )
        expected.append(tokenizer.decode(out[0, ids.shape[1] :]))
    assert ours == expected
    assert len(set(expected)) > 1 and all(expected)  # real, different continuations


def test_a_checkpoint_generates_what_its_hf_folder_does(hf_dir: Path, tmp_path, script, capsys):
    assert (
        script("convert_hf").main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "c")])
        == 0
    )
    capsys.readouterr()
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    assert script("generate").main(["--hf", str(hf_dir), *prompts]) == 0
    from_hf = capsys.readouterr().out
    ckpt = [
        "--checkpoint",
        str(tmp_path / "c" / "step-0"),
        "--config",
        str(tmp_path / "c" / "model.toml"),
    ]
    assert script("generate").main([*ckpt, *prompts]) == 0
    assert capsys.readouterr().out == from_hf


def test_sampling_is_seeded(hf_dir: Path, script, capsys):
    args = ["--hf", str(hf_dir), "--prompt", "The", "--temperature", "1.0", "--top-p", "0.9"]
    runs = []
    for seed in ("1", "1", "2"):
        assert script("generate").main([*args, "--seed", seed, "--max-new-tokens", "12"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_mistakes_are_one_line(hf_dir: Path, script, capsys):
    assert script("generate").main(["--hf", str(hf_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert script("generate").main(["--prompt", "x"]) == 2
    assert script("generate").main(["--hf", str(hf_dir), "--prompt", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "--prompt is empty" in err[-1]


def test_a_prompt_longer_than_the_training_length(hf_dir: Path, script, capsys):
    """The rotary table grows to the prompt plus the new tokens (the import's default is 128)."""
    long_prompt = " ".join(["route the tokens"] * 60)
    assert script("generate").main(["--hf", str(hf_dir), "--prompt", long_prompt]) == 0
    assert capsys.readouterr().out.startswith(f"=== {long_prompt}\n")


def test_generation_stops_at_any_stop_token(hf_dir: Path):
    from tests.models.test_hf_parity import torchmoe_from_hf
    from torchmoe.data.tokenizer import build_tokenizer
    from torchmoe.inference.generate import generate

    _, model = torchmoe_from_hf(hf_dir)
    prompt = build_tokenizer(str(hf_dir)).encode("The expert")
    [free] = generate(model, [prompt], 6, stop_ids={-1})
    assert len(free) == 6
    [stopped] = generate(model, [prompt], 6, stop_ids={free[2]})
    assert stopped == free[: free.index(free[2]) + 1]  # up to and including the stop token
