"""Summaries of `run_eval` results: Markdown tables, and the JSON / PNG / Markdown files of one run."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from .runner import format_length

__all__ = ["retrieval_table", "kl_table", "recall_table", "summary_markdown", "write_outputs"]


def _label(method: str, budget) -> str:
    return method if budget is None else f"{method} @{budget}"


def _mean(xs) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _rows_in_order(records: list[dict]) -> list[tuple[str, object]]:
    seen: dict[tuple, None] = {}
    for r in records:
        seen.setdefault((r["method"], r["budget"]), None)
    return list(seen)


def retrieval_table(records: list[dict], variant: str | None = None) -> str:
    """Mean score (share of needles recalled) per method/budget (rows) and length (columns), averaged over
    depths (and NIAH variants unless `variant` is given); last column: median decode time per token."""
    recs = [r for r in records if variant is None or r["variant"] == variant]
    lengths = sorted({r["length"] for r in recs})
    cell: dict[tuple, list[float]] = defaultdict(list)
    spt: dict[tuple, list[float]] = defaultdict(list)
    for r in recs:
        cell[(r["method"], r["budget"], r["length"])].append(r["score"])
        spt[(r["method"], r["budget"])].append(r["s_per_token"])
    head = "| method | " + " | ".join(format_length(n) for n in lengths) + " | mean | ms/token |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    for m, b in _rows_in_order(recs):
        vals = [_mean(cell[(m, b, n)]) for n in lengths]
        allv = [s for n in lengths for s in cell[(m, b, n)]]
        ms = sorted(spt[(m, b)])[len(spt[(m, b)]) // 2] * 1e3
        lines.append(
            f"| {_label(m, b)} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {_mean(allv):.2f} | {ms:.0f} |"
        )
    return "\n".join(lines)


def kl_table(records: list[dict]) -> str:
    """Mean KL(dense ‖ method) in nats and top-1 agreement with dense, per method/budget and length."""
    recs = [r for r in records if r["method"] != "dense"]
    lengths = sorted({r["length"] for r in recs})
    by = {(r["method"], r["budget"], r["length"]): r for r in recs}
    head = "| method | " + " | ".join(f"{format_length(n)} KL / top-1" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 1)]
    for m, b in _rows_in_order(recs):
        cells = [f"{by[(m, b, n)]['kl']:.4f} / {by[(m, b, n)]['top1']:.2f}" if (m, b, n) in by else "" for n in lengths]
        lines.append(f"| {_label(m, b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(records: list[dict]) -> str:
    """Per-layer recall (coverage in parentheses), averaged over lengths and decode steps."""
    recs = [r for r in records if r["method"] != "dense"]
    layers = sorted({int(k) for r in recs for k in r["layers"]})
    head = "| method | " + " | ".join(f"layer {i}" for i in layers) + " | mean |"
    lines = [head, "|" + "---|" * (len(layers) + 2)]
    for m, b in _rows_in_order(recs):
        rs = [r for r in recs if (r["method"], r["budget"]) == (m, b)]
        rec = [_mean(r["layers"][str(i)]["recall"] for r in rs if str(i) in r["layers"]) for i in layers]
        cov = [_mean(r["layers"][str(i)]["coverage"] for r in rs if str(i) in r["layers"]) for i in layers]
        cells = [f"{a:.3f} ({c:.2f})" for a, c in zip(rec, cov)]
        lines.append(f"| {_label(m, b)} | " + " | ".join(cells) + f" | {_mean(rec):.3f} ({_mean(cov):.2f}) |")
    return "\n".join(lines)


def summary_markdown(result: dict) -> str:
    """All tables of one run, with its grid and wall time."""
    s = result["settings"]
    tasks = s["tasks"]
    out = [f"## {' + '.join(tasks)}", "", f"grid: lengths {s['lengths']}, budgets {s['budgets']}, "
           f"methods {s['methods']}" + (f", depths {s['depths']}" if tasks[0] in ("passkey", "niah") else "")
           + (f", variants {s['variants']}" if tasks[0] == "niah" else "")
           + (f", teacher tokens {s['teacher_tokens']}" if tasks[0] in ("kl", "recall") else "")
           + f"; wall time {result['wall_s']:.0f} s", ""]
    recs = result["records"]
    if tasks[0] in ("passkey", "niah"):
        over = "depths and variants" if tasks[0] == "niah" and len(s["variants"]) > 1 else "depths"
        out += [f"Accuracy (share of needles recalled), mean over {over}:", "", retrieval_table(recs), ""]
        if tasks[0] == "niah" and len(s["variants"]) > 1:
            for v in s["variants"]:
                out += [f"NIAH {v}:", "", retrieval_table(recs, v), ""]
    if "kl" in tasks:
        out += ["KL(dense ‖ method) per next token (nats) / top-1 agreement with dense:", "", kl_table(recs), ""]
    if "recall" in tasks:
        out += ["Attention recall per layer (coverage of all-token attention mass in parentheses):", "",
                recall_table(recs), ""]
    return "\n".join(out)


def write_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """Write <tasks>.json, <tasks>.md and the task's PNG plots into out_dir; returns the paths written.
    Without matplotlib the plots are skipped with a warning (the numbers are all in the JSON)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = result["settings"]["tasks"]
    stem = "_".join(tasks)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=float) + "\n")
    paths[1].write_text(summary_markdown(result) + "\n")
    recs = result["records"]
    try:
        from . import plots

        plots._plt()
    except ImportError as e:
        print(f"pqpatch: no plots written ({e})", file=sys.stderr)
        return paths
    if tasks[0] in ("passkey", "niah"):
        paths += plots.heatmaps(recs, out, prefix=tasks[0])
    if "kl" in tasks:
        paths.append(plots.kl_plot(recs, out / "kl.png"))
    if "recall" in tasks:
        paths.append(plots.recall_plot(recs, out / "recall.png"))
    return paths
