"""Offload: same tokens and logits as the GPU-resident PQ path, block-cache policies, stats, no growth."""

import threading

import pytest
import torch
from conftest import live_tensor_count, tiny_model

import pqpatch
from pqpatch.blockcache import BlockCache
from pqpatch.cache import PQCache


def _cfg(offload, **kw):
    base = dict(token_budget=40, sink_tokens=4, local_tokens=8, min_context=16, bits=4, gpu_cache_tokens=32,
                cache_block_tokens=8, rerank=1)  # rerank=1: the same ranking rule resident and offloaded
    return pqpatch.PQCacheConfig(offload=offload, **{**base, **kw})


def _run(arch, offload, ids, mask, **kw):
    model = tiny_model(arch)
    pqpatch.patch_model(model, _cfg(offload, **kw))
    indices = []
    orig = PQCache.__init__

    def recording_init(self, *a, **k):  # record every sparse step's selection in each cache generate() builds
        orig(self, *a, **k)
        self.add_observer(lambda layer, q, idx, scaling: indices.append(idx.clone()))

    PQCache.__init__ = recording_init
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    finally:
        PQCache.__init__ = orig
    return model, out, indices


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_offload_selects_same_tokens_and_logits(arch, policy):
    torch.manual_seed(1)
    ids = torch.randint(1, 96, (2, 150))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    _, ref, ref_idx = _run(arch, False, ids, mask, cache_policy=policy)
    model, out, idx = _run(arch, True, ids, mask, cache_policy=policy)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(idx) == len(ref_idx) > 0
    for a, b in zip(idx, ref_idx):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    st = pqpatch.stats(model)
    assert st.offload and st.hits > 0 and st.misses > 0  # the block cache was really exercised


def test_stats_sanity_and_gpu_bytes():
    torch.manual_seed(2)
    ids = torch.randint(1, 96, (1, 400))
    model, _, idx = _run("llama", True, ids, None, token_budget=60, gpu_cache_tokens=64)
    st = pqpatch.stats(model)
    selected = sum(int((i[..., 4 : 4 + st_k] >= 0).sum()) for i, st_k in zip(idx, [48] * len(idx)))
    assert st.hits + st.misses == st.requested == selected
    assert st.steps == len(idx) == 2 * 15  # 2 layers, 15 sparse decode steps after the prefill's token
    elt = 4 * (16 + 16)  # float32 key + value of head dim 16
    assert st.staged >= st.misses and st.bytes_h2d == (st.staged + st.admitted_blocks * 8) * elt
    assert st.bytes_d2h == 2 * 2 * (400 + 15) * elt  # 2 layers x 2 KV heads, every token written once
    assert st.gpu_kv_bytes < st.dense_kv_bytes / 2
    dense = pqpatch.stats(_run("llama", False, ids, None, token_budget=60)[0])
    assert dense.gpu_kv_bytes > dense.dense_kv_bytes  # full buffers plus codes


def test_chunked_prefill_and_short_prompt_go_through_the_store():
    torch.manual_seed(3)
    ids = torch.randint(1, 96, (1, 120))
    outs = {}
    for off in (False, True):
        model = tiny_model("llama")
        pqpatch.patch_model(model, _cfg(off))
        cache = PQCache(model, 140)
        kw = model._pqpatch.cache_kwarg
        with torch.no_grad():
            model(ids[:, :80], **{kw: cache})
            model(ids[:, 80:], **{kw: cache})  # a second multi-token step: dense over the whole context
            logits = [model(ids[:, -1:] * 0 + t, **{kw: cache}).logits for t in (5, 7, 11)]
        outs[off] = torch.cat(logits)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    short = torch.randint(1, 96, (1, 10))  # below min_context: dense decoding from the store
    ref = tiny_model("llama").generate(short, max_new_tokens=5, do_sample=False)
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(True))
    assert torch.equal(model.generate(short, max_new_tokens=5, do_sample=False), ref)


def test_lfu_evicts_least_frequent_and_keeps_ties():
    bc = BlockCache(rows=1, num_blocks=10, capacity=2, policy="lfu", max_admit=4)
    assert bc.admit(torch.tensor([[0, 1]])) == [(0, 0, 0), (0, 1, 1)]
    bc.admit(torch.tensor([[0, 0, 0]]))  # block 0 used again (counted once per step): freq 0 -> 2, 1 -> 1
    assert bc.admit(torch.tensor([[2]])) == []  # freq 1 does not beat resident block 1 (freq 1): tie stays
    assert bc.admit(torch.tensor([[2]])) == [(0, 2, 1)]  # freq 2 beats block 1 -> it takes its slot
    assert bc.lookup(torch.tensor([[0, 1, 2, -1]])).tolist() == [[0, -1, 1, -1]]


