"""A frozen rank ends the job within comm.train_timeout_s, and the message names it."""

import os
import signal
import time

import torch
import torch.multiprocessing as mp

from tests.distributed.launcher import free_port, run_ranks
from torchmoe.config.load import build_config
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.train.trainer import Trainer
from torchmoe.train.watchdog import EXIT_HUNG

TIMEOUT_S = 3


class FreezingTrainer(Trainer):
    """Rank 1 stops itself (SIGSTOP, as a hung host or a debugger would) in step 3."""

    def train_step(self):
        if self.state.step == 2 and self.dims.world_size > 1 and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().train_step()


def rank_main(rank: int, port: int, cfg, log: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    try:
        FreezingTrainer(cfg, device=torch.device("cpu")).train()
    finally:
        os._exit(0)


def test_a_frozen_rank_ends_the_job_naming_it(tmp_path, data_cache):
    load_stdlib_docs(data_cache)
    cfg = build_config(
        {},
        [
            ("job.dump_folder", str(tmp_path)),
            ("data.cache_dir", data_cache),
            ("training.steps", "6"),
            ("training.seq_len", "32"),
            ("training.local_batch_size", "2"),
            ("comm.train_timeout_s", str(TIMEOUT_S)),
        ],
    )
    ctx, port = mp.get_context("fork"), free_port()
    logs = [str(tmp_path / f"rank{r}.log") for r in range(2)]
    procs = [ctx.Process(target=rank_main, args=(r, port, cfg, logs[r])) for r in range(2)]
    for p in procs:
        p.start()
    try:
        start = time.monotonic()
        procs[0].join(timeout=120)
        assert procs[0].exitcode == EXIT_HUNG
        # the watchdog gave up a few beats after the timeout (the first step may take longer)
        assert time.monotonic() - start < 60
        lines = [line for line in open(logs[0]).read().splitlines() if "error:" in line]
        assert len(lines) == 1
        assert (
            "error: rank 0: no progress for 3 s while step 3; rank 1 stopped answering" in lines[0]
        )
        assert "Raise comm.train_timeout_s" in lines[0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def build_and_wait(rank: int, cfg) -> str:
    Trainer(cfg, device=torch.device("cpu"))
    time.sleep(3 * TIMEOUT_S)  # longer than both timeouts: no watchdog outside train()
    return "alive"


def test_a_trainer_that_is_not_training_is_left_alone(tmp_path, data_cache):
    load_stdlib_docs(data_cache)
    cfg = build_config(
        {},
        [
            ("job.dump_folder", str(tmp_path)),
            ("data.cache_dir", data_cache),
            ("training.seq_len", "32"),
            ("comm.init_timeout_s", "1"),
            ("comm.train_timeout_s", "1"),
        ],
    )
    assert run_ranks(2, build_and_wait, cfg) == ["alive", "alive"]
