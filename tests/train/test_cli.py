"""The launcher and the entry point, as a user runs them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from torchmoe.config.load import build_config, read_toml

REPO = Path(__file__).resolve().parents[2]
FAST = [
    "--training.steps",
    "3",
    "--training.seq_len",
    "32",
    "--training.local_batch_size",
    "2",
    "--metrics.log_freq",
    "1",
]


# These run the CPU path even on a GPU machine (ranks would otherwise share its GPUs).
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def run(cmd, tmp_path, data_cache, **env):
    full_env = {**CPU_ENV, "NGPU": "1", **env}
    return subprocess.run(
        cmd + FAST + ["--job.dump_folder", str(tmp_path), "--data.cache_dir", data_cache],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=300,
    )


def test_run_train_sh_trains_the_default_recipe_through_torchrun(tmp_path, data_cache):
    proc = run(["./run_train.sh"], tmp_path, data_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3]
    assert "step 3/3 (100%) | loss" in proc.stdout + proc.stderr


def test_fsdp2_x_ep2_on_four_cpu_ranks(tmp_path, data_cache):
    proc = run(
        ["./run_train.sh", "--parallelism.dp_shard", "2", "--parallelism.ep", "2"],
        tmp_path,
        data_cache,
        NGPU="4",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "4 ranks: given dp_replicate 1 dp_shard 2 cp 1 tp 1 pp 1 ep 2 etp 1;" in out
    assert "resolved: data-parallel 4 (replicate 1 x dense FSDP 4)" in out
    assert "step 3/3 (100%) | loss" in out


def test_two_nodes_with_static_rendezvous(tmp_path, data_cache):
    """Two 'nodes' on this machine, one rank each, as a SLURM job would start them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**CPU_ENV, "NGPU": "1", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    cmd = ["./run_train.sh"] + FAST + ["--data.cache_dir", data_cache]
    nodes = [
        subprocess.Popen(
            cmd + ["--job.dump_folder", str(tmp_path / f"node{i}")],
            cwd=REPO,
            env={**env, "NODE_RANK": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 ranks: given dp_replicate 1 dp_shard -1 (the rest)" in outs[0]
    assert "resolved: data-parallel 2 (replicate 1 x dense FSDP 2)" in outs[0]


def test_deepseek_v3_recipe_with_size_overrides(tmp_path, data_cache):
    cmd = [
        sys.executable,
        "-m",
        "torchmoe.train",
        "--config",
        "train_configs/deepseek_v3.toml",
        "--model.n_layers",
        "2",
        "--model.dim",
        "256",
        "--moe.num_experts",
        "16",
        "--parallelism.ep",
        "1",
        "--checkpoint.enable",
        "false",
    ]
    proc = run(cmd, tmp_path, data_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model deepseek_v3/16B" in proc.stderr


def test_print_config_output_loads_back(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torchmoe.train",
        "--config",
        "train_configs/deepseek_v3.toml",
        "--model.n_layers",
        "4",
        "--print-config",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "WORLD_SIZE": "8"},
    )
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "resolved.toml").write_text(proc.stdout)
    cfg = build_config(read_toml(str(tmp_path / "resolved.toml")), [])
    assert cfg.model.n_layers == 4 and cfg.model.dim == 2048 and cfg.moe.num_experts == 64


def test_a_job_a_rank_refuses_exits_2_through_run_train_sh_in_one_line(tmp_path, data_cache):
    """torchrun alone would add a ChildFailedError traceback and exit 1 (train/launch.py)."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}  # alive
    (tmp_path / ".torchmoe.lock").write_text(json.dumps(holder))
    proc = run(["./run_train.sh"], tmp_path, data_cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "ChildFailedError" not in out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "is in use by another run" in errors[0], errors


def test_context_parallel_run_equals_one_process(tmp_path, data_cache):
    """The README's command: ``NGPU=2 ./run_train.sh --parallelism.cp 2`` trains like NGPU=1."""
    one = run(["./run_train.sh"], tmp_path / "one", data_cache)
    cp2 = run(["./run_train.sh", "--parallelism.cp", "2"], tmp_path / "cp2", data_cache, NGPU="2")
    assert one.returncode == cp2.returncode == 0, one.stderr[-2000:] + cp2.stderr[-2000:]
    assert "2 ranks: given dp_replicate 1 dp_shard -1 (the rest) cp 2" in cp2.stdout + cp2.stderr

    def steps(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(row["loss"], row["grad_norm"]) for row in rows]

    assert len(steps(tmp_path / "cp2")) == 3
    for (loss_1, norm_1), (loss_cp, norm_cp) in zip(
        steps(tmp_path / "one"), steps(tmp_path / "cp2"), strict=True
    ):
        assert loss_cp == pytest.approx(loss_1, rel=1e-5)
        # torch's float32 norms on CPU are off by ~2e-4 for a 1M-element gradient (the output
        # head's; float64 agrees to 1e-9 across layouts), and sharded norms reduce in other parts
        assert norm_cp == pytest.approx(norm_1, rel=5e-4)
