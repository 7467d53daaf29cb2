"""Where the routed experts' grouped GEMMs lose to a dense GEMM of the same FLOPs, GEMM by GEMM.

    python scripts/benchmark_grouped_mm.py --config train_configs/deepseek_v3.toml \\
        --parallelism.ep 1 \\
        [--training.local_batch_size 2 --training.seq_len 4096] [--autotune]

The recipe gives the shapes: T = local batch x sequence tokens, each routed to K of E experts
(uniformly at random, so every expert gets about T*K/E rows), model dim D, expert hidden dim F.
Table 1 times each GEMM of the SwiGLU experts with ``torch._grouped_mm`` in the operand layouts
autograd hands it (forward, input gradient, weight gradient; a row-major copy of the weight
gradient's left operand trips a device-side assert in torch 2.11), for the gate projection alone
(N = F) and for gate and up fused into one GEMM (N = 2F), against ``torch.mm`` of the same M, N,
K. Table 2 times the whole SwiGLU forward + backward: three grouped GEMMs (torchmoe today) and
gate and up fused, each eager and compiled, and the dense SwiGLU of the same FLOPs;
``--autotune`` adds both compiled with inductor's max-autotune, whose Triton grouped-GEMM
templates compete with ``_grouped_mm``.
"""

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchmark import fwd_bwd, gpu_ms

from torchmoe.config.load import load_config


def uniform_counts(tokens: int, experts: int, top_k: int) -> torch.Tensor:
    """Rows per expert when every token picks top_k distinct experts uniformly at random."""
    idx = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    return torch.bincount(idx.flatten(), minlength=experts)


def gemm_rows(M: int, D: int, Fh: int, offs: torch.Tensor, E: int) -> list[tuple[str, Callable]]:
    """(name, [grouped call, dense call]) for each GEMM role of one expert projection."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    rows = []
    for label, N in (("gate (N=F)", Fh), ("gate+up fused (N=2F)", 2 * Fh)):
        x, g = torch.randn(M, D, **bf16), torch.randn(M, N, **bf16)
        w = torch.randn(E, N, D, **bf16)  # nn.Linear-like stack: out x in
        dense_w = torch.randn(N, D, **bf16)
        rows += [
            (
                f"{label} forward: x[M,D] @ w^T",
                lambda x=x, w=w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                lambda x=x, w=dense_w: x @ w.T,
            ),
            (
                f"{label} input grad: g[M,N] @ w",
                lambda g=g, w=w: torch._grouped_mm(g, w, offs=offs),
                lambda g=g, w=dense_w: g @ w,
            ),
            (
                f"{label} weight grad: g^T @ x",
                lambda g=g, x=x: torch._grouped_mm(g.t(), x, offs=offs),
                lambda g=g, x=x: g.t() @ x,
            ),
        ]
    h, gd = torch.randn(M, Fh, **bf16), torch.randn(M, D, **bf16)
    w2, dense_w2 = torch.randn(E, D, Fh, **bf16), torch.randn(D, Fh, **bf16)
    rows += [
        (
            "down forward: h[M,F] @ w2^T",
            lambda: torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs),
            lambda: h @ dense_w2.T,
        ),
        (
            "down input grad: g[M,D] @ w2",
            lambda: torch._grouped_mm(gd, w2, offs=offs),
            lambda: gd @ dense_w2,
        ),
        (
            "down weight grad: g^T @ h",
            lambda: torch._grouped_mm(gd.t(), h, offs=offs),
            lambda: gd.t() @ h,
        ),
    ]
    return rows


def three_gemms(x, w1, w3, w2, offs):
    h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs))
    h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)


def fused_gate_up(x, w13, w2, offs):
    h13 = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
    gate, up = h13.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)


def dense_swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--autotune", action="store_true")
    args, recipe = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        sys.exit("scripts/benchmark_grouped_mm.py measures GPU speed and needs CUDA")
    cfg, _ = load_config(recipe)
    T = cfg.training.local_batch_size * cfg.training.seq_len
    D, Fh = cfg.model.dim, cfg.moe.ffn_hidden_size
    E, K = cfg.moe.num_experts, cfg.moe.router_topk
    torch.manual_seed(0)
    counts = uniform_counts(T, E, K)
    M = int(counts.sum())
    offs = torch.cumsum(counts, 0).to(torch.int32)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"T={T} tokens, E={E}, K={K}: M={M} rows, {M // E} per expert; D={D}, F={Fh}\n")

    print("| GEMM | grouped ms | dense ms | grouped TFLOP/s | grouped / dense rate |")
    print("|---|---|---|---|---|")
    for name, grouped, dense in gemm_rows(M, D, Fh, offs, E):
        n_out = 2 * Fh if "fused" in name else (Fh if "gate" in name else D)
        k_in = Fh if name.startswith("down") else D
        flops = 2 * M * n_out * k_in
        g_ms, d_ms = gpu_ms(grouped), gpu_ms(dense)
        print(
            f"| {name} | {g_ms:.3f} | {d_ms:.3f} | {flops / g_ms / 1e9:.0f} | {d_ms / g_ms:.0%} |"
        )

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, D, **bf16)
    w1, w3 = (torch.randn(E, Fh, D, **bf16) * 0.02 for _ in range(2))
    w2 = torch.randn(E, D, Fh, **bf16) * 0.02
    w13 = torch.cat([w1, w3], dim=1)
    dense_w = [torch.randn(Fh, D, **bf16) * 0.02 for _ in range(2)]
    dense_w.append(torch.randn(D, Fh, **bf16) * 0.02)
    cases = [
        (
            "three grouped GEMMs (w1, w3, w2)",
            fwd_bwd(lambda *a: three_gemms(*a, offs), x, w1, w3, w2),
        ),
        ("gate+up fused (w13, w2)", fwd_bwd(lambda *a: fused_gate_up(*a, offs), x, w13, w2)),
        ("dense SwiGLU, same FLOPs", fwd_bwd(dense_swiglu, x, *dense_w)),
    ]
    for name, fn, weights in (
        ("three grouped GEMMs", three_gemms, (w1, w3, w2)),
        ("gate+up fused", fused_gate_up, (w13, w2)),
    ):
        compiled = torch.compile(fn, dynamic=False)
        cases.append(
            (
                f"{name}, compiled",
                fwd_bwd(lambda *a, compiled=compiled: compiled(*a, offs), x, *weights),
            )
        )
    if args.autotune:
        for name, fn, weights in (
            ("three grouped GEMMs", three_gemms, (w1, w3, w2)),
            ("gate+up fused", fused_gate_up, (w13, w2)),
        ):
            tuned = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
            cases.append(
                (
                    f"{name}, max-autotune",
                    fwd_bwd(lambda *a, tuned=tuned: tuned(*a, offs), x, *weights),
                )
            )
    flops = 18 * M * D * Fh
    print("\n| SwiGLU experts, forward + backward | GPU ms | TFLOP/s | rate vs dense |")
    print("|---|---|---|---|")
    times = [(name, gpu_ms(fn, label=name)) for name, fn in cases]
    dense_ms = times[2][1]
    for name, ms in times:
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {dense_ms / ms:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
