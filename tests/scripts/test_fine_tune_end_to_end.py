"""A released model end to end (issue 15's acceptance): tiny random transformers Qwen3-MoE and
DeepSeek-V3 models with a tokenizer.json trained by `tokenizers` -> import -> fine-tune 20 steps
on chat data with masked prompts and validation every 5 steps -> export (bf16 and fp32) ->
transformers loads the folder with its tokenizer, and its greedy generation equals
scripts/generate.py token for token on 4 prompts."""

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.test_hf_parity import tiny_hf  # noqa: E402
from tests.tokenizer_files import CHAT_CONFIG, train_tokenizer  # noqa: E402
from torchmoe.data.stdlib_docs import load_stdlib_docs  # noqa: E402

PROMPTS = ["How do experts share", "Route", "Why does the loss", "Balance the load of"]


def chat_rows(rng: random.Random, n: int) -> str:
    words = ["route", "tokens", "to", "experts", "balance", "the", "load", "why", "because"]
    say = lambda k: " ".join(rng.choices(words, k=rng.randint(2, k)))  # noqa: E731
    rows = [
        {
            "messages": [
                {"role": "user", "content": say(6)},
                {"role": "assistant", "content": say(9)},
            ]
        }
        for _ in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_import_fine_tune_export_generate(family, tmp_path: Path, data_cache, script, capsys):
    rng = random.Random(0)
    hf = tmp_path / "released"
    tiny_hf(family, vocab_size=640).save_pretrained(hf)
    train_tokenizer(load_stdlib_docs(data_cache)[:200], hf, CHAT_CONFIG)
    (tmp_path / "chat.jsonl").write_text(chat_rows(rng, 200))
    ckpt = tmp_path / "ckpt"
    assert script("convert_hf").main(["import", "--hf", str(hf), "--out", str(ckpt)]) == 0
    recipe = ["--config", str(ckpt / "model.toml")]
    train = [
        *("--job.dump_folder", str(tmp_path / "run"), "--data.cache_dir", data_cache),
        *("--data.dataset", str(tmp_path / "chat.jsonl"), "--data.format", "chat"),
        *("--model.attn_mask", "block_causal"),  # packed conversations kept apart
        *("--validation.enable", "true", "--validation.freq", "5", "--validation.steps", "2"),
        *("--training.steps", "20", "--training.seq_len", "64", "--training.local_batch_size", "4"),
        *("--checkpoint.interval", "20", "--lr_scheduler.warmup_steps", "2"),
    ]
    from torchmoe.train.__main__ import main as train_main

    assert train_main([*recipe, *train]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    validated = [r["step"] for r in rows if "val_loss" in r]
    assert validated == [5, 10, 15, 20]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learned the chat data
    for dtype in ("bf16", "fp32"):
        out = tmp_path / f"out_{dtype}"
        export = ["export", "--checkpoint", str(ckpt / "step-20"), *recipe, *train]
        assert script("convert_hf").main([*export, "--out", str(out), "--dtype", dtype]) == 0
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (
            next(model.parameters()).dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        )
    out = tmp_path / "out_fp32"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    capsys.readouterr()
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    assert script("generate").main(["--hf", str(out), *prompts, "--max-new-tokens", "10"]) == 0
    ours = [b.split("\n", 1)[1][:-1] for b in capsys.readouterr().out.split("=== ")[1:]]
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        new = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :]
        expected.append(tokenizer.decode(new))
    assert ours == expected and all(expected)
