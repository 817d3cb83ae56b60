"""Page-locked host memory (`pqpatch.pinned`): exactly sized cudaHostRegister'ed buffers, released after their last
copy, a logged fallback to pin_memory=True, and the clustering pool's reusable, exclusively leased staging.

CPU tests mock `torch.cuda.cudart()` (and, for the pool, CUDA keys); the `gpu` tests run the real thing (also
from `benchmarks/gpu_check.py`, step "offload_pinned").
"""

from __future__ import annotations

import gc
import logging
import threading

import pytest
import torch

from pqpatch import pinned
from pqpatch.pinned import HostBuffer, StagingBuffers, page_size

# ---- CPU: the logic, with a fake CUDA runtime ---------------------------------------------------------------------


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls; `fail` makes registration return that error code."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[tuple] = []
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr, nbytes, flags))
        if self.fail:
            return self.fail
        assert ptr not in self.registered, "registered twice"
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0 if self.registered.pop(ptr, None) is not None else 713  # cudaErrorHostMemoryNotRegistered

    def cudaGetErrorString(self, err):
        return f"fake error {int(err)}"


class FakeEvent:
    def __init__(self, log: list) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append("synchronize")


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_registers_exactly_the_pages_it_owns_and_unregisters_after_the_last_copy(cudart):
    page = page_size()
    nbytes = 3 * page + 100
    buf = HostBuffer(nbytes, pin=True)
    assert buf.registered and buf.pinned
    (kind, ptr, span, flags), = cudart.calls
    assert kind == "register" and flags == 0
    assert ptr % page == 0 and span == 4 * page  # whole pages, rounded up to a page, not to a power of two
    assert buf.data.data_ptr() == ptr and buf.data.numel() == nbytes
    t = buf.view((2, 3), torch.float64)
    assert t.is_contiguous() and t.data_ptr() == ptr
    with pytest.raises(ValueError, match="bytes"):
        buf.view((nbytes,), torch.float32)
    buf.fence(FakeEvent(cudart.calls))  # the fence's synchronize is logged among the cudart calls
    keep = buf.view((4,), torch.int32)  # a view that outlives the buffer object: memory stays valid, unregistered
    del buf, t
    gc.collect()
    calls = cudart.calls
    assert [c if isinstance(c, str) else c[0] for c in calls] == ["register", "synchronize", "unregister"]
    assert calls[-1] == ("unregister", ptr) and not cudart.registered
    keep.fill_(7)  # still our memory (the view holds it), just no longer page-locked
    assert keep.tolist() == [7] * 4


def test_store_of_128k_plus_64_tokens_pins_its_size_not_twice(cudart):
    """The issue's case: a 128K+64-token store ([max_len, B, Hkv, D] bf16, one KV head of dim 128) was rounded up
    to 256K tokens by the caching host allocator; registered, it is its own size up to a page."""
    from pqpatch.offload import _host_store

    n = 131072 + 64
    store, buf = _host_store((n, 1, 1, 128), torch.bfloat16, True, torch.device("cpu"))
    nbytes = n * 128 * 2
    (_, ptr, span, _), = cudart.calls
    assert store.shape == (n, 1, 1, 128) and store.data_ptr() == ptr and store.is_contiguous()
    assert nbytes <= span < nbytes + page_size()
    assert span < 1.01 * nbytes  # power-of-two rounding would be 1.9998x
    del store, buf
    gc.collect()
    assert not cudart.registered


