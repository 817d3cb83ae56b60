"""Product-quantization training: k-means per sub-space, with faiss-cpu or a batched pure-torch fallback.

A "problem" is one (KV head, sub-space) pair of one sequence: its points are that sub-vector of every training
key. Both trainers take all problems of a sequence at once, x: [P, n, Ds], and return
centroids [P, K, Ds] float32 and codes [P, n] uint8 (the assignment of every training point).

Input guard (`train_pq`): non-finite keys (NaN/inf) raise a ValueError that says where they came from. Finite
keys far from 1 in magnitude are clustered after a per-problem power-of-two rescale (see `_rescale`): faiss
aborts the whole process (an exception thrown inside OpenMP) once squared distances overflow float32, near
|x| ~ 1e19, and the torch k-means silently degrades (overflowing distances: wrong nearest centroids). k-means is
scale-equivariant, and a power-of-two scale is exact in floating point, so the codes are those of the unscaled
problem and the centroids come back in the keys' own scale.

Which trainer runs: faiss when importable, else the torch k-means (a warning is logged once: the two sample
and seed differently, so results change). `kmeans_trainer()` names it; an evaluation records it.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch

__all__ = ["faiss_available", "default_use_faiss", "kmeans_trainer", "kmeans_torch", "kmeans_faiss", "train_pq",
           "train_rq", "inertia", "reconstruction_error", "worst_coded", "ClusteringStopped"]

log = logging.getLogger("pqpatch")

# Problems whose largest |x| lies outside [2**-_SAFE_EXP, 2**_SAFE_EXP] are rescaled before clustering. Far
# inside float32's range both ways: a squared distance summed over Ds <= 2**10 dims and n <= 2**20 points of
# magnitude 2**40 is 2**110 < 2**127, and 2**-40 squared (2**-80) is still a normal float32.
_SAFE_EXP = 40
_warned_no_faiss = False


class ClusteringStopped(Exception):
    """Raised inside a k-means job that its pool was asked to stop (see `ClusterPool.cancel`)."""


def faiss_available() -> bool:
    """Whether faiss can be imported (the preferred k-means)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def kmeans_trainer() -> str:
    """The k-means `train_pq` uses by default: "faiss <version>" or "torch" (faiss-cpu not installed)."""
    if not faiss_available():
        return "torch"
    import faiss

    return f"faiss {getattr(faiss, '__version__', '?')}"


def default_use_faiss() -> bool:
    """Whether training uses faiss when the caller does not say: yes if installed. Logs a warning the first
    time it answers no (the torch fallback changes results)."""
    global _warned_no_faiss
    if faiss_available():
        return True
    if not _warned_no_faiss:
        _warned_no_faiss = True
        log.warning(
            "pqpatch: faiss is not installed; k-means runs on the torch fallback, which samples and seeds "
            "differently (results differ from a faiss run and it holds the GIL less). pip install faiss-cpu"
        )
    return False


def _check_finite(x: torch.Tensor, where: str) -> None:
    """x: [P, n, Ds] float32. Raise a ValueError naming `where` if any value is NaN or inf."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        tokens = int(bad.any(-1).any(0).sum())
        raise ValueError(
            f"k-means input{' of ' + where if where else ''}: {tokens} key(s) hold NaN or inf values, so PQ "
            f"cannot index them. The model produced non-finite key states during the prefill (float16 "
            f"overflow is the usual cause: load the model in bfloat16 or float32); dense attention over such "
            f"keys is not meaningful either"
        )


def _rescale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring every problem's magnitude near 1 where it is far from it. x: [P, n, Ds] float32.

    Returns (x / scale, scale [P, 1, 1] float32) or (x, None) when no problem needs it. Each scale is a power
    of two, so x / scale is exact and k-means on it gives the same codes (centroids scaled by 1 / scale).
    """
    if x.numel() == 0:
        return x, None
    amax = x.abs().amax(dim=(1, 2))  # [P]
    far = ((amax > 2.0**_SAFE_EXP) | ((amax > 0) & (amax < 2.0**-_SAFE_EXP))).tolist()
    if not any(far):
        return x, None
    exps = [math.frexp(a)[1] if f else 0 for a, f in zip(amax.tolist(), far)]  # amax = f * 2**e, 0.5 <= f < 1
    scale = torch.tensor([2.0**e for e in exps], dtype=torch.float32)[:, None, None]
    return x / scale, scale


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


