"""CPU fast path of `rerank_topk` (backend "cpu"): exact re-ranking of a PQ shortlist, the rule of
`quality.rerank_exact_ref`, read through the gather pattern of `cpu_attention`.

With the native kernels (`native.py`) the shortlist's key rows are read in place (`native.gather_logits`, scaled,
-inf for empty entries); with per-head log-partitions (the decode step's rule) the score arithmetic around torch's
exp, the radix select and the gathers of the kept positions and logits are two native passes
(`native.rerank_pick`), otherwise the selection is one radix-select call (`_select_native`); the ATen path below is
the fallback without them.

Why it is fast on CPU (plain ATen ops; nothing here touches a device):
  * The shortlist is read in ascending position order (sorted when it is not already, empty entries last;
    `pq_topk_cpu` already emits ascending positions then -1), so neighbouring key rows share DRAM pages and the
    prefetchers can follow. Columns that are empty in every row (the -1 tail of a shortlist whose count is a
    runtime `k_valid`) are not read at all.
  * The key rows of all B * Hkv heads are gathered chunk by chunk (one `index_select` per chunk over the flattened
    [B * Hkv * N, D] cache) into a per-thread workspace reused across calls, and the chunk's logits come from one
    batched matmul while the rows are still in cache. The reference instead builds a [B, Hkv, R, D] copy through
    `torch.gather` with an expanded index, which costs several times the matmul.
  * bfloat16/float16 keys are gathered in their own dtype (half the bytes) and widened to float32 in the cached
    chunk; logits, softmax and the group score are float32, as in the reference.
  * The k-th best group score comes from `cpu_np.kth_largest` (np.partition); the selected entries are then a
    mask (above the threshold, plus the first ties), and since the entries are in position order the output
    positions come out ascending without a sort.

Ties: every entry scoring strictly above the k-th selected score is selected; among entries equal to it the lowest
positions are taken. With `log_z` (the per-head log-partition over all candidates) the score of an entry is
sum_g exp(l_g - log_z_g), scaled per row; without it, the sum of per-head softmaxes over the shortlist.
"""

from __future__ import annotations

import torch

from . import native
from .cpu_attention import _gather_logits, _rows, native_rows, sparse_decode_attention_cpu, use_native
from .cpu_np import kth_largest
from .quality import check_rerank_inputs

__all__ = ["rerank_topk_cpu", "rerank_attention_cpu"]

_CHUNK_BYTES = 1 << 21  # float32 bytes of one gathered chunk (all heads), as in cpu_attention


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _empty(top: torch.Tensor, g: int, keep_logits: bool):
    """The result of a call that selects nothing: top as is, and all -inf logits when they are asked for."""
    if not keep_logits:
        return top
    b, h, k = top.shape
    return top, torch.full((b, h, g, k), float("-inf"))


