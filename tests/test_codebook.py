"""PQ training: code ranges, error vs bits, faiss vs torch k-means, the clustering pool."""

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
