"""Ops of the quality options: residual quantization (RQ) and exact re-ranking of a PQ shortlist.

Residual quantization with S stages over the whole head dim: key ~ C_1[c_1] + C_2[c_2] + ... + C_S[c_S], each
C_s a table of K = 2**bits full-dimension (D) centroids, stage s trained on what stages < s left over. Its logit
q . key ~ sum_s q . C_s[c_s] is exactly the PQ logit of a codebook with m = S "sub-spaces" of width Ds = D whose
query is q repeated S times: so `residual_query` + the PQ top-k (`pq_topk`, every backend) score RQ codes with no
new kernel. Centroids use the PQ layout [B, Hkv, S, K, D]; codes [B, Hkv, N, S] uint8.

Exact re-ranking: a PQ shortlist of r * k tokens is scored again with the exact keys (r * k * D key elements
read per KV head and step) and the best k kept, by the same GQA rule as every selector: the sum over the group of
each head's probability under its softmax over *all* candidates, whose normaliser log Z_g the caller passes as
`log_z` (estimated through the PQ codes: `kernels.log_partition`). Without `log_z` each head's softmax is taken over
the shortlist alone, which re-weights the heads (see `kernels.log_partition` for why that hurts).
`rerank_exact_ref` is the reference of the public op `kernels.rerank_topk` (CPU fast path: `kernels.cpu_rerank`;
Triton: `kernels._triton.rerank`).

Plain tensor ops (no host synchronisation, static shapes), so a compiled decode step stays one graph.
"""

from __future__ import annotations

import torch

__all__ = ["with_outliers", "is_residual", "residual_query", "rq_assign_ref", "rq_reconstruct_ref",
           "rerank_exact_ref", "rerank_keep_best", "check_rerank_inputs"]


def is_residual(query_dim: int, centroids: torch.Tensor) -> bool:
    """Whether centroids [B, Hkv, m, K, Ds] hold residual stages (full-dimension: Ds == D with m > 1) rather than
    PQ sub-spaces (m * Ds == D). m = 1 is both, and scores the same either way."""
    m, ds = centroids.shape[2], centroids.shape[4]
    return m > 1 and ds == query_dim


def residual_query(query: torch.Tensor, stages: int) -> torch.Tensor:
    """query [B, Hkv, G, D] -> [B, Hkv, G, stages * D]: the PQ query under which stage s is sub-space s."""
    return query.repeat(1, 1, 1, stages)


