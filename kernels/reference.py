"""Pure-PyTorch reference of every pqpatch tensor op: the ground truth the Triton kernels are tested against.

Notation used in every docstring:
    B      batch
    Hkv    key/value heads
    G      query heads per KV head (GQA group; H = Hkv * G)
    N      cached tokens (positions 0..N-1 of a preallocated buffer)
    D      head dim (keys);  Dv head dim (values)
    m      PQ sub-spaces;  K = 2**bits centroids per sub-space;  Ds = D // m
    k      tokens selected per (sequence, KV head);  S = slots handed to attention

Selection rule (shared by every backend and by the oracle):
    For each query head g of a group, p_g = softmax over the candidate tokens of scaling * q_g . k_n
    (k_n is the PQ reconstruction for "pq", the exact key for "oracle"). The group score of token n is
    sum_g p_g(n). Why: one selected set serves all G heads, and the error of head g's output is bounded by the
    attention mass p_g that it misses, so the set that keeps the most total mass is the one to pick. Per-head
    softmax puts the heads on the same scale, so one head with large logits cannot starve the others (a plain
    sum of logits would let it).
Candidates of sequence b are the positions lo[b] <= n < hi[b]; everything else scores -inf, and an index slot
that cannot be filled with a candidate is returned as -1.

This module never imports transformers.
"""

from __future__ import annotations

import torch

__all__ = [
    "candidate_mask",
    "group_softmax_scores",
    "pq_scores_ref",
    "pq_topk_ref",
    "exact_topk_ref",
    "topk_from_scores",
    "topk_slots",
    "pq_assign_ref",
    "pq_reconstruct_ref",
    "sparse_decode_attention_ref",
]


