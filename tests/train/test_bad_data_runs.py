"""A training run over data with bad rows goes on, counts them and resumes exactly; too many bad
rows or no documents at all end it with one line and exit status 2 (python -m torchmoe.train)."""

import json
import logging
import random
import shutil

import pytest

from torchmoe.train.__main__ import main
from torchmoe.train.trainer import Trainer


def write_corpus(path, rng: random.Random, n: int, bad_rows: dict[int, bytes]) -> None:
    words = ["alpha", "beta", "gamma", "delta", "é", "中", "42"]
    lines = [
        bad_rows.get(
            i, json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 40)))}).encode()
        )
        for i in range(n)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_rows_are_skipped_and_the_resume_is_exact(tmp_path, tiny_config, rng, caplog):
    corpus = tmp_path / "corpus.jsonl"
    bad = {3: b'{"text": "caf\xe9"}', 7: b'{"body": 1}', 11: b'{"text": ""}', 16: b"{cut"}
    write_corpus(corpus, rng, 20, bad)  # 8 steps read every row at least once
    keys = {
        "data.dataset": str(corpus),
        "data.max_bad_fraction": "0.5",  # 4 of 20 rows: 0.001 would stop the run
        "training.steps": "8",
        "checkpoint.enable": "true",
        "checkpoint.interval": "4",
    }
    with caplog.at_level(logging.INFO):
        uninterrupted = Trainer(tiny_config(**keys, **{"job.dump_folder": tmp_path / "a"})).train()
    assert len(uninterrupted) == 8  # the run went on
    for reason in ("not valid UTF-8", "no 'text' value", "empty document", "not valid JSON"):
        assert reason in caplog.text  # each named in a warning
    assert "data rows skipped as bad" in caplog.text  # the summary counts them
    assert "bad rows skipped " in caplog.text  # and the log line
    shutil.copytree(
        tmp_path / "a" / "checkpoint" / "step-4", tmp_path / "b" / "checkpoint" / "step-4"
    )
    resumed = Trainer(tiny_config(**keys, **{"job.dump_folder": tmp_path / "b"})).train()
    assert resumed == pytest.approx(uninterrupted[4:], rel=1e-6)


def test_too_many_bad_rows_end_the_run_in_one_line(tmp_path, data_cache, rng, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, rng, 40, {i: b'{"text": 7}' for i in range(0, 40, 3)})
    status = main(
        ["--data.dataset", str(corpus), "--data.cache_dir", data_cache]
        + ["--job.dump_folder", str(tmp_path / "run"), "--training.steps", "3"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("error: data: ") and "rows read are bad" in err[-1]
    assert f"{corpus} row " in err[-1] and "'text' is int, not text" in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("layout", ["empty file", "folder of empty files"])
def test_no_documents_is_one_line_before_training(tmp_path, data_cache, capsys, layout):
    target = tmp_path / ("e.jsonl" if layout == "empty file" else "data")
    if layout == "empty file":
        target.write_text("")
    else:
        target.mkdir()
        (target / "a.txt").write_text("\n\n")
        (target / "b.txt").write_text("")
    status = main(
        ["--data.dataset", str(target), "--data.cache_dir", data_cache]
        + ["--job.dump_folder", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len([line for line in err if "error:" in line]) == 1
    assert err[-1].startswith(f"error: data.dataset = '{target}' holds no documents")