def test_lru_evicts_least_recent_but_not_blocks_used_now():
    bc = BlockCache(rows=2, num_blocks=10, capacity=2, policy="lru", max_admit=4)
    bc.admit(torch.tensor([[0, 1], [5, -1]]))
    bc.admit(torch.tensor([[1, -1], [-1, -1]]))  # row 0: block 0 is now the least recent
    assert bc.admit(torch.tensor([[3, -1], [-1, -1]])) == [(0, 3, 0)]
    # every resident block used in this step: nothing can be evicted for the third one
    assert bc.admit(torch.tensor([[1, 3, 7], [-1, -1, -1]])) == []
    assert bc.lookup(torch.tensor([[3, 1, 0], [5, 6, -1]])).tolist() == [[0, 1, -1], [0, -1, -1]]


def test_admission_limit_and_zero_capacity():
    bc = BlockCache(rows=1, num_blocks=64, capacity=16, policy="lfu", max_admit=3)
    assert len(bc.admit(torch.arange(10)[None])) == 3
    assert BlockCache(1, 8, 0).admit(torch.tensor([[1, 2]])) == []
    with pytest.raises(ValueError, match="lfu"):
        BlockCache(1, 8, 2, policy="fifo")


def test_offload_refuses_policies_that_read_every_key():
    for sel in ("oracle", "quest"):
        with pytest.raises(ValueError, match="offload"):
            pqpatch.PQCacheConfig(offload=True, selection=sel)


def test_no_growth_over_50_generates_with_offload():
    model = tiny_model("qwen2")
    pqpatch.patch_model(model, _cfg(True))
    ids = torch.randint(1, 96, (1, 60))

    for _ in range(3):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    threads, tensors = threading.active_count(), live_tensor_count()
    for _ in range(50):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert threading.active_count() <= threads
    assert live_tensor_count() <= tensors


def test_stats_of_a_resident_cache_and_errors():
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(False))
    with pytest.raises(ValueError, match="no generate"):
        pqpatch.stats(model)
    model.generate(torch.randint(1, 96, (1, 100)), max_new_tokens=5, do_sample=False)
    st = pqpatch.stats(model)
    assert st.steps == 2 * 4 and st.requested == 0 and not st.offload  # 2 layers x 4 sparse steps
    assert st.gpu_kv_bytes > st.dense_kv_bytes > 0
    assert "offload=False" in str(st) and "hit rate" not in str(st)
    with pytest.raises(ValueError, match="patched"):
        pqpatch.stats(tiny_model("llama"))


def test_gpu_resident_kv_at_128k_is_under_an_eighth_of_dense():
    """The offload target: at 128K context and budget 0.1 the GPU keeps <= 1/8 of the dense K/V (Llama head
    dim 128, bf16, codes and centroids included). One KV head is enough: every part scales with the heads."""
    from pqpatch.clustering import ClusterPool
    from pqpatch.offload import OffloadPQLayer

    n, d = 131072, 128
    pool = ClusterPool(2)
    layer = OffloadPQLayer(n + 16, 0, pqpatch.PQCacheConfig(token_budget=0.1, offload=True, min_context=1), pool)
    keys = torch.randn(1, 1, n, d, dtype=torch.bfloat16)
    layer.update(keys, keys.clone())
    layer.after_prefill(None, 1)
    layer.update(keys[:, :, :1], keys[:, :, :1])
    layer.decode(torch.randn(1, 4, 1, d, dtype=torch.bfloat16), d**-0.5)  # allocates the codes
    dense = 2 * d * 2 * layer.length  # K + V, bf16
    print(f"GPU-resident / dense KV at 128K, budget 0.1: {layer.gpu_kv_bytes() / dense:.3f}")  # shown with -s
    assert layer.codes is not None and layer.gpu_kv_bytes() <= dense / 8
    pool.shutdown()


