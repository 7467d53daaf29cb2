"""Single-GPU speed of a recipe under each speed variant, and where one MoE layer spends its time.

    python scripts/benchmark.py --config train_configs/deepseek_v3.toml \\
        --model.n_layers 4 --parallelism.ep 1 --training.local_batch_size 2 \\
        --training.seq_len 4096 [--variants eager,compiled,...] [--warmup 10 --steps 30]

Each variant runs in a fresh process (own compile caches and memory peak) for ``--warmup``
then ``--steps`` optimizer steps and prints one table row: tokens/s, model TFLOP/s (the
trainer's FLOP count), MFU, peak allocated memory, the last loss. Then one MoE layer of the
recipe's shape is timed forward + backward with CUDA events, phase by phase (router, dispatch,
experts, combine, shared experts; GPU kernel time from the profiler), against a dense bf16
SwiGLU of the same FLOPs.
"""

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch

_FLOAT8_LINEAR_BF16_WGRAD = [
    "--compile.enable",
    "true",
    "--quantize.float8_linear",
    "true",
    "--quantize.float8_linear_weight_grad",
    "bfloat16",
]
VARIANTS = {
    "eager": [],
    "compiled": ["--compile.enable", "true"],
    "compiled+full_ac": ["--compile.enable", "true", "--activation_checkpoint.mode", "full"],
    "compiled+selective_ac": [
        "--compile.enable",
        "true",
        "--activation_checkpoint.mode",
        "selective",
    ],
    "compiled+recompute_moe_act+layernorm": [
        "--compile.enable",
        "true",
        "--activation_checkpoint.mode",
        "selective",
        "--activation_checkpoint.recompute_modules",
        "moe_act,layernorm",
    ],
    # what moe_act and the norms save goes to pinned host memory (against recomputing them)
    "compiled+offload_moe_act+layernorm": [
        "--compile.enable",
        "true",
        "--activation_checkpoint.offload_modules",
        "moe_act,layernorm",
    ],
    "compiled+float8": [
        "--compile.enable",
        "true",
        "--quantize.float8_linear",
        "true",
        "--quantize.float8_experts",
        "true",
    ],
    # 4 micro-batches of 2 sequences accumulated per optimizer step.
    "compiled+accum4": [
        "--compile.enable",
        "true",
        "--training.local_batch_size",
        "2",
        "--training.global_batch_size",
        "8",
    ],
    # torch's fused AdamW after a separate clipping pass (the optimizer before torchmoe's).
    "compiled+torch_fused_adamw": [
        "--compile.enable",
        "true",
        "--optimizer.implementation",
        "fused",
    ],
    # autocast casts the float32 weights in every micro-batch (compute_weights before "cached").
    "compiled+cast_weights": ["--compile.enable", "true", "--training.compute_weights", "cast"],
    # Adam's moments in bfloat16 (torchmoe's AdamW).
    "compiled+bf16_moments": ["--compile.enable", "true", "--optimizer.state_dtype", "bfloat16"],
    # 4 sequences per micro-batch with bfloat16 moments (their 9 GB freed buys activations).
    "compiled+bf16_moments+batch4": [
        "--compile.enable",
        "true",
        "--optimizer.state_dtype",
        "bfloat16",
        "--training.local_batch_size",
        "4",
    ],
    "compiled+selective_ac+bf16_moments": [
        "--compile.enable",
        "true",
        "--activation_checkpoint.mode",
        "selective",
        "--optimizer.state_dtype",
        "bfloat16",
    ],
    "compiled+accum4+bf16_moments": [
        "--compile.enable",
        "true",
        "--training.global_batch_size",
        "8",
        "--optimizer.state_dtype",
        "bfloat16",
    ],
    # the same, the 4 micro-batches' bfloat16 gradients folded into the float32 sums in one pass
    "compiled+accum4+bf16_moments+fold4": [
        "--compile.enable",
        "true",
        "--training.global_batch_size",
        "8",
        "--optimizer.state_dtype",
        "bfloat16",
        "--training.grads_per_fold",
        "4",
    ],
    # Packed documents kept apart (flex attention); the cost depends on the documents' lengths.
    "compiled+block_causal": ["--compile.enable", "true", "--model.attn_mask", "block_causal"],
    # Best case of routing: every expert gets the same number of tokens (benchmark only).
    "compiled+forced_balance": ["--compile.enable", "true", "--moe.force_load_balance", "true"],
    # Token dropping at capacity 1.25, groups padded to capacity (static GEMM shapes).
    "compiled+capacity1.25_padded": [
        "--compile.enable",
        "true",
        "--moe.capacity_factor",
        "1.25",
        "--moe.pad_to_capacity",
        "true",
    ],
    # float8 forward and input-gradient GEMMs, bf16 weight gradient (torchmoe's float8 GEMMs,
    # cached weights stay): linears and experts, then linears only, then with the output head
    "compiled+float8_bf16_wgrad": [
        *_FLOAT8_LINEAR_BF16_WGRAD,
        "--quantize.float8_experts",
        "true",
        "--quantize.float8_experts_weight_grad",
        "bfloat16",
    ],
    "compiled+float8_linear_bf16_wgrad": _FLOAT8_LINEAR_BF16_WGRAD,
    "compiled+float8_linear_bf16_wgrad+head": [
        *_FLOAT8_LINEAR_BF16_WGRAD,
        "--quantize.float8_exclude",
        "router",
    ],
    # the routed experts only in float8 (torchao's op, then torchmoe's with cached weights)
    "compiled+float8_experts": ["--compile.enable", "true", "--quantize.float8_experts", "true"],
    "compiled+float8_experts_bf16_wgrad": [
        "--compile.enable",
        "true",
        "--quantize.float8_experts",
        "true",
        "--quantize.float8_experts_weight_grad",
        "bfloat16",
    ],
    "compiled+float8+selective_ac": [
        "--compile.enable",
        "true",
        "--quantize.float8_linear",
        "true",
        "--quantize.float8_experts",
        "true",
        "--activation_checkpoint.mode",
        "selective",
    ],
}
_QUIET = [
    "--checkpoint.enable",
    "false",
    "--metrics.save_jsonl",
    "false",
    "--metrics.log_freq",
    "1000000",
]


