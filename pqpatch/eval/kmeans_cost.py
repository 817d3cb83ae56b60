"""Cost of one layer's k-means job (what `ClusterPool` runs per PQ layer) at a given codebook and key count.

    python -m pqpatch.eval.kmeans_cost [--keys 8k,32k,128k] [--heads 1] [--head-dim 256] [--bits 8] [--subspaces 2]
                                        [--quantizer pq|residual] [--weighted] [--threads 1]

Keys are random Gaussians (k-means cost depends on the sizes, not on the values). Prints one line per key count:
seconds for the whole job (every KV head and sub-space, one thread of the pool), so a GPU-machine projection
can scale it by the model's KV heads and layers and the pool's threads.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..codebook import train_pq, train_rq


def job_seconds(n: int, heads: int, head_dim: int, bits: int, subspaces: int, quantizer: str = "pq",
                weighted: bool = False, iters: int = 10, seed: int = 0) -> float:
    """Wall seconds of one layer's k-means over n keys of `heads` KV heads (one thread, the default trainer)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, n, head_dim, generator=g)
    w = 1.0 + torch.rand(heads, n, generator=g) if weighted else None
    train = train_rq if quantizer == "residual" else train_pq
    t0 = time.perf_counter()
    train(keys, subspaces, bits, iters, seed, weights=w)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    from ..cli import _csv, parse_length

    p = argparse.ArgumentParser(prog="python -m pqpatch.eval.kmeans_cost", description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=_csv(parse_length), default=(8192, 32768, 131072))
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--subspaces", type=int, default=2)
    p.add_argument("--quantizer", choices=("pq", "residual"), default="pq")
    p.add_argument("--weighted", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads (the pool runs one job per thread)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(a.threads)
    except ImportError:
        pass
    for n in a.keys:
        s = job_seconds(n, a.heads, a.head_dim, a.bits, a.subspaces, a.quantizer, a.weighted)
        print(f"keys {n:>7}  heads {a.heads}  D {a.head_dim}  {a.quantizer} m={a.subspaces} b={a.bits}"
              f"{' weighted' if a.weighted else ''}: {s:.2f} s per layer job")


if __name__ == "__main__":
    main()