def test_registration_failure_falls_back_to_pin_memory_with_a_warning(monkeypatch, caplog):
    fake = FakeCudart(fail=2)  # cudaErrorMemoryAllocation: no more lockable memory
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    fallback, cleared = [], []
    monkeypatch.setattr(pinned, "_pinned_fallback", lambda n: fallback.append(n) or torch.empty(n, dtype=torch.uint8))
    monkeypatch.setattr(pinned, "_clear_last_error", lambda device: cleared.append(device))
    with caplog.at_level(logging.WARNING, logger="pqpatch"):
        buf = HostBuffer(1000, pin=True, device=torch.device("cpu"))
    assert fallback == [1000] and buf.pinned and not buf.registered and buf.data.numel() == 1000
    assert cleared == [torch.device("cpu")]  # the failed call's last error is consumed
    assert "cudaHostRegister" in caplog.text and "fake error 2" in caplog.text and "pin_memory=True" in caplog.text
    del buf
    gc.collect()
    assert [c[0] for c in fake.calls] == ["register"]  # nothing to unregister


def test_unpinned_buffer_touches_no_cuda(cudart):
    buf = HostBuffer(64, pin=False)
    assert not buf.pinned and not cudart.calls and buf.view((16,), torch.float32).numel() == 16


def test_deepcopy_and_pickle_give_plain_copies(cudart):
    import copy
    import pickle

    buf = HostBuffer(16, pin=True)
    buf.view((4,), torch.float32).copy_(torch.arange(4.0))
    for new in (copy.deepcopy(buf), pickle.loads(pickle.dumps(buf))):
        assert not new.registered and new.view((4,), torch.float32).tolist() == [0, 1, 2, 3]
        assert new.data.data_ptr() != buf.data.data_ptr()
    assert len(cudart.registered) == 1


def test_staging_leases_are_exclusive_reused_and_grown(cudart):
    st = StagingBuffers()
    a, b = st.take(1000), st.take(1000)
    assert a is not b and a.data.data_ptr() != b.data.data_ptr()
    log = []
    a.fence(FakeEvent(log))
    st.give(a)
    assert st.take(900) is a and log == ["synchronize"]  # reused, after its last copy
    n_reg = len(cudart.registered)
    st.give(a)
    st.give(b)
    c = st.take(10 * page_size())  # fits in none: one exact new buffer, the largest too-small one is dropped
    assert c.nbytes == 10 * page_size() and len(cudart.registered) == n_reg
    assert st.free_bytes() == 1000
    st.give(c)
    st.clear()
    assert not cudart.registered and st.free_bytes() == 0


class _FakeCudaKeys:
    """Keys that report a CUDA device but hold CPU data: enough for ClusterPool.submit's CUDA branch."""

    device = torch.device("cuda", 0)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.shape, self.dtype = t.shape, t.dtype

    def __getitem__(self, i):
        return _FakeCudaKeys(self.t[i])


@pytest.fixture
def fake_cuda_copies(monkeypatch, cudart):
    """ClusterPool.submit's CUDA branch on the CPU: events, streams and the device->host copy are faked."""

    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    real_copy = torch.Tensor.copy_

    def fake_copy(self, src, non_blocking=False):
        return real_copy(self, src.t if isinstance(src, _FakeCudaKeys) else src)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.Tensor, "copy_", fake_copy)
    return cudart


