"""The worst-coded keys join every re-ranking shortlist (`PQCacheConfig.rerank_outliers`).

Why it exists: on Gemma-3-270M a NIAH needle's digit keys were the worst-coded of 15.5K candidates, and the codes
ranked the key holding 0.96 of a head's attention 2443rd, outside the 2k shortlist (docs/results.md). Pieces:
`codebook.reconstruction_error` / `worst_coded` (against a per-token loop), the pool's `Codebook.outliers`,
`selection.with_outliers` (against a set union) and a planted end-to-end case that fails without the outliers.
"""

from __future__ import annotations

import math

import pytest
import torch

from pqpatch.cache import PQLayer
from pqpatch.clustering import ClusterPool
from pqpatch.codebook import reconstruction_error, train_pq, train_rq, worst_coded
from pqpatch.config import PQCacheConfig
from pqpatch.selection import with_outliers


@pytest.fixture(scope="module")
def pool():
    p = ClusterPool(2)
    yield p
    p.shutdown()


def _recon_loop(keys, cent, codes, residual):
    h, n, m = codes.shape
    out = torch.zeros(h, n)
    for hh in range(h):
        for t in range(n):
            parts = [cent[hh, j, int(codes[hh, t, j])] for j in range(m)]
            rec = sum(parts) if residual else torch.cat(parts)
            out[hh, t] = float(((keys[hh, t] - rec) ** 2).sum())
    return out


@pytest.mark.parametrize("residual", [False, True], ids=["pq", "residual"])
@pytest.mark.parametrize("n,d,m", [(1, 64, 2), (17, 128, 1), (97, 256, 2), (1000, 64, 2)])
def test_reconstruction_error_matches_a_loop(residual, n, d, m):
    g = torch.Generator().manual_seed(n + d)
    keys = torch.randn(2, n, d, generator=g)
    train = train_rq if residual else train_pq
    cent, codes = train(keys, m, 3, 3, 0, use_faiss=False)
    err = reconstruction_error(keys, cent, codes, residual)
    torch.testing.assert_close(err, _recon_loop(keys, cent, codes, residual), rtol=1e-4, atol=1e-4)
    for count in (0, 1, 5, n + 3):
        w = worst_coded(keys, cent, codes, residual, count)
        assert w.shape == (2, min(count, n))
        for h in range(2):
            want = set(torch.argsort(err[h], descending=True)[: min(count, n)].tolist())
            assert set(w[h].tolist()) == want and w[h].tolist() == sorted(want)


@pytest.mark.parametrize("r,x", [(1, 0), (1, 1), (17, 1), (97, 17), (1000, 17), (0, 5)])
def test_with_outliers_is_the_union_each_position_once(r, x):
    g = torch.Generator().manual_seed(r * 31 + x)
    b, h, n = 2, 3, 3000
    rows_s, rows_o = [], []
    for _ in range(b * h):
        perm = torch.randperm(n, generator=g)
        s = perm[:r].clone()
        s[torch.rand(r, generator=g) < 0.2] = -1  # empty entries anywhere
        o = torch.cat([perm[: x // 2], perm[r + 5 : r + 5 + x - x // 2]])  # half of them already shortlisted
        if x:
            o[torch.rand(x, generator=g) < 0.2] = -1
        o = o.sort().values  # the layout PQLayer.sync writes: ascending, the empty (-1) entries first
        rows_s.append(s)
        rows_o.append(o)
    short = torch.stack(rows_s).view(b, h, r)
    outl = torch.stack(rows_o).view(b, h, x)
    out = with_outliers(short, outl)
    assert out.shape == (b, h, r + x)
    assert torch.equal(out[..., :r], short)  # the shortlist is kept as it is
    for row, s, o in zip(out.reshape(b * h, r + x), short.reshape(b * h, r), outl.reshape(b * h, x)):
        got = [p for p in row.tolist() if p >= 0]
        assert len(got) == len(set(got))
        assert set(got) == {p for p in s.tolist() + o.tolist() if p >= 0}


def test_pool_returns_the_worst_coded_positions(pool):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 300, 64, generator=g)
    lo = [10, 40]
    for quantizer in ("pq", "residual"):
        book = pool.submit(keys, lo=lo, hi=290, num_subspaces=2, bits=3, iters=3, seed=0, quantizer=quantizer,
                           outliers=7).result()
        assert len(book.outliers) == 2
        for b in range(2):
            x = keys[b, :, lo[b] : 290]
            want = worst_coded(x, book.centroids[b], book.codes[b], quantizer == "residual", 7)
            assert torch.equal(book.outliers[b], want)
    assert pool.submit(keys, lo=lo, hi=290, num_subspaces=2, bits=3, iters=3, seed=0).result().outliers == []


def _layer_with_an_outlier(pool, outliers):
    """A prefilled layer of clustered keys plus one key far off every cluster along a direction u, and a query
    along u: the key holds nearly all of the exact attention, while its code (shared with its cluster's keys)
    scores like an ordinary key. One residual stage of 8 centroids for 8 clusters: a second stage would spend a
    centroid on the planted key (its squared residual draws a starting point there), which is what `rerank_outliers`
    stands in for when the stages cannot."""
    g = torch.Generator().manual_seed(11)
    n, d = 2000, 64
    centres = torch.randn(8, d, generator=g) * 2
    keys = centres[torch.randint(0, 8, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    u = torch.randn(d, generator=g)
    u = u - centres.T @ torch.linalg.lstsq(centres.T, u[:, None]).solution[:, 0]  # off every centre
    u = u / u.norm()
    target = 1500
    keys[target] = keys[target] + 6.0 * u
    keys = keys[None, None]  # [1, 1, n, d]
    cfg = PQCacheConfig(token_budget=232, sink_tokens=16, local_tokens=16, min_context=1, bits=3, num_subspaces=1,
                        rerank=2, rerank_outliers=outliers)
    layer = PQLayer(n + 8, 0, cfg, pool)
    layer.update(keys, torch.randn_like(keys))
    layer.after_prefill(None, 1)
    q = (u * 20.0).view(1, 1, 1, d)
    out, idx = layer._rerank_decode(q, 1 / math.sqrt(d))
    # the unfused path (token_index, what a step without the fused op and the eval probes use) selects the same
    assert torch.equal(idx.sort(-1).values, layer.token_index(q, 1 / math.sqrt(d)).sort(-1).values)
    return layer, idx, target


def test_an_outlier_key_is_selected_only_with_the_outliers(pool):
    layer, idx, target = _layer_with_an_outlier(pool, 0)
    assert layer.outliers is None
    assert not (idx == target).any(), "the planted key must be out of the codes' shortlist for this test to mean much"
    layer, idx, target = _layer_with_an_outlier(pool, 4)
    assert target in layer.outliers[0, 0].tolist()  # the worst-coded key of the prompt
    assert torch.equal(layer.outliers, layer.outliers.sort(-1).values)  # the layout with_outliers searches
    assert (idx == target).any()
