"""Metrics: next-token KL and top-1 agreement against dense decoding, and attention recall of a selection.

Recall, as measured here (one decode step of one PQ layer; G query heads share each KV head):

- candidates C: the positions a top-k selection may choose from at this budget, i.e. everything between the
  sink tokens and the local window of the standard budget split, [start + sink, n - local).
- group mass over C: for each query head g, the softmax of its exact logits restricted to C; the mass of a
  token set S is sum over g and over n in S of that softmax. It is the quantity every selection policy ranks
  tokens by (see `kernels.reference`), and the exact top-k over C maximises it.
- `recall` = mass(S_method ∩ C) / mass(oracle top-k over C). Oracle recall is exactly 1 and every method lies
  in [0, 1]. StreamingLLM spends the top-k share of its budget on a longer window; the part of that window
  inside C counts as its selection, so it is compared at the same token budget.
- `coverage` = attention mass of the full attended set (sink + selection + window) under each head's softmax
  over *all* valid tokens, averaged over the G*Hkv heads: how much of dense attention the step keeps (dense = 1).
"""

from __future__ import annotations

import torch

__all__ = ["kl_divergence", "top1_agreement", "selection_recall"]


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ other) in nats of the next-token distributions. Both [..., V]; returns [...] float32 >= 0."""
    p = torch.log_softmax(ref_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0).float()


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """True where both distributions put their maximum on the same token. [..., V] -> [...] bool."""
    return ref_logits.argmax(-1) == logits.argmax(-1)


def _mass_of(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sum of p over the listed positions. p: [B, Hkv, G, N]; idx: [B, Hkv, S] (-1 skipped). -> [B, Hkv, G]."""
    valid = idx >= 0
    safe = idx.clamp_min(0)
    got = torch.gather(p, 3, safe[:, :, None, :].expand(*p.shape[:3], -1))  # [B, Hkv, G, S]
    return (got * valid[:, :, None, :]).sum(-1)


def _softmax_over(logits: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per-head softmax over the positions where ok [B, N] is True; zeros elsewhere. logits: [B, Hkv, G, N]."""
    x = logits.masked_fill(~ok[:, None, None, :], float("-inf"))
    mx = x.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(x - mx)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def selection_recall(
    query: torch.Tensor,
    keys: torch.Tensor,
    start: torch.Tensor,
    length: int,
    sink: int,
    local: int,
    topk: int,
    index: torch.Tensor,
    scaling: float,
) -> dict[str, float]:
    """Recall and coverage (module docstring) of one decode step of one layer.

    query: [B, Hkv, G, D] (the layer's decode query); keys: [B, Hkv, N, D] cache buffer, first `length` valid;
    start: [B] first real position; sink/local/topk: the standard (non-streaming) budget split; index:
    [B, Hkv, S] positions the method attended (-1 = empty); scaling: the attention scale.
    Returns {"recall": float or nan when there is nothing to select, "coverage": float}, means over B and Hkv.
    """
    from .. import kernels

    b, h, g, _ = query.shape
    dev = query.device
    pos = torch.arange(keys.shape[2], device=dev)
    logits = torch.einsum("bhgd,bhnd->bhgn", query.float(), keys.float()) * scaling  # [B, Hkv, G, N]
    valid = (pos[None, :] >= start[:, None]) & (pos[None, :] < length)  # [B, N]
    lo = start + sink
    hi = torch.full_like(lo, max(length - local, 0))
    cand = valid & (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
    coverage = _mass_of(_softmax_over(logits, valid), index).mean().item()
    if topk == 0 or not bool(cand.any()):
        return {"recall": float("nan"), "coverage": coverage}
    p_cand = _softmax_over(logits, cand)  # [B, Hkv, G, N]
    # the method's tokens inside C (sink and window positions fall outside C and are dropped here)
    inside = (index >= lo[:, None, None]) & (index < hi[:, None, None])
    got = _mass_of(p_cand, torch.where(inside, index, -1)).sum(-1)  # [B, Hkv]
    best_idx = kernels.exact_topk(query, keys, lo, hi, topk, scaling)  # [B, Hkv, k], the same ranking rule
    best = _mass_of(p_cand, best_idx).sum(-1)
    recall = (got / best.clamp_min(1e-30)).clamp(max=1.0)  # clamp: float round-off of equal sets only
    return {"recall": recall.mean().item(), "coverage": coverage}
