"""PQ training: code ranges, error vs bits, faiss vs torch k-means, the input guard, the clustering pool."""

import logging
import subprocess
import sys

import pytest
import torch

from pqpatch.kernels.reference import pq_assign_ref, pq_reconstruct_ref
from pqpatch.clustering import ClusterPool
from pqpatch.codebook import faiss_available, inertia, kmeans_faiss, kmeans_torch, train_pq


@pytest.mark.parametrize("m,bits,d", [(1, 4, 64), (2, 6, 128), (4, 8, 256), (8, 3, 64)])
def test_codes_in_range_and_shapes(m, bits, d):
    keys = torch.randn(3, 500, d)
    cent, codes = train_pq(keys, m, bits, iters=4, seed=0, use_faiss=False)
    assert cent.shape == (3, m, 2**bits, d // m) and codes.shape == (3, 500, m)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits


def _rel_error(keys, cent, codes):
    rec = pq_reconstruct_ref(cent[None], codes[None])[0]
    return float(((rec - keys) ** 2).sum() / (keys**2).sum())


@pytest.mark.parametrize("use_faiss", [False, pytest.param(True, marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))])
def test_reconstruction_error_falls_as_bits_rise(use_faiss):
    keys = torch.randn(2, 2000, 64)
    errs = [_rel_error(keys, *train_pq(keys, 2, b, iters=10, seed=0, use_faiss=use_faiss)) for b in (2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("use_faiss", [False, pytest.param(True, marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))])
def test_enough_centroids_recover_planted_clusters(use_faiss):
    """Sub-vectors drawn around 16 centres (noise 5% of their spread): 6 bits (64 centroids) must get down to
    about the noise floor (rel. error ~0.0025), 2 bits (4 centroids) cannot."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 16, 32, generator=gen)  # 2 sub-spaces x 16 centres x 32 dims
    pick = torch.randint(0, 16, (2000, 2), generator=gen)
    keys = torch.cat([centres[0, pick[:, 0]], centres[1, pick[:, 1]]], -1) + 0.05 * torch.randn(2000, 64, generator=gen)
    keys = keys[None]  # [Hkv=1, n, 64]
    err = {b: _rel_error(keys, *train_pq(keys, 2, b, iters=20, seed=0, use_faiss=use_faiss)) for b in (2, 6)}
    assert err[6] < 0.02 and err[2] > 0.3, err


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_and_torch_reach_similar_inertia():
    x = torch.randn(4, 3000, 32) * torch.linspace(0.5, 2.0, 32)
    it_t = inertia(x, *kmeans_torch(x, 64, 15, seed=1))
    it_f = inertia(x, *kmeans_faiss(x, 64, 15, seed=1))
    assert abs(it_t - it_f) / it_f < 0.05, (it_t, it_f)


def test_training_codes_match_nearest_centroid():
    keys = torch.randn(2, 700, 64)
    cent, codes = train_pq(keys, 4, 5, iters=8, seed=0, use_faiss=False)
    again = pq_assign_ref(keys[None], cent[None])[0]
    assert (again == codes).float().mean() > 0.999  # ties aside, training codes are the nearest centroids


def test_fewer_points_than_centroids_is_exact():
    keys = torch.randn(1, 5, 16)
    cent, codes = train_pq(keys, 2, 4, iters=3, seed=0)
    assert _rel_error(keys, cent, codes) < 1e-10
    cent, codes = train_pq(torch.randn(1, 0, 16), 2, 4, iters=3, seed=0)
    assert codes.shape == (1, 0, 2)


def test_pool_trains_every_sequence_from_its_own_start():
    pool = ClusterPool(2)
    keys = torch.randn(2, 3, 100, 32)
    book = pool.submit(keys, lo=[10, 30], hi=90, num_subspaces=2, bits=3, iters=3, seed=0).result()
    assert book.centroids.shape == (2, 3, 2, 8, 16)
    assert [c.shape for c in book.codes] == [(3, 80, 2), (3, 60, 2)]
    pool.shutdown()


def test_short_padded_sequence_borrows_the_richest_codebook():
    """A sequence with fewer training keys than centroids uses the codebook of the one with the most keys."""
    pool = ClusterPool(1)
    keys = torch.randn(2, 2, 300, 32)
    book = pool.submit(keys, lo=[0, 295], hi=300, num_subspaces=2, bits=4, iters=3, seed=0).result()
    assert torch.equal(book.centroids[1], book.centroids[0])
    assert book.codes[1].shape == (2, 5, 2)
    assert torch.equal(book.codes[1], pq_assign_ref(keys[1:, :, 295:300], book.centroids[:1])[0])
    pool.shutdown()


# ---- input guard: non-finite and extreme keys ------------------------------------------------------------------
TRAINERS = [False, pytest.param(True, marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))]

_EXTREME = """
import sys, torch
from pqpatch.codebook import train_pq
use_faiss = sys.argv[1] == "1"
keys = torch.randn(2, 400, 64, generator=torch.Generator().manual_seed(0))
c0, q0 = train_pq(keys, 2, 4, 5, 0, use_faiss=use_faiss)
for s in (2.0**64, 2.0**-70):  # squared distances overflow / underflow float32
    c, q = train_pq(keys * s, 2, 4, 5, 0, use_faiss=use_faiss)
    assert torch.equal(q, q0), ("codes changed", s)
    assert torch.equal(c, c0 * s), ("centroids not in the keys' scale", s)
keys[0, 7] = 1e19  # one huge but finite key among ordinary ones: must not abort the process
c, q = train_pq(keys, 2, 4, 5, 0, use_faiss=use_faiss)
assert torch.isfinite(c).all() and int(q.max()) < 16
print("ok")
"""


@pytest.mark.parametrize("use_faiss", TRAINERS)
def test_extreme_finite_keys_are_rescaled_not_fatal(use_faiss):
    """faiss aborts the process (exit 134, an exception inside OpenMP) on keys near 1e19, and the torch k-means
    miscodes them; a power-of-two rescale gives exactly the codes of the unscaled keys. In a subprocess: an
    abort must fail this test, not kill the test run."""
    out = subprocess.run([sys.executable, "-c", _EXTREME, "1" if use_faiss else "0"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("use_faiss", TRAINERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_keys_raise_a_clear_error(use_faiss, bad):
    keys = torch.randn(2, 300, 32)
    keys[1, 40, 3] = bad
    with pytest.raises(ValueError, match=r"layer 5.*1 key\(s\) hold NaN or inf.*bfloat16"):
        train_pq(keys, 2, 4, 3, 0, use_faiss=use_faiss, where="layer 5")


def test_pool_error_names_the_layer():
    pool = ClusterPool(1)
    keys = torch.randn(1, 2, 100, 32)
    keys[0, 0, 50] = float("nan")
    fut = pool.submit(keys, lo=[0], hi=100, num_subspaces=2, bits=3, iters=2, seed=0, layer=7)
    with pytest.raises(ValueError, match="layer 7, sequence 0"):
        fut.result()
    pool.shutdown()


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_largest_seed_works_with_faiss():
    """faiss takes a C int: seed + problem index must not overflow it at PQCacheConfig's largest seed."""
    _, codes = train_pq(torch.randn(2, 100, 16), 2, 3, 2, 2**31 - 1, use_faiss=True)
    assert codes.shape == (2, 100, 2)


# ---- which trainer ran ---------------------------------------------------------------------------------------
def test_codebook_records_its_trainer_and_warns_once_without_faiss(monkeypatch, caplog):
    import pqpatch.codebook as cb

    pool = ClusterPool(1)
    keys = torch.randn(1, 2, 100, 32)
    if faiss_available():
        assert cb.kmeans_trainer().startswith("faiss")
        assert pool.submit(keys, [0], 100, 2, 3, 2, 0).result().trainer == "faiss"
    monkeypatch.setattr(cb, "faiss_available", lambda: False)
    monkeypatch.setattr(cb, "_warned_no_faiss", False)
    assert cb.kmeans_trainer() == "torch"
    with caplog.at_level(logging.WARNING, logger="pqpatch"):
        books = [pool.submit(keys, [0], 100, 2, 3, 2, 0).result() for _ in range(2)]
        train_pq(keys[0], 2, 3, 2, 0)
    assert [b.trainer for b in books] == ["torch", "torch"]
    warned = [r for r in caplog.records if "faiss is not installed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    pool.shutdown()
