"""Speed of the MoE permutation kernels (``torchmoe/kernels/moe_permute.py``) on one GPU, and of
the gather-sum and scatter kernels under each tile width and warp count, against the memory's speed.

    python scripts/benchmark_permute.py [--tokens 8192 --dim 2048 --experts 64 --topk 6]

Uniform random top-k routing. Prints one table: microseconds per call (CUDA-event time; for
``permute_indices``, a chain of small launches, that is the host's launch time) and the bytes
each kernel must move per second (GB/s); the sweep rows pick the launch configuration
(``moe_permute._tiles``).
"""

import argparse
import functools
import sys

import torch


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=6)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmark_permute.py needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    from torchmoe.kernels import moe_permute as mp

    T, D, E, K = args.tokens, args.dim, args.experts, args.topk
    torch.manual_seed(0)
    scores = torch.rand(T, E, device="cuda")
    idx_TK = scores.topk(K, dim=-1).indices
    x_TD = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w_TK = torch.rand(T, K, device="cuda")
    dest_TK, src_M, _ = mp.permute_indices(idx_TK, E, 16)
    y_MD = mp.permute(x_TD, dest_TK, src_M)
    out_TD = torch.empty_like(x_TD)
    rows_bytes = T * K * D * 2  # every copy's row read or written once
    token_bytes = T * D * 2

    rows = [
        ("permute_indices", do_bench(lambda: mp.permute_indices(idx_TK, E, 16)), 0),
        ("permute (scatter rows)", do_bench(lambda: mp.permute(x_TD, dest_TK, src_M)), 1),
        (
            "unpermute, weighted (gather-sum)",
            do_bench(lambda: mp.unpermute(y_MD, dest_TK, src_M, w_TK)),
            1,
        ),
    ]
    block_k = triton.next_power_of_2(K)
    out_MD, dw_TK = torch.empty_like(y_MD), torch.empty_like(w_TK)
    kernels = {
        "gather-sum": lambda **launch: mp._gather_sum_kernel[(T,)](
            y_MD, dest_TK, w_TK, out_TD, K, D, HAS_W=True, BLOCK_K=block_k, **launch
        ),
        "scatter": lambda **launch: mp._scatter_rows_kernel[(T,)](
            x_TD,
            dest_TK,
            w_TK,
            y_MD,
            out_MD,
            dw_TK,
            K,
            D,
            HAS_W=False,
            WITH_DW=False,
            BLOCK_K=block_k,
            **launch,
        ),
    }
    for name, kernel in kernels.items():
        for block_d in (256, 512, 1024, 2048):
            if block_d > triton.next_power_of_2(D):
                continue
            for warps in (1, 2, 4, 8):
                ms = do_bench(functools.partial(kernel, BLOCK_D=block_d, num_warps=warps))
                rows.append((f"{name} BLOCK_D={block_d} warps={warps}", ms, 1))
    print("| kernel | us | GB/s |\n|---|---|---|")
    for name, ms, moves in rows:
        gbs = f"{(rows_bytes + token_bytes) / ms / 1e6:.0f}" if moves else "-"
        print(f"| {name} | {ms * 1e3:.1f} | {gbs} |")


if __name__ == "__main__":
    main(sys.argv[1:])
