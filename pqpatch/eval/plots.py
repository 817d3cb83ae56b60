"""PNG plots of evaluation records (matplotlib, imported on use, Agg backend: no display needed)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from .runner import format_length

__all__ = ["heatmaps", "kl_plot", "recall_plot"]

_COLORS = {"pq": "tab:blue", "oracle": "tab:green", "streaming": "tab:orange", "quest": "tab:red"}


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def heatmaps(records: list[dict], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per method: accuracy over (needle depth, length), a panel per (variant, budget)."""
    plt = _plt()
    paths = []
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    variants = list(dict.fromkeys(r["variant"] for r in records))
    for method in dict.fromkeys(r["method"] for r in records):
        recs = [r for r in records if r["method"] == method]
        budgets = list(dict.fromkeys(r["budget"] for r in recs))
        fig, axes = plt.subplots(
            len(variants), len(budgets), figsize=(1.0 + 2.6 * len(budgets), 0.6 + 2.2 * len(variants)),
            squeeze=False,
        )
        for i, v in enumerate(variants):
            for j, b in enumerate(budgets):
                cell = defaultdict(list)
                for r in recs:
                    if r["variant"] == v and r["budget"] == b:
                        cell[(r["depth"], r["length"])].append(r["score"])
                grid = [[_mean(cell[(d, n)]) if cell[(d, n)] else float("nan") for n in lengths] for d in depths]
                ax = axes[i][j]
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                for y, row in enumerate(grid):
                    for x, val in enumerate(row):
                        if not math.isnan(val):
                            ax.text(x, y, f"{val:.2f}", ha="center", va="center", fontsize=8)
                ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], fontsize=8)
                ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=8)
                title = v if b is None else f"{v}, budget {b}"
                ax.set_title(title, fontsize=9)
                if j == 0:
                    ax.set_ylabel("needle depth", fontsize=8)
                if i == len(variants) - 1:
                    ax.set_xlabel("context length", fontsize=8)
        fig.suptitle(f"{prefix}: {method}", fontsize=10)
        fig.tight_layout()
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", method)  # "pq:bits=8" -> "pq_bits_8": a portable file name
        path = out_dir / f"{prefix}_heatmap_{safe}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _series(records: list[dict], value) -> dict[str, dict[float, list[float]]]:
    """method -> budget -> values (dense left out: it is the reference)."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["method"] != "dense":
            out[r["method"]][r["budget"]].append(value(r))
    return out


def kl_plot(records: list[dict], path: Path) -> Path:
    """KL(dense ‖ method) and top-1 agreement vs budget, a column per context length."""
    plt = _plt()
    lengths = sorted({r["length"] for r in records})
    fig, axes = plt.subplots(2, len(lengths), figsize=(1.0 + 3.0 * len(lengths), 5.5), squeeze=False)
    for j, n in enumerate(lengths):
        recs = [r for r in records if r["length"] == n]
        for row, (key, label) in enumerate((("kl", "KL(dense ‖ method), nats"), ("top1", "top-1 agreement"))):
            ax = axes[row][j]
            for m, by_b in _series(recs, lambda r: r[key]).items():
                bs = sorted(by_b)
                ax.plot(bs, [_mean(by_b[b]) for b in bs], "o-", label=m, color=_COLORS.get(m))
            ax.set_xlabel("token budget", fontsize=8)
            if row == 0:
                ax.set_yscale("log")
                ax.set_title(f"{format_length(n)} context", fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def recall_plot(records: list[dict], path: Path) -> Path:
    """Attention recall (top) and coverage (bottom) vs budget, a column per PQ layer, mean over lengths."""
    plt = _plt()
    layers = sorted({int(k) for r in records for k in r["layers"]})
    fig, axes = plt.subplots(2, max(1, len(layers)), figsize=(1.0 + 3.0 * max(1, len(layers)), 5.5), squeeze=False)
    for j, layer in enumerate(layers):
        key = str(layer)
        for row, what in enumerate(("recall", "coverage")):
            ax = axes[row][j]
            ser = _series([r for r in records if key in r["layers"]], lambda r: r["layers"][key][what])
            for m, by_b in ser.items():
                bs = sorted(by_b)
                ax.plot(bs, [_mean(by_b[b]) for b in bs], "o-", label=m, color=_COLORS.get(m))
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("token budget", fontsize=8)
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=9)
            if j == 0:
                ax.set_ylabel("recall of oracle top-k mass" if row == 0 else "coverage of dense attention", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
