"""Plot how a run spread its tokens over the experts, from its metrics.jsonl.

    python scripts/plot_expert_load.py outputs/debug_model [--last N] [--out load.png]

The argument is a run's dump folder or its metrics.jsonl. One PNG (default: expert_load.png next
to the metrics file) shows: a heatmap of each MoE layer's tokens per expert relative to the
uniform share (1 = balanced, 0 = dead; over the last N log rows, or the whole run), the loss
curve (and the balance loss), each layer's load imbalance over the steps (max/mean, or the
coefficient of variation with ``--imbalance cv``), and the router entropy, dropped fraction and
expert-bias norm per layer where the run logged them.

matplotlib is an optional dependency (``pip install -e ".[plot]"``); without it, and for a
missing, empty or load-free metrics file, the script prints one line and exits with status 2.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Per-layer series drawn over the steps when present: key -> (panel title, y label).
EXTRA_SERIES = {
    "entropy": ("Router entropy per token", "nats"),
    "dropped_frac": ("Dropped routed copies", "fraction"),
    "bias_norm": ("Expert-bias norm (aux-loss-free balancing)", "L2 norm"),
}


class InputError(ValueError):
    """Input the script cannot plot; printed on one line."""


def find_metrics(path: Path) -> Path:
    """The metrics file of a run folder, or the file itself."""
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise InputError(
            f"{path}: no metrics.jsonl (give a run's job.dump_folder or its metrics.jsonl)"
        )
    return metrics


def read_rows(metrics: Path) -> list[dict]:
    """The log rows that carry per-layer expert loads, in file order."""
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise InputError(f"{metrics} line {number} is not JSON") from None
    if not rows:
        raise InputError(f"{metrics} is empty; the run logged no step")
    rows = [r for r in rows if r.get("per_layer", {}).get("tokens")]
    if not rows:
        raise InputError(
            f"{metrics} has no per-layer expert loads (a dense model, or a run without MoE layers)"
        )
    shape = np.shape(rows[-1]["per_layer"]["tokens"])  # rows of an earlier, other model: skip
    return [r for r in rows if np.shape(r["per_layer"]["tokens"]) == shape]


def relative_load(rows: list[dict]) -> np.ndarray:
    """Tokens per expert summed over ``rows``, over each layer's mean: [layers, experts]."""
    tokens = np.sum([r["per_layer"]["tokens"] for r in rows], axis=0, dtype=np.float64)
    return tokens / np.maximum(tokens.mean(axis=1, keepdims=True), 1e-12)


def series(rows: list[dict], key: str) -> np.ndarray | None:
    """A per-layer value over the steps, [steps, layers], or None when not logged."""
    if any(key not in r["per_layer"] for r in rows):
        return None
    return np.array([r["per_layer"][key] for r in rows], dtype=np.float64)


def plot(rows: list[dict], last: int, imbalance: str, title: str):
    """The figure described in the module docstring."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    window = rows[-last:] if last else rows
    steps = [r["step"] for r in rows]
    panels = [("loss", None), ("imbalance", series(rows, imbalance))]
    panels += [
        (key, values)
        for key in EXTRA_SERIES
        if (values := series(rows, key)) is not None and values.any()
    ]
    fig = Figure(figsize=(max(12, 4.2 * len(panels)), 9), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[1.1, 1])
    fig.suptitle(title, fontsize=13)

    load = relative_load(window)
    n_layers, n_experts = load.shape
    ax = fig.add_subplot(grid[0, :])
    image = ax.imshow(
        load,
        aspect="auto",
        cmap="RdBu_r",
        interpolation="nearest",
        norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, load.max())),
    )
    fig.colorbar(image, ax=ax, label="tokens / uniform share")
    ax.set_title(
        f"Expert load, steps {window[0]['step']}-{window[-1]['step']} "
        f"({len(window)} log rows); blue = under-used, red = over-used, 0 = dead"
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(_ticks(n_experts))
    ax.set_yticks(_ticks(n_layers))
    if n_layers * n_experts <= 160:
        for (layer, expert), value in np.ndenumerate(load):
            dark = abs(image.norm(value) - 0.5) > 0.3  # far from the white centre
            ax.text(
                expert,
                layer,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )

    for column, (key, values) in enumerate(panels):
        ax = fig.add_subplot(grid[1, column])
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
        if key == "loss":
            _loss_panel(ax, rows)
            continue
        name, unit = (
            "Load imbalance per layer",
            "max / mean tokens per expert"
            if imbalance == "max_over_mean"
            else "CV of tokens per expert",
        )
        if key in EXTRA_SERIES:
            name, unit = EXTRA_SERIES[key]
        ax.set_title(name)
        ax.set_ylabel(unit)
        colors = _layer_colors(values.shape[1])
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], color=colors[layer], label=f"layer {layer}")
        if values.shape[1] <= 8:
            ax.legend(fontsize=8)
    return fig


def _loss_panel(ax, rows: list[dict]) -> None:
    steps = [r["step"] for r in rows]
    ax.set_title("Loss")
    ax.plot(steps, [r["loss"] for r in rows], color="C0", label="loss")
    ax.set_ylabel("language-model loss")
    aux = [r.get("aux_loss") or 0.0 for r in rows]
    if any(aux):
        twin = ax.twinx()
        twin.plot(steps, aux, color="C1", linestyle="--", label="balance loss")
        twin.set_ylabel("balance loss", color="C1")
        twin.tick_params(axis="y", colors="C1")
        ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=8)


def _ticks(n: int) -> list[int]:
    """At most ~16 integer ticks."""
    return list(range(0, n, max(1, -(-n // 16))))


def _layer_colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](i / max(1, n - 1) * 0.9) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run's dump folder or its metrics.jsonl")
    parser.add_argument(
        "--last",
        type=int,
        default=0,
        help="heatmap over the last N log rows (default: the whole run)",
    )
    parser.add_argument("--imbalance", choices=("max_over_mean", "cv"), default="max_over_mean")
    parser.add_argument(
        "--out", type=Path, help="PNG path (default: expert_load.png next to the metrics file)"
    )
    args = parser.parse_args(argv)
    if args.last < 0:
        parser.error("--last must be >= 0")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "error: matplotlib is not installed; pip install matplotlib "
            '(or pip install -e ".[plot]")',
            file=sys.stderr,
        )
        return 2
    try:
        metrics = find_metrics(args.run)
        rows = read_rows(metrics)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or metrics.parent / "expert_load.png"
    plot(rows, args.last, args.imbalance, str(metrics)).savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