def rerank_topk_cpu(query: torch.Tensor, keys: torch.Tensor, shortlist: torch.Tensor, k: int, scaling: float,
                    k_valid: torch.Tensor | None = None, log_z: torch.Tensor | None = None,
                    keep_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Re-score the shortlist with the exact keys and keep its best min(k, k_valid) entries.

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D] (float32/bfloat16/float16, any strides; one that cannot be viewed
    as [B * Hkv * N, D] rows, e.g. a slice of a longer buffer, is copied first, as in cpu_attention); shortlist:
    [B, Hkv, R] int32/int64 positions in [0, N) (a position >= N raises), negative = empty, each position at most
    once per row; k_valid: optional 1-element integer CPU tensor; log_z: optional [B, Hkv, G] float32 per-head
    log-partition over all candidates (the score rule with and without it: `quality.rerank_exact_ref`). Returns
    [B, Hkv, k] int64: the selected positions in ascending order, then -1.
    keep_logits=True (the fused `rerank_attention_cpu`) also returns the exact scaled logits of each output slot,
    [B, Hkv, G, k] float32 (-inf for empty slots), so the attention does not read those keys a second time.
    """
    check_rerank_inputs(query, keys, shortlist, k, k_valid, log_z)
    _check(query.device.type == "cpu", f"backend 'cpu' needs CPU tensors, the query is on {query.device}")
    b, h, g, d = query.shape
    n, r = keys.shape[2], shortlist.shape[2]
    bh = b * h
    kk = k if k_valid is None else max(0, min(int(k_valid), k))  # a CPU tensor: reading it costs no sync
    out = torch.full((bh, k), -1, dtype=torch.int64)
    if r == 0:
        return _empty(out.view(b, h, k), g, keep_logits)
    # ascending positions with the empty entries last: an empty entry sorts as n (one past the last row)
    ix = shortlist.reshape(bh, r).to(torch.int64)
    top = int(ix.max())
    _check(top < n, f"shortlist positions must be < N = {n} (or negative for an empty entry), got {top}")
    ix = ix.masked_fill(ix < 0, n)
    if r > 1 and not bool((ix[:, 1:] >= ix[:, :-1]).all()):
        ix = ix.sort(dim=-1).values
    cnt = int((ix < n).sum(-1).max())  # entries of the fullest row; the columns after them are empty everywhere
    kk = min(kk, cnt)
    if kk == 0:
        return _empty(out.view(b, h, k), g, keep_logits)
    ix = ix[:, :cnt]
    valid = ix < n  # [BH, cnt]
    qf = query.reshape(bh, g, d).float().contiguous()
    if use_native(keys):  # each listed row read once, prefetched from the list; empty entries not read (-inf)
        src, base = native_rows(keys)
        logits = native.gather_logits(qf, src, torch.where(valid, ix + base[:, None], -1), scale=scaling,
                                      fill=float("-inf"))
    else:
        chunk = max(16, min(cnt, _CHUNK_BYTES // (4 * bh * d)))
        rows = ix.clamp_max(n - 1) + torch.arange(0, bh * n, n).view(bh, 1)  # empty entries read a real row, masked
        logits = _gather_logits(qf, _rows(keys), rows, chunk)
        logits.mul_(scaling).masked_fill_(~valid[:, None, :], float("-inf"))
    if log_z is not None and native.available():  # the score arithmetic and the pick in two native passes
        found = native.rerank_pick(logits, log_z.reshape(bh, g).float(), ix.contiguous(), n, kk, k)
        if found is not None:
            top, sel = found[0].view(b, h, k), found[1].view(b, h, g, k)
            return (top, sel) if keep_logits else top
    raw = logits.clone() if keep_logits else None  # the exact logits, before the score arithmetic below
    if log_z is not None:
        # each head's probability under its full-candidate softmax, sum_g exp(l - log_z), scaled by one factor
        # per row: t = l - log_z, minus the row's max of t (no overflow; the ranking is unchanged)
        lz = log_z.reshape(bh, g)
        logits.sub_(torch.where(torch.isfinite(lz), lz, 0.0)[:, :, None])
        mx = logits.amax(dim=(1, 2), keepdim=True)
        score = logits.sub_(torch.where(torch.isfinite(mx), mx, 0.0)).exp_().sum(dim=1)  # [BH, cnt]
    else:
        # per-head softmax over the row's entries, summed over the group; a row without entries gives NaN here,
        # and every one of its entries is set to -inf just below
        score = torch.softmax(logits, dim=-1).sum(dim=1)  # [BH, cnt]
    if native.available():
        found = _select_native(score, valid, ix, raw, kk, k, keep_logits)
        if found is not None:
            return (found[0].view(b, h, k), found[1].view(b, h, g, k)) if keep_logits else found[0].view(b, h, k)
    score.masked_fill_(~valid, float("-inf"))
    # the kk-th best score of every row, then a mask: above it, or equal to it among the first `need` ties
    thr = kth_largest(score, kk)  # [BH, 1]
    above = score > thr
    tie = (score == thr) & valid
    need = kk - above.sum(-1, keepdim=True)
    sel = above | (tie & (tie.cumsum(-1) <= need))  # a row with fewer than kk entries: all of them
    slot = torch.where(sel, sel.cumsum(-1) - 1, k)  # output slot of each selected entry; k: a spare column
    out = torch.nn.functional.pad(out, (0, 1))
    out.scatter_(1, slot, torch.where(sel, ix, -1))
    top = out[:, :k].contiguous().view(b, h, k)
    if not keep_logits:
        return top
    # the exact logits of each output slot (-inf for empty slots): [BH, G, k] through the same slot map
    sel_logits = torch.full((bh, g, k + 1), float("-inf"))
    sel_logits.scatter_(2, slot[:, None, :].expand(bh, g, cnt), raw)
    sel_logits[:, :, k:] = float("-inf")
    return top, sel_logits[:, :, :k].reshape(b, h, g, k)


def _select_native(score: torch.Tensor, valid: torch.Tensor, ix: torch.Tensor, raw: torch.Tensor | None, kk: int,
                   k: int, keep_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The selection of `rerank_topk_cpu` through `native.select_top` (a radix select and one emitting pass, the
    same rule: every entry above the kk-th score, then the earliest ties). score: [BH, cnt] float32 (>= 0 where
    valid); valid: [BH, cnt] bool, the valid entries first in every row (the empty ones are its tail); ix: [BH, cnt]
    int64 positions; raw: [BH, G, cnt] float32 logits, or None. Returns (top [BH, k] int64, logits [BH, G, k] or
    None), or None for a NaN score (the ATen path then decides, as before).
    The empty entries score 0, so they can only be taken as ties after every valid entry of their row (they sit at
    its tail): a row with fewer than kk valid entries gets all of them, and the empty picks become -1."""
    bh, cnt = score.shape
    try:
        col, _ = native.select_top(bh, cnt, kk, scores=score.masked_fill_(~valid, 0.0).contiguous())
    except RuntimeError:
        return None
    ok = valid.gather(1, col)  # [BH, kk]: False only for an empty entry taken as a tie, at the row's end
    top = torch.full((bh, k), -1, dtype=torch.int64)
    top[:, :kk] = torch.where(ok, ix.gather(1, col), -1)
    if not keep_logits:
        return top, None
    g = raw.shape[1]
    logits = torch.full((bh, g, k), float("-inf"))
    logits[:, :, :kk] = raw.gather(2, col[:, None, :].expand(bh, g, kk)).masked_fill_(~ok[:, None, :], float("-inf"))
    return top, logits


