"""Run a function on N ranks joined in a gloo process group (CPU), inside pytest."""

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, conn) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle: tensors go by value, not as shared-memory handles that die with the child.
        conn.send(("ok", pickle.dumps(fn(rank, *args))))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
        os._exit(0)  # never run pytest's teardown in a forked child


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """``fn(rank, *args)`` on every rank; returns the results by rank, or raises with the
    first failing rank's traceback."""
    # fork is cheap (torch already imported) but a child of a process that used CUDA must not
    # touch it, and torch's optimizers do; then start ranks from a clean fork server instead.
    method = os.environ.get("TORCHMOE_TEST_START_METHOD") or (
        "forkserver" if torch.cuda.is_initialized() else "fork"
    )
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torchmoe.train.trainer"])  # import torch once, not per rank
    port = free_port()
    pipes, procs = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, child))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    results: dict[int, Any] = {}
    waiting = dict(enumerate(pipes))
    try:
        while waiting:  # fail fast: a rank that dies leaves the others blocked in collectives
            ready = wait(list(waiting.values()), timeout=timeout)
            if not ready:
                raise TimeoutError(f"ranks {sorted(waiting)} gave no result within {timeout} s")
            for rank in [r for r, pipe in waiting.items() if pipe in ready]:
                try:
                    status, value = waiting.pop(rank).recv()
                except EOFError:  # it died before sending: a signal (crash, OOM killer)
                    procs[rank].join(timeout=5)
                    raise RuntimeError(
                        f"rank {rank} died without a result, exit code {procs[rank].exitcode} "
                        "(negative: the signal that killed it)"
                    ) from None
                if status != "ok":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                results[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return [results[rank] for rank in range(world_size)]