@pytest.mark.parametrize("prompt,pad,sink", [(40, 37, 8), (24, 0, 30)])
def test_offload_sink_tokens_generated_after_the_prefill(prompt, pad, sink):
    """A row with fewer real prompt tokens than `sink` reaches its last sink positions while decoding; the
    offloaded sink slots must hold them (full budget: must equal dense)."""
    torch.manual_seed(4)
    ids = torch.randint(1, 96, (2, prompt))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    cfg = dict(token_budget=1.0, sink_tokens=sink, local_tokens=4, min_context=8)
    ref = tiny_model("llama").generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                       return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(True, **cfg))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fork_refuses_offloaded_caches():
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(True))
    cache = PQCache(model, 80)
    with pytest.raises(ValueError, match="offload=False"):
        cache.fork(None)


@pytest.mark.parametrize("prompt,heads,kv_heads,head_dim", [(1, 4, 4, 64), (17, 8, 1, 128), (97, 8, 2, 256)])
def test_offload_full_budget_equals_dense_odd_sizes(prompt, heads, kv_heads, head_dim):
    ids = torch.randint(1, 96, (1, prompt))
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    ref = tiny_model("qwen2", heads=heads, kv_heads=kv_heads, head_dim=head_dim).generate(ids, **kw)
    model = tiny_model("qwen2", heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    pqpatch.patch_model(model, _cfg(True, token_budget=1.0, sink_tokens=3, local_tokens=4, min_context=1))
    out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantizer", pqpatch.config.QUANTIZERS)
def test_gpu_buffers_follow_a_short_context(quantizer):
    """A 100-token prompt with the default 2048-token block cache: the resident buffers (sink, window, block cache,
    staging, codes) must not outgrow the dense K/V of the context (they were 21x dense). The centroids count too,
    but they are a fixed cost that the context length does not change (per KV head: 2**bits x D floats for "pq",
    num_subspaces x 2**bits x D for "residual"): bits=3 keeps them small beside this toy context's K/V (per layer
    1 / 2 KiB for "pq" / "residual" against 26.75 KiB dense; at bits=4 "residual"'s 4 KiB of centroids put the sum
    0.5 KiB over dense), so the test measures the buffers that follow the context."""
    model = tiny_model("llama")
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.2, min_context=16, offload=True, bits=3,
                                                     sink_tokens=4, quantizer=quantizer))
    model.generate(torch.randint(1, 96, (1, 100)), max_new_tokens=8, do_sample=False, pad_token_id=0)
    st = pqpatch.stats(model)
    assert st.gpu_kv_bytes <= st.dense_kv_bytes, st


def _record_store_writes(monkeypatch):
    """Record every in-place write (copy_, index_copy_, index_put_, item assignment) as (storage pointer,
    destination contiguous or None when the destination is not a plain slice)."""
    writes = []
    real_copy, real_index_copy, real_setitem = torch.Tensor.copy_, torch.Tensor.index_copy_, torch.Tensor.__setitem__
    real_index_put = torch.Tensor.index_put_

    def copy_(self, src, non_blocking=False):
        writes.append((self.untyped_storage().data_ptr(), self.is_contiguous()))
        return real_copy(self, src, non_blocking)

    def index_copy_(self, *a, **k):
        writes.append((self.untyped_storage().data_ptr(), None))
        return real_index_copy(self, *a, **k)

    def index_put_(self, *a, **k):
        writes.append((self.untyped_storage().data_ptr(), None))
        return real_index_put(self, *a, **k)

    def setitem(self, key, value):
        writes.append((self.untyped_storage().data_ptr(), None))
        return real_setitem(self, key, value)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch.Tensor, "index_copy_", index_copy_)
    monkeypatch.setattr(torch.Tensor, "index_put_", index_put_)
    monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)
    return writes


def test_host_store_writes_have_contiguous_destinations(monkeypatch):
    """Every write into the host store (the prefill, a second multi-token chunk, each decode token) is one
    contiguous destination, with B x Hkv = 2 x 2 rows. On CUDA a non-contiguous destination in pinned memory is
    copied through a pageable temporary, which blocks the host once per layer and step (issue 11); the old
    [B, Hkv, max_len, D] store wrote `store[:, :, p]`, four strided pieces."""
    torch.manual_seed(5)
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(True))
    ids = torch.randint(1, 96, (2, 120))
    cache = PQCache(model, 140)
    kw = model._pqpatch.cache_kwarg
    writes = _record_store_writes(monkeypatch)
    with torch.no_grad():
        model(ids[:, :100], **{kw: cache})
        model(ids[:, 100:], **{kw: cache})
        for t in (5, 7, 11):
            model(torch.full((2, 1), t), **{kw: cache})
    monkeypatch.undo()
    layers = cache.pq_layers()
    assert layers and all(layer.length == 123 for layer in layers)
    for layer in layers:
        assert layer.keys.shape[:2] == (2, 2)
        for store in (layer.keys, layer.values):
            mine = [c for p, c in writes if p == store.untyped_storage().data_ptr()]
            assert len(mine) == 2 + 3, mine  # two multi-token writes, three decode tokens
            assert all(c is True for c in mine), mine


