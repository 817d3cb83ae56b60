"""Summaries of `run_eval` results: Markdown tables, and the JSON / PNG / Markdown files of one run."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from .runner import format_length

__all__ = ["retrieval_table", "kl_table", "recall_table", "recall_length_table", "cell_stats", "summary_markdown",
           "write_outputs"]


def _label(method: str, budget) -> str:
    return method if budget is None else f"{method} @{budget}"


def _mean(xs) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _rep(r: dict) -> tuple:
    """Which repetition of a cell a record belongs to: (prompt seed, k-means seed offset)."""
    return r.get("seed", 0), r.get("kmeans_seed")


def _spread(xs: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min, max and count of xs (NaNs skipped)."""
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "sd": sd, "min": min(xs), "max": max(xs), "n": len(xs)}


def _fmt(st: dict, digits: int = 2) -> str:
    """ "0.83" for one repetition, "0.83 ± 0.04" (mean ± sd over repetitions) for several."""
    if st["n"] <= 1:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['sd']:.{digits}f}"


def _per_rep(recs: list[dict], value) -> list[float]:
    """value(record) averaged within each repetition (over depths, variants, layers), one number per repetition."""
    by: dict[tuple, list[float]] = defaultdict(list)
    for r in recs:
        by[_rep(r)].append(value(r))
    return [_mean(v) for v in by.values()]


def _layer_mean(r: dict, what: str = "recall") -> float:
    return _mean(v[what] for v in r["layers"].values())


def cell_stats(records: list[dict]) -> list[dict]:
    """Mean and spread over repetitions (prompt seeds x k-means seeds) of every (method, budget, length) cell:
    retrieval score, or KL, top-1, recall and coverage (means over layers) of the teacher-forced tasks."""
    out = []
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["method"], r["budget"], r["length"])].append(r)
    for (m, b, n), recs in cells.items():
        row = {"method": m, "budget": b, "length": n, "repetitions": len({_rep(r) for r in recs})}
        if "score" in recs[0]:
            row["score"] = _spread(_per_rep(recs, lambda r: r["score"]))
        else:
            row["kl"] = _spread(_per_rep(recs, lambda r: r["kl"]))
            row["top1"] = _spread(_per_rep(recs, lambda r: r["top1"]))
            if m != "dense":
                row["recall"] = _spread(_per_rep(recs, _layer_mean))
                row["coverage"] = _spread(_per_rep(recs, lambda r: _layer_mean(r, "coverage")))
        out.append(row)
    return out


def _rows_in_order(records: list[dict]) -> list[tuple[str, object]]:
    seen: dict[tuple, None] = {}
    for r in records:
        seen.setdefault((r["method"], r["budget"]), None)
    return list(seen)


def retrieval_table(records: list[dict], variant: str | None = None) -> str:
    """Mean score (share of needles recalled) per method/budget (rows) and length (columns), averaged over
    depths (and NIAH variants unless `variant` is given); with repeated cells (prompt / k-means seeds), the mean
    ± sd over repetitions of those averages. Last column: median decode time per token."""
    recs = [r for r in records if variant is None or r["variant"] == variant]
    lengths = sorted({r["length"] for r in recs})
    cell: dict[tuple, list[dict]] = defaultdict(list)
    spt: dict[tuple, list[float]] = defaultdict(list)
    for r in recs:
        cell[(r["method"], r["budget"], r["length"])].append(r)
        spt[(r["method"], r["budget"])].append(r["s_per_token"])
    head = "| method | " + " | ".join(format_length(n) for n in lengths) + " | mean | ms/token |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    score = lambda r: r["score"]  # noqa: E731
    for m, b in _rows_in_order(recs):
        vals = [_fmt(_spread(_per_rep(cell[(m, b, n)], score))) if cell[(m, b, n)] else "" for n in lengths]
        allv = _fmt(_spread(_per_rep([r for n in lengths for r in cell[(m, b, n)]], score)))
        ms = sorted(spt[(m, b)])[len(spt[(m, b)]) // 2] * 1e3
        lines.append(f"| {_label(m, b)} | " + " | ".join(vals) + f" | {allv} | {ms:.0f} |")
    return "\n".join(lines)


def kl_table(records: list[dict]) -> str:
    """Mean KL(dense ‖ method) in nats and top-1 agreement with dense, per method/budget and length."""
    recs = [r for r in records if r["method"] != "dense"]
    lengths = sorted({r["length"] for r in recs})
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        by[(r["method"], r["budget"], r["length"])].append(r)
    head = "| method | " + " | ".join(f"{format_length(n)} KL / top-1" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 1)]
    for m, b in _rows_in_order(recs):
        cells = [
            f"{_fmt(_spread(_per_rep(by[(m, b, n)], lambda r: r['kl'])), 4)} / "
            f"{_mean(_per_rep(by[(m, b, n)], lambda r: r['top1'])):.2f}" if by[(m, b, n)] else "" for n in lengths
        ]
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


def recall_length_table(records: list[dict]) -> str:
    """Recall (mean over PQ layers and decode steps) per method/budget and length: mean ± sd over repetitions
    (prompt seeds x k-means seeds), with the range in the last column."""
    recs = [r for r in records if r["method"] != "dense"]
    lengths = sorted({r["length"] for r in recs})
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        by[(r["method"], r["budget"], r["length"])].append(r)
    head = "| method | " + " | ".join(format_length(n) for n in lengths) + " | min–max |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for m, b in _rows_in_order(recs):
        sts = [_spread(_per_rep(by[(m, b, n)], _layer_mean)) for n in lengths]
        lo = min((s["min"] for s in sts if s["n"]), default=float("nan"))
        hi = max((s["max"] for s in sts if s["n"]), default=float("nan"))
        lines.append(f"| {_label(m, b)} | " + " | ".join(_fmt(s, 3) if s["n"] else "" for s in sts)
                     + f" | {lo:.3f}–{hi:.3f} |")
    return "\n".join(lines)


def summary_markdown(result: dict) -> str:
    """All tables of one run, with its grid and wall time."""
    s = result["settings"]
    tasks = s["tasks"]
    out = [f"## {' + '.join(tasks)}", "", f"grid: lengths {s['lengths']}, budgets {s['budgets']}, "
           f"methods {s['methods']}" + (f", depths {s['depths']}" if tasks[0] in ("passkey", "niah") else "")
           + (f", variants {s['variants']}" if tasks[0] == "niah" else "")
           + (f", teacher tokens {s['teacher_tokens']}" if tasks[0] in ("kl", "recall") else "")
           + (f", prompt seeds {list(s['seeds'])}" if s.get("seeds") else "")
           + (f", k-means seed offsets {list(s['kmeans_seeds'])}" if len(s.get("kmeans_seeds") or ()) > 1 else "")
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
        out += ["Attention recall per length (mean over layers and steps; mean ± sd over repetitions):", "",
                recall_length_table(recs), ""]
    return "\n".join(out)


def write_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """Write <tasks>.json, <tasks>.md and the task's PNG plots into out_dir; returns the paths written.
    Without matplotlib the plots are skipped with a warning (the numbers are all in the JSON)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = result["settings"]["tasks"]
    stem = "_".join(tasks)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    result = {**result, "cells": cell_stats(result["records"])}  # mean and spread of every cell
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
