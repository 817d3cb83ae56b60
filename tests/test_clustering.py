"""The clustering pool: cancelling abandoned jobs, logging their errors, draining, copying and pickling."""

import copy
import logging
import pickle
import threading
import time

import pytest
import torch

import pqpatch.clustering as clustering
from pqpatch.clustering import ClusterPool, ClusteringStopped
from pqpatch.codebook import faiss_available


def _slow_train(problems: int, seconds_each: float, started: threading.Event | None = None):
    """A stand-in for train_pq that works through `problems` (head, sub-space) problems of fixed duration,
    polling `should_stop` between them like the real trainers."""

    def train(keys, m, bits, iters, seed, use_faiss=None, *, where="", should_stop=None, **_):  # head_offset, ...
        if started is not None:
            started.set()
        for _ in range(problems):
            if should_stop is not None and should_stop():
                raise ClusteringStopped()
            time.sleep(seconds_each)
        h, n, d = keys.shape
        return torch.zeros(h, m, 1 << bits, d // m), torch.zeros(h, n, m, dtype=torch.uint8)

    return train


def _submit(pool, keys=None, **kw):
    keys = torch.randn(1, 2, 64, 32) if keys is None else keys
    return pool.submit(keys, [0], keys.shape[2], 2, 3, 2, 0, **kw)


def test_cancel_lets_the_next_job_start_at_once(monkeypatch):
    """Three abandoned 4-second jobs (one running, two queued) must not delay the next call's job."""
    started = threading.Event()
    monkeypatch.setattr(clustering, "train_pq", _slow_train(80, 0.05, started))
    pool = ClusterPool(1)
    abandoned = [_submit(pool) for _ in range(3)]
    assert started.wait(10)
    pool.cancel(abandoned)
    assert abandoned[1].cancelled() and abandoned[2].cancelled()  # queued: never run
    monkeypatch.setattr(clustering, "train_pq", _slow_train(1, 0.0))
    t0 = time.perf_counter()
    _submit(pool).result(timeout=30)
    assert time.perf_counter() - t0 < 2.0  # the running one stopped at its next problem boundary (~0.05 s)
    with pytest.raises(ClusteringStopped):
        abandoned[0].result()
    pool.shutdown()


@pytest.mark.parametrize("use_faiss", [False, pytest.param(True, marks=pytest.mark.skipif(
    not faiss_available(), reason="no faiss"))])
def test_real_trainers_stop_when_cancelled(monkeypatch, use_faiss):
    """A k-means of several seconds, cancelled while it runs, ends with ClusteringStopped, not a codebook."""
    import pqpatch.codebook as cb

    monkeypatch.setattr(cb, "faiss_available", lambda: use_faiss)
    monkeypatch.setattr(cb, "_warned_no_faiss", True)
    pool = ClusterPool(1)
    keys = torch.randn(1, 4, 20000 if use_faiss else 5000, 128)
    fut = pool.submit(keys, [0], keys.shape[2], 8, 8, 20, 0)  # ~3 s (faiss) / ~8 s (torch) on one core
    deadline = time.perf_counter() + 10
    while not fut.running() and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    pool.cancel([fut])
    with pytest.raises(ClusteringStopped):
        fut.result(timeout=60)
    pool.shutdown()


def test_abandoned_job_errors_are_logged(caplog):
    """Nobody collects an abandoned future: its exception must reach the log, a plain stop must not."""
    pool = ClusterPool(1)
    keys = torch.randn(1, 2, 64, 32)
    keys[0, 1, 10] = float("nan")
    failing = _submit(pool, keys, layer=3)
    assert pool.drain(timeout=30)
    with caplog.at_level(logging.ERROR, logger="pqpatch"):
        pool.cancel([failing])  # already finished with a ValueError
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "abandoned" in errors[0].getMessage() and "layer 3" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pqpatch"):
        ok = _submit(pool)
        ok.result()
        pool.cancel([ok])  # finished fine: nothing to log
    assert not caplog.records
    pool.shutdown()


def test_drain_waits_for_everything_in_flight(monkeypatch):
    monkeypatch.setattr(clustering, "train_pq", _slow_train(4, 0.05))
    pool = ClusterPool(2)
    futs = [_submit(pool) for _ in range(5)]
    assert pool.drain(timeout=60)
    assert all(f.done() and f.exception() is None for f in futs)
    assert pool.drain(timeout=0)  # nothing left
    pool.shutdown()


def test_pool_survives_deepcopy_and_pickle(monkeypatch):
    """A patched model holds a pool: copy.deepcopy(model) and pickling must work and give a fresh pool."""
    monkeypatch.setattr(clustering, "train_pq", _slow_train(20, 0.05))
    pool = ClusterPool(3)
    pending = _submit(pool)  # a job in flight must not be copied (nor block the copy)
    holder = {"pool": pool, "x": torch.ones(2)}
    for clone in (copy.deepcopy(holder)["pool"], pickle.loads(pickle.dumps(holder))["pool"]):
        assert isinstance(clone, ClusterPool) and clone is not pool and clone.num_threads == 3
        monkeypatch.setattr(clustering, "train_pq", _slow_train(1, 0.0))
        assert _submit(clone).result(timeout=30).centroids.shape == (1, 2, 2, 8, 16)
        clone.shutdown()
    pool.cancel([pending])
    pool.shutdown()


@pytest.mark.skipif(not faiss_available(), reason="no faiss")
def test_split_job_gives_one_jobs_codebook():
    """split_heads=True runs a layer's heads as parts on several threads: faiss seeds each problem by its global
    head, so the joined codebook equals the unsplit job's exactly (the default splits only CUDA keys)."""
    keys, weights = torch.randn(2, 4, 600, 32), torch.rand(2, 4, 600) + 1
    books = []
    for split in (False, True):
        pool = ClusterPool(2)
        pool.split_heads = split
        books.append(pool.submit(keys, [0, 40], 600, 2, 4, 3, 0, weights=weights).result(60))
        pool.shutdown()
    assert torch.equal(books[0].centroids, books[1].centroids)
    assert all(torch.equal(a, b) for a, b in zip(books[0].codes, books[1].codes))


def test_split_job_cancels_and_drains_as_one(monkeypatch):
    """A split job behaves like one job: running parts stop (ClusteringStopped), queued ones never run, drain
    waits for the joined future, and a job whose parts all queued is cancelled outright."""
    started = threading.Event()
    monkeypatch.setattr(clustering, "train_pq", _slow_train(80, 0.05, started))
    pool = ClusterPool(2)
    pool.split_heads = True
    running = _submit(pool, torch.randn(1, 4, 64, 32))  # two parts: both threads busy
    queued = _submit(pool, torch.randn(1, 4, 64, 32))
    assert started.wait(10)
    pool.cancel([running, queued])
    assert queued.cancelled()
    with pytest.raises(ClusteringStopped):
        running.result(timeout=30)
    monkeypatch.setattr(clustering, "train_pq", _slow_train(1, 0.0))
    done = _submit(pool, torch.randn(1, 4, 64, 32))
    assert pool.drain(timeout=30) and done.done() and done.result().centroids.shape[1] == 4
    pool.shutdown()
