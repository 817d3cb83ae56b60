"""Ops of the quality options: residual quantization (RQ) and exact re-ranking of a PQ shortlist.

Residual quantization with S stages over the whole head dim: key ~ C_1[c_1] + C_2[c_2] + ... + C_S[c_S], each
C_s a table of K = 2**bits full-dimension (D) centroids, stage s trained on what stages < s left over. Its logit
q . key ~ sum_s q . C_s[c_s] is exactly the PQ logit of a codebook with m = S "sub-spaces" of width Ds = D whose
query is q repeated S times: so `residual_query` + the PQ top-k (`pq_topk`, every backend) score RQ codes with no
new kernel. Centroids use the PQ layout [B, Hkv, S, K, D]; codes [B, Hkv, N, S] uint8.

Exact re-ranking: a PQ shortlist of r * k tokens is scored again with the exact keys (r * k * D key elements
read per KV head and step) and the best k kept, by the same GQA rule as every selector (per-head softmax over
the shortlist, summed over the group).

Plain tensor ops (no host synchronisation, static shapes), so a compiled decode step stays one graph.
"""

from __future__ import annotations

import torch

__all__ = ["is_residual", "residual_query", "rq_assign_ref", "rq_reconstruct_ref", "rerank_exact_ref"]


def is_residual(query_dim: int, centroids: torch.Tensor) -> bool:
    """Whether centroids [B, Hkv, m, K, Ds] hold residual stages (full-dimension: Ds == D with m > 1) rather than
    PQ sub-spaces (m * Ds == D). m = 1 is both, and scores the same either way."""
    m, ds = centroids.shape[2], centroids.shape[4]
    return m > 1 and ds == query_dim


def residual_query(query: torch.Tensor, stages: int) -> torch.Tensor:
    """query [B, Hkv, G, D] -> [B, Hkv, G, stages * D]: the PQ query under which stage s is sub-space s."""
    return query.repeat(1, 1, 1, stages)


def rq_assign_ref(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Greedy residual codes: stage s takes the centroid nearest to what stages < s left.

    keys: [B, Hkv, T, D]; centroids: [B, Hkv, S, K, D]. Returns codes [B, Hkv, T, S] uint8.
    """
    r = keys.float()
    c = centroids.float()
    codes = []
    for s in range(c.shape[2]):
        cs = c[:, :, s]  # [B, Hkv, K, D]
        dist = (cs * cs).sum(-1)[:, :, None, :] - 2.0 * torch.einsum("bhtd,bhkd->bhtk", r, cs)
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


def rerank_exact_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    shortlist: torch.Tensor,
    k: int,
    scaling: float,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-score a shortlist with the exact keys and keep its best k.

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D]; shortlist: [B, Hkv, R] positions (-1 = empty), R >= k.
    k_valid: optional 1-element integer tensor, fill only the best min(k_valid, k) slots (the rest -1).
    Returns [B, Hkv, k] int64 positions, best first, -1 = empty.
    """
    b, h, g, d = query.shape
    valid = shortlist >= 0  # [B, Hkv, R]
    safe = shortlist.clamp_min(0)
    kk = torch.gather(keys, 2, safe[..., None].expand(b, h, shortlist.shape[-1], d))  # [B, Hkv, R, D]
    logits = torch.einsum("bhgd,bhrd->bhgr", query.float(), kk.float()) * scaling
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    mx = logits.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(logits - mx)
    score = (p / p.sum(-1, keepdim=True).clamp_min(1e-30)).sum(2)  # [B, Hkv, R]: the GQA rule
    score = score.masked_fill(~valid, float("-inf"))
    kk_n = min(k, score.shape[-1])
    vals, pos = torch.topk(score, kk_n, dim=-1, sorted=True)  # best first
    keep = torch.isfinite(vals)
    if k_valid is not None:
        keep = keep & (torch.arange(kk_n, device=score.device) < k_valid.reshape(()))
    out = torch.where(keep, torch.gather(shortlist, -1, pos), -1)
    return torch.nn.functional.pad(out, (0, k - kk_n), value=-1)
