"""Generation speed of a recipe's model on one GPU: new tokens per second with the KV cache
and without it (the whole prefix rerun per token), randomly initialised weights.

    python scripts/benchmark_generate.py --config train_configs/deepseek_v3.toml \\
        --model.n_layers 4 --parallelism.ep 1 [--batch 1,8 --prompt-len 128 --new 128]

Weights in bfloat16 on the GPU (float32 on the CPU), dropless MoE as scripts/generate.py
builds it; no stop token, so every row makes --new tokens. Prints one table.
"""

import argparse
import random
import time

import torch

from torchmoe.config.load import load_config
from torchmoe.config.registry import build_model
from torchmoe.inference.generate import generate


def timed(model: torch.nn.Module, prompts: list[list[int]], new: int, cache: bool) -> float:
    generate(model, prompts, 2, set(), kv_cache=cache)  # warm up the kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, prompts, new, set(), kv_cache=cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    args, recipe = parser.parse_known_args()
    cfg, _ = load_config(recipe)
    cfg.moe.eval_capacity_factor = 0.0
    cfg.training.seq_len = max(cfg.training.seq_len, args.prompt_len + args.new)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = build_model(cfg)
        model.init_weights(cfg.model.init_std, cfg.model.n_layers)
    cos_sin = model.rope_cos_sin  # float32, as in training
    model = model.to(dtype).eval()
    model.rope_cos_sin = cos_sin
    rng = random.Random(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}; {cfg.model.name}/{cfg.model.flavor}, {cfg.model.n_layers} layers, {dtype}; "
        f"prompt {args.prompt_len} tokens, {args.new} new\n"
        "| batch | KV cache | new tokens/s | ms per step |\n|---|---|---|---|"
    )
    for batch in map(int, args.batch.split(",")):
        prompts = [
            [rng.randrange(cfg.model.vocab_size) for _ in range(args.prompt_len)]
            for _ in range(batch)
        ]
        for cache in (True, False):
            seconds = timed(model, prompts, args.new, cache)
            print(
                f"| {batch} | {'yes' if cache else 'no'} | {batch * args.new / seconds:,.1f} | "
                f"{1e3 * seconds / args.new:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
