"""Kernel benchmark: PQ top-k selection and sparse decode attention vs the torch reference and dense SDPA decode.

One decode step of one layer at the Llama-3-8B shape (B = 1, 32 query heads, 8 KV heads, D = 128, bf16, PQ m = 2,
6 bits) for N cached tokens and k = N/5, N/10 selected. Reports microseconds and GB/s of the bytes each op must move:

    pq_topk          Hkv * (N * m code bytes + k * 8 index bytes) + centroids + query
    sparse_attn      Hkv * k * ((D + Dv) * 2 + 8)  (K/V rows of the selected tokens + their indices)
    dense_sdpa       Hkv * N * (D + Dv) * 2        (the whole cache)

Timing on CUDA, both with the L2 cache flushed before every run (a decode step reads each layer's data once, so a
warm L2 would flatter the kernels), median: "us" times the eager call (triton.testing.do_bench: Python wrapper and
launches included); "graph us" captures the call in a CUDA graph once and times its replay the same way, i.e. without
Python launch overhead, as a compiled decode step runs. GB/s uses "graph us" when there is one, else "us"; the two
are never mixed by taking a minimum. On CPU (--smoke, or no GPU) a tiny configuration runs (Triton through the
interpreter, plus the "cpu" fast path) with wall-clock timing, only to check that the script works; the CPU numbers
that matter come from `python -m pytest benchmarks`.

    python benchmarks/bench_kernels.py [--smoke] [--out results/bench_kernels.json] [--n 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqpatch import kernels  # noqa: E402

HKV, G, D, M, BITS = 8, 4, 128, 2, 6
DTYPE = torch.bfloat16


def _inputs(n: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    kc = 2 ** BITS
    return dict(
        q=torch.randn(1, HKV, G, D, generator=gen, device=device, dtype=DTYPE),
        c=torch.randn(1, HKV, M, kc, D // M, generator=gen, device=device, dtype=DTYPE),
        codes=torch.randint(0, kc, (1, HKV, n, M), generator=gen, device=device, dtype=torch.uint8),
        keys=torch.randn(1, HKV, n, D, generator=gen, device=device, dtype=DTYPE),
        values=torch.randn(1, HKV, n, D, generator=gen, device=device, dtype=DTYPE),
        lo=torch.zeros(1, dtype=torch.int64, device=device),
        hi=torch.full((1,), n, dtype=torch.int64, device=device),
    )


def _time_us(fn: Callable[[], object], cuda: bool, graph: bool = False) -> float:
    if not cuda:
        fn()  # warm-up (interpreter: first call binds the kernels)
        t0 = time.perf_counter()
        reps = 2
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6
    import triton.testing as tt

    if graph:
        fn()  # compile / autotune outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # flushes L2 before every call


def bench(ns: list[int], ratios: list[int], cuda: bool) -> list[dict]:
    import torch.nn.functional as F

    device = "cuda" if cuda else "cpu"
    scaling = 1.0 / math.sqrt(D)
    rows = []
    for n in ns:
        x = _inputs(n, device)
        # dense as transformers runs a decode step (pack_gqa): the G query heads of a KV head as G query rows
        # [B, Hkv, G, D], so K and V are read once (enable_gqa re-reads them per query head on CPU, ~3.7x slower)
        dense = lambda: F.scaled_dot_product_attention(x["q"], x["keys"], x["values"], scale=scaling)  # noqa: E731
        dense_bytes = HKV * n * 2 * D * 2
        rows.append(_row(n, n, "dense_sdpa", "torch", dense, dense_bytes, cuda))  # attends to all k = N tokens
        for ratio in ratios:
            k = max(1, n // ratio)
            sel_bytes = HKV * (n * M + k * 8) + HKV * M * 2 ** BITS * (D // M) * 2 + HKV * G * D * 2
            attn_bytes = HKV * k * (2 * D * 2 + 8) + 2 * HKV * G * D * 2
            for backend in ("triton", "torch") + (() if cuda else ("cpu",)):
                topk = lambda b=backend: kernels.pq_topk(x["q"], x["c"], x["codes"], x["lo"], x["hi"], k,  # noqa
                                                         scaling, backend=b)
                idx = topk()
                attn = lambda b=backend, i=idx: kernels.sparse_decode_attention(x["q"], x["keys"], x["values"],  # noqa
                                                                                i, scaling, backend=b)
                both = lambda t=topk, b=backend: kernels.sparse_decode_attention(  # noqa: E731
                    x["q"], x["keys"], x["values"], t(), scaling, backend=b)
                rows.append(_row(n, k, "pq_topk", backend, topk, sel_bytes, cuda))
                rows.append(_row(n, k, "sparse_attn", backend, attn, attn_bytes, cuda))
                rows.append(_row(n, k, "topk+attn", backend, both, sel_bytes + attn_bytes, cuda))
        del x
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _row(n: int, k: int, op: str, backend: str, fn: Callable[[], object], nbytes: int, cuda: bool) -> dict:
    row = dict(n=n, k=k, op=op, backend=backend, bytes=nbytes, us=None, graph_us=None, gbps=None, error=None)
    try:
        row["us"] = _time_us(fn, cuda)
        if cuda:
            try:
                row["graph_us"] = _time_us(fn, cuda, graph=True)
            except Exception as e:  # not capturable (e.g. a host sync): keep the eager number, say why
                row["graph_error"] = f"{type(e).__name__}: {e}"[:200]
        t = row["graph_us"] if row["graph_us"] is not None else row["us"]  # both L2-flushed: never a min of the two
        row["gbps"] = nbytes / t / 1e3  # bytes / us / 1e3 = GB/s
    except Exception as e:  # one failing measurement must not hide the others
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def format_table(rows: list[dict]) -> str:
    fmt = lambda v, w, p: "-".rjust(w) if v is None else f"{v:{w}.{p}f}"  # noqa: E731
    lines = [f"{'N':>7} {'k':>6} {'op':<12} {'backend':<7} {'us':>9} {'graph us':>9} {'MB':>8} {'GB/s':>7}"]
    for r in rows:
        lines.append(f"{r['n']:>7} {r['k']:>6} {r['op']:<12} {r['backend']:<7} {fmt(r['us'], 9, 1)} "
                     f"{fmt(r['graph_us'], 9, 1)} {r['bytes'] / 1e6:8.2f} {fmt(r['gbps'], 7, 0)}"
                     + (f"  ERROR {r['error']}" if r["error"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (CPU interpreter friendly)")
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 131072], help="cached tokens")
    ap.add_argument("--ratios", type=int, nargs="+", default=[5, 10], help="k = N / ratio")
    ap.add_argument("--out", default="results/bench_kernels.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    ns = [512] if args.smoke or not cuda else args.n
    ratios = [5] if args.smoke or not cuda else args.ratios
    rows = bench(ns, ratios, cuda)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}), " \
                                                         "Triton interpreter"
    print(f"device: {device}; B=1 Hkv={HKV} G={G} D={D} {str(DTYPE)[6:]} m={M} bits={BITS}")
    print(format_table(rows))
    result = dict(device=device, torch=torch.__version__, triton=_triton_version(), smoke=not cuda or args.smoke,
                  shape=dict(B=1, Hkv=HKV, G=G, D=D, dtype=str(DTYPE), m=M, bits=BITS), rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 1 if any(r["error"] for r in rows) else 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
