"""Does the data loader keep up? Step time with the real loader (tokenizing and packing in its
background thread) against step time with ready-made batches (four of the loader's, repeated),
on one trainer.

    python scripts/benchmark_loader.py --config train_configs/deepseek_v3.toml \\
        --model.n_layers 4 --parallelism.ep 1 --compile.enable true \\
        [--warmup 8 --steps 20 --rounds 3]

The two kinds of batches alternate in rounds (real, synthetic, real, ...) on the same model, so
drift (clocks, memory) hits both alike. Prints one table: the median step time of each, their
ratio, and the loader's own rate with no training (batches/s and tokens/s, on the host).
"""

import argparse
import itertools
import statistics
import sys
import time

import torch

from torchmoe.config.load import load_config
from torchmoe.train.trainer import Trainer

_QUIET = ["--metrics.log_freq", "1000000", "--metrics.save_jsonl", "false"]


def timed_steps(trainer: Trainer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        trainer.train_step()  # ends with a host sync (the loss and norm)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def synthetic(trainer: Trainer) -> itertools.cycle:
    """Four batches taken from the loader once (CPU, as it makes them; document ids
    included), then repeated: batches that cost nothing to make."""
    return itertools.cycle([next(trainer.dataloader) for _ in range(4)])


def loader_rate(trainer: Trainer, seconds: float = 5.0) -> tuple[float, float]:
    """Batches and tokens per second the loader makes alone (its thread, no training)."""
    loader, n, start = trainer.dataloader, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = next(loader).inputs
        n += 1
    elapsed = time.perf_counter() - start
    return n / elapsed, n * x.numel() / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args, recipe = parser.parse_known_args()
    cfg, _ = load_config(recipe + _QUIET)
    trainer = Trainer(cfg)
    fake, real = synthetic(trainer), trainer.dataloader
    trainer.batches = real
    timed_steps(trainer, args.warmup)
    times: dict[str, list[float]] = {"real loader": [], "synthetic batches": []}
    for _ in range(args.rounds):
        for name, batches in (("real loader", real), ("synthetic batches", fake)):
            trainer.batches = batches
            times[name] += timed_steps(trainer, args.steps)
    batches_per_s, tokens_per_s = loader_rate(trainer)
    real_ms = 1e3 * statistics.median(times["real loader"])
    fake_ms = 1e3 * statistics.median(times["synthetic batches"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    t = cfg.training
    print(
        f"\n{device}; {cfg.model.name}/{cfg.model.flavor}, {cfg.model.n_layers} layers, "
        f"batch {t.local_batch_size} x {t.seq_len}, dataset {cfg.data.dataset}, "
        f"prefetch {cfg.data.prefetch_batches}; {args.rounds} rounds of {args.steps} steps\n"
        "| batches | median step (ms) |\n|---|---|\n"
        f"| real loader | {real_ms:.2f} |\n| synthetic | {fake_ms:.2f} |\n"
        f"| ratio real / synthetic | {real_ms / fake_ms:.4f} |\n"
        f"loader alone: {batches_per_s:.1f} batches/s, {tokens_per_s:,.0f} tokens/s",
        file=sys.stderr,
    )
    trainer.dataloader.close()


if __name__ == "__main__":
    main()
