"""Exact re-ranking (`kernels.rerank_topk`) against its reference (`quality.rerank_exact_ref`) at the Llama-3-8B
layer shape: B = 1, Hkv = 8, G = 4, D = 128, k = N/10 tokens kept from a shortlist of R = 2k (rerank=2), the
shortlist in ascending position order as the PQ top-k emits it on CPU.

CPU (default): one thread (`torch.set_num_threads(1)`), the reference vs the "cpu" fast path, timed in interleaved
rounds (`bench_util.interleaved_min`), each op's time its minimum over the rounds. CUDA: the reference vs the
Triton path, CUDA events over a captured graph (`bench_util.Timer`). Also prints the bytes of keys the step reads
(R rows per KV head).

    python benchmarks/bench_rerank.py [--n 32768 131072] [--dtype float32] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import Timer, interleaved_min  # noqa: E402
from pqpatch import kernels  # noqa: E402
from pqpatch.kernels.quality import rerank_exact_ref  # noqa: E402

HKV, G, D = 8, 4, 128


def inputs(n: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = n // 10
    r = 2 * k
    q = torch.randn(1, HKV, G, D, generator=gen).to(device, dtype)
    keys = torch.randn(1, HKV, n, D, generator=gen).to(device, dtype)
    short = torch.stack([torch.randperm(n, generator=gen)[:r].sort().values for _ in range(HKV)]).view(1, HKV, r)
    return q, keys, short.to(device), k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype)
    if not cuda:
        torch.set_num_threads(1)
    fast = "triton" if cuda else "cpu"
    print(f"device={'cuda' if cuda else 'cpu'} threads={torch.get_num_threads()} dtype={args.dtype} "
          f"B=1 Hkv={HKV} G={G} D={D} k=N/10 R=2k")
    print(f"{'N':>7} {'R':>6} {'key MB':>7} {'reference ms':>13} {fast + ' ms':>10} {'speedup':>8}")
    for n in args.n:
        q, keys, short, k = inputs(n, dtype, "cuda" if cuda else "cpu")
        s = D ** -0.5
        ops = {
            "ref": lambda: rerank_exact_ref(q, keys, short, k, s),
            "fast": lambda: kernels.rerank_topk(q, keys, short, k, s, backend=fast),
        }
        got, want = ops["fast"](), ops["ref"]()
        assert got.shape == want.shape and int((got == -1).sum()) == int((want == -1).sum())
        best = {name: t * 1e3 for name, t in interleaved_min(ops, args.rounds, Timer(cuda)).items()}  # ms
        mb = HKV * 2 * k * D * keys.element_size() / 1e6
        print(f"{n:>7} {2 * k:>6} {mb:>7.1f} {best['ref']:>13.2f} {best['fast']:>10.2f} "
              f"{best['ref'] / best['fast']:>7.1f}x")


if __name__ == "__main__":
    main()
