"""Selection-quality features: attention-weighted k-means (observation window), and their plumbing from the
prefill's attention to the k-means pool."""

import pytest
import torch
from conftest import tiny_model

import pqpatch
from pqpatch import PQCacheConfig
from pqpatch.cache import PQLayer
from pqpatch.clustering import ClusterPool
from pqpatch.codebook import faiss_available, kmeans_torch, train_pq
from pqpatch.selection import kmeans_weights, observation_attention

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


def test_prefill_records_observation_and_trains_weighted(monkeypatch):
    """End to end on a tiny model: the prefill stores each PQ layer's observation attention, and the k-means
    job gets weights 1 + N x that attention over its training rows (and none with weighted_kmeans=False)."""
    import pqpatch.clustering as cl

    got = []
    real = cl.train_pq

    def spy(*a, **kw):
        got.append(kw.get("weights"))
        return real(*a, **kw)

    monkeypatch.setattr(cl, "train_pq", spy)
    model = tiny_model("llama", layers=1)
    ids = torch.randint(1, 96, (1, 200))
    for weighted in (True, False):
        got.clear()
        cfg = PQCacheConfig(token_budget=0.3, min_context=64, sink_tokens=4, bits=4, weighted_kmeans=weighted,
                            observation_window=16)
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
            assert got and got[0] is not None
            torch.testing.assert_close(got[0], kmeans_weights(layer.obs_attn)[0, :, lo:hi])
        else:
            assert layer.obs_attn is None and got and got[0] is None


def test_weighted_kmeans_config_is_validated():
    with pytest.raises(ValueError, match="weighted_kmeans"):
        PQCacheConfig(weighted_kmeans=1)
    with pytest.raises(ValueError, match="observation_window"):
        PQCacheConfig(observation_window=0)
