"""Scattered and contiguous reads of a CPU K/V buffer on ordinary vs transparent huge pages, in one process.

The Llama-3-8B layer shape (8 KV heads, head dim 128, float32): `index_select` of N/5 random rows per head in
ascending order (what a sparse decode step gathers) and a contiguous read of the same bytes, from a `torch.zeros`
buffer and from a `pqpatch.hugepages.zeros` one, interleaved rounds, min per op, one thread.

    python benchmarks/bench_hugepages.py [--n 32768] [--rounds 9]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqpatch import hugepages  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    h, d, n = 8, 128, args.n
    k = n // 5
    gen = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randperm(n, generator=gen)[:k].sort().values + i * n for i in range(h)])
    bufs = {"ordinary": torch.zeros(h * n, d), "huge": hugepages.zeros((h * n, d), torch.float32)}
    for b in bufs.values():
        b.normal_(generator=gen)  # fault every page in before timing
    out = torch.empty(rows.numel(), d)
    ops = {}
    for name, b in bufs.items():
        ops[f"gather {name}"] = lambda b=b: torch.index_select(b, 0, rows, out=out)
        ops[f"contiguous {name}"] = lambda b=b: b[: rows.numel()].view(torch.int32).amax()
    best = {name: float("inf") for name in ops}
    names = list(ops)
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            ops[name]()
            dt = time.perf_counter() - t0
            if r:
                best[name] = min(best[name], dt)
    print(f"huge pages available: {hugepages.hugepages_available()}; N={n}, {h} heads x {k} rows of {d} floats")
    for name, t in best.items():
        print(f"{name:<22} {t * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
