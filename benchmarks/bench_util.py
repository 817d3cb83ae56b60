"""Timing and gating helpers of the pytest-benchmark suite (`python -m pytest benchmarks -q [--benchmark-json f]`).

Timing rule: every op of a case is timed in the same process, in interleaved rounds (the order rotates every round,
so no op always runs after the same neighbour), and each op's time is its minimum over the rounds. Gates compare
ratios to dense SDPA of the same rounds, so a machine that is busier (shared CI cores) slows both sides alike.
On CUDA an op's time is the mean of `inner` back-to-back launches between CUDA events (one replay of a captured CUDA
graph when capture works), so launch overhead of the Python wrappers is not what is measured.

Sizes: `PQPATCH_BENCH_SIZES=8192,32768,131072` overrides the sizes of thresholds.json (CPU default: 32K only, to stay
within CI's time; 128K takes about a minute more). `PQPATCH_BENCH_BACKEND=torch` times the reference ops instead
(the "before" of issue 9; its gates fail, the table is still printed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

THRESHOLDS = json.loads((Path(__file__).with_name("thresholds.json")).read_text())
ROWS: list[dict] = []  # one per measured case, printed at the end of the session


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def settings() -> dict:
    """The thresholds.json section of this machine's device kind, sizes overridden by PQPATCH_BENCH_SIZES."""
    s = dict(THRESHOLDS[device_kind()])
    env = os.environ.get("PQPATCH_BENCH_SIZES")
    if env:
        s["sizes"] = [int(v) for v in env.split(",") if v.strip()]
    s["backend"] = os.environ.get("PQPATCH_BENCH_BACKEND", s["backend"])  # "torch": the reference, for a before/after
    return s


class Timer:
    """Seconds per call of fn: wall clock on CPU; CUDA events over `inner` launches (a CUDA graph when possible)."""

    def __init__(self, cuda: bool, inner: int = 20):
        self.cuda, self.inner = cuda, inner
        self._graphs: dict[int, object] = {}

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        run = self._graph(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(self.inner):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / self.inner

    def _graph(self, fn: Callable[[], object]) -> Callable[[], object]:
        key = id(fn)
        if key not in self._graphs:
            try:  # warm up on a side stream, then capture; ops that cannot be captured run eagerly
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                self._graphs[key] = graph.replay
            except Exception:  # noqa: BLE001 - timing eagerly is the honest fallback
                self._graphs[key] = fn
        return self._graphs[key]


def interleaved_min(fns: dict[str, Callable[[], object]], rounds: int, timer: Timer) -> dict[str, float]:
    """Minimum seconds per op over `rounds` interleaved rounds (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    best = {n: float("inf") for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            best[n] = min(best[n], timer(fns[n]))
    return best


def gate(name: str, value: float, section: dict) -> tuple[bool, str]:
    """(passes, 'name value <= gate (target t)') for a time gate of thresholds.json."""
    g = section["gates"][name]
    ok = value <= g["gate"]
    return ok, f"{name} {value:.3f} {'<=' if ok else '>'} gate {g['gate']} (target {g['target']})"
