"""Throughput of a recipe under a parallel layout, and its expert-parallel all-to-all time
against a plain NCCL all_to_all_single of the same bytes, measured in the same run.

    torchrun --nproc_per_node 2 scripts/benchmark_parallel.py \\
        --config train_configs/deepseek_v3.toml --model.n_layers 4 --parallelism.ep 2

Prints one table row (rank 0): tokens/s per GPU, model TFLOP/s per GPU, MFU, peak memory,
the share of each GPU's time without a compute kernel (the pipeline bubble under ``pp``, plus
any exposed communication; the theoretical bubble is in the layout column), then per
optimizer step the time of the NCCL all-to-all and send/recv kernels (EP dispatch, forward and
backward, and the pipeline's point-to-point transfers, waits included; from the profiler) and
of a replay of the same all_to_all_single calls after a barrier.
"""

import argparse
import logging
import sys
import time

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from torchmoe.config.load import load_config
from torchmoe.config.pipeline_keys import microbatches, num_stages
from torchmoe.models.moe.moe import MoE
from torchmoe.train.metrics import peak_flops
from torchmoe.train.trainer import Trainer


def record_exchanges(model: torch.nn.Module, calls: list) -> int:
    """Wrap every expert-parallel dispatcher's token exchange (its ``exchange`` seam, as built:
    the dispatchers hold the function, so patching the module's name would record nothing)
    to note (rows sent, row shape, dtype, output splits, input splits, group) of each call;
    returns how many dispatchers it wrapped. Splits are None for the sync-free dispatcher's
    equal blocks."""
    wrapped = 0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        dispatcher = getattr(moe.dispatcher, "inner", moe.dispatcher)  # inside etp's wrapper
        if not hasattr(dispatcher, "exchange"):  # one rank, or the all-gather dispatcher
            continue
        original = dispatcher.exchange

        def recording(x, output_splits, input_splits, group, original=original):
            calls.append((x.shape[0], x.shape[1:], x.dtype, output_splits, input_splits, group))
            return original(x, output_splits, input_splits, group)

        dispatcher.exchange = recording
        wrapped += 1
    return wrapped


def replay_exchanges(calls: list, repeats: int, device: torch.device) -> float:
    """Seconds per step to run the recorded forward calls plain, twice (forward + backward
    move the same bytes), after a barrier so no rank waits for another's compute."""
    buffers = []
    for rows, row, dtype, out_splits, in_splits, group in calls:
        received = rows if out_splits is None else sum(out_splits)
        send = torch.empty(rows, *row, dtype=dtype, device=device)
        recv = torch.empty(received, *row, dtype=dtype, device=device)
        buffers.append((send, recv, out_splits, in_splits, group))
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        for send, recv, out_splits, in_splits, group in buffers:
            for _ in range(2):
                dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def kernel_seconds(prof, fragment: str, steps: int) -> float:
    total_us = sum(
        e.device_time_total
        for e in prof.key_averages()
        if fragment in e.key and e.device_time_total > 0
    )
    return total_us / 1e6 / steps


def busy_fraction(prof, seconds: float) -> float:
    """Share of the wall time the GPU spends in compute kernels (the union of their intervals,
    NCCL kernels left out: they spin while waiting) over the profiled steps."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and "nccl" not in e.name.lower()
    )
    busy_us, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    return busy_us / 1e6 / seconds


def theoretical_bubble(cfg, stages: int) -> float:
    """(p - 1) / (v m + p - 1): the idle share of 1F1B (v = 1) and of interleaving v stages per
    rank, with equal stages and free communication."""
    p = cfg.parallelism.pp
    v, m = stages // p, microbatches(cfg)
    return (p - 1) / (v * m + p - 1)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args, rest = parser.parse_known_args(argv)
    cfg, _ = load_config(rest + ["--checkpoint.enable", "false", "--metrics.save_jsonl", "false"])
    logging.basicConfig(level=logging.WARNING)
    trainer = Trainer(cfg)
    calls: list = []
    if cfg.parallelism.ep > 1 and not record_exchanges(trainer.model, calls):
        sys.exit("benchmark_parallel.py: found no expert-parallel exchange to record")

    def step():
        trainer.train_step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    calls.clear()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        profiled = time.perf_counter() - start
    idle = torch.tensor([1 - busy_fraction(prof, profiled)], device=trainer.device)
    idle_by_rank = [torch.zeros_like(idle) for _ in range(dist.get_world_size())]
    dist.all_gather(idle_by_rank, idle)
    a2a_kernels = kernel_seconds(prof, "SendRecv", 2) + kernel_seconds(prof, "AllToAll", 2)
    fsdp_kernels = kernel_seconds(prof, "AllGather", 2) + kernel_seconds(prof, "ReduceScatter", 2)
    step_calls = calls[: len(calls) // 2]
    plain = replay_exchanges(step_calls, 5, trainer.device) if step_calls else 0.0
    moved = sum(rows * row.numel() * dtype.itemsize for rows, row, dtype, *_ in step_calls)
    moved = moved * 2 / 2**20

    # tokens per GPU: the ranks of a tensor-parallel group work on one batch together
    tokens = trainer.global_tokens / trainer.dims.world_size
    tps = tokens / seconds
    tflops = tps * trainer.metrics.flops_per_token / 1e12
    peak = peak_flops(trainer.device, trainer.dtype)
    mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "n/a"
    memory = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=trainer.device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        d = trainer.dims
        layout = f"dp_shard {d.dp_shard} ep {d.ep} ({cfg.moe.dispatcher})"
        if trainer.pipeline:
            p = cfg.parallelism
            layout += (
                f" pp {d.pp} {p.pp_schedule}, {num_stages(cfg)} stages, "
                f"{microbatches(cfg)} micro-batches, bubble in theory "
                f"{100 * theoretical_bubble(cfg, num_stages(cfg)):.0f}%"
            )
        idle_text = " / ".join(f"{100 * float(i):.0f}%" for i in idle_by_rank)
        print(
            "| layout | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB (max rank) | step ms | "
            "GPU idle by rank (no compute kernel) | EP a2a + PP p2p kernels ms/step | "
            "plain a2a same bytes ms/step | a2a MiB/step/rank | FSDP comm kernels ms/step |"
        )
        print(
            f"| {layout} | {tps:,.0f} | {tflops:.0f} | {mfu} | {float(memory):.1f} | "
            f"{seconds * 1e3:.0f} | {idle_text} | {a2a_kernels * 1e3:.1f} | "
            f"{plain * 1e3:.1f} | {moved:.0f} | {fsdp_kernels * 1e3:.1f} |",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