def test_pool_staging_is_exclusive_while_jobs_run_and_reused_by_the_next_call(fake_cuda_copies):
    """Every layer of a prefill submits before any job finishes: each holds its own snapshot (a shared buffer would
    let a later layer overwrite an earlier one's keys). Once the jobs are done, the next call's submits reuse the
    buffers: nothing new is registered. The codebooks equal those of the same keys submitted from host memory."""
    from pqpatch.clustering import ClusterPool

    cudart = fake_cuda_copies
    torch.manual_seed(0)
    layers = [torch.randn(1, 2, 300, 16) for _ in range(3)]
    pool = ClusterPool(1)
    gate = threading.Event()
    try:
        blocker = pool._pool.submit(gate.wait)  # the only pool thread is busy: every job stays queued
        futs = [pool.submit(_FakeCudaKeys(k), [0], 300, 2, 3, 2, 0) for k in layers]
        assert len(cudart.registered) == 3  # three leases at once, three buffers
        gate.set()
        blocker.result(timeout=60)
        books = [f.result(timeout=60) for f in futs]
        refs = [pool.submit(k, [0], 300, 2, 3, 2, 0).result(timeout=60) for k in layers]
        for book, ref in zip(books, refs):
            assert torch.equal(book.centroids, ref.centroids)
        pool.drain(60)
        assert pool.staging.free_bytes() == 3 * 2 * 300 * 16 * 4
        regs = sum(c[0] == "register" for c in cudart.calls)
        shorter = [pool.submit(_FakeCudaKeys(k[:, :, :200]), [0], 200, 2, 3, 2, 0) for k in layers]
        [f.result(timeout=60) for f in shorter]
        assert sum(c[0] == "register" for c in cudart.calls) == regs  # reused (a prefix of each buffer)
        # a cancelled job that never ran gives its buffer back too
        gate.clear()
        blocker = pool._pool.submit(gate.wait)
        fut = pool.submit(_FakeCudaKeys(layers[0]), [0], 300, 2, 3, 2, 0)
        pool.cancel([fut])
        gate.set()
        pool.drain(60)
        assert pool.staging.free_bytes() == 3 * 2 * 300 * 16 * 4
    finally:
        gate.set()
        pool.shutdown()
    assert not cudart.registered  # shutdown unregistered every staging buffer


# ---- CUDA ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_buffer_is_page_locked_exactly_and_released():
    dev = torch.device("cuda")
    buf = HostBuffer(5 * 2**20 + 3, pin=True, device=dev)
    assert buf.registered and buf.data.is_pinned()
    keep = buf.view((1024,), torch.float32)
    src = torch.randn(1024, device=dev)
    keep.copy_(src, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    buf.fence(ev)
    buf.release()  # waits for the copy, then unregisters
    assert torch.equal(keep, src.cpu()) and not keep.is_pinned()


@pytest.mark.gpu
def test_cuda_failed_registration_leaves_no_error_behind(caplog):
    """Registering memory twice fails (cudaErrorHostMemoryAlreadyRegistered); the binding leaves the error as
    CUDA's last error, which torch's next kernel-launch check would raise. `_register` consumes it."""
    dev = torch.device("cuda")
    buf = HostBuffer(2 * page_size(), pin=True, device=dev)
    err = pinned._register(buf.data.data_ptr(), 2 * page_size(), dev)
    assert err is not None and "cudaError" in err
    assert float(torch.ones(8, device=dev).sum()) == 8.0  # no stale error raised here
    buf.release()


@pytest.mark.gpu
def test_cuda_fallback_is_still_pinned(monkeypatch, caplog):
    monkeypatch.setattr(pinned, "_register", lambda ptr, n, device: "cudaError 2 (forced)")
    with caplog.at_level(logging.WARNING, logger="pqpatch"):
        buf = HostBuffer(1000, pin=True, device=torch.device("cuda"))
    assert buf.data.is_pinned() and not buf.registered and "falling back" in caplog.text


@pytest.mark.gpu
def test_cuda_pool_staging_reused_across_generate_calls(monkeypatch):
    """A resident CUDA model's prefill snapshots its keys into leased page-locked buffers; a second generate()
    with the same prompt length registers nothing new."""
    from conftest import tiny_model

    import pqpatch

    calls = []
    real = pinned._register
    monkeypatch.setattr(pinned, "_register", lambda ptr, n, device: calls.append(n) or real(ptr, n, device))
    model = tiny_model("llama").cuda()
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.3, sink_tokens=4, local_tokens=16,
                                                     min_context=64, bits=6))
    ids = torch.randint(1, 96, (2, 300), device="cuda")
    first = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    n = len(calls)
    assert n >= 2  # one snapshot per PQ layer (and its k-means weights)
    second = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert len(calls) == n and torch.equal(first, second)
    pqpatch.unpatch_model(model)
