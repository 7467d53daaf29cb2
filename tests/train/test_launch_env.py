"""Launch conventions torchtitan users bring: CONFIG_FILE, LOG_RANK lists, COMM_MODE=fake_backend,
-h, and the torchmoe-train console script; a value that would be ignored is one line, exit 2."""

import shutil
import subprocess

from tests.train.test_cli import CPU_ENV, REPO, run


def sh(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["./run_train.sh", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**CPU_ENV, "NGPU": "1", **env},
        timeout=300,
    )


def test_config_file_is_the_recipe_unless_config_is_given():
    dry = {"COMM_MODE": "fake_backend", "NGPU": "8"}  # torchtitan's name for the dry run
    proc = sh([], CONFIG_FILE="train_configs/deepseek_v3.toml", **dry)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deepseek_v3/16B" in proc.stdout + proc.stderr
    proc = sh(["--config", "train_configs/qwen3_30b_a3b.toml"], CONFIG_FILE="nope.toml", **dry)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qwen3_moe/30B-A3B" in proc.stdout + proc.stderr


def test_unusable_launch_variables_are_one_line_and_exit_2():
    for env, message in (
        ({"COMM_MODE": "real"}, "COMM_MODE='real': the only mode is fake"),
        ({"LOG_RANK": "0,x"}, "LOG_RANK='0,x': give a rank or a list of ranks"),
    ):
        proc = sh([], **env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(f"error: {message}")


def test_h_prints_the_usage_the_environment_and_the_reference():
    proc = sh(["-h"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ./run_train.sh")
    assert "CONFIG_FILE" in proc.stdout and "LOG_RANK" in proc.stdout
    assert "# Save checkpoints and resume from the latest one." in proc.stdout


def test_a_log_rank_list_shows_each_ranks_log(tmp_path, data_cache):
    proc = run(["./run_train.sh"], tmp_path, data_cache, NGPU="2", LOG_RANK="0,1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"[torchmoe rank {rank} " in out and out.count("step 3/3 (100%) | loss") == 2


def test_the_console_script_runs_the_entry_point():
    script = shutil.which("torchmoe-train")
    assert script, "pip install -e . installs torchmoe-train"
    proc = subprocess.run([script, "--print-config"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("[job]")
