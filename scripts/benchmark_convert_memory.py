"""Peak memory of scripts/convert_hf.py import and export on a model larger than its shards.

    python scripts/benchmark_convert_memory.py [--experts 64 --dim 1024 --layers 4 \\
        --shard-mb 256 --work /tmp/convert_memory]

Writes a randomly initialised DeepSeek-V3-shaped model (float32) as a Hugging Face folder in
shards of --shard-mb, then runs import (-> a torchmoe seed checkpoint) and export (-> a float32
Hugging Face folder in shards of --shard-mb) each in a fresh process, and prints one table:
the model's size, its largest shard and tensor, and each process's peak resident memory above
that of a process that only imports the converter (the interpreter, torch, the code).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.convert.hf import adapter_for_family
from torchmoe.convert.hf.io import write_hf_shards
from torchmoe.convert.hf.mapping import to_hf

SCRIPT = Path(__file__).resolve().parent / "convert_hf.py"
_PEAK = """
import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    {run}
except SystemExit as e:
    if e.code:
        raise
# this process's own high-water mark (ru_maxrss would carry the forking parent's over exec)
print("PEAK", re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def recipe(experts: int, dim: int, layers: int) -> list[tuple[str, str]]:
    return [
        ("model.name", "deepseek_v3"),
        ("model.dim", str(dim)),
        ("model.n_layers", str(layers)),
        ("model.n_dense_layers", "1"),
        ("model.inter_dim", str(4 * dim)),
        ("model.n_heads", "8"),
        ("model.vocab_size", "32000"),
        ("moe.num_experts", str(experts)),
        ("moe.ffn_hidden_size", str(dim)),
        ("moe.shared_expert_intermediate_size", str(dim)),
        ("parallelism.ep", "1"),
    ]


def write_hf_model(folder: Path, keys: list[tuple[str, str]], shard_bytes: int) -> dict:
    """A random model as a Hugging Face folder; returns its sizes (bytes)."""
    cfg = build_config({}, keys)
    model = build_model(cfg)
    model.init_weights(0.02, cfg.model.n_layers)
    adapter = adapter_for_family("deepseek_v3")
    hf = {"architectures": [adapter.architecture], "model_type": adapter.model_type}
    hf |= adapter.to_hf_config(cfg)
    tensors = to_hf(model.state_dict(), adapter.rules(cfg, hf), "deepseek_v3")
    del model
    groups = [{k: t} for k, t in tensors.items()]
    write_hf_shards(folder, groups, lambda g: g, lambda g: g, shard_bytes)
    (folder / "config.json").write_text(json.dumps(hf))
    shards = [f.stat().st_size for f in folder.glob("*.safetensors")]
    with torch.device("meta"):
        meta = build_model(build_config({}, keys)).state_dict()
    stacked = max(t.numel() * t.element_size() for t in meta.values())
    return {"model": sum(shards), "largest shard": max(shards), "largest tensor": stacked}


def peak_rss(run: str, args: list[str]) -> int:
    """Peak resident bytes of a fresh Python process running ``run`` with ``args``."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK.format(run=run), "x", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split("PEAK")[-1]) * 1024


def measure(work: Path, experts: int, dim: int, layers: int, shard_mb: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    keys = recipe(experts, dim, layers)
    sizes = write_hf_model(work / "hf", keys, shard_mb * 2**20)
    baseline = peak_rss("import torchmoe.convert.hf.convert", [])
    convert = f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    imported = peak_rss(convert, ["import", "--hf", str(work / "hf"), "--out", str(work / "ckpt")])
    overrides = [a for k, v in keys for a in (f"--{k}", v)]
    export = ["export", "--checkpoint", str(work / "ckpt" / "step-0"), *overrides]
    export += ["--out", str(work / "out"), "--dtype", "fp32", "--max-shard-size", f"{shard_mb}MB"]
    exported = peak_rss(convert, export)
    return sizes | {
        "baseline": baseline,
        "import peak": imported,
        "export peak": exported,
        "import above baseline": imported - baseline,
        "export above baseline": exported - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert_memory"))
    args = parser.parse_args()
    row = measure(args.work, args.experts, args.dim, args.layers, args.shard_mb)
    print("| what | MiB |\n|---|---|")
    for name, value in row.items():
        print(f"| {name} | {value / 2**20:,.0f} |")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