def run_variant(recipe: list[str], warmup: int, steps: int, profile: bool) -> dict:
    """Train in this process and return the measured row; with ``profile``, also print the
    GPU kernels of two more steps, most expensive first."""
    from torchmoe.config.load import load_config
    from torchmoe.train.metrics import peak_flops
    from torchmoe.train.trainer import Trainer

    cfg, _ = load_config(recipe + _QUIET)
    trainer = Trainer(cfg)
    for _ in range(warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step().loss
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if profile:
        _print_kernels(trainer)
    tps = trainer.global_tokens / trainer.dims.world_size / seconds
    tflops = tps * trainer.metrics.flops_per_token / 1e12
    peak = peak_flops(trainer.device, trainer.dtype)
    return {
        "tokens_per_s": tps,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss,
    }


def _print_kernels(trainer) -> None:
    """The GPU kernels of two steps by self time, and how busy the GPU was: a step whose
    kernels sum to less than its wall time waits on the host (launches, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            trainer.train_step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / 2
    events = prof.key_averages()
    busy_ms = sum(e.self_device_time_total for e in events) / 1e3 / 2
    print(
        events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90),
        file=sys.stderr,
    )
    kernels = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    total, gaps = gpu_idle_gaps(kernels)
    print(
        "--- the GPU's longest idle gaps (us, the kernel before -> the kernel after)",
        file=sys.stderr,
    )
    for gap, before, after in gaps:
        print(f"{gap:9.0f}  {before[:70]} -> {after[:70]}", file=sys.stderr)
    print(
        f"profiled step: {wall_ms:.1f} ms wall (with the profiler), {busy_ms:.1f} ms of kernels, "
        f"{total / 1e3 / 2:.1f} ms idle between the first and last kernel",
        file=sys.stderr,
        flush=True,
    )


def gpu_idle_gaps(
    kernels: list[tuple[float, float, str]], top: int = 12
) -> tuple[float, list[tuple[float, str, str]]]:
    """Total idle time between kernels (start, end, name; any order, overlaps merged) and the
    ``top`` longest gaps as (length, kernel before, kernel after): where the GPU waited on the
    host."""
    total, gaps, busy_until, last = 0.0, [], None, ""
    for start, end, name in sorted(kernels):
        if busy_until is not None and start > busy_until:
            total += start - busy_until
            gaps.append((start - busy_until, last, name))
        if busy_until is None or end >= busy_until:
            busy_until, last = end, name
    return total, sorted(gaps, reverse=True)[:top]


def gpu_ms(fn, repeats: int = 10, label: str = "") -> float:
    """Mean milliseconds of GPU kernels per call of ``fn`` (from the profiler, so a phase made
    of small kernels is not charged for the CPU time it takes to launch them). With a label,
    the phase's kernels go to stderr, slowest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    if label:
        print(f"--- {label}: kernels per call", file=sys.stderr)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
            per_call = e.self_device_time_total / repeats
            print(f"{per_call:9.1f} us  x{e.count // repeats:<3} {e.key[:110]}", file=sys.stderr)
    return sum(e.self_device_time_total for e in events) / 1e3 / repeats


def fwd_bwd(fn, *inputs: torch.Tensor, params: Iterable[torch.Tensor] = ()):
    """A callable running ``fn`` forward and backward (seeded with ones-like gradients) on
    detached copies of ``inputs``, so one phase is timed alone. Gradients of the inputs and of
    ``params`` are returned, not accumulated into ``.grad``: the trainer's first micro-batch
    writes fresh gradients, and an accumulating add would charge the phase for a pass over
    every weight it touches. The seeds are made in the first call only (warm-up): filling an
    [M, D] seed took 62 us, charged to the phase before."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    wrt = [t for t in (*leaves, *params) if t.requires_grad]
    seeds: list[torch.Tensor] = []

    def run():
        outs = fn(*leaves)
        outs = [
            o
            for o in (outs if isinstance(outs, tuple) else (outs,))
            if isinstance(o, torch.Tensor) and o.requires_grad
        ]
        if not seeds:
            seeds.extend(torch.ones_like(o) for o in outs)
        torch.autograd.grad(outs, wrt, seeds, allow_unused=True)

    return run


def moe_layer_split(recipe: list[str]) -> list[tuple[str, float]]:
    """(phase, forward + backward ms) for one MoE layer of the recipe, bf16, eager (the
    experts, the whole layer and the dense SwiGLU also compiled)."""
    from torchmoe.config.load import load_config
    from torchmoe.config.model_args import moe_args
    from torchmoe.models.moe.moe import MoE

    cfg, _ = load_config(recipe + _QUIET)
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = MoE(moe_args(cfg))
        layer.init_weights(0.02, 0.02)
    layer.to(torch.bfloat16)
    T, D = cfg.training.local_batch_size * cfg.training.seq_len, cfg.model.dim
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    routing = layer.router(x)
    x_MD, counts, state = layer.dispatcher.dispatch(x, routing.topk_idx_TK)
    y_MD = layer.experts(x_MD, counts)
    rows, F = int(counts.sum()), cfg.moe.ffn_hidden_size
    w = [torch.randn(F, D, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
    w.append(torch.randn(D, F, device="cuda", dtype=torch.bfloat16) * 0.02)

    def dense_swiglu(x_MD, w1, w3, w2):
        return (torch.nn.functional.silu(x_MD @ w1.T) * (x_MD @ w3.T)) @ w2.T

    params = list(layer.parameters())
    compiled_experts = torch.compile(layer.experts, fullgraph=True)  # as training runs them

    def step(fn, *inputs):
        return fwd_bwd(fn, *inputs, params=params)

    phases = [
        ("router", step(lambda x: layer.router(x).topk_weight_TK, x)),
        ("dispatch", step(lambda x: layer.dispatcher.dispatch(x, routing.topk_idx_TK)[0], x)),
        ("experts (grouped GEMM)", step(lambda h: layer.experts(h, counts), x_MD)),
        ("experts, compiled", step(lambda h: compiled_experts(h, counts), x_MD)),
        (
            "combine",
            step(
                lambda y, wt: layer.dispatcher.combine(y, wt, state), y_MD, routing.topk_weight_TK
            ),
        ),
    ]
    if layer.shared_experts is not None:
        phases.append(("shared experts", step(layer.shared_experts, x)))
    phases.append(("whole layer", step(lambda x: layer(x.view(1, T, D)), x)))
    compiled = torch.compile(layer, fullgraph=True)
    phases.append(("whole layer, compiled", step(lambda x: compiled(x.view(1, T, D)), x)))
    phases.append(
        (f"dense SwiGLU, same FLOPs ({rows} rows)", fwd_bwd(dense_swiglu, x_MD[:rows], *w))
    )
    compiled_dense = torch.compile(dense_swiglu, fullgraph=True)
    phases.append(("dense SwiGLU, compiled", fwd_bwd(compiled_dense, x_MD[:rows], *w)))
    expert_flops = 18 * rows * D * F  # 3 GEMMs of 2*rows*D*F, forward and 2x in backward
    results = [(name, gpu_ms(fn, label=name)) for name, fn in phases]
    return results + [("expert GEMM TFLOP/s", expert_flops / results[2][1] / 1e9)]


def _child(args: argparse.Namespace, recipe: list[str]) -> None:
    row = (
        run_variant(recipe + VARIANTS[args.variant], args.warmup, args.steps, args.profile)
        if args.variant
        else {"split": moe_layer_split(recipe)}
    )
    print("RESULT " + json.dumps(row), flush=True)


def run_child(script: str, args: list[str], tag: str = "RESULT") -> Any:
    """Run ``script`` in a fresh process (its stderr passes through) and return the JSON it
    printed after ``tag``; None if it printed none (it failed)."""
    proc = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    return None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-layer-split", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="print each variant's top GPU kernels over two steps"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--split", action="store_true", help=argparse.SUPPRESS)  # child
    args, recipe = parser.parse_known_args(argv)
    if args.variant or args.split:
        return _child(args, recipe)
    if not torch.cuda.is_available():
        sys.exit("scripts/benchmark.py measures GPU speed and needs CUDA")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {' '.join(recipe)}")
    print("| variant | tokens/s | TFLOP/s | MFU | peak GiB | loss |\n|---|---|---|---|---|---|")
    for name in filter(None, args.variants.split(",")):  # --variants "": the layer split only
        if name not in VARIANTS:
            sys.exit(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        flags = ["--variant", name, "--warmup", str(args.warmup), "--steps", str(args.steps)]
        flags += ["--profile"] if args.profile else []
        r = run_child(__file__, flags + recipe)
        if r is None:
            print(f"| {name} | failed (see stderr) | | | | |", flush=True)
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | {mfu} | "
            f"{r['peak_gib']:.1f} | {r['loss']:.3f} |",
            flush=True,
        )
    if args.no_layer_split:
        return
    split = run_child(__file__, ["--split"] + recipe)
    if split is None:
        return
    split = split["split"]
    total = dict(split)["whole layer"]
    print("\n| one MoE layer, forward + backward | GPU ms | share of layer |\n|---|---|---|")
    for name, value in split:
        if name == "expert GEMM TFLOP/s":
            print(f"| {name} | {value:.0f} | |")
        else:
            print(f"| {name} | {value:.3f} | {100 * value / total:.1f}% |")
    times = dict(split)
    overhead = times["router"] + times["dispatch"] + times["combine"]
    dense = next(v for k, v in split if k.startswith("dense SwiGLU"))
    print(
        f"\nrouter + dispatch + combine: {100 * overhead / total:.1f}% of the layer; "
        f"grouped experts at {100 * dense / times['experts (grouped GEMM)']:.0f}% of the "
        f"dense SwiGLU's rate ("
        f"{100 * times['dense SwiGLU, compiled'] / times['experts, compiled']:.0f}% compiled)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
