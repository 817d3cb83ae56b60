"""Clustering thread pool: k-means of layer i runs on CPU threads while the model goes on with layers i+1...

The main thread hands over a layer's prefill keys with `submit`; the copy to host memory is issued
asynchronously (pinned buffer + CUDA event on GPUs) so the main thread never waits for it. The pool threads
spend their time in faiss or torch kernels, both of which release the GIL.

On CUDA a layer's job is split by KV heads over the pool's threads (`_Joined` joins the parts): nothing later in
the prefill hides the last layers' jobs, and the first decode step waits for them, so they should use every
clustering thread while the host is otherwise idle. For CPU keys the job is not split (`split_heads` None): the
prefill computes on the same cores, so no core is idle for the parts; on the 2-core CPU the split made no measurable
difference (benchmarks/test_model_step.py at 2K: time to first / second token 1.10-1.14x / 1.26-1.32x dense split,
1.11x / 1.31x unsplit). Set `pool.split_heads = True` to force it (tests do). k-means problems are seeded by global head, so the split does not change faiss's codebooks (the torch
fallback's weighted sampling draws per call, so its codebooks depend on the split, i.e. on `num_threads`).

Abandoned jobs: a generate() that ends before its first decode step never collects its codebooks. Its caller
hands those futures to `cancel`: queued jobs are dropped, running ones stop at the next (head, sub-space)
problem boundary, and an exception from any of them is logged (nobody will call `.result()` to see it).

Pinned staging on CUDA: each resident-cache submit snapshots its keys (and k-means weights) into page-locked
host memory leased from the pool's `StagingBuffers` (`pinned.py`: exactly sized cudaHostRegister'ed buffers, no
power-of-two rounding, no zero-fill). One shared buffer would not be safe: the copy must snapshot the keys in
stream order at submit time (positions may be rewritten later), every layer submits during the same prefill long
before the first job finishes, and forks or manual loops may run several caches' jobs at once. So each job
leases a buffer of its own and gives it back when it can no longer read it (its future is done: finished,
stopped or cancelled before it ran); the next submit that fits reuses it. After the first call a model's
prefills pin nothing new (per layer a buffer for its keys and one for its k-means weights, grown when a longer
prompt needs them). Offloaded layers pass `ready` and are read in place (no copy at all).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from . import codebook
from .codebook import ClusteringStopped, train_pq, train_rq
from .kernels.quality import rq_assign_ref
from .kernels.reference import pq_assign_ref
from .pinned import StagingBuffers

__all__ = ["Codebook", "ClusterPool", "ClusteringStopped", "default_num_threads"]

log = logging.getLogger("pqpatch")


@dataclass
class Codebook:
    """One layer's trained codebook.

    centroids: [B, Hkv, m, K, Ds] float32 (CPU); codes: per sequence b, [Hkv, hi - lo[b], m] uint8 for the
    training positions lo[b] <= n < hi. trainer: the k-means that produced it, "faiss" or "torch".
    outliers: per sequence b, [Hkv, min(outliers, hi - lo[b])] int64, the worst-coded training positions
    (relative to lo[b], ascending; `codebook.worst_coded`); empty lists when the job was not asked for them.
    """

    centroids: torch.Tensor
    codes: list[torch.Tensor]
    trainer: str = "faiss"
    outliers: list[torch.Tensor] = field(default_factory=list)


def default_num_threads() -> int:
    """Clustering threads when `num_threads` is None: max(1, min(4, cpus // local_world_size)).

    cpus: the CPUs this process may run on (its affinity mask where the OS has one, else the CPU count).
    local_world_size: the processes sharing this host, from `LOCAL_WORLD_SIZE` (set by torchrun for every rank);
    1 when unset. Every tensor-parallel rank runs its own pool on the same host cores, so each takes its share
    instead of all of them asking for 4 threads on one machine.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(4, cpus // local))


class _Joined(Future):
    """The Future of one layer's job, resolved when all its per-head-range parts are done (`ClusterPool.submit`).
    It behaves like one pool job: running once a part runs; `cancel()` succeeds only while no part has started
    (then every part is dropped), otherwise it asks the running parts to stop at their next problem boundary
    and the future ends with `ClusteringStopped` (or the error a part raised)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop
        self.parts: list[Future] = []

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        self.stop.set()
        for f in self.parts:
            f.cancel()
        return self.cancelled()  # the last part's callback cancels this future when no part had started


class ClusterPool:
    """A small, long-lived thread pool (one per patched model; closed by `unpatch_model`).

    `copy.deepcopy` and `pickle` give a fresh, empty pool with the same thread count (threads and queued jobs
    cannot be copied, and a copied model must not share its original's jobs).
    """

    def __init__(self, num_threads: int | None = None) -> None:
        n = num_threads or default_num_threads()
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pqpatch-kmeans")
        self.num_threads = n
        # split a layer's job by KV heads over the threads: None = only for CUDA keys (module docstring)
        self.split_heads: bool | None = None
        # stop flag of every job not yet finished; the lock guards the dict (submit, cancel and the pool
        # threads' done-callbacks touch it)
        self._stops: dict[Future, threading.Event] = {}
        self._lock = threading.Lock()
        self.staging = StagingBuffers()  # page-locked snapshots of CUDA keys (module docstring)

    def __reduce__(self):
        return (ClusterPool, (self.num_threads,))

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
        *,
        layer: int | None = None,
        head_offset: int = 0,
        weights: torch.Tensor | None = None,
        quantizer: str = "pq",
        outliers: int = 0,
    ) -> Future:
        """Cluster keys[b, :, lo[b]:hi] of every sequence b. keys: [B, Hkv, N, D] on any device.

        `ready`: the keys are a host buffer that an asynchronous copy is still filling; the job waits for this
        event instead of copying them. `layer`: named in errors (e.g. non-finite keys). `head_offset`: global
        index of keys' first KV head (a tensor-parallel rank holds heads head_offset.. head_offset + Hkv - 1);
        k-means seeds by the global head, so every rank's codebooks equal a single process's. Returns a Future
        of `Codebook`; hand it to `cancel` if it will never be collected. `weights`: [B, Hkv, N] per-key k-means
        weights (attention-weighted k-means), positions as in keys; None: unweighted. `quantizer`: "pq"
        (num_subspaces sub-spaces) or "residual" (num_subspaces full-dimension stages, `codebook.train_rq`).
        `outliers`: also find each sequence's `outliers` worst-coded keys per KV head (`Codebook.outliers`), here
        on the pool thread rather than on the decode path.
        """
        src = keys[:, :, : max(hi, 0)]
        leases = []  # staging buffers this job holds until its future is done
        if ready is not None:
            host = src  # positions [lo, hi) of a host store are never written again
        elif src.device.type == "cuda":
            host, ready = self._snapshot(src, src.dtype, leases)
        else:
            host, ready = src.clone(), None  # the buffer is written in place later: take a copy
        wts, wready = None, None
        if weights is not None:  # small ([B, Hkv, hi]): copied like the keys, never read in place
            wsrc = weights[:, :, : max(hi, 0)]
            if wsrc.device.type == "cuda":
                wts, wready = self._snapshot(wsrc, torch.float32, leases)
            else:
                wts = wsrc.float().clone()
        stop = threading.Event()
        use_faiss = codebook.default_use_faiss()  # decided once per job: the Codebook names what really ran
        where = f"layer {layer}" if layer is not None else "a layer"

        def give_back() -> None:  # once the job can no longer read its snapshots (idempotent)
            with self._lock:
                mine, leases[:] = list(leases), []
            for buf in mine:
                self.staging.give(buf)

        hkv = host.shape[1]
        split = self.split_heads if self.split_heads is not None else keys.device.type == "cuda"
        parts = max(1, min(self.num_threads, hkv)) if split else 1
        bounds = [(hkv * i // parts, hkv * (i + 1) // parts) for i in range(parts)]

        def train(h0: int, h1: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            with self._lock:
                if not outer.running() and not outer.done():
                    outer.set_running_or_notify_cancel()
            return train_heads(h0, h1)

        def train_heads(h0: int, h1: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """k-means of KV heads [h0, h1) of every sequence: [(centroids [h1-h0, m, K, Ds], codes [h1-h0, n_b,
            m])] per sequence. Problems are seeded by global head (head_offset + h), so any split of the heads
            gives the same codebooks as one job (faiss; the torch fallback draws weighted samples per call)."""
            if ready is not None:
                ready.synchronize()
            if wready is not None:
                wready.synchronize()
            books = []
            for b in range(host.shape[0]):
                if stop.is_set():
                    raise ClusteringStopped()
                x = host[b, h0:h1, lo[b] : max(hi, lo[b])]
                trainer = train_rq if quantizer == "residual" else train_pq
                extra = {} if wts is None else {"weights": wts[b, h0:h1, lo[b] : max(hi, lo[b])]}
                books.append(trainer(x, num_subspaces, bits, iters, seed, use_faiss, where=f"{where}, sequence {b}",
                                     should_stop=stop.is_set, head_offset=head_offset + h0, **extra))
            return books

        def combine(results: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> Codebook:
            rows = [host[b, :, lo[b] : max(hi, lo[b])] for b in range(host.shape[0])]  # [Hkv, n_b, D] each
            books = [(torch.cat([r[b][0] for r in results]), torch.cat([r[b][1] for r in results]))
                     for b in range(len(rows))]
            # A heavily left-padded sequence may have fewer training keys than centroids (none at all, even):
            # its codebook would be nearly flat. Borrow the codebook of the sequence with the most keys (same
            # layer and heads, so the same key distribution) and code its own keys with it.
            richest = max(range(len(rows)), key=lambda b: rows[b].shape[1])
            for b, x in enumerate(rows):
                if x.shape[1] < 1 << bits <= rows[richest].shape[1]:
                    c = books[richest][0]  # [Hkv, m, K, Ds]
                    assign = rq_assign_ref if quantizer == "residual" else pq_assign_ref
                    books[b] = (c, assign(x[None].float(), c[None])[0])
            worst = [codebook.worst_coded(x, c, q, quantizer == "residual", outliers) for x, (c, q) in
                     zip(rows, books)] if outliers > 0 else []
            return Codebook(torch.stack([c for c, _ in books]), [q for _, q in books],
                            "faiss" if use_faiss else "torch", worst)

        # The layer's heads are split over the pool's threads: the last layers' jobs, which nothing later in the
        # prefill hides, then finish num_threads times sooner (the first decode step waits for them).
        outer = _Joined(stop)
        remaining = [len(bounds)]  # parts not yet done; part_done is attached only after every part is submitted
        with self._lock:
            futs = [self._pool.submit(train, h0, h1) for h0, h1 in bounds]
            self._stops[outer] = stop  # the job as the pool's callers see it (cancel, drain, shutdown)
        outer.parts = futs
        outer.add_done_callback(self._forget)

        def part_done(_: Future) -> None:
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if not last:
                return
            give_back()  # every part is done: none reads the snapshots any more
            if all(f.cancelled() for f in futs):  # dropped before any part ran: the job is cancelled
                Future.cancel(outer)
                return
            try:
                results = []
                for f in futs:
                    if f.cancelled():
                        raise ClusteringStopped()
                    results.append(f.result())
                outer.set_result(combine(results))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever collects the future
                outer.set_exception(exc)

        for f in futs:
            f.add_done_callback(part_done)
        return outer

    def _snapshot(self, src, dtype: torch.dtype, leases: list) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start an asynchronous copy of CUDA tensor `src` into a leased page-locked buffer (as `dtype`).
        Returns the host tensor and the event after which it holds the snapshot."""
        nbytes = math.prod(src.shape) * torch.empty((), dtype=dtype).element_size()
        buf = self.staging.take(nbytes, src.device)
        leases.append(buf)
        host = buf.view(src.shape, dtype)
        host.copy_(src, non_blocking=True)
        ready = torch.cuda.Event()
        # the copy runs on the keys' device's current stream, which need not be the current device's
        # (a device map over several GPUs): record there, or the job could read the buffer too early
        ready.record(torch.cuda.current_stream(src.device))
        buf.fence(ready)  # a later lease of this buffer waits for this copy (a job cancelled before it ran)
        return host, ready

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._stops.pop(fut, None)

    def cancel(self, futures: Iterable[Future]) -> None:
        """Abandon jobs of this pool: queued ones never run, running ones stop at the next (head, sub-space)
        problem boundary (their future then raises `ClusteringStopped`). Returns at once. An exception other
        than the stop from any of these jobs is logged, since no caller will collect it. Futures already
        collected or finished are fine to pass."""
        futures = [f for f in futures if f is not None]
        # first drop every queued part of every job, then stop the running ones: a part that stops frees its
        # thread, which must not pick up a queued part of a job this same call is cancelling
        for fut in futures:
            for part in getattr(fut, "parts", ()):  # a split job (_Joined): its queued parts
                part.cancel()
            if not isinstance(fut, _Joined):
                fut.cancel()  # succeeds only while queued; sets no stop flag
        for fut in futures:
            if fut.cancel():
                continue
            with self._lock:
                stop = self._stops.get(fut)
            if stop is not None:
                stop.set()
            fut.add_done_callback(_log_abandoned)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has finished (benchmarks: nothing left running in the
        background). Returns False if `timeout` seconds passed first."""
        with self._lock:
            pending = list(self._stops)
        return not wait(pending, timeout=timeout).not_done

    def shutdown(self) -> None:
        """Stop queued and running jobs, then wait for the threads."""
        with self._lock:
            pending = list(self._stops)
        self.cancel(pending)
        self._pool.shutdown(wait=True)
        self.staging.clear()  # every job is done, so every staging buffer is back: unregister them


def _log_abandoned(fut: Future) -> None:
    """Done-callback of an abandoned job: log its exception, if any (a stop is the expected outcome)."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None and not isinstance(exc, ClusteringStopped):
        log.error("pqpatch: an abandoned k-means job failed: %s", exc, exc_info=exc)
