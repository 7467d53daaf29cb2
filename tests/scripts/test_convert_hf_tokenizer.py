"""A released model's tokenizer travels with it: import copies tokenizer.json and its config
beside the checkpoint and points the recipe at them, training uses it, export writes it back
for transformers."""

import functools
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.test_hf_parity import tiny_hf  # noqa: E402
from tests.tokenizer_files import CONFIG, train_tokenizer  # noqa: E402
from torchmoe.config.load import load_config  # noqa: E402
from torchmoe.data.stdlib_docs import load_stdlib_docs  # noqa: E402
from torchmoe.data.tokenizer import build_tokenizer  # noqa: E402
from torchmoe.train.trainer import Trainer  # noqa: E402

Trainer = functools.partial(Trainer, device=torch.device("cpu"))


def run(script, *args) -> int:
    return script("convert_hf").main([str(a) for a in args])


def test_import_trains_with_and_exports_the_tokenizer(tmp_path: Path, script, data_cache, capsys):
    hf = tmp_path / "hf"
    tiny_hf("qwen3_moe", vocab_size=640).save_pretrained(hf)
    train_tokenizer(load_stdlib_docs(data_cache)[:200], hf, CONFIG)
    ckpt = tmp_path / "ckpt"
    assert run(script, "import", "--hf", hf, "--out", ckpt) == 0
    assert f"--model.tokenizer_path {ckpt / 'tokenizer'}" in capsys.readouterr().out
    assert sorted(p.name for p in (ckpt / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    train = ["--job.dump_folder", tmp_path / "run", "--data.cache_dir", data_cache]
    train += ["--training.seq_len", "32", "--training.local_batch_size", "2"]
    train += ["--training.steps", "2", "--checkpoint.interval", "2"]
    cfg, _ = load_config(["--config", str(ckpt / "model.toml"), *map(str, train)])
    trainer = Trainer(cfg)
    assert trainer.tokenizer.digest == build_tokenizer(str(hf)).digest
    trainer.train()
    out = tmp_path / "out"
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
            out,
            "--dtype",
            "fp32",
        )
        == 0
    )
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    reference = transformers.AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    text = "def route(tokens): return experts"
    assert reference.encode(text, add_special_tokens=False) == trainer.tokenizer.encode(text)


def test_a_tokenizer_larger_than_the_model_is_one_line(tmp_path: Path, script, data_cache, capsys):
    hf = tmp_path / "hf"
    tiny_hf("qwen3_moe", vocab_size=256).save_pretrained(hf)
    train_tokenizer(load_stdlib_docs(data_cache)[:200], hf, CONFIG)  # 600 ids
    capsys.readouterr()  # transformers' progress bar while saving
    assert run(script, "import", "--hf", hf, "--out", tmp_path / "ckpt") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "the tokenizer has 600 ids but config.json's" in err
    assert not (tmp_path / "ckpt").exists()  # nothing written
