"""Product-quantization training: k-means per sub-space, with faiss-cpu or a batched pure-torch fallback.

A "problem" is one (KV head, sub-space) pair of one sequence: its points are that sub-vector of every training
key. Both trainers take all problems of a sequence at once, x: [P, n, Ds], and return
centroids [P, K, Ds] float32 and codes [P, n] uint8 (the assignment of every training point).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["faiss_available", "kmeans_torch", "kmeans_faiss", "train_pq", "inertia"]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _degenerate(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n <= k points: every point is its own centroid (zero error); spare centroids repeat point 0 (or zero)."""
    p, n, ds = x.shape
    cent = torch.zeros(p, k, ds, dtype=torch.float32)
    if n > 0:
        cent[:, :n] = x
        cent[:, n:] = x[:, :1]
    codes = torch.arange(n, dtype=torch.uint8).expand(p, n).clone()
    return cent, codes


def _assign(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Nearest centroid. x: [P, n, Ds], cent: [P, K, Ds] -> [P, n] int64."""
    # |x-c|^2 up to the |x|^2 term, which does not change the argmin
    d = (cent * cent).sum(-1)[:, None, :] - 2.0 * torch.bmm(x, cent.transpose(1, 2))
    return d.argmin(-1)


def kmeans_torch(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means. x: [P, n, Ds] float32 -> (centroids [P, K, Ds], codes [P, n] uint8)."""
    x = x.float()
    p, n, ds = x.shape
    if n <= k:
        return _degenerate(x, k)
    g = torch.Generator().manual_seed(seed)
    init = torch.randperm(n, generator=g)[:k]
    cent = x[:, init].clone()  # [P, K, Ds]
    for _ in range(iters):
        a = _assign(x, cent)  # [P, n]
        sums = torch.zeros(p, k, ds).scatter_add_(1, a[..., None].expand(p, n, ds), x)
        counts = torch.zeros(p, k).scatter_add_(1, a, torch.ones(p, n))
        # empty clusters keep their previous centroid instead of collapsing to zero
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
    return cent, _assign(x, cent).to(torch.uint8)


def kmeans_faiss(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss.Kmeans per problem (faiss releases the GIL, so pool threads run in parallel). Same contract."""
    import faiss

    x = x.float()
    p, n, ds = x.shape
    if n <= k:
        return _degenerate(x, k)
    cent = torch.empty(p, k, ds)
    codes = torch.empty(p, n, dtype=torch.uint8)
    xn = x.numpy()
    for i in range(p):
        pts = np.ascontiguousarray(xn[i])
        km = faiss.Kmeans(ds, k, niter=iters, seed=seed + i, verbose=False, min_points_per_centroid=1)
        km.train(pts)
        _, a = km.index.search(pts, 1)
        cent[i] = torch.from_numpy(km.centroids)
        codes[i] = torch.from_numpy(a[:, 0].astype(np.uint8))
    return cent, codes


def inertia(x: torch.Tensor, cent: torch.Tensor, codes: torch.Tensor) -> float:
    """Mean squared distance of each point to its centroid. Shapes as `kmeans_torch`."""
    rec = torch.gather(cent, 1, codes.long()[..., None].expand(*codes.shape, cent.shape[-1]))
    return float(((x.float() - rec) ** 2).sum(-1).mean())


def train_pq(
    keys: torch.Tensor, num_subspaces: int, bits: int, iters: int, seed: int, use_faiss: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one sequence's codebooks.

    keys: [Hkv, n, D] (any float dtype, CPU). Returns centroids [Hkv, m, K, Ds] float32 and
    codes [Hkv, n, m] uint8.
    """
    h, n, d = keys.shape
    m = num_subspaces
    if d % m:
        raise ValueError(f"num_subspaces={m} must divide the head dim {d}")
    ds, k = d // m, 1 << bits
    x = keys.float().reshape(h, n, m, ds).permute(0, 2, 1, 3).reshape(h * m, n, ds).contiguous()
    if use_faiss is None:
        use_faiss = faiss_available()
    fn = kmeans_faiss if use_faiss else kmeans_torch
    cent, codes = fn(x, k, iters, seed)
    return cent.reshape(h, m, k, ds), codes.reshape(h, m, n).permute(0, 2, 1).contiguous()