def kmeans_torch(
    x: torch.Tensor, k: int, iters: int, seed: int, should_stop: Callable[[], bool] | None = None,
    *, weights: torch.Tensor | None = None, init_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means. x: [P, n, Ds] float32 -> (centroids [P, K, Ds], codes [P, n] uint8).

    All problems advance together, so `should_stop` (raises `ClusteringStopped` when it returns True) is
    checked between iterations. weights: [P, n] > 0 per-point weights (None: all 1); a centroid is the
    weighted mean of its points, i.e. the objective is sum_i w_i |x_i - c(x_i)|^2.
    init_weights: [P, n] >= 0, the distribution the K starting points are drawn from (None: `weights`, or a
    uniform sample when both are None)."""
    x = x.float()
    p, n, ds = x.shape
    if n <= k:
        return _degenerate(x, k)
    g = torch.Generator().manual_seed(seed)
    if init_weights is None:
        init_weights = weights
    if init_weights is None:
        init = torch.randperm(n, generator=g)[:k]
        cent = x[:, init].clone()  # [P, K, Ds]
    else:  # seed the centroids where the weight is (a uniform sample would rarely start on a few heavy points)
        init = torch.multinomial(init_weights.float(), k, replacement=False, generator=g)  # [P, K]
        cent = torch.gather(x, 1, init[..., None].expand(p, k, ds)).clone()
    for _ in range(iters):
        if should_stop is not None and should_stop():
            raise ClusteringStopped()
        a = _assign(x, cent)  # [P, n]
        wx = x if weights is None else x * weights[..., None]
        sums = torch.zeros(p, k, ds).scatter_add_(1, a[..., None].expand(p, n, ds), wx)
        counts = torch.zeros(p, k).scatter_add_(1, a, torch.ones(p, n) if weights is None else weights)
        # empty clusters keep their previous centroid instead of collapsing to zero
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
    return cent, _assign(x, cent).to(torch.uint8)


def kmeans_faiss(
    x: torch.Tensor, k: int, iters: int, seed: int, should_stop: Callable[[], bool] | None = None,
    *, first_problem: int = 0, weights: torch.Tensor | None = None, init_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss.Kmeans per problem (faiss releases the GIL, so pool threads run in parallel). Same contract;
    `should_stop` is checked before each problem. Problem i is seeded with seed + first_problem + i:
    `first_problem` is the global index of x[0] when x holds only some heads (a tensor-parallel rank), so a head
    gets the same codebook whichever rank clusters it. weights: [P, n] per-point weights (faiss's weighted
    k-means; None: unweighted). init_weights: as `kmeans_torch` (None: `weights`, or faiss's own sample)."""
    import faiss

    x = x.float()
    p, n, ds = x.shape
    if n <= k:
        return _degenerate(x, k)
    cent = torch.empty(p, k, ds)
    codes = torch.empty(p, n, dtype=torch.uint8)
    xn = x.numpy()
    if init_weights is None:
        init_weights = weights
    for i in range(p):
        if should_stop is not None and should_stop():
            raise ClusteringStopped()
        pts = np.ascontiguousarray(xn[i])
        # faiss takes the seed as a C int: wrap seed + i (seed <= 2**31 - 1, PQCacheConfig checks it)
        km = faiss.Kmeans(ds, k, niter=iters, seed=(seed + first_problem + i) % 2**31, verbose=False,
                          min_points_per_centroid=1)
        if init_weights is None:
            km.train(pts)
        else:  # (weighted) Lloyd, started from centroids sampled by `init_weights` (as kmeans_torch does): faiss's
            # uniform sample would rarely start on the few keys that carry most of the weight
            pi = init_weights[i].double().numpy()
            rng = np.random.default_rng((seed + first_problem + i) % 2**31)
            init = rng.choice(n, size=k, replace=False, p=pi / pi.sum())
            wi = None if weights is None else np.ascontiguousarray(weights[i].numpy(), "float32")
            km.train(pts, weights=wi, init_centroids=np.ascontiguousarray(pts[init]))
        _, a = km.index.search(pts, 1)
        cent[i] = torch.from_numpy(km.centroids)
        codes[i] = torch.from_numpy(a[:, 0].astype(np.uint8))
    return cent, codes


def inertia(x: torch.Tensor, cent: torch.Tensor, codes: torch.Tensor) -> float:
    """Mean squared distance of each point to its centroid. Shapes as `kmeans_torch`."""
    rec = torch.gather(cent, 1, codes.long()[..., None].expand(*codes.shape, cent.shape[-1]))
    return float(((x.float() - rec) ** 2).sum(-1).mean())


def train_pq(
    keys: torch.Tensor, num_subspaces: int, bits: int, iters: int, seed: int, use_faiss: bool | None = None,
    *, where: str = "", should_stop: Callable[[], bool] | None = None, head_offset: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one sequence's codebooks.

    keys: [Hkv, n, D] (any float dtype, CPU). Returns centroids [Hkv, m, K, Ds] float32 and
    codes [Hkv, n, m] uint8.

    use_faiss: None picks faiss when installed (else the torch k-means, with a warning logged once).
    where: named in errors (e.g. "layer 3, sequence 0"). should_stop: polled at problem boundaries; when it
    returns True the training raises `ClusteringStopped`. Non-finite keys raise ValueError; keys of extreme
    magnitude are rescaled for clustering (module docstring).
    head_offset: global index of keys[0]'s KV head (tensor parallel: the rank's first head). Problem (h, j) is
    seeded by its global index (head_offset + h) * m + j, so a rank's codebooks equal a single process's.
    weights: [Hkv, n] > 0, how much each training key counts (attention-weighted k-means: keys the queries
    attend to pull centroids towards them); every sub-space of a head shares its key's weight. None: all 1.
    """
    h, n, d = keys.shape
    m = num_subspaces
    if d % m:
        raise ValueError(f"num_subspaces={m} must divide the head dim {d}")
    ds, k = d // m, 1 << bits
    x = keys.float().reshape(h, n, m, ds).permute(0, 2, 1, 3).reshape(h * m, n, ds).contiguous()
    _check_finite(x, where)
    x, scale = _rescale(x)
    w = _checked_weights(weights, h, n)
    if w is not None:
        w = w.repeat_interleave(m, dim=0).contiguous()  # [Hkv * m, n]: problem order (h, j)
    if use_faiss is None:
        use_faiss = default_use_faiss()
    if use_faiss:
        cent, codes = kmeans_faiss(x, k, iters, seed, should_stop, first_problem=head_offset * m, weights=w)
    else:  # one initial sample (seeded once) serves every problem: the result does not depend on the offset
        cent, codes = kmeans_torch(x, k, iters, seed, should_stop, weights=w)
    if scale is not None:
        cent = cent * scale
    return cent.reshape(h, m, k, ds), codes.reshape(h, m, n).permute(0, 2, 1).contiguous()


def _checked_weights(weights: torch.Tensor | None, h: int, n: int) -> torch.Tensor | None:
    """k-means weights [Hkv, n] as contiguous float32, or None; a wrong shape is a ValueError."""
    if weights is None:
        return None
    if tuple(weights.shape) != (h, n):
        raise ValueError(f"k-means weights must be [Hkv, n] = {(h, n)}, got {tuple(weights.shape)}")
    return weights.float().contiguous()


def _residual_init_weights(r: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Where a later residual stage draws its starting points: weight x squared residual. r: [P, n, D] float32,
    w: [P, n] or None -> [P, n] float64 > 0, each row summing to 1.

    Why not by weight alone: the heavy keys are the ones the previous stage coded best (weighted k-means pulls a
    centroid onto each), so their residual is ~0. Starting points drawn there are near-duplicates of 0 that
    float rounding tells apart, and Lloyd then ends O(1) apart on keys equal up to rounding (tensor-parallel
    ranks would stop selecting like one process). Drawing by w |r|^2 (one k-means++ step) starts where the error
    to correct is. The floor (1e-9 of the mean) keeps k points drawable when fewer than k residuals are non-zero,
    and sits far above float32 rounding's ~1e-13 relative |r|^2, so rounding-level residuals all look alike.
    """
    e = (r.double() ** 2).sum(-1)  # [P, n]
    if w is not None:
        e = e * w.double()
    e = e + 1e-9 * e.mean(-1, keepdim=True) + 1e-300
    return e / e.sum(-1, keepdim=True)  # normalised here: float32 (torch.multinomial) keeps the floor


def train_rq(
    keys: torch.Tensor, stages: int, bits: int, iters: int, seed: int, use_faiss: bool | None = None,
    *, where: str = "", should_stop: Callable[[], bool] | None = None, head_offset: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one sequence's residual codebooks: `stages` k-means over the whole head dim, stage s on what stages
    < s left (key - sum of the chosen centroids). Same contract as `train_pq` with m = stages and Ds = D:

    keys: [Hkv, n, D] (CPU). Returns centroids [Hkv, S, K, D] float32 and codes [Hkv, n, S] uint8.
    Why full-dimension stages: PQ's sub-spaces split the head dim, so at 2 bytes per token on a 256-dim head each
    code sees 128 dims; two residual stages each see all 256, and the second corrects the first's error where
    it is largest. Scoring is unchanged (see `kernels.quality`).
    """
    h, n, d = keys.shape
    k = 1 << bits
    x = keys.float().contiguous()
    _check_finite(x, where)
    x, scale = _rescale(x)
    w = _checked_weights(weights, h, n)
    if use_faiss is None:
        use_faiss = default_use_faiss()
    cents, codes = [], []
    r = x
    init = None  # stage 0 starts as `train_pq` does (by weight, or uniformly)
    for s in range(stages):
        stage_seed = (seed + 7919 * s) % 2**31  # a different start per stage; deterministic per config
        if use_faiss:
            c, a = kmeans_faiss(r, k, iters, stage_seed, should_stop, first_problem=head_offset, weights=w,
                                init_weights=init)
        else:
            c, a = kmeans_torch(r, k, iters, stage_seed, should_stop, weights=w, init_weights=init)
        cents.append(c)
        codes.append(a)
        r = r - torch.gather(c, 1, a.long()[..., None].expand(h, n, d))  # the residual the next stage codes
        init = _residual_init_weights(r, w)
    cent = torch.stack(cents, 1)  # [Hkv, S, K, D]
    if scale is not None:
        cent = cent * scale[:, None]
    return cent, torch.stack(codes, -1).contiguous()  # codes [Hkv, n, S]


def reconstruction_error(keys: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor,
                         residual: bool) -> torch.Tensor:
    """Squared distance of every key to its reconstruction from the codebook: [Hkv, n] float32.

    keys: [Hkv, n, D]; centroids: [Hkv, m, K, Ds] (PQ: Ds = D / m, the key is the concatenation of its
    sub-space centroids; residual: Ds = D, the key is the sum of its stage centroids); codes: [Hkv, n, m] uint8.
    One head at a time, one `index_select` of centroid rows per sub-space / stage, subtracted in place: memory
    stays at one head's keys (a single gather over every head and stage would hold m x the keys in float32).
    """
    h, n, m = codes.shape
    ds = centroids.shape[-1]
    cent = centroids.float()
    out = torch.empty(h, n)
    for i in range(h):
        diff = keys[i].float().clone()  # [n, D]: the key, minus its reconstruction below
        idx = codes[i].long()  # [n, m]
        for j in range(m):
            rows = cent[i, j].index_select(0, idx[:, j])  # [n, Ds]
            if residual:
                diff -= rows
            else:
                diff[:, j * ds : (j + 1) * ds] -= rows
        out[i] = diff.square_().sum(-1)
    return out


def worst_coded(keys: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, residual: bool,
                count: int) -> torch.Tensor:
    """Positions of the `count` worst-coded keys per KV head (largest `reconstruction_error`), ascending:
    [Hkv, min(count, n)] int64 (positions into keys' n). Shapes as `reconstruction_error`."""
    err = reconstruction_error(keys, centroids, codes, residual)
    c = min(count, err.shape[1])
    return torch.topk(err, c, dim=-1).indices.sort(dim=-1).values
