"""The test launcher names a rank that dies without a result, and how it died."""

import os
import signal

import pytest

from tests.distributed.launcher import run_ranks


def _rank_one_killed(rank: int) -> int:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def test_a_killed_rank_is_named_with_its_signal() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 died without a result, exit code -9 "):
        run_ranks(2, _rank_one_killed, timeout=60)


def _ranks_ok(rank: int) -> int:
    return rank * 10


def test_results_come_back_by_rank() -> None:
    assert run_ranks(3, _ranks_ok) == [0, 10, 20]
