"""Selection policies: which k candidate tokens a decode query attends to, at an equal token budget.

Every policy returns idx [B, Hkv, k] int64 (-1 = empty slot) drawn from the candidates lo[b] <= n < hi[b];
sink and local-window tokens are added by the caller. GQA groups are aggregated with the same rule for every
policy (per-head softmax over candidates, summed over the group; see `kernels.reference`).

- "pq": PQ scores through codes and centroids (the PQCache method); residual codebooks score through the same
  top-k (`kernels.quality`); with `rerank` r > 1 a shortlist of r x k is re-scored with the exact keys, each head's
  exact logits normalised by its PQ-estimated log-partition over all candidates (`kernels.pq_log_partition`; the
  shortlist and the log-partition come from one op, `kernels.pq_shortlist`).
- "oracle": exact scores with the real keys (an upper bound for evaluation; reads every key).
- "streaming": no selection; the budget goes to the local window (StreamingLLM). k is 0 by construction.
- "snapkv": eviction baseline (SnapKV): the k tokens with the most attention from the prompt's last queries,
  chosen once at prefill and fixed for the whole decode (`snapkv_indices`).
- "quest": pages of `quest_page_tokens` tokens scored by sum_d max(q_d min_d, q_d max_d) over the page's
  per-channel key minima/maxima (Quest); the best k // page pages are taken whole.
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .kernels.quality import is_residual, residual_query, with_outliers
from .kernels.reference import group_softmax_scores

__all__ = ["QuestPages", "select", "pq_shortlist", "with_outliers", "observation_attention", "kmeans_weights",
           "snapkv_indices"]


@torch.no_grad()  # a statistic of the prefill, never part of a gradient
def observation_attention(
    query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, window: int
) -> torch.Tensor:
    """Mean softmax attention each key receives from the prompt's last `window` queries (SnapKV's "observation
    window"), averaged over the window and the G query heads of its KV head.

    query: [B, H, q, D] (the prefill's rotated queries, q >= 1); keys: [B, Hkv, n, D] (the whole prompt, n >= q,
    the last q of them belong to these queries); attention_mask: the 4D mask the prefill attention got
    ([B or 1, 1, q, >= n], bool or additive) or None (causal, no padding). Returns [B, Hkv, n] float32, each row
    summing to 1 (0 on masked positions). Cost: window x n dot products per query head, in chunks of query rows
    so the [.., rows, n] logits stay below ~128 MB at 128K-token prompts.
    """
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    w = max(1, min(window, q))
    k = keys.float()
    out = torch.zeros(b, hkv, n, dtype=torch.float32, device=keys.device)
    rows = max(1, (1 << 25) // max(1, hq * n * b))
    pos = torch.arange(n, device=keys.device)
    for r0 in range(q - w, q, rows):
        r1 = min(r0 + rows, q)
        qq = (query[:, :, r0:r1].float() * scaling).reshape(b, hkv, g, r1 - r0, d)  # scaled here: r x d, not r x n
        logits = torch.einsum("bhgrd,bhnd->bhgrn", qq, k)  # [B, Hkv, G, r, n]
        qpos = (n - q) + torch.arange(r0, r1, device=keys.device)  # absolute positions of these query rows
        if attention_mask is not None:
            allowed = pos[None, :] <= qpos[:, None]  # [r, n] causal
            m = attention_mask[:, 0, r0:r1, :n]  # [B or 1, r, n]
            ok = m if m.dtype == torch.bool else m == 0
            allowed = allowed[None] & ok  # [B or 1, r, n]
            logits.masked_fill_(~allowed[:, None, None], float("-inf"))
            p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a fully masked row (padding query) adds nothing
        else:  # causal only: just the keys after the first row's position need masking (a triangle at the end)
            c0 = n - q + r0 + 1
            if c0 < n:
                logits[..., c0:].masked_fill_(pos[c0:][None, :] > qpos[:, None], float("-inf"))
            p = torch.softmax(logits, dim=-1)  # every row sees at least its own key: no NaN
        out += p.sum(dim=(2, 3))
    return out / (w * g)


SNAPKV_POOL = 7  # SnapKV's pooling kernel over positions


def snapkv_indices(attention: torch.Tensor, lo: torch.Tensor, hi: int, k: int, slots: int,
                   pool: int = SNAPKV_POOL) -> torch.Tensor:
    """The "snapkv" selection, made once at prefill: per KV head, the k candidates lo[b] <= n < hi with the most
    observation-window attention (`observation_attention`) after SnapKV's average pooling over `pool`
    neighbouring positions, best first, padded with -1 to `slots` entries. Why the pooling: a token that matters
    drags its neighbours along (a number's later digits get less attention from the question than its first),
    and keeping them whole is what SnapKV's pooling is for; pool=1 is the plain top-k.

    attention: [B, Hkv, n] float32; lo: [B] (device); hi: python int. Returns [B, Hkv, slots] int64.
    """
    b, h, n = attention.shape
    if pool > 1:
        attention = torch.nn.functional.avg_pool1d(attention, pool, stride=1, padding=pool // 2,
                                                   count_include_pad=False)[..., :n]
    pos = torch.arange(n, device=attention.device)
    cand = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi)  # [B, n]
    score = attention.masked_fill(~cand[:, None, :], float("-inf"))
    kk = min(k, n)
    vals, idx = torch.topk(score, kk, dim=-1, sorted=True) if kk else (score[..., :0], pos[:0].expand(b, h, 0))
    idx = torch.where(torch.isfinite(vals), idx, -1)
    return torch.nn.functional.pad(idx, (0, slots - kk), value=-1)


def kmeans_weights(attention: torch.Tensor, strength: float | None = None) -> torch.Tensor:
    """Per-key k-means weights from observation-window attention [B, Hkv, n]: 1 + N * attention, N = n unless
    `strength` says otherwise. Why 1 + N x: a key with average attention (1/N) counts twice, one the window
    ignores still counts once (it may matter to later queries), and the keys the queries actually hit pull the
    centroids towards themselves, so the codebook spends its resolution where top-k decisions are made."""
    n = attention.shape[-1] if strength is None else strength
    return 1.0 + n * attention


class QuestPages:
    """Per-page, per-channel key minima and maxima of one layer, kept up to date as tokens arrive.

    kmin, kmax: [B, Hkv, P, D] float32 with P = ceil(max_len / page). Padding positions never count.
    """

    def __init__(self, keys: torch.Tensor, page: int) -> None:
        b, h, n, d = keys.shape
        self.page = page
        self.num_pages = math.ceil(n / page)
        self.kmin = torch.full((b, h, self.num_pages, d), float("inf"), device=keys.device)
        self.kmax = torch.full((b, h, self.num_pages, d), float("-inf"), device=keys.device)
        self.upto = 0  # positions < upto are folded into the bounds

    def update(self, keys: torch.Tensor, start: torch.Tensor, length: int) -> None:
        """Fold positions [upto, length) in. keys: [B, Hkv, N, D]; start: [B] first real position."""
        if length <= self.upto:
            return
        p0, p1 = self.upto // self.page, math.ceil(length / self.page)
        a, e = p0 * self.page, min(p1 * self.page, keys.shape[2])
        seg = keys[:, :, a:e].float()  # [B, Hkv, T, D]
        pos = torch.arange(a, e, device=keys.device)
        ok = (pos[None, :] >= start[:, None]) & (pos[None, :] < length)  # [B, T]
        pad = p1 * self.page - e
        lo_v = seg.masked_fill(~ok[:, None, :, None], float("inf"))
        hi_v = seg.masked_fill(~ok[:, None, :, None], float("-inf"))
        if pad:
            lo_v = torch.nn.functional.pad(lo_v, (0, 0, 0, pad), value=float("inf"))
            hi_v = torch.nn.functional.pad(hi_v, (0, 0, 0, pad), value=float("-inf"))
        shape = (*seg.shape[:2], p1 - p0, self.page, seg.shape[-1])
        self.kmin[:, :, p0:p1] = lo_v.reshape(shape).amin(3)
        self.kmax[:, :, p0:p1] = hi_v.reshape(shape).amax(3)
        self.upto = length

    def topk(self, query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, k: int, scaling: float) -> torch.Tensor:
        """query: [B, Hkv, G, D]; lo, hi: [B]. Returns [B, Hkv, k] token indices, -1 = empty."""
        q = query.float()[:, :, :, None, :]  # [B, Hkv, G, 1, D]
        ub = torch.maximum(q * self.kmin[:, :, None], q * self.kmax[:, :, None])  # [B, Hkv, G, P, D]
        ub = torch.nan_to_num(ub, nan=0.0, posinf=0.0, neginf=0.0).sum(-1) * scaling  # [B, Hkv, G, P]
        first = torch.arange(self.num_pages, device=query.device) * self.page
        valid = (first[None, :] < hi[:, None]) & (first[None, :] + self.page > lo[:, None])  # [B, P]
        scores = group_softmax_scores(ub, valid)  # [B, Hkv, P]
        # best pages first; two spare pages because the candidate range need not start on a page boundary
        npsel = min(k // self.page + 2, self.num_pages)
        vals, pages = torch.topk(scores, npsel, dim=-1, sorted=True)  # [B, Hkv, p]
        tok = (pages[..., None] * self.page + torch.arange(self.page, device=query.device)).flatten(2)
        inside = torch.isfinite(vals)[..., None].expand(-1, -1, -1, self.page).flatten(2)
        inside = inside & (tok >= lo[:, None, None]) & (tok < hi[:, None, None])  # [B, Hkv, p * page]
        keep = inside & (inside.cumsum(-1) <= k)  # the first k candidate tokens, in page-score order
        if tok.shape[-1] < k:
            pad = k - tok.shape[-1]
            tok = torch.nn.functional.pad(tok, (0, pad), value=-1)
            keep = torch.nn.functional.pad(keep, (0, pad), value=False)
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :k]  # kept slots first
        tok, keep = torch.gather(tok, -1, order), torch.gather(keep, -1, order)
        tok = torch.where(keep, tok, torch.full_like(tok, -1))
        return tok


def pq_shortlist(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, k: int, scaling: float,
                 centroids: torch.Tensor, codes: torch.Tensor, rerank: int, backend: str = "auto",
                 k_valid: torch.Tensor | None = None,
                 outliers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PQ shortlist of exact re-ranking and the per-head normaliser it is re-scored with.

    query: [B, Hkv, G, D]; lo, hi: [B]; centroids, codes: the layer's codebook (PQ or residual); k_valid: optional
    1-element device tensor, how many of the k slots the re-ranking fills (the shortlist fills rerank times as many).
    Returns (shortlist [B, Hkv, rerank * k (+ X)] int64 positions, -1 = empty; log_z [B, Hkv, G] float32, each head's
    log-partition over all candidates through the codes, the same q as the PQ scoring). One op
    (`kernels.pq_shortlist`): both run over every candidate's codes, and it makes that pass once.
    outliers: optional [B, Hkv, X] worst-coded positions joined to the shortlist inside the op (`with_outliers`'s
    union; the shortlist then has rerank * k + X slots)."""
    q = query
    if is_residual(query.shape[-1], centroids):
        q = residual_query(query, centroids.shape[2])
    return kernels.pq_shortlist(q, centroids, codes, lo, hi, rerank * k, scaling, backend=backend,
                                k_valid=None if k_valid is None else k_valid * rerank, outliers=outliers)


def select(
    selection: str,
    query: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    k: int,
    scaling: float,
    *,
    keys: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    pages: QuestPages | None = None,
    fixed: torch.Tensor | None = None,
    rerank: int = 1,
    backend: str = "auto",
    k_valid: torch.Tensor | None = None,
    outliers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch to a policy. query: [B, Hkv, G, D]; lo, hi: [B]. Returns idx [B, Hkv, k] int64.

    outliers: [B, Hkv, X] worst-coded positions (-1 = empty) joined to a re-ranking shortlist (`with_outliers`).

    k_valid: a 1-element device tensor, how many of the k slots to fill (the budget of the real context, when k is
    the slot count of a shape bucket); None fills all k. "quest" (eager only) takes the whole k."""
    b, h = query.shape[:2]
    if selection == "snapkv":  # chosen at prefill (`snapkv_indices`, [B, Hkv, k]); read, never recomputed
        return fixed
    if k == 0 or selection == "streaming":
        return torch.full((b, h, k), -1, dtype=torch.long, device=query.device)
    if selection == "pq":
        q = query
        if is_residual(query.shape[-1], centroids):  # residual stages: a PQ sub-space per stage, whole query each
            q = residual_query(query, centroids.shape[2])
        if rerank == 1:
            return kernels.pq_topk(q, centroids, codes, lo, hi, k, scaling, backend=backend, k_valid=k_valid)
        # exact re-ranking: a shortlist of rerank x k by the codes, re-scored with the exact keys. Each head's exact
        # logits are normalised by its log-partition over *all* candidates, estimated through the codes (the same
        # q as the PQ scoring), so the heads keep the weights the group rule gives them; a softmax over the
        # shortlist alone re-weights them and agreed less with the oracle than the codes alone
        # (kernels/log_partition.py). Tensor ops only: a compiled decode step stays one graph.
        short, log_z = pq_shortlist(query, lo, hi, k, scaling, centroids, codes, rerank, backend, k_valid, outliers)
        return kernels.rerank_topk(query, keys, short, k, scaling, backend=backend, k_valid=k_valid, log_z=log_z)
    if selection == "oracle":
        return kernels.exact_topk(query, keys, lo, hi, k, scaling, k_valid=k_valid)
    if selection == "quest":
        return pages.topk(query, lo, hi, k, scaling)
    raise ValueError(f"unknown selection {selection!r}")
