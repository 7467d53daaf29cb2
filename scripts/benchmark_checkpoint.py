"""What a checkpoint costs the training loop on one GPU: step time with an async save in flight
against steps without one, and the stall of a synchronous save, for a recipe.

    python scripts/benchmark_checkpoint.py --config train_configs/deepseek_v3.toml \\
        --model.n_layers 3 --parallelism.ep 1 --compile.enable true \\
        [--folder /tmp/ckpt_bench --warmup 8 --steps 10]

Prints one table: the median step without a save; for two async saves, each call's own stall
(staging the state into pinned host memory: the first allocates it, the second reuses it), the
steps run while the background thread writes and hashes, their median and its ratio to the
plain step, the seconds until the second manifest was written; for a synchronous save, the
stall. The folder is removed afterwards.
"""

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchmoe.config.load import load_config
from torchmoe.train.checkpoint_writer import CheckpointWriter
from torchmoe.train.trainer import Trainer

_QUIET = ["--metrics.log_freq", "1000000", "--metrics.save_jsonl", "false"]


def timed_step(trainer: Trainer) -> float:
    start = time.perf_counter()
    trainer.train_step()
    torch.cuda.synchronize()
    trainer.state.step += 1
    return time.perf_counter() - start


def measure(trainer: Trainer, warmup: int, steps: int, max_in_flight: int) -> dict:
    checkpoint = trainer.checkpoint
    checkpoint.check_destination(trainer.n_params)
    for _ in range(warmup):
        timed_step(trainer)
    plain = [timed_step(trainer) for _ in range(steps)]

    stalls, in_flight, written = [], [], 0.0
    for _ in range(2):  # the first save allocates the host buffers, the second reuses them
        start = time.perf_counter()
        checkpoint.save(trainer.state.step)  # async: returns once staged
        stalls.append(time.perf_counter() - start)
        pending = checkpoint.writer.pending
        while not pending.settled.is_set() and len(in_flight) < max_in_flight:
            in_flight.append(timed_step(trainer))
        checkpoint.writer.wait()
        written = time.perf_counter() - start
        timed_step(trainer)  # a new step to save

    sync_cfg = replace(checkpoint.cfg, async_mode="disabled")
    sync = CheckpointWriter(sync_cfg, checkpoint.folder, trainer.device)
    start = time.perf_counter()
    sync.save(trainer.state.step, checkpoint.states, checkpoint.job)
    sync_stall = time.perf_counter() - start
    after = [timed_step(trainer) for _ in range(steps)]
    return {
        "plain": statistics.median(plain),
        "after": statistics.median(after),
        "stalls": stalls,
        "in_flight": in_flight,
        "written": written,
        "sync": sync_stall,
        "bytes": sum(p.stat().st_size for p in checkpoint.folder.rglob("*") if p.is_file()),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/torchmoe_ckpt_bench"))
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-in-flight", type=int, default=500)
    args, recipe = parser.parse_known_args(argv)
    shutil.rmtree(args.folder, ignore_errors=True)
    folder = ["--job.dump_folder", str(args.folder), "--checkpoint.folder", "checkpoint"]
    cfg, _ = load_config(
        recipe
        + _QUIET
        + folder
        + ["--checkpoint.enable", "--checkpoint.async_mode", "async"]
        + ["--checkpoint.keep_latest_k", "1"]  # one checkpoint on disk at a time
    )
    try:
        r = measure(Trainer(cfg), args.warmup, args.steps, args.max_in_flight)
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    flight = r["in_flight"]
    median_flight = statistics.median(flight) if flight else float("nan")
    print(f"device: {torch.cuda.get_device_name()}, checkpoint {r['bytes'] / 2**30:.2f} GiB")
    print(
        "| step, no save (ms) | async stall: 1st, 2nd save (s) | steps in flight "
        "| step in flight (ms) | in flight / no save | async: 2nd manifest after (s) "
        "| sync: stall (s) | step after (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    first, second = r["stalls"]
    print(
        f"| {r['plain'] * 1e3:.1f} | {first:.2f}, {second:.2f} | {len(flight)} | "
        f"{median_flight * 1e3:.1f} | {median_flight / r['plain']:.3f} | {r['written']:.1f} | "
        f"{r['sync']:.1f} | {r['after'] * 1e3:.1f} |"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
