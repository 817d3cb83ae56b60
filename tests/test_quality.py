"""Selection-quality features: attention-weighted k-means (observation window), and their plumbing from the
prefill's attention to the k-means pool."""

import pytest
import torch
from conftest import tiny_model

import pqpatch
from pqpatch import PQCacheConfig


@pytest.fixture
def fresh_dynamo():
    """Compile tests start and end with an empty dynamo cache: graphs of other tests' configs compile the same
    code objects and would count against the recompile limit (fullgraph turns that into a failure)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
from pqpatch.cache import PQLayer
from pqpatch.clustering import ClusterPool
from pqpatch.codebook import faiss_available, kmeans_torch, train_pq
from pqpatch.selection import kmeans_weights, observation_attention, snapkv_indices

TRAINERS = [False] + ([True] if faiss_available() else [])


# ---- weighted k-means -----------------------------------------------------------------------------------------
def test_weighted_lloyd_centroid_is_the_weighted_mean():
    """Two points, one centroid: the centroid must sit at the weighted mean (w=3 at 0, w=1 at 4 -> 1)."""
    x = torch.tensor([[[0.0], [4.0]]])
    w = torch.tensor([[3.0, 1.0]])
    # k=1 with n=2 > k: a real Lloyd step (n <= k would return the points themselves)
    cent, codes = kmeans_torch(x, 1, 3, 0, weights=w)
    assert cent.item() == pytest.approx(1.0)
    cent, _ = kmeans_torch(x, 1, 3, 0)
    assert cent.item() == pytest.approx(2.0)


@pytest.mark.parametrize("use_faiss", TRAINERS)
def test_heavy_weights_buy_resolution_where_they_are(use_faiss):
    """Many light points in one blob and a few heavy points spread in another: with weights the heavy points'
    quantization error must fall sharply (centroids move to them), and unweighted it must not."""
    g = torch.Generator().manual_seed(0)
    blob = torch.randn(1, 2000, 8, generator=g) * 0.1
    heavy = torch.randn(1, 40, 8, generator=g) * 3.0 + 10.0
    keys = torch.cat([blob, heavy], 1)  # [Hkv=1, n, D=8]
    w = torch.ones(1, keys.shape[1])
    w[0, 2000:] = 1000.0

    def heavy_error(weights):
        cent, codes = train_pq(keys, 1, 4, 20, 0, use_faiss, weights=weights)  # 16 centroids
        rec = cent[0, 0][codes[0, :, 0].long()]
        return float(((rec - keys[0]) ** 2).sum(-1)[2000:].mean())

    plain, weighted = heavy_error(None), heavy_error(w)
    assert weighted < 0.5 * plain, (weighted, plain)


def test_weights_shape_is_checked():
    with pytest.raises(ValueError, match="weights"):
        train_pq(torch.randn(2, 300, 8), 2, 3, 2, 0, False, weights=torch.ones(2, 299))


def test_pool_hands_each_sequence_its_own_weight_rows(monkeypatch):
    """submit(weights=[B, Hkv, N]) must give sequence b the rows lo[b]:hi of its own weights."""
    import pqpatch.clustering as cl

    seen = []

    def spy(x, m, bits, iters, seed, use_faiss, **kw):
        seen.append(kw["weights"].clone())
        return train_pq(x, m, bits, iters, seed, use_faiss, **{k: v for k, v in kw.items() if k != "where"})

    monkeypatch.setattr(cl, "train_pq", spy)
    pool = ClusterPool(1)
    try:
        keys = torch.randn(2, 1, 50, 8)
        w = torch.arange(2 * 50, dtype=torch.float32).reshape(2, 1, 50)
        pool.submit(keys, [3, 10], 40, 2, 2, 2, 0, weights=w).result()
    finally:
        pool.shutdown()
    assert torch.equal(seen[0], w[0, :, 3:40]) and torch.equal(seen[1], w[1, :, 10:40])


# ---- observation window ---------------------------------------------------------------------------------------
def _brute_observation(query, keys, start, scaling, window):
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, n, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for r in range(q - window, q):
                p = n - q + r
                lg = torch.full((n,), float("-inf"), dtype=torch.float64)
                for j in range(start[bi], p + 1):
                    lg[j] = (query[bi, h, r].double() @ keys[bi, h // g, j].double()) * scaling
                out[bi, h // g] += torch.softmax(lg, 0)
    return out / (window * g)


@pytest.mark.parametrize("with_mask", [False, True])
def test_observation_attention_matches_brute_force(with_mask):
    torch.manual_seed(0)
    b, hq, hkv, n, d, w = 2, 4, 2, 30, 8, 5
    query, keys = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d)
    start = [0, 7] if with_mask else [0, 0]
    mask = None
    if with_mask:  # boolean 4D mask, causal and left-padded (row 1 starts at 7)
        pos = torch.arange(n)
        causal = pos[None, :] <= pos[:, None]
        mask = torch.stack([causal & (pos[None, :] >= s) for s in start])[:, None]
    got = observation_attention(query, keys, mask, 0.3, w)
    want = _brute_observation(query, keys, start, 0.3, w)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, hkv), atol=1e-5, rtol=0)
    if with_mask:
        assert (got[1, :, :7] == 0).all()  # padding gets no attention
    weights = kmeans_weights(got)
    assert torch.allclose(weights, 1 + n * got) and (weights >= 1).all()


@pytest.mark.parametrize("quantizer", pqpatch.config.QUANTIZERS)
def test_prefill_records_observation_and_trains_weighted(monkeypatch, quantizer):
    """End to end on a tiny model: the prefill stores each PQ layer's observation attention, and the k-means
    job gets weights 1 + N x that attention over its training rows (and none with weighted_kmeans=False)."""
    import pqpatch.clustering as cl

    trainer = "train_rq" if quantizer == "residual" else "train_pq"  # the one the pool calls for this quantizer
    got = []
    real = getattr(cl, trainer)

    def spy(*a, **kw):  # the pool may split a layer's heads over its threads: one call per head range
        got.append((kw.get("head_offset", 0), kw.get("weights")))
        return real(*a, **kw)

    monkeypatch.setattr(cl, trainer, spy)
    model = tiny_model("llama", layers=1)
    ids = torch.randint(1, 96, (1, 200))
    for weighted in (True, False):
        got.clear()
        cfg = PQCacheConfig(token_budget=0.3, min_context=64, sink_tokens=4, bits=4, weighted_kmeans=weighted,
                            observation_window=16, quantizer=quantizer)
        pqpatch.patch_model(model, cfg)
        try:
            from pqpatch.cache import PQCache

            cache = PQCache(model, max_cache_len=210)
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True)
            layer = cache.layers[0]
            assert isinstance(layer, PQLayer)
            layer.sync()
        finally:
            pqpatch.unpatch_model(model)
        if weighted:
            assert layer.obs_attn is not None and layer.obs_attn.shape == (1, 2, 200)
            lo, hi = 4, 200 - layer.local
            assert got and all(w is not None for _, w in got)
            weights = torch.cat([w for _, w in sorted(got, key=lambda t: t[0])])  # [Hkv, n] in head order
            torch.testing.assert_close(weights, kmeans_weights(layer.obs_attn)[0, :, lo:hi])
        else:
            # recorded anyway (a weighted or "snapkv" fork needs it), but not used
            assert layer.obs_attn is not None and got and all(w is None for _, w in got)


def test_weighted_kmeans_config_is_validated():
    with pytest.raises(ValueError, match="weighted_kmeans"):
        PQCacheConfig(weighted_kmeans=1)
    with pytest.raises(ValueError, match="observation_window"):
        PQCacheConfig(observation_window=0)


# ---- snapkv (eviction baseline) -------------------------------------------------------------------------------
def test_snapkv_indices_take_the_most_attended_candidates():
    att = torch.tensor([[[0.30, 0.01, 0.20, 0.05, 0.25, 0.10, 0.09]]])  # [B=1, Hkv=1, n=7]
    idx = snapkv_indices(att, torch.tensor([1]), 6, 3, 5, pool=1)  # candidates 1..5 (0 a sink, 6 the window)
    assert idx.tolist() == [[[4, 2, 5, -1, -1]]]
    idx = snapkv_indices(att, torch.tensor([4]), 6, 3, 3, pool=1)  # only 2 candidates: the rest stays empty
    assert idx.tolist() == [[[4, 5, -1]]]
    # SnapKV's pooling: a lone peak's neighbours beat an isolated runner-up
    att = torch.tensor([[[0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]]])
    assert snapkv_indices(att, torch.tensor([0]), 12, 2, 2, pool=1).tolist() == [[[3, 8]]]
    assert sorted(snapkv_indices(att, torch.tensor([0]), 12, 3, 3, pool=3)[0, 0].tolist()) == [2, 3, 4]


def _gen(model, ids, **kw):
    return model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, **kw)


def test_snapkv_selection_is_fixed_at_prefill_and_full_budget_is_dense():
    """Every decode step of every layer attends the same top-k tokens: those with the most observation-window
    attention at prefill (checked against the brute-force observation attention); at token_budget=1.0 the model
    equals the unpatched one."""
    from pqpatch.cache import PQCache

    model = tiny_model("llama", layers=2)
    ids = torch.randint(1, 96, (1, 120))
    dense = _gen(model, ids)
    cfg = PQCacheConfig(token_budget=1.0, selection="snapkv", min_context=16, sink_tokens=4, local_tokens=8)
    pqpatch.patch_model(model, cfg)
    try:
        assert torch.equal(_gen(model, ids), dense)
    finally:
        pqpatch.unpatch_model(model)
    cfg = PQCacheConfig(token_budget=40, selection="snapkv", min_context=16, sink_tokens=4, local_tokens=8,
                        observation_window=8)
    pqpatch.patch_model(model, cfg)
    seen = {}
    try:
        cache = PQCache(model, max_cache_len=140)
        cache.add_observer(lambda layer, q, idx, s: seen.setdefault(layer.layer_idx, []).append(idx[:, :, 4:32]))
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(5):
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for layer in cache.pq_layers():
            steps = seen[layer.layer_idx]
            assert len(steps) == 5 and all(torch.equal(s, steps[0]) for s in steps)  # fixed
            lo, hi = 4, 120 - 8
            pooled = torch.nn.functional.avg_pool1d(layer.obs_attn, 7, 1, 3, count_include_pad=False)
            want = pooled[0, :, lo:hi].topk(28, dim=-1).indices + lo  # [Hkv, 28]
            assert torch.equal(steps[0][0].sort(-1).values, want.sort(-1).values)
    finally:
        pqpatch.unpatch_model(model)


def test_snapkv_compiles_whole(fresh_dynamo):
    """The fixed selection is a preallocated tensor: generate() with a fullgraph compile config gives eager's
    tokens with one graph."""
    from transformers import CompileConfig

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class Backend:
        def __call__(self, gm, ex):
            return backend(gm, ex)

        def __deepcopy__(self, memo):
            return self

    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 56))
    pqpatch.patch_model(model, PQCacheConfig(token_budget=0.3, selection="snapkv", sink_tokens=4, local_tokens=8,
                                             min_context=16))
    try:
        eager = _gen(model, ids)
        cc = CompileConfig(fullgraph=True, dynamic=False, backend=Backend(), mode=None)
        cc._compile_all_devices = True
        assert torch.equal(_gen(model, ids, compile_config=cc), eager)
        assert len(graphs) == 1
        assert pqpatch.stats(model).steps > 0
    finally:
        pqpatch.unpatch_model(model)
        model.__dict__.pop("_compiled_call", None)


# ---- the budget split -----------------------------------------------------------------------------------------
def test_sink_on_top_of_the_budget_is_the_official_composition():
    ours = PQCacheConfig(token_budget=0.05)
    official = PQCacheConfig(token_budget=0.05, sink_in_budget=False)
    assert ours.budget_split(2056) == (32, 52, 19)  # 103 tokens in all
    assert official.budget_split(2056) == (32, 52, 51)  # 32 sink + 103 split half and half
    assert official.budget_split(40) == (32, 1, 1)  # ceil(0.05 * 40) = 2 tokens on top of the sink
    assert official.budget_split(1) == (0, 1, 0)  # the newest token first
    with pytest.raises(ValueError, match="sink_in_budget"):
        PQCacheConfig(sink_in_budget="no")


# ---- residual quantization and exact re-ranking ---------------------------------------------------------------
@pytest.mark.parametrize("use_faiss", TRAINERS)
def test_residual_stages_cut_the_error_and_codes_are_greedy(use_faiss):
    from pqpatch.codebook import train_rq
    from pqpatch.kernels.quality import rq_assign_ref, rq_reconstruct_ref

    keys = torch.randn(2, 2000, 32, generator=torch.Generator().manual_seed(1))
    err = []
    for stages in (1, 2, 3):
        cent, codes = train_rq(keys, stages, 4, 10, 0, use_faiss)
        assert cent.shape == (2, stages, 16, 32) and codes.shape == (2, 2000, stages) and codes.dtype == torch.uint8
        rec = rq_reconstruct_ref(cent[None], codes[None])[0]
        err.append(float(((rec - keys) ** 2).mean()))
        # the training codes are what greedy residual coding of the keys gives (new tokens are coded that way)
        assert torch.equal(rq_assign_ref(keys[None], cent[None])[0], codes)
    assert err[0] > err[1] > err[2]


def _rq_case(seed=0, b=2, h=2, g=4, d=64, s=2, kc=256, n=700):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, g, d, generator=gen)
    cent = torch.randn(b, h, s, kc, d, generator=gen) * 0.3
    codes = torch.randint(0, kc, (b, h, n, s), generator=gen).to(torch.uint8)
    return q, cent, codes, torch.tensor([0, 37])[:b], torch.tensor([n, n - 50])[:b]


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_residual_codes_score_through_the_pq_top_k(backend):
    """A residual codebook is scored by the PQ top-k with the query repeated per stage: the selected set must be
    the top-k of the exact scores of the reconstructed keys (every backend, b=8 tables)."""
    from pqpatch import kernels
    from pqpatch.kernels.quality import residual_query, rq_reconstruct_ref
    from pqpatch.kernels.reference import exact_topk_ref

    if backend == "triton":
        pytest.importorskip("triton")
    q, cent, codes, lo, hi = _rq_case()
    rec = rq_reconstruct_ref(cent, codes)  # [B, Hkv, N, D]
    want = exact_topk_ref(q, rec, lo, hi, 60, 0.125)
    got = kernels.pq_topk(residual_query(q, 2), cent, codes, lo, hi, 60, 0.125, backend=backend)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_rerank_of_a_full_shortlist_is_the_exact_top_k():
    from pqpatch.kernels.quality import rerank_exact_ref
    from pqpatch.kernels.reference import exact_topk_ref

    q, _, _, lo, hi = _rq_case()
    keys = torch.randn(2, 2, 700, 64, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(700)
    short = torch.where((pos >= lo[:, None]) & (pos < hi[:, None]), pos, -1)[:, None].expand(2, 2, -1)
    got = rerank_exact_ref(q, keys, short.contiguous(), 50, 0.125)
    want = exact_topk_ref(q, keys, lo, hi, 50, 0.125)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    part = rerank_exact_ref(q, keys, short.contiguous(), 50, 0.125, k_valid=torch.tensor([20]))
    assert (part[..., 20:] == -1).all() and torch.equal(part[..., :20], got[..., :20])  # best first


def _decode_selections(model, cfg, ids, steps=4):
    from pqpatch.cache import PQCache

    pqpatch.patch_model(model, cfg)
    seen = []
    try:
        cache = PQCache(model, max_cache_len=ids.shape[1] + steps + 2)
        cache.add_observer(lambda layer, q, idx, s: seen.append((layer, q, idx.clone(), s)))
        with torch.no_grad():
            tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    finally:
        pqpatch.unpatch_model(model)
    return seen


@pytest.mark.parametrize("quantizer", ["pq", "residual"])
def test_rerank_with_a_shortlist_covering_every_candidate_is_the_oracle(quantizer):
    """rerank r with r x k >= the candidates: the shortlist is every candidate, so the selection must equal the
    exact top-k (the oracle) at every step, whatever the codes."""
    from pqpatch.kernels.reference import exact_topk_ref

    model = tiny_model("llama", layers=1)
    ids = torch.randint(1, 96, (1, 100))
    cfg = PQCacheConfig(token_budget=30, sink_tokens=4, local_tokens=8, min_context=16, bits=3, rerank=6,
                        quantizer=quantizer)
    seen = _decode_selections(model, cfg, ids)
    assert seen
    for layer, q, idx, s in seen:
        n = layer.length
        lo = layer.start + layer.sink
        hi = torch.full_like(lo, n - layer.local)
        want = exact_topk_ref(q, layer.keys, lo, hi, layer.topk, s)
        assert torch.equal(idx[:, :, 4:4 + layer.topk].sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("fields", [dict(quantizer="residual"), dict(rerank=3), dict(quantizer="residual", rerank=2,
                                                                                       weighted_kmeans=True)])
def test_quality_options_keep_full_budget_dense_and_compile_whole(fields, fresh_dynamo):
    from transformers import CompileConfig

    class Backend:
        graphs = 0

        def __call__(self, gm, ex):
            Backend.graphs += 1
            return gm.forward

        def __deepcopy__(self, memo):
            return self

    model = tiny_model("qwen3")
    ids = torch.randint(1, 96, (1, 56))
    dense = _gen(model, ids)
    base = dict(sink_tokens=4, local_tokens=8, min_context=16, bits=4, **fields)
    pqpatch.patch_model(model, PQCacheConfig(token_budget=1.0, **base))
    try:
        assert torch.equal(_gen(model, ids), dense)
    finally:
        pqpatch.unpatch_model(model)
    pqpatch.patch_model(model, PQCacheConfig(token_budget=0.3, **base))
    try:
        eager = _gen(model, ids)
        cc = CompileConfig(fullgraph=True, dynamic=False, backend=Backend(), mode=None)
        cc._compile_all_devices = True
        assert torch.equal(_gen(model, ids, compile_config=cc), eager)
        assert Backend.graphs == 1 and pqpatch.stats(model).steps > 0
    finally:
        pqpatch.unpatch_model(model)
        model.__dict__.pop("_compiled_call", None)


def test_quality_config_is_validated():
    with pytest.raises(ValueError, match="quantizer"):
        PQCacheConfig(quantizer="opq")
    with pytest.raises(ValueError, match="rerank"):
        PQCacheConfig(rerank=0)
    with pytest.raises(ValueError, match="rerank"):
        PQCacheConfig(rerank=2, offload=True)


@pytest.mark.parametrize("t,d,k", [(1, 64, 256), (17, 128, 16), (97, 256, 64)])
def test_rq_assign_with_cached_norms_equals_recomputed(t, d, k):
    """The decode step encodes new keys with the centroids' squared norms kept by the layer (`PQLayer.centroid_sq`,
    computed once per codebook); the codes equal those computed with the norms recomputed."""
    from pqpatch.kernels.quality import rq_assign_ref

    gen = torch.Generator().manual_seed(t + d + k)
    keys = torch.randn(2, 3, t, d, generator=gen)
    cent = torch.randn(2, 3, 2, k, d, generator=gen)
    sq = (cent * cent).sum(-1)
    assert torch.equal(rq_assign_ref(keys, cent, sq), rq_assign_ref(keys, cent))
