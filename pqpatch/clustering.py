"""Clustering thread pool: k-means of layer i runs on CPU threads while the model goes on with layers i+1...

The main thread hands over a layer's prefill keys with `submit`; the copy to host memory is issued
asynchronously (pinned buffer + CUDA event on GPUs) so the main thread never waits for it. The pool threads
spend their time in faiss or torch kernels, both of which release the GIL.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .kernels.reference import pq_assign_ref

from .codebook import train_pq

__all__ = ["Codebook", "ClusterPool"]


@dataclass
class Codebook:
    """One layer's trained codebook.

    centroids: [B, Hkv, m, K, Ds] float32 (CPU); codes: per sequence b, [Hkv, hi - lo[b], m] uint8 for the
    training positions lo[b] <= n < hi.
    """

    centroids: torch.Tensor
    codes: list[torch.Tensor]


class ClusterPool:
    """A small, long-lived thread pool (one per patched model; closed by `unpatch_model`)."""

    def __init__(self, num_threads: int | None = None) -> None:
        n = num_threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pqpatch-kmeans")
        self.num_threads = n

    def submit(
        self,
        keys: torch.Tensor,
        lo: list[int],
        hi: int,
        num_subspaces: int,
        bits: int,
        iters: int,
        seed: int,
        ready: torch.cuda.Event | None = None,
    ) -> Future:
        """Cluster keys[b, :, lo[b]:hi] of every sequence b. keys: [B, Hkv, N, D] on any device.

        `ready`: the keys are a host buffer that an asynchronous copy is still filling; the job waits for this
        event instead of copying them. Returns a Future of `Codebook`.
        """
        src = keys[:, :, : max(hi, 0)]
        if ready is not None:
            host = src  # positions [lo, hi) of a host store are never written again
        elif src.device.type == "cuda":
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            host.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = src.clone(), None  # the buffer is written in place later: take a copy

        def job() -> Codebook:
            if ready is not None:
                ready.synchronize()
            rows = [host[b, :, lo[b] : max(hi, lo[b])] for b in range(host.shape[0])]  # [Hkv, n_b, D] each
            books = [train_pq(x, num_subspaces, bits, iters, seed) for x in rows]
            # A heavily left-padded sequence may have fewer training keys than centroids (none at all, even):
            # its codebook would be nearly flat. Borrow the codebook of the sequence with the most keys (same
            # layer and heads, so the same key distribution) and code its own keys with it.
            richest = max(range(len(rows)), key=lambda b: rows[b].shape[1])
            for b, x in enumerate(rows):
                if x.shape[1] < 1 << bits <= rows[richest].shape[1]:
                    c = books[richest][0]  # [Hkv, m, K, Ds]
                    books[b] = (c, pq_assign_ref(x[None].float(), c[None])[0])
            return Codebook(torch.stack([c for c, _ in books]), [q for _, q in books])

        return self._pool.submit(job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