def rq_assign_ref(keys: torch.Tensor, centroids: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy residual codes: stage s takes the centroid nearest to what stages < s left.

    keys: [B, Hkv, T, D]; centroids: [B, Hkv, S, K, D]; sq: optional [B, Hkv, S, K] float32, the centroids' squared
    norms (sum over D of c * c) when the caller keeps them (a decode step encodes one token per layer: recomputing
    them read the whole codebook every step). Returns codes [B, Hkv, T, S] uint8.
    """
    r = keys.float()
    c = centroids.float()
    codes = []
    for s in range(c.shape[2]):
        cs = c[:, :, s]  # [B, Hkv, K, D]
        norms = (cs * cs).sum(-1) if sq is None else sq[:, :, s]  # [B, Hkv, K]
        dist = norms[:, :, None, :] - 2.0 * torch.einsum("bhtd,bhkd->bhtk", r, cs)
        a = dist.argmin(-1)  # [B, Hkv, T]
        r = r - torch.gather(cs, 2, a[..., None].expand(*a.shape, cs.shape[-1]))
        codes.append(a)
    return torch.stack(codes, -1).to(torch.uint8)


def rq_reconstruct_ref(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Keys rebuilt from residual codes: sum over stages. centroids [B, Hkv, S, K, D], codes [B, Hkv, N, S] ->
    [B, Hkv, N, D] float32."""
    b, h, s, _, d = centroids.shape
    n = codes.shape[2]
    idx = codes.long().permute(0, 1, 3, 2)[..., None].expand(b, h, s, n, d)  # [B, Hkv, S, N, D]
    return torch.gather(centroids.float(), 3, idx).sum(2)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_rerank_inputs(query, keys, shortlist, k, k_valid, log_z=None) -> None:
    """Argument checks of `rerank_topk` shared by its CPU and Triton launchers: a ValueError naming the offending
    shape, dtype or device (no data is read, so nothing synchronises)."""

    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    for name, t in (("query", query), ("keys", keys), ("shortlist", shortlist)):
        check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    check(query.dim() == 4 and query.dtype in _FLOATS, f"query must be a float32/bfloat16/float16 tensor "
          f"[B, Hkv, G, D], got {query.dtype} {tuple(query.shape)}")
    check(keys.dim() == 4 and keys.dtype in _FLOATS, f"keys must be a float32/bfloat16/float16 tensor "
          f"[B, Hkv, N, D], got {keys.dtype} {tuple(keys.shape)}")
    b, h, _, d = query.shape
    check(tuple(keys.shape[:2]) == (b, h) and keys.shape[3] == d,
          f"keys {tuple(keys.shape)} do not match query {tuple(query.shape)} (need [B, Hkv, N, D] = "
          f"[{b}, {h}, N, {d}])")
    check(shortlist.dim() == 3 and tuple(shortlist.shape[:2]) == (b, h)
          and shortlist.dtype in (torch.int32, torch.int64),
          f"shortlist must be an int32/int64 tensor [B, Hkv, R] = [{b}, {h}, R], got {shortlist.dtype} "
          f"{tuple(shortlist.shape)}")
    check(isinstance(k, int) and not isinstance(k, bool) and k >= 0, f"k must be a non-negative int, got {k!r}")
    if k_valid is not None:
        check(isinstance(k_valid, torch.Tensor) and k_valid.numel() == 1
              and k_valid.dtype in (torch.int32, torch.int64),
              f"k_valid must be a 1-element int32/int64 tensor, got {getattr(k_valid, 'dtype', type(k_valid))} "
              f"{tuple(getattr(k_valid, 'shape', ()))}")
    if log_z is not None:
        check(isinstance(log_z, torch.Tensor) and log_z.dtype == torch.float32
              and tuple(log_z.shape) == tuple(query.shape[:3]),
              f"log_z must be a float32 tensor [B, Hkv, G] = {list(query.shape[:3])}, got "
              f"{getattr(log_z, 'dtype', type(log_z))} {tuple(getattr(log_z, 'shape', ()))}")
    for name, t in (("keys", keys), ("shortlist", shortlist), ("k_valid", k_valid), ("log_z", log_z)):
        if t is not None:
            check(t.device == query.device, f"{name} is on {t.device} but the query is on {query.device}")


def rerank_keep_best(score: torch.Tensor, shortlist: torch.Tensor, k: int,
                     k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The best min(k, k_valid) shortlist entries by score, best first (ties: torch.topk's choice), then -1.

    score: [B, Hkv, R] float32, -inf on empty entries; shortlist: [B, Hkv, R] positions. Returns [B, Hkv, k]
    int64. Tensor ops only (k_valid is compared on its device, never read on the host)."""
    kk_n = min(k, score.shape[-1])
    vals, pos = torch.topk(score, kk_n, dim=-1, sorted=True)  # best first, so a prefix is the best k_valid
    keep = torch.isfinite(vals)
    if k_valid is not None:
        keep = keep & (torch.arange(kk_n, device=score.device) < k_valid.reshape(()))
    out = torch.where(keep, torch.gather(shortlist, -1, pos).long(), -1)
    return torch.nn.functional.pad(out, (0, k - kk_n), value=-1)


def rerank_exact_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    shortlist: torch.Tensor,
    k: int,
    scaling: float,
    k_valid: torch.Tensor | None = None,
    log_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-score a shortlist with the exact keys and keep its best k: the reference of `kernels.rerank_topk`.

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D]; shortlist: [B, Hkv, R] positions in [0, N), negative = empty,
    each position at most once per row (R < k is allowed: the extra slots are -1).
    Score of an entry n, l_g(n) = scaling * q_g . key_n in float32:
      log_z [B, Hkv, G] given: sum_g exp(l_g(n) - log_z[g]), each head's probability under its softmax over all
        candidates (log_z: `log_partition`), computed as sum_g exp(t_g(n) - max_{g', n'} t) with t = l - log_z
        (a per-row factor: no overflow, same ranking); a non-finite log_z entry counts as 0.
      log_z None: sum over the G heads of each head's softmax over the row's non-empty entries.
    k_valid: optional 1-element integer tensor, fill only the best min(k_valid, k) slots (the rest -1).
    Returns [B, Hkv, k] int64: the selected positions best first (among equal scores: torch.topk's choice), then
    -1 in the slots that min(k, k_valid, non-empty entries) leaves empty.
    """
    b, h, g, d = query.shape
    if shortlist.shape[-1] == 0:
        return torch.full((b, h, k), -1, dtype=torch.int64, device=query.device)
    valid = shortlist >= 0  # [B, Hkv, R]
    safe = shortlist.clamp_min(0).long()
    kk = torch.gather(keys, 2, safe[..., None].expand(b, h, shortlist.shape[-1], d))  # [B, Hkv, R, D]
    logits = torch.einsum("bhgd,bhrd->bhgr", query.float(), kk.float()) * scaling
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    if log_z is not None:
        lz = log_z.float()
        t = logits - torch.where(torch.isfinite(lz), lz, torch.zeros_like(lz))[..., None]
        mx = t.amax(dim=(2, 3), keepdim=True)  # one shift per (b, h): the ranking is unchanged
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        score = torch.exp(t - mx).sum(2)  # [B, Hkv, R]
    else:
        mx = logits.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(logits - mx)
        score = (p / p.sum(-1, keepdim=True).clamp_min(1e-30)).sum(2)  # [B, Hkv, R]: the GQA rule
    score = score.masked_fill(~valid, float("-inf"))
    return rerank_keep_best(score, shortlist, k, k_valid)


def with_outliers(shortlist: torch.Tensor, outliers: torch.Tensor, lo: torch.Tensor | None = None,
                  hi: torch.Tensor | None = None) -> torch.Tensor:
    """The shortlist extended by the worst-coded keys (`PQCacheConfig.rerank_outliers`), each position once.

    shortlist: [B, Hkv, R] int64 positions, -1 = empty, any order, distinct; outliers: [B, Hkv, X] int64, sorted
    ascending with the empty (-1) entries first, distinct (`PQLayer.sync` fills it so); lo, hi: optional [B]
    candidate bounds, outliers outside lo[b] <= n < hi[b] are dropped. Returns [B, Hkv, R + X]: the shortlist, then
    the outliers it does not already hold (-1 in their place). Each shortlist entry is looked up in the small
    sorted outlier list (O(R log X)); the shortlist itself is never sorted. Tensor ops only, so a compiled step
    stays one graph. The reference of `kernels.pq_shortlist`'s `outliers` argument (whose "cpu" backend merges
    them into its selection mask instead, giving the same set in ascending order).
    """
    x = outliers.shape[-1]
    if lo is not None:  # only candidates join (the fixed sink and window slots must stay disjoint from them)
        inside = (outliers >= lo.view(-1, 1, 1)) & (outliers < hi.view(-1, 1, 1))
        outliers = torch.where(inside, outliers, -1).sort(-1).values  # X is small: the -1 entries first again
    if x == 0 or shortlist.shape[-1] == 0:
        return torch.cat([shortlist, outliers], dim=-1)
    at = torch.searchsorted(outliers, shortlist).clamp_max(x - 1)  # [B, Hkv, R]
    hit = (torch.gather(outliers, -1, at) == shortlist) & (shortlist >= 0)
    held = torch.zeros_like(outliers).scatter_add_(-1, at, hit.long()) > 0  # several entries may share one `at`
    return torch.cat([shortlist, torch.where(held, -1, outliers)], dim=-1)
