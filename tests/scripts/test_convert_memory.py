"""Import and export stream: a model several times its largest tensor converts with peak memory
far below the model's size (each in a fresh process, measured by its own high-water mark);
each holds one tensor at a time (export: one expert of a stack)."""

from pathlib import Path


def test_import_and_export_hold_a_few_tensors_not_the_model(script, tmp_path: Path) -> None:
    bench = script("benchmark_convert_memory")
    row = bench.measure(tmp_path / "work", experts=64, dim=384, layers=8, shard_mb=48)
    assert row["model"] > 8 * row["largest tensor"]
    for step in ("import above baseline", "export above baseline"):
        # before streaming both needed at least the whole model (import: about twice it)
        assert row[step] < row["model"] / 3, (step, row)
    # one tensor and a fixed overhead (28-54 MiB measured, the most with the CPUs busy);
    # holding two tensors at once (+47 MiB here) fails
    for step in ("import above baseline", "export above baseline"):
        assert row[step] < row["largest tensor"] + 60 * 2**20, (step, row)
    shards = list((tmp_path / "work" / "out").glob("*.safetensors"))
    assert len(shards) > 8  # sharded, each shard within --max-shard-size (no tensor exceeds it)
    assert all(f.stat().st_size <= 48 * 2**20 + 2**16 for f in shards)  # + the header
