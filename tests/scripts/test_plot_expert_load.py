"""scripts/plot_expert_load.py on a synthetic metrics.jsonl: a PNG with more panels when the run
logged router entropy and drops, the heatmap's load over the chosen window; bad input and a
missing matplotlib are one line and exit status 2."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS, EXPERTS = 3, 16


def write_metrics(folder, rows=12, extra=False):
    """Rows as MetricsLogger.log writes them, with random loads (expert 5 of layer 0 dead)."""
    rng = np.random.default_rng()
    lines = []
    for i in range(rows):
        tokens = rng.integers(0, 500, (LAYERS, EXPERTS)).astype(float)
        tokens[0, 5] = 0
        mean = tokens.mean(1)
        per_layer = {
            "tokens": tokens.tolist(),
            "max_over_mean": (tokens.max(1) / mean).tolist(),
            "cv": (tokens.std(1) / mean).tolist(),
            "dead": (tokens == 0).sum(1).tolist(),
        }
        if extra:
            per_layer["entropy"] = rng.uniform(1, 2, LAYERS).tolist()
            per_layer["dropped_frac"] = rng.uniform(0, 0.1, LAYERS).tolist()
        lines.append(
            json.dumps(
                {
                    "step": 5 * (i + 1),
                    "loss": 9 - i * rng.uniform(0.1, 0.3),
                    "aux_loss": rng.uniform(0, 1e-3),
                    "per_layer": per_layer,
                }
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return [json.loads(line) for line in lines]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.mark.parametrize("extra", [False, True])
def test_writes_a_png_next_to_the_metrics(extra, tmp_path, script, capsys):
    write_metrics(tmp_path / "run", extra=extra)
    assert script("plot_expert_load").main([str(tmp_path / "run")]) == 0
    width, height = png_size(tmp_path / "run" / "expert_load.png")
    assert height > 500 and width > (1700 if extra else 1000)  # four panels below, or two
    assert "expert_load.png" in capsys.readouterr().out


def test_heatmap_load_over_the_last_rows(tmp_path, script):
    rows = write_metrics(tmp_path)
    module = script("plot_expert_load")
    read = module.read_rows(module.find_metrics(tmp_path))
    tokens = np.array([r["per_layer"]["tokens"] for r in rows[-3:]]).sum(0)
    want = tokens / tokens.mean(1, keepdims=True)
    np.testing.assert_allclose(module.relative_load(read[-3:]), want)
    out = tmp_path / "plots" / "last3.png"
    out.parent.mkdir()
    assert (
        module.main(
            [str(tmp_path / "metrics.jsonl"), "--last", "3", "--imbalance", "cv", "--out", str(out)]
        )
        == 0
    )
    png_size(out)


def test_runs_as_a_script(tmp_path, script):
    write_metrics(tmp_path)
    proc = subprocess.run(
        [sys.executable, script("plot_expert_load").__file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    png_size(tmp_path / "expert_load.png")


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no metrics.jsonl"),
        ("empty", "is empty"),
        ("not_json", "line 2 is not JSON"),
        ("no_loads", "has no per-layer expert loads"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, tmp_path, script, capsys):
    metrics = tmp_path / "metrics.jsonl"
    if case == "empty":
        metrics.write_text("\n")
    elif case == "not_json":
        metrics.write_text('{"step": 1, "loss": 9.0}\n{"step": 2,\n')
    elif case == "no_loads":
        metrics.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.5}\n')
    target = tmp_path / "missing" if case == "missing" else tmp_path
    assert script("plot_expert_load").main([str(target)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_without_matplotlib(tmp_path, script, capsys, monkeypatch):
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert script("plot_expert_load").main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and err.count("\n") == 1