def candidate_mask(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean [B, N]: True where lo[b] <= position < hi[b]. lo, hi: [B] integer tensors."""
    pos = torch.arange(n, device=lo.device)
    return (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])


def group_softmax_scores(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GQA group score from per-head logits.

    logits: [B, Hkv, G, N] float (already scaled); valid: [B, N] bool.
    Returns [B, Hkv, N] float32: sum over g of softmax_n(logits[:, :, g]) restricted to valid tokens; -inf where
    not valid. A row without any valid token is all -inf (never NaN).
    """
    logits = logits.float().masked_fill(~valid[:, None, None, :], float("-inf"))
    mx = logits.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # empty rows: avoid -inf - -inf
    p = torch.exp(logits - mx)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    score = p.sum(dim=2)
    return score.masked_fill(~valid[:, None, :], float("-inf"))


def pq_reconstruct_ref(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Keys rebuilt from their codes.

    centroids: [B, Hkv, m, K, Ds]; codes: [B, Hkv, N, m] (uint8 or int).
    Returns [B, Hkv, N, m * Ds] in the centroids' dtype.
    """
    b, h, m, _, ds = centroids.shape
    n = codes.shape[2]
    idx = codes.long().permute(0, 1, 3, 2)  # [B, Hkv, m, N]
    parts = torch.gather(centroids, 3, idx[..., None].expand(b, h, m, n, ds))  # [B, Hkv, m, N, Ds]
    return parts.permute(0, 1, 3, 2, 4).reshape(b, h, n, m * ds)


def pq_scores_ref(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Approximate GQA group scores of every cached token through its PQ codes.

    query: [B, Hkv, G, D]; centroids: [B, Hkv, m, K, Ds]; codes: [B, Hkv, N, m]; lo, hi: [B].
    Returns [B, Hkv, N] float32 (see the module docstring for the rule); -inf outside [lo, hi).
    """
    b, h, g, d = query.shape
    m, kc, ds = centroids.shape[2:]
    n = codes.shape[2]
    q = query.float().reshape(b, h, g, m, ds)
    # lookup table: the query's inner product with every centroid of every sub-space
    lut = torch.einsum("bhgmd,bhmkd->bhmgk", q, centroids.float())  # [B, Hkv, m, G, K]
    idx = codes.long().permute(0, 1, 3, 2)[:, :, :, None, :].expand(b, h, m, g, n)  # [B, Hkv, m, G, N]
    logits = torch.gather(lut, 4, idx).sum(dim=2) * scaling  # [B, Hkv, G, N]
    return group_softmax_scores(logits, candidate_mask(lo, hi, n))


def topk_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best tokens; -1 in slots that only -inf scores could fill.

    scores: [B, Hkv, N] float. Returns [B, Hkv, k] int64. If k > N the extra slots are -1.
    """
    n = scores.shape[-1]
    kk = min(k, n)
    vals, idx = torch.topk(scores, kk, dim=-1, sorted=False)
    idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    if kk < k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], k - kk), -1)], dim=-1)
    return idx


def pq_topk_ref(
    query: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    k: int,
    scaling: float,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k candidate tokens by PQ score. Shapes as `pq_scores_ref`; returns [B, Hkv, k] int64, -1 = empty.

    k_valid: optional 1-element integer tensor; only the best min(k_valid, k) tokens are selected, the other
    slots are -1 (see `topk_slots`)."""
    return topk_slots(pq_scores_ref(query, centroids, codes, lo, hi, scaling), k, k_valid)


def topk_slots(scores: torch.Tensor, k: int, k_valid: torch.Tensor | None) -> torch.Tensor:
    """`topk_from_scores` with k slots of which only the best min(k_valid, k) are filled, the rest -1.
    scores: [B, Hkv, N]; k_valid: 1-element integer tensor or None (all k). Tensor ops only (no host read), so a
    compiled step keeps its k slots while the count varies."""
    if k_valid is None:
        return topk_from_scores(scores, k)
    kk = min(k, scores.shape[-1])
    vals, idx = torch.topk(scores, kk, dim=-1, sorted=True)  # best first, so a prefix is the best k_valid
    keep = torch.isfinite(vals) & (torch.arange(kk, device=scores.device) < k_valid.reshape(()))
    idx = torch.where(keep, idx, torch.full_like(idx, -1))
    return torch.nn.functional.pad(idx, (0, k - kk), value=-1)


def exact_topk_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    k: int,
    scaling: float,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Oracle: the same rule as `pq_topk_ref` with exact keys (k_valid too).

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D]. Returns [B, Hkv, k] int64, -1 = empty.
    """
    logits = torch.einsum("bhgd,bhnd->bhgn", query.float(), keys.float()) * scaling
    scores = group_softmax_scores(logits, candidate_mask(lo, hi, keys.shape[2]))
    return topk_slots(scores, k, k_valid)


def pq_assign_ref(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid code of each key in each sub-space (squared L2 distance).

    keys: [B, Hkv, T, D]; centroids: [B, Hkv, m, K, Ds]. Returns codes [B, Hkv, T, m] uint8.
    """
    b, h, t, d = keys.shape
    m, kc, ds = centroids.shape[2:]
    if d != m * ds:
        raise ValueError(f"keys have dim {d} but centroids describe {m} sub-spaces of {ds}")
    x = keys.float().reshape(b, h, t, m, ds).permute(0, 1, 3, 2, 4)  # [B, Hkv, m, T, Ds]
    c = centroids.float()
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 ; |x|^2 does not change the argmin
    dist = (c * c).sum(-1)[:, :, :, None, :] - 2.0 * torch.einsum("bhmtd,bhmkd->bhmtk", x, c)
    return dist.argmin(dim=-1).permute(0, 1, 3, 2).to(torch.uint8)


def sparse_decode_attention_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    idx: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of one decode query over the tokens listed in idx.

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D]; values: [B, Hkv, N, Dv]; idx: [B, Hkv, S] int, -1 = skip.
    Each listed position must appear at most once per (b, h). Returns (out [B, Hkv, G, Dv] in query.dtype,
    lse [B, Hkv, G] float32, the natural log of the softmax denominator; -inf and a zero output where a row lists
    no token).
    """
    b, h, g, d = query.shape
    n, s = keys.shape[2], idx.shape[-1]
    valid = idx >= 0
    # one index_select over the flattened (b, h, n) rows: no [B, Hkv, S, D] expanded index to build
    rows = (idx.clamp_min(0).long() + torch.arange(b * h, device=idx.device).view(b, h, 1) * n).flatten()
    k_sel = keys.reshape(b * h * n, -1).index_select(0, rows).view(b, h, s, -1)  # [B, Hkv, S, D]
    v_sel = values.reshape(b * h * n, -1).index_select(0, rows).view(b, h, s, -1)  # [B, Hkv, S, Dv]
    logits = torch.einsum("bhgd,bhsd->bhgs", query.float(), k_sel.float()) * scaling
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.einsum("bhgs,bhsd->bhgd", p, v_sel.float())
    return out.to(query.dtype), lse
