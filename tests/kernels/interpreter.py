"""Run a test file's ``__main__`` block in a subprocess under Triton's CPU interpreter
(TRITON_INTERPRET=1 is read when triton is imported, so it needs a fresh process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_in_interpreter(test_file: str) -> None:
    """Fails unless the file's main block prints OK last; skips when it prints SKIP first."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, test_file], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
