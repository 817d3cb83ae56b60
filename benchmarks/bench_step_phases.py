"""Where one PQ layer's default decode step spends its time on CPU, next to dense SDPA (transformers' decode call).

The attention-bound model of `bench_compile` (Llama-3-8B attention shape), its cache filled at --n tokens with real
projections (k-means waited for), then one layer's step is cut into the parts `PQLayer._rerank_decode` runs and each
part is timed alone (min of --rounds calls, one thread): the shortlist with its log-partition (`pq_shortlist`, with
the outliers), the fused re-ranking + attention (`rerank_attention`), the re-ranking alone, the attention over the
fixed (sink + window) slots alone, the whole `decode`, and dense SDPA over the same cache. --profile adds the
ATen ops of the whole decode (torch.profiler, self time); --primitives times the CPU selection primitives
(`kernels.cpu_np`) against the torch calls they replace on random rows of the step's sizes.

--aten times the same parts again with the native CPU kernels turned off (`kernels.native.disabled()`: the ATen
fallback), in the same process: the before/after of the native kernels.

    python benchmarks/bench_step_phases.py [--n 32768] [--dtype float32|bfloat16] [--profile] [--primitives] [--aten]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pqpatch  # noqa: E402
from bench_compile import build_model, filled_cache  # noqa: E402
from pqpatch import kernels  # noqa: E402
from pqpatch.selection import pq_shortlist  # noqa: E402


def best_ms(fn, rounds: int) -> float:
    fn()  # warm-up, dropped
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def primitives(rounds: int) -> None:
    from pqpatch.kernels import cpu_np

    gen = torch.Generator().manual_seed(0)
    for n, k in ((29458, 6494), (6755, 3247)):  # the 32K shortlist's candidates, the re-ranking's entries
        x = (torch.randn(8, n, generator=gen) * 3).exp()
        mask = torch.rand(8, n, generator=gen) < k / n
        rows = {
            "kth: np.partition": lambda: cpu_np.kth_largest(x, k),
            "kth: torch.topk": lambda: torch.topk(x, k, dim=-1, sorted=False).values.amin(-1),
            "positions: np.flatnonzero": lambda: cpu_np.row_positions(mask),
            "positions: torch.nonzero": lambda: mask.nonzero(as_tuple=True),
        }
        for name, fn in rows.items():
            print(f"[8, {n}] {name:<28} {best_ms(fn, rounds):7.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--primitives", action="store_true")
    ap.add_argument("--aten", action="store_true", help="also time the ATen fallback (native kernels off)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if args.primitives:
        primitives(args.rounds)
    dtype = getattr(torch, args.dtype)
    model = build_model(2, args.n + 64).to(dtype)
    pqpatch.patch_model(model, pqpatch.PQCacheConfig())
    cache = filled_cache(model, args.n, 8, patched=True)
    model(torch.ones(1, 1, dtype=torch.long), cache=cache)  # one real step: the window has moved once
    layer = cache.layers[0]
    q = torch.randn(1, 8, 4, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    scaling = 128 ** -0.5
    lo, hi, sink, local = layer._step_ranges(q)
    k_valid, bh = layer.split_n[2:], q.shape[:2]
    fixed = torch.cat([sink[:, None].expand(*bh, -1), local[:, None].expand(*bh, -1)], -1)
    args_sl = (q, lo, hi, layer.topk_slots, scaling, layer.centroids, layer.codes, layer.cfg.rerank_factor,
               layer.cfg.backend, k_valid, layer.outliers)
    short, log_z = pq_shortlist(*args_sl)
    parts = {
        "shortlist + log_z (pq_shortlist)": lambda: pq_shortlist(*args_sl),
        "re-ranking + attention (rerank_attention)": lambda: kernels.rerank_attention(
            q, layer.keys, layer.values, short, fixed, layer.topk_slots, scaling, backend=layer.cfg.backend,
            k_valid=k_valid, log_z=log_z),
        "  re-ranking alone (rerank_topk)": lambda: kernels.rerank_topk(
            q, layer.keys, short, layer.topk_slots, scaling, backend=layer.cfg.backend, k_valid=k_valid,
            log_z=log_z),
        "  attention over sink + window alone": lambda: kernels.sparse_decode_attention(
            q, layer.keys, layer.values, fixed, scaling, backend=layer.cfg.backend),
        "whole decode (PQLayer.decode)": lambda: layer.decode(q.reshape(1, 32, 1, 128), scaling),
        "dense SDPA, transformers' decode call": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, layer.keys, layer.values, scale=scaling),
    }
    print(f"N={args.n} {args.dtype}, one layer, slots sink/top-k/window = {layer.sink_slots}/{layer.topk_slots}/"
          f"{layer.local_slots}, shortlist {short.shape[-1]} (outliers included)")
    from pqpatch.kernels import native

    paths = ["native", "aten"] if args.aten else ["native"]
    print(f"{'':<44} " + " ".join(f"{p:>9}" for p in paths) + f"   (native kernels: {native.available()})")
    for name, fn in parts.items():
        cols = []
        for p in paths:
            if p == "aten":
                with native.disabled():
                    cols.append(best_ms(fn, args.rounds))
            else:
                cols.append(best_ms(fn, args.rounds))
        print(f"{name:<44} " + " ".join(f"{c:6.2f} ms" for c in cols))
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(5):
                layer.decode(q.reshape(1, 32, 1, 128), scaling)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    pqpatch.unpatch_model(model)


if __name__ == "__main__":
    main()