def test_store_positions_are_never_read_before_written(monkeypatch):
    """The store is allocated uninitialised (no zero-fill): filling it with NaN first must not change a single
    selection or logit of an offloaded run against the resident one (batch 2 with left padding, block cache on)."""
    from pqpatch import offload

    real = offload._host_store

    def nan_store(shape, dtype, pin, device):
        store, buf = real(shape, dtype, pin, device)
        store.fill_(float("nan"))
        return store, buf

    torch.manual_seed(1)
    ids = torch.randint(1, 96, (2, 150))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    _, ref, ref_idx = _run("llama", False, ids, mask)
    monkeypatch.setattr(offload, "_host_store", nan_store)
    model, out, idx = _run("llama", True, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(idx, ref_idx):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    st = pqpatch.stats(model)
    assert st.hits > 0 and st.misses > 0 and st.admitted_blocks > 0
    for layer in model._pqpatch.last_cache.pq_layers():  # the fill was real: the unwritten tail is still NaN
        assert layer.max_cache_len > layer.length and torch.isnan(layer.keys[:, :, layer.length :]).all()


@pytest.mark.gpu
def test_cuda_store_writes_are_asynchronous():
    """With the current stream kept busy (torch.cuda._sleep), writing a decode token and a long prefill chunk to
    the pinned store returns at once and leaves the copy pending: the host does not wait for it. A pageable
    temporary (non-contiguous pinned destination) would block until the busy stream reached the copy."""
    import time

    from pqpatch.clustering import ClusterPool
    from pqpatch.offload import OffloadPQLayer

    dev = torch.device("cuda")
    pool = ClusterPool(1)
    layer = OffloadPQLayer(12288, 0, pqpatch.PQCacheConfig(token_budget=0.1, offload=True, min_context=1), pool)
    b, h, d = 2, 4, 128
    k0 = torch.randn(b, h, 16, d, device=dev, dtype=torch.bfloat16)
    layer.update(k0, k0 + 1)
    torch.cuda.synchronize()
    assert layer._kst.is_pinned() and layer._host_k.registered and layer._host_v.registered
    for t in (1, 9000):  # a decode token; a prefill chunk longer than one device->host chunk
        k = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
        p0 = layer.length
        layer._to_host(p0, k, v)  # warm-up: first launches and allocations of this size may synchronise
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time on the current stream; the side stream waits for it
        t0 = time.perf_counter()
        layer._to_host(p0, k, v)
        dt = time.perf_counter() - t0
        pending = not layer.event.query()
        torch.cuda.synchronize()
        assert pending, f"the host waited {dt * 1e3:.1f} ms for the device->host copy of {t} tokens"
        assert dt < 0.05, dt
        layer._n += t
        assert torch.equal(layer.keys[:, :, p0 : p0 + t].cuda(), k)
        assert torch.equal(layer.values[:, :, p0 : p0 + t].cuda(), v)
    pool.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cuda_offload_selects_same_tokens_and_logits(arch):
    """Offload equals resident on CUDA (pinned store, side-stream writes, block cache): batch 2, left padding."""
    torch.manual_seed(1)
    ids = torch.randint(1, 96, (2, 150))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    runs = []
    for off in (False, True):
        model = tiny_model(arch).cuda()
        pqpatch.patch_model(model, _cfg(off))
        indices = []
        orig = PQCache.__init__

        def recording_init(self, *a, **k):
            orig(self, *a, **k)
            self.add_observer(lambda layer, q, idx, scaling: indices.append(idx.clone()))

        PQCache.__init__ = recording_init
        try:
            out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=16, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        finally:
            PQCache.__init__ = orig
        runs.append((model, out, indices))
    (_, ref, ref_idx), (model, out, idx) = runs
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(idx) == len(ref_idx) > 0
    for a, b in zip(idx, ref_idx):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    st = pqpatch.stats(model)
    assert st.offload and st.hits > 0 and st.misses > 0
    layer = model._pqpatch.last_cache.pq_layers()[0]
    assert layer._kst.is_pinned() and layer._host_k.registered
