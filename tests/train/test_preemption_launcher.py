"""Preemption as a cluster delivers it: SIGTERM to ``run_train.sh`` (torchrun, two gloo ranks)
gives one final checkpoint, exit 0 and an exact resume; a launcher killed with SIGKILL takes
its workers with it."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.distributed.launcher import free_port
from tests.train.test_cli import CPU_ENV, FAST, REPO
from torchmoe.train.process_link import child_pids

ARGS = FAST[2:] + ["--checkpoint.enable", "--checkpoint.interval", "1000"]  # steps: per run


def start(folder: Path, data_cache: str, steps: int, ngpu: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        ["./run_train.sh", *ARGS, "--training.steps", str(steps)]
        + ["--job.dump_folder", str(folder), "--data.cache_dir", data_cache],
        cwd=REPO,
        env={**CPU_ENV, "NGPU": str(ngpu)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def losses(folder: Path) -> dict[int, float]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {row["step"]: row["loss"] for row in rows}


def wait_for_step(proc: subprocess.Popen, folder: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(losses(folder), default=0) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run did not reach step {step}"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """Running, not a zombie left for a container's init to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_run_train_sh_saves_once_exits_0_and_resumes_exactly(tmp_path, data_cache):
    reference = start(tmp_path / "reference", data_cache, steps=12)
    assert reference.wait(timeout=300) == 0, reference.communicate()[0][-3000:]

    run = tmp_path / "run"
    proc = start(run, data_cache, steps=1000)
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = max(losses(run))
    saved = sorted(p.name for p in (run / "checkpoint").iterdir())
    assert saved == [f"step-{stopped}"]
    assert f"stopped by SIGTERM after step {stopped}: saved checkpoint step-{stopped}" in out
    assert "Traceback" not in out

    resumed = start(run, data_cache, steps=12)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert losses(run) == losses(tmp_path / "reference")


def test_workers_die_with_a_killed_launcher(tmp_path, data_cache):
    proc = start(tmp_path, data_cache, steps=100000, ngpu=1)
    wait_for_step(proc, tmp_path, 1)
    workers = child_pids(proc.pid)
    assert workers
    proc.kill()  # SIGKILL: the launcher cannot forward anything
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its launcher"
        time.sleep(0.1)
    # the next run takes over the dead run's lock and starts
    rerun = start(tmp_path, data_cache, steps=2, ngpu=1)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert "step-2" in os.listdir(tmp_path / "checkpoint")


def test_a_signal_before_any_worker_runs_stops_the_launcher(tmp_path, data_cache):
    """Two nodes asked for, one present: the launcher waits in the rendezvous, no worker yet."""
    env = {**CPU_ENV, "NGPU": "1", "NNODES": "2", "RDZV_ENDPOINT": f"localhost:{free_port()}"}
    proc = subprocess.Popen(
        ["./run_train.sh", *ARGS, "--job.dump_folder", str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(12)  # past the config check, into the rendezvous
    assert proc.poll() is None and not child_pids(proc.pid)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGINT while no worker was running: nothing to save" in out


def test_the_third_signal_kills_a_hung_worker(tmp_path, data_cache):
    proc = start(tmp_path, data_cache, steps=100000, ngpu=1)
    wait_for_step(proc, tmp_path, 1)
    (worker,) = child_pids(proc.pid)
    os.kill(worker, signal.SIGSTOP)  # as a rank blocked in a collective: no handler runs
    for _ in range(3):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "received a third time: killed the workers" in out
    assert not alive(worker)
