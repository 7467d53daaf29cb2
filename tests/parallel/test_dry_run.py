"""COMM_MODE=fake plans a layout for many ranks in one CPU process."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dry_run(ngpu: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMM_MODE": "fake", "NGPU": str(ngpu)}
    return subprocess.run(
        ["./run_train.sh", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The dry run's table: its column names, and each rank's label -> cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GiB per rank"))
    columns = lines[start].split()[3:]
    cells = {
        " ".join(line.split()[: -len(columns)]): line.split()[-len(columns) :]
        for line in lines[start + 1 :]
        if line.strip()
    }
    return columns, cells


def gib(out: str, row: str, column: str) -> float:
    columns, cells = table(out)
    return float(cells[row][columns.index(column)])


def rows(out: str) -> list[str]:
    return list(table(out)[1])


def test_671b_on_256_ranks_with_ep64():
    proc = dry_run(256, "--config", "train_configs/deepseek_v3_671b.toml", "--parallelism.ep", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "256 ranks: dp_replicate 1 dp_shard 256 cp 1 tp 1 pp 1 ep 64 etp 1" in out
    assert "experts sharded over edp 4" in out
    assert rows(out) == ["rank 0"]
    total = float(re.search(r"([\d.]+)B parameters", out).group(1)) * 1e9
    per_rank = gib(out, "rank 0", "params") * 2**30
    assert abs(per_rank - 4 * total / 256) / per_rank < 0.02  # every weight sharded 256 ways
    assert abs(gib(out, "rank 0", "AdamW") - 2 * gib(out, "rank 0", "params")) < 0.02


def test_deepseek_v3_671b_seed_layout_tp2_pp16_ep64_on_1024_ranks():
    proc = dry_run(
        1024,
        "--config",
        "train_configs/deepseek_v3_671b.toml",
        "--parallelism.tp",
        "2",
        "--parallelism.pp",
        "16",
        "--parallelism.ep",
        "64",
        "--training.local_batch_size",
        "16",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "1024 ranks: dp_replicate 1 dp_shard 32 cp 1 tp 2 pp 16 ep 64 etp 1" in out
    assert "pipeline 1F1B, 16 micro-batches: stage 0: embedding + blocks 0-" in out
    labels = rows(out)
    assert labels == [f"pp rank {r} (stage {r})" for r in range(16)]
    total = float(re.search(r"([\d.]+)B parameters", out).group(1)) * 1e9
    held = sum(gib(out, row, "params") for row in labels) * 2**30
    # each stage's weights are split over the 64 ranks of its pipeline position, once
    assert abs(held * 64 - 4 * total) / (4 * total) < 0.02
    # 1F1B: pp - rank micro-batches in flight; the last rank also holds the logits
    acts = [gib(out, row, "activations") for row in labels]
    assert acts[0] > 2 * acts[14] and acts[1] > acts[14]
    assert "UserWarning" not in proc.stderr


@pytest.mark.parametrize(
    "ngpu,extra,layout",
    [
        (8, [], "8 ranks: dp_replicate 1 dp_shard 8 cp 1 tp 1 pp 1 ep 8"),
        (
            64,
            [
                "--parallelism.pp",
                "4",
                "--parallelism.pp_schedule",
                "Interleaved1F1B",
                "--training.local_batch_size",
                "8",
                "--parallelism.dp_replicate",
                "2",
            ],
            "64 ranks: dp_replicate 2 dp_shard 8 cp 1 tp 1 pp 4 ep 8",
        ),
    ],
)
def test_mixtral_8x7b_seed_layouts(ngpu, extra, layout):
    proc = dry_run(ngpu, "--config", "train_configs/mixtral_8x7b.toml", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert layout in proc.stdout
    assert "mixtral/8x7B, 46.7B parameters" in proc.stdout
    if "Interleaved1F1B" in extra:  # rank r holds stages r and r + 4
        assert rows(proc.stdout) == [f"pp rank {r} (stages {r}, {r + 4})" for r in range(4)]


def test_fewer_experts_per_rank_means_smaller_fsdp_buffers():
    base = dry_run(16, "--config", "train_configs/deepseek_v3.toml", "--parallelism.ep", "1")
    ep8 = dry_run(16, "--config", "train_configs/deepseek_v3.toml", "--parallelism.ep", "8")
    assert base.returncode == ep8.returncode == 0, base.stderr[-2000:] + ep8.stderr[-2000:]
    assert gib(ep8.stdout, "rank 0", "FSDP-buf") < gib(base.stdout, "rank 0", "FSDP-buf") / 4


def test_invalid_layout_is_the_usual_one_line_error():
    proc = dry_run(1024, "--config", "train_configs/deepseek_v3_671b.toml", "--parallelism.ep", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: parallelism.ep = 3 x parallelism.etp = 1 must divide dp_shard x cp x tp = 1024, "
        "the ranks expert parallelism borrows from; on fewer GPUs lower parallelism.ep"
    ]


def test_context_parallel_ranks_hold_a_share_of_the_sequence_and_the_gathered_keys():
    """32K tokens on 16 ranks: cp 4 holds a quarter of each sequence's activations, plus the
    keys and values gathered from the other cp ranks."""
    args = ("--config", "train_configs/deepseek_v3.toml", "--parallelism.ep", "8")
    long = ("--training.seq_len", "32768")
    cp1 = dry_run(16, *args, *long)
    cp4 = dry_run(16, *args, *long, "--parallelism.cp", "4")
    assert cp1.returncode == cp4.returncode == 0, cp1.stderr[-2000:] + cp4.stderr[-2000:]
    assert "16 ranks: dp_replicate 1 dp_shard 4 cp 4 tp 1 pp 1 ep 8" in cp4.stdout
    ratio = gib(cp4.stdout, "rank 0", "activations") / gib(cp1.stdout, "rank 0", "activations")
    assert 0.25 < ratio < 0.4
    # dense weights shard over dp_shard x cp: the same 16 ways as dp_shard 16
    assert gib(cp4.stdout, "rank 0", "params") == gib(cp1.stdout, "rank 0", "params")


def test_context_parallel_ranks_gather_fsdp_weights_like_data_parallel_ones():
    args = ("--config", "train_configs/deepseek_v3.toml", "--parallelism.ep", "1")
    dp2 = dry_run(2, *args)
    cp2 = dry_run(2, *args, "--parallelism.cp", "2", "--parallelism.dp_shard", "1")
    assert dp2.returncode == cp2.returncode == 0, dp2.stderr[-2000:] + cp2.stderr[-2000:]
    assert gib(cp2.stdout, "rank 0", "FSDP-buf") == gib(dp2.stdout, "rank 0", "FSDP-buf") > 0


def test_the_sync_free_dispatchers_fixed_blocks_are_planned():
    """Dropless sync_free holds a block of every token for every expert (E rows per token
    instead of top-k); padded to a capacity it holds the capacity's blocks."""
    args = ("--config", "train_configs/deepseek_v3.toml", "--parallelism.ep", "8")
    runs = {
        name: dry_run(8, *args, *extra)
        for name, extra in {
            "alltoall": (),
            "sync_free": ("--moe.dispatcher", "sync_free"),
            "sync_free_capacity": (
                "--moe.dispatcher",
                "sync_free",
                "--moe.capacity_factor",
                "1.0",
                "--moe.pad_to_capacity",
                "true",
            ),
        }.items()
    }
    assert all(p.returncode == 0 for p in runs.values()), [p.stderr[-500:] for p in runs.values()]
    acts = {name: gib(p.stdout, "rank 0", "activations") for name, p in runs.items()}
    assert acts["sync_free"] > 3 * acts["alltoall"]
    assert acts["sync_free_capacity"] == acts["alltoall"]  # capacity 1.0: k rows per token