def rerank_attention_cpu(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, shortlist: torch.Tensor,
                         fixed: torch.Tensor, k: int, scaling: float, k_valid: torch.Tensor | None = None,
                         log_z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact re-ranking fused with the sparse attention it feeds: the keys of the shortlist are read once, and
    the selected tokens' logits are reused by the attention, which reads only their values (plus the keys and
    values of the fixed slots). Saves k key rows per KV head and step over `rerank_topk_cpu` followed by
    `sparse_decode_attention_cpu`, with the same result.

    query: [B, Hkv, G, D]; keys/values: [B, Hkv, N, D/Dv]; shortlist: [B, Hkv, R] (as `rerank_topk_cpu`);
    fixed: [B, Hkv, F] positions always attended (sink and window), -1 = skip, disjoint from the shortlist.
    Returns (out [B, Hkv, G, Dv] in query.dtype, lse [B, Hkv, G] float32, top [B, Hkv, k] int64 ascending, -1
    after) where out/lse are the attention over fixed ∪ top.
    """
    _check(isinstance(fixed, torch.Tensor) and fixed.dim() == 3 and tuple(fixed.shape[:2]) == tuple(query.shape[:2])
           and not fixed.is_floating_point() and fixed.dtype != torch.bool,
           f"fixed must be an integer [B, Hkv, F] tensor matching the query's [B, Hkv] = {tuple(query.shape[:2])}, got "
           f"{getattr(fixed, 'dtype', type(fixed))} {tuple(getattr(fixed, 'shape', ()))}")
    top, sel_logits = rerank_topk_cpu(query, keys, shortlist, k, scaling, k_valid, log_z, keep_logits=True)
    idx = torch.cat([fixed.to(torch.int64), top], dim=-1)
    out, lse = sparse_decode_attention_cpu(query, keys, values, idx, scaling, known_logits=sel_logits)
    return out, lse, top
