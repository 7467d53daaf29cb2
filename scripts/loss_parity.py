"""Does a speed variant train like the plain recipe? Loss curves over N steps, side by side.

    python scripts/loss_parity.py --config train_configs/deepseek_v3.toml \\
        --model.n_layers 4 --parallelism.ep 1 [--variants compiled+bf16_moments,...] \\
        [--baseline compiled] [--steps 200]

Each variant (a name from scripts/benchmark.py) and the baseline train in fresh processes on
the same data in the same order from the same initial weights. A run of the baseline with
another seed (other initial weights and data order) gives the noise to judge by. The table:
mean loss over the last quarter of the steps, its gap to the baseline's, and the mean per-step
gap over those steps (same batches, so only the numerics differ).
"""

import argparse
import json
import sys

import torch
from benchmark import _QUIET, VARIANTS, run_child

NOISE = "baseline, seed + 1"


def _losses(recipe: list[str], steps: int) -> list[float]:
    from torchmoe.config.load import load_config
    from torchmoe.train.trainer import Trainer

    cfg, _ = load_config(recipe + _QUIET)
    trainer = Trainer(cfg)
    return [trainer.train_step().loss for _ in range(steps)]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variants", default="compiled+bf16_moments,compiled+float8")
    parser.add_argument("--baseline", default="compiled")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save", help="write every run's per-step losses to this JSON file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # variant, seed offset
    args, recipe = parser.parse_known_args(argv)
    if args.child:
        name, seed_offset = args.child
        from torchmoe.config.load import load_config

        seed = load_config(recipe + _QUIET)[0].training.seed + int(seed_offset)
        extra = VARIANTS[name] + ["--training.seed", str(seed)]
        print("LOSSES " + json.dumps(_losses(recipe + extra, args.steps)), flush=True)
        return
    names = args.variants.split(",")
    unknown = [n for n in [args.baseline, *names] if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        sys.exit("scripts/loss_parity.py compares GPU speed variants and needs CUDA")
    runs = {}
    for label, name, offset in [
        (args.baseline, args.baseline, 0),
        (NOISE, args.baseline, 1),
        *[(n, n, 0) for n in names],
    ]:
        flags = ["--child", name, str(offset), "--steps", str(args.steps), *recipe]
        runs[label] = run_child(__file__, flags, tag="LOSSES")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(runs, f)
    base = runs[args.baseline]
    if base is None:
        sys.exit(f"the baseline {args.baseline!r} failed (see stderr)")
    tail = slice(args.steps - max(1, args.steps // 4), args.steps)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, {args.steps} steps: {' '.join(recipe)}")
    print(
        f"| run | mean loss, steps {tail.start + 1}-{tail.stop} | gap to {args.baseline} | "
        "mean per-step gap |\n|---|---|---|---|"
    )
    for label, losses in runs.items():
        if losses is None:
            print(f"| {label} | failed (see stderr) | | |")
            continue
        gap = mean(losses[tail]) - mean(base[tail])
        step_gap = mean([abs(a - b) for a, b in zip(losses[tail], base[tail], strict=True)])
        print(f"| {label} | {mean(losses[tail]):.4f} | {gap:+.4f} | {step_gap:.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
