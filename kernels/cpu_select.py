"""CPU fast path of `pq_topk` (backend "cpu"): PQ group scores computed per *code* instead of per token, and a
radix select over integer keys instead of a sort. Plain ATen ops only; nothing here synchronises with a device
(the op only ever runs on CPU tensors), so reading `lo`/`hi` on the host is free.

Why it is fast (m = 2 sub-spaces, b bits, K = 2**b centroids, n candidate tokens per sequence):
  * Two one-byte codes of a token read as one uint16 are its joint code j = c0 + 256 * c1: no arithmetic per token.
  * A token's softmax weight for head g factorises over the sub-spaces,
        exp(s * (lut0[g, c0] + lut1[g, c1]) - M) = e0[g, c0] * e1[g, c1],
    so with the histogram C[c1, c0] of joint codes (`joint_codes`: one index_add_) the softmax denominators are a
    bilinear form Z[g] = e1[g] . C . e0[g] and the group score of every *code* is one rank-G matmul,
    S = e1^T diag(1/Z) e0.
    Nothing per token is exponentiated; a token's score is S[j]. The same histogram gives the log-partition
    (`log_partition.log_partition_cpu`); `cpu_shortlist.pq_shortlist_cpu` builds it once for both.
  * Top-k by a threshold: over a token list, the k-th largest score by `np.partition` (`cpu_np`; the code table is
    built in float32 there, float64 only when a denominator or the threshold nears float32's underflow); over the
    code table (fewer codes than tokens), a radix select on the scores' float bits (non-negative floats order like
    their int32 bits), three digits of 11/11/9 bits, each one bincount weighted by the code counts, so the select
    costs O(K^2) instead of O(n).
  * The selected set is emitted with one pass over the mask in position order (`cpu_np.row_positions`), which
    also gives the sparse attention ascending (cache-friendly) row indices.
With the native kernels (`native.py`; the default where a C compiler works) the whole selection of a sequence is
one kernel call (`select_fused` -> `native.topk_pq`): the denominators Z from one pass over the codes (the bits of
`log_partition.sequence_z`, shared with the log-partition), not from the histogram; each head's code table built
from the two factor tables (256 KB for b = 8, L2-resident); every token's score read from it through its codes; a
radix select on the scores' bits plus one emitting pass, the same rule. The lookup table is `native.lut`. The
weighted search over the code table and numpy's partition are the ATen fallback.
m = 1 uses the same code-domain path; other m, and short candidate lists whose code table would be larger than 2 G n
entries (b = 8 below ~8K tokens), score per token (the reference's arithmetic). Ties: every token
scoring strictly above the k-th selected score is selected; among equal scores the earliest positions are taken.
"""

from __future__ import annotations

import sys

import torch

from . import native
from .cpu_attention import _workspace
from .cpu_np import kth_largest, row_positions

__all__ = ["pq_topk_cpu", "pq_lut", "JointCodes", "joint_codes", "radix_threshold", "mark", "select_fused"]

# (shift, width) of the three digits of a non-negative int32 key, most significant first
_DIGITS = ((20, 11), (9, 11), (0, 9))
# below this a softmax denominator built from float64 factors is treated as underflow (then: per-token scores)
_TINY = 1e-290
# the same for float32 factors: a denominator this far below 1 means the best token sits > ~46 nats under the
# per-sub-space maxima, where float32 products would lose tokens the reference still ranks (then: float64)
_TINY32 = 1e-20
# a float32 code-table threshold below this is in float32's underflow zone: the selection is redone in float64
_LOW32 = 1e-30


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_inputs(query, centroids, codes, lo, hi, k) -> None:
    for name, t in (("query", query), ("centroids", centroids), ("codes", codes), ("lo", lo), ("hi", hi)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
        _check(t.device.type == "cpu", f"backend 'cpu' needs CPU tensors, {name} is on {t.device}")
    _check(query.dim() == 4 and query.is_floating_point(), f"query must be float [B, Hkv, G, D], got "
           f"{query.dtype} {tuple(query.shape)}")
    _check(centroids.dim() == 5 and centroids.is_floating_point(), f"centroids must be float [B, Hkv, m, K, Ds], "
           f"got {centroids.dtype} {tuple(centroids.shape)}")
    _check(codes.dim() == 4 and codes.dtype == torch.uint8, f"codes must be uint8 [B, Hkv, N, m], got "
           f"{codes.dtype} {tuple(codes.shape)}")
    b, h, _, d = query.shape
    m, kc, ds = centroids.shape[2:]
    _check(tuple(centroids.shape[:2]) == (b, h) and m * ds == d,
           f"centroids {tuple(centroids.shape)} do not match query {tuple(query.shape)} (need m * Ds = D)")
    _check(tuple(codes.shape[:2]) == (b, h) and codes.shape[3] == m,
           f"codes {tuple(codes.shape)} do not match query {tuple(query.shape)} and m = {m}")
    _check(1 <= kc <= 256, f"at most 256 centroids per sub-space (one-byte codes), got {kc}")
    for name, t in (("lo", lo), ("hi", hi)):
        _check(t.shape == (b,) and not t.is_floating_point(), f"{name} must be an integer [B] tensor, got "
               f"{t.dtype} {tuple(t.shape)}")
    _check(k >= 0, f"k must be >= 0, got {k}")


def pq_topk_cpu(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, k: int, scaling: float) -> torch.Tensor:
    """Top-k candidate tokens by PQ group score, the rule of `reference.pq_topk_ref`.

    query: [B, Hkv, G, D] float; centroids: [B, Hkv, m, K, Ds] float (m * Ds = D, K <= 256); codes: [B, Hkv, N, m]
    uint8 (only [lo, hi) is read); lo, hi: [B] integer. Returns [B, Hkv, k] int64: the selected positions in
    ascending order, then -1 in slots beyond the number of candidates.
    """
    _check_inputs(query, centroids, codes, lo, hi, k)
    b, h, g, d = query.shape
    m, kc, ds = centroids.shape[2:]
    n = codes.shape[2]
    out = torch.full((b, h, k), -1, dtype=torch.int64)
    if k == 0 or n == 0:
        return out
    lut = pq_lut(query, centroids, scaling)
    for bi, (a, e) in enumerate(zip(lo.tolist(), hi.tolist())):
        a, e = max(0, int(a)), min(n, int(e))
        if e <= a:
            continue  # no candidate: the row stays -1
        kk = min(k, e - a)
        if kk == e - a:  # every candidate fits: no scoring needed
            out[bi, :, :kk] = torch.arange(a, e)
            continue
        out[bi, :, :kk] = _select(lut[bi], codes[bi, :, a:e], kk).add_(a)
    return out


def uses_code_table(m: int, kc: int, g: int, n: int) -> bool:
    """Whether `_select` scores n tokens through the code table (m <= 2 and the table, ~256 * K entries for m = 2,
    costs less than per-token scoring, ~G * n gathers), and so builds the joint-code histogram."""
    return m <= 2 and (256 * kc if m == 2 else kc) <= 2 * g * n


def _select(lut: torch.Tensor, codes: torch.Tensor, kk: int, hist: JointCodes | None = None,
            extra: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """lut: [Hkv, m, G, K] float32; codes: [Hkv, n, m] uint8; 0 < kk < n. Returns [Hkv, kk] int64 (0-based).
    hist: the codes' `joint_codes`, when the caller already built it (`cpu_shortlist`); None builds it here if the
    code table is used. extra: optional [Hkv, X] int64 positions in [0, n) (-1 = none) joined to the selection
    (`_emit`): then [Hkv, kk + X], ascending, -1 after. fused=False: the caller already tried `select_fused` on
    these inputs (it found float32's range too small), so the float64 table is next."""
    h, m, g, kc = lut.shape
    n = codes.shape[1]
    use_table = uses_code_table(m, kc, g, n)
    fast = use_table and native.available() and codes.stride(2) == 1
    if fast and fused:
        # the whole selection in one native call; None: float32 lost range, the float64 table below (the native
        # call scores every token through its head's code table whatever the table's size, so the float32 table
        # route below is the ATen path's only)
        found = select_fused(lut, codes, kk, extra)
        if found is not None:
            return found[0]
    if use_table and hist is None:
        hist = joint_codes(codes, kc)
    if not fast and use_table and (256 if m == 2 else 1) * kc >= n:  # more codes than tokens: a float32 table
        found = _code_scores(lut, codes, hist=hist)
        if found is not None:
            table, _, joint, _ = found
            pos = _select_tokens(hist.spread(table).index_select(0, joint).view(h, n), kk, min_thr=_LOW32,
                                 extra=extra)
            if pos is not None:
                return pos
        # a denominator or the threshold fell where float32 underflows: the float64 table below
    found = _code_scores(lut, codes, wide=True, hist=hist) if use_table else None
    if found is None:
        return _select_tokens(_token_scores(lut, codes), kk, extra=extra)
    table, counts, joint, _ = found  # [Hkv, R, K] float32 / float64 scores and counts, [Hkv * n] int32
    if table[0].numel() >= n:
        return _select_tokens(hist.spread(table).index_select(0, joint).view(h, n), kk, extra=extra)
    # fewer codes than tokens: search the code table, weighted by code counts
    tab_keys = table.view(torch.int32)
    thr, need = radix_threshold(tab_keys.reshape(h, -1), counts.reshape(h, -1), kk)
    # class of every code (2 above, 1 at the threshold, 0 below), laid out like the joint codes' bins
    cls = (tab_keys > thr[:, None, None]).to(torch.int8) * 2 + (tab_keys == thr[:, None, None])
    cls = hist.spread(cls).index_select(0, joint).view(h, n)  # one byte per token
    above, tie = cls == 2, cls == 1
    # ties at the threshold: the first `need` of them in position order
    return _emit(_take_first_ties(above, tie, need), kk, extra)


def select_fused(lut: torch.Tensor, codes: torch.Tensor, kk: int, extra: torch.Tensor | None = None,
                 ex: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_select`'s native route as one kernel call per sequence (`native.topk_pq`): the denominators, the factor
    tables, the code table, the scores and the radix select, with the bits of the separate calls (`sequence_z`'s
    denominators, `_code_scores`' float32 factors, `select_top`'s rule). lut: [Hkv, m, G, K] float32 (m <= 2);
    codes: [Hkv, n, m] uint8 with unit stride in m; 0 < kk < n; extra as `_select`; ex: the lut's
    `log_z_factors` [Hkv, m, G, K] float64 when the caller has them. Returns (pos [Hkv, kk (+ X)] int64, z [Hkv, G]
    float64: the softmax denominators, for the log-partition), or None where float32 factors lose range (a
    denominator below _TINY32 or a threshold below _LOW32) or G > 256: the caller takes the float64 table."""
    if lut.shape[2] > 256:  # more query heads per KV head than the kernel's scratch: the float64 table route
        return None
    if ex is None:
        from .log_partition import log_z_factors  # (that module imports this one)

        ex = log_z_factors(lut[None])[0][0]
    e32 = (lut - lut.amax(dim=-1, keepdim=True)).exp_()  # `_code_scores`' float32 factors
    return native.topk_pq(ex.contiguous(), e32, codes, kk, extra, _TINY32, _LOW32)


def _take_first_ties(above: torch.Tensor, tie: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """above [Hkv, n] bool with the first need[h] entries of tie [Hkv, n] bool (in position order) set too; need:
    [Hkv] integer. The ties are listed with one pass over the mask (`row_positions`) and ranked within their row:
    no cumulative sum over the whole [Hkv, n] mask, and no int64 copy of it (what a cumsum compared with an int64
    count costs)."""
    rows, cols = row_positions(tie)  # row-major: each row's ties in position order
    if rows.numel():
        count = torch.bincount(rows, minlength=tie.shape[0])
        rank = torch.arange(rows.numel()) - (count.cumsum(0) - count)[rows]  # 0, 1, ... within each row
        take = rank < need.view(-1)[rows]
        above[rows[take], cols[take]] = True
    return above


def mark(keep: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Set keep[r, pos[r, j]] for every pos[r, j] >= 0. keep: [R, n] bool; pos: [R, X] int64 in [0, n) or -1."""
    ok = pos >= 0
    keep[torch.arange(pos.shape[0]).view(-1, 1).expand_as(pos)[ok], pos[ok]] = True
    return keep


def _emit(keep: torch.Tensor, kk: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The positions a selection mask keeps, in ascending order (one pass: `cpu_np.row_positions`).

    keep: [Hkv, n] bool with exactly kk entries per row (else RuntimeError: only NaN scores could do that); it is
    written to when extra is given. extra: optional [Hkv, X] int64 positions in [0, n), -1 = none (the outliers of
    `pq_shortlist`): set in the mask first, so the union comes out ascending with each position once, no sort or
    search. Returns [Hkv, kk] int64, or with extra [Hkv, kk + X]: each row's positions, then -1.
    """
    h, n = keep.shape
    if extra is None:
        pos = row_positions(keep)[1]
        if pos.numel() != h * kk:  # cannot happen unless the scores are NaN
            raise RuntimeError(f"pq_topk_cpu selected {pos.numel()} tokens for {h} x {kk} slots (NaN scores?)")
        return pos.view(h, kk)
    got = int(torch.count_nonzero(keep))
    if got != h * kk:
        raise RuntimeError(f"pq_topk_cpu selected {got} tokens for {h} x {kk} slots (NaN scores?)")
    x = extra.shape[1]
    mark(keep, extra)
    count = torch.count_nonzero(keep, dim=-1).tolist()  # per row: kk + the extra positions not already kept
    pos = row_positions(keep)[1]  # row-major: each row's positions ascending, row after row
    out = torch.full((h, kk + x), -1, dtype=torch.int64)
    a = 0
    for r, c in enumerate(count):  # Hkv row copies: cheaper than ranking every entry to scatter it
        out[r, :c] = pos[a:a + c]
        a += c
    return out


def _select_tokens(scores: torch.Tensor, kk: int, min_thr: float | None = None,
                   extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """The kk best of n per-token scores, ties to the earliest positions. scores: [Hkv, n] float32, non-negative
    (no NaN); 0 < kk < n. Returns [Hkv, kk] int64 positions in ascending order (with extra: `_emit`'s union).

    The threshold (the kk-th largest score) comes from `cpu_np.kth_largest` (np.partition; torch.topk's values
    without numpy, which are ~2x cheaper than the three bincount passes of `radix_threshold` over a token list);
    the positions are then taken in position order by comparing against it, so the result does not depend on
    any sort order or tie handling.
    """
    h, n = scores.shape
    if scores.dtype == torch.float32 and native.available():
        return _select_native(h, n, kk, min_thr, extra, scores.contiguous())
    thr = kth_largest(scores, kk)  # [Hkv, 1]
    if min_thr is not None and not bool((thr >= min_thr).all()):
        return None  # the caller recomputes the scores with more range
    keep = scores >= thr
    count = torch.count_nonzero(keep, dim=-1)
    if not bool((count == kk).all()):  # ties at the threshold: every score above it, then the first ties
        above = scores > thr
        keep = _take_first_ties(above, keep.logical_xor_(above), kk - torch.count_nonzero(above, dim=-1))
    return _emit(keep, kk, extra)


def _select_native(h: int, n: int, kk: int, min_thr: float | None, extra: torch.Tensor | None,
                   scores: torch.Tensor) -> torch.Tensor | None:
    """`_select_tokens` through the native kernel (`native.select_top`: a radix select on the scores' bits and one
    emitting pass, the same rule) on scores [Hkv, n] float32. None when a threshold is below min_thr (as
    `_select_tokens`)."""
    pos, thr = native.select_top(h, n, kk, scores, extra=extra)
    if min_thr is not None and not bool((thr >= min_thr).all()):
        return None
    return pos


def pq_lut(query: torch.Tensor, centroids: torch.Tensor, scaling: float) -> torch.Tensor:
    """[B, Hkv, m, G, K] float32 lookup table: scaled inner products of each query sub-vector with every centroid.
    query: [B, Hkv, G, D]; centroids: [B, Hkv, m, K, Ds]. One function for `pq_topk_cpu`, `log_partition_cpu` and
    `pq_shortlist_cpu`, so the fused op reads the very table the separate ops compute (same bits). With the native
    kernels, `native.lut` (the same products, summed in another order)."""
    b, h, g, _ = query.shape
    m, kc, ds = centroids.shape[2:]
    if native.available() and ds <= 1024:  # one small loop: no library dispatch (most of a bmm this size, cold)
        return native.lut(query, centroids, scaling)
    q = query.float().reshape(b * h, g, m, ds).transpose(1, 2).reshape(b * h * m, g, ds)
    c = centroids.float().reshape(b * h * m, kc, ds)
    return torch.bmm(q, c.transpose(1, 2)).mul_(scaling).view(b, h, m, g, kc)


class JointCodes:
    """The joint codes of one sequence's candidates and their per-head histogram (m <= 2), built once by
    `joint_codes` and read by the top-k's code table and by the log-partition (`log_partition_cpu`,
    `pq_shortlist_cpu`). Every tensor is a view of a per-thread workspace: valid until the next `joint_codes`
    call on this thread.

    joint: [Hkv * n] int32, token t of head h at bin h * rows * width + c0 + 256 * c1 (m = 2) or + c0 (m = 1);
    raw: [Hkv, rows, width] int32 counts per bin (rows = K, width = 256 for m = 2; rows = 1, width = K for m = 1).
    """

    def __init__(self, joint: torch.Tensor, raw: torch.Tensor, kc: int) -> None:
        self.joint, self.raw, self.kc = joint, raw, kc
        self.width = raw.shape[2]
        self._counts: dict[torch.dtype, torch.Tensor] = {}

    def counts(self, dtype: torch.dtype) -> torch.Tensor:
        """[Hkv, rows, K] contiguous counts in `dtype` (exact: at most 2**24 tokens per code in float32), converted
        once per dtype into a reused workspace (fresh pages of this size cost as much as the conversion)."""
        if dtype not in self._counts:
            h, rows, _ = self.raw.shape
            buf = _workspace("pq_counts", h * rows * self.kc, dtype).view(h, rows, self.kc)
            self._counts[dtype] = buf.copy_(self.raw[:, :, :self.kc])
        return self._counts[dtype]

    def spread(self, table: torch.Tensor) -> torch.Tensor:
        """A per-code table [Hkv, rows, K] laid out like the bins, flat [Hkv * rows * width]: index_select(0, joint)
        then reads every token's entry. Columns K..width-1 (no code) are zero-filled."""
        if table.shape[2] == self.width:
            return table.reshape(-1)
        return torch.nn.functional.pad(table, (0, self.width - table.shape[2])).view(-1)


def joint_codes(codes: torch.Tensor, kc: int) -> JointCodes:
    """Joint codes and histogram of codes [Hkv, n, m] uint8 (m <= 2, codes < kc <= 256); see `JointCodes`.

    The two one-byte codes of a token are read as one little-endian uint16 where the buffer holds the pairs packed
    (no arithmetic per token), by arithmetic otherwise (e.g. every other token of a buffer); the counting is one
    `index_add_` of an expanded int32 one into a zeroed workspace, cheaper than `bincount` (which returns fresh
    int64 pages) at the Llama-3-8B shape."""
    h, n, m = codes.shape
    width, rows = (256, kc) if m == 2 else (kc, 1)
    stride = rows * width
    joint = _workspace("pq_joint", h * n, torch.int32).view(h, n)
    if m == 2 and sys.byteorder == "little" and codes.stride(2) == 1 and codes.stride(1) == 2 \
            and codes.stride(0) % 2 == 0 and codes.storage_offset() % 2 == 0:
        joint.copy_(codes.view(torch.uint16)[..., 0])  # the two bytes as one little-endian word
    elif m == 2:
        torch.add(codes[..., 0], codes[..., 1].to(torch.int32), alpha=256, out=joint)
    else:
        joint.copy_(codes[..., 0])
    joint.add_(torch.arange(0, h * stride, stride, dtype=torch.int32).view(h, 1))  # per-head bins
    raw = _workspace("pq_raw_counts", h * stride, torch.int32).zero_()
    raw.index_add_(0, joint.view(-1), torch.ones(1, dtype=torch.int32).expand(h * n))
    return JointCodes(joint.view(-1), raw.view(h, rows, width), kc)


def _code_scores(lut: torch.Tensor, codes: torch.Tensor, wide: bool = False, hist: JointCodes | None = None):
    """Group score of every joint code (m = 1 or 2), or None if a softmax denominator underflows.

    lut: [Hkv, m, G, K] float32 (scaled); codes: [Hkv, n, m] uint8; hist: their `joint_codes` (None: built here).
    Returns (scores [Hkv, R, K] float32, counts [Hkv, R, K] candidates per code (float64 if wide else float32),
    joint [Hkv * n] int32, width): R = K rows (c1) for m = 2, 1 for m = 1; `hist.spread` lays a code table out
    like the joint codes' bins. (`native.topk_pq` computes the same float32 factors and table in one kernel.)
    wide=False computes the factors in float32 (half the memory traffic of float64, and no conversions): exact
    enough while the denominators stay far from underflow (checked: None is returned below _TINY32, and the
    caller re-runs wide=True); wide=True keeps float64's range for very peaked queries.
    """
    h, m, g, kc = lut.shape
    dt = torch.float64 if wide else torch.float32
    # per-sub-space softmax factors, each <= 1 (max over all K centroids subtracted)
    e = (lut - lut.amax(dim=-1, keepdim=True)).to(dt).exp_()  # [H, m, G, K]
    e0 = e[:, 0]  # [H, G, K]: factor of c0
    e1 = e[:, 1].transpose(1, 2) if m == 2 else e.new_ones(h, 1, g)  # [H, R, G]: factor of c1
    if hist is None:
        hist = joint_codes(codes, kc)
    counts = hist.counts(dt)
    z = (torch.bmm(counts, e0.transpose(1, 2)) * e1).sum(dim=1)  # [H, G]: sum_n p_g(n) before normalising
    if not bool((z > (_TINY if wide else _TINY32)).all()):
        return None
    scores = torch.bmm(e1 / z[:, None, :], e0).float()  # [H, R, K]: sum_g e1 e0 / Z_g
    return scores, counts, hist.joint, hist.width


def _token_scores(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-token group scores (any m): lut [Hkv, m, G, K] float32, codes [Hkv, n, m] uint8 -> [Hkv, n] float32."""
    h, m, g, kc = lut.shape
    n = codes.shape[1]
    logits = lut.new_zeros(h, g, n)
    for j in range(m):
        idx = codes[:, :, j].to(torch.int64)[:, None, :].expand(h, g, n)
        logits += torch.gather(lut[:, j], 2, idx)
    return torch.softmax(logits, dim=-1).sum(dim=1).contiguous()


def radix_threshold(keys: torch.Tensor, weights: torch.Tensor | None, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-th largest key per row, by weight.

    keys: [R, L] int32, non-negative; weights: [R, L] float64 (None = 1 each); kk: the rank, with
    0 < kk <= total weight of every row. Returns (thr [R] int32, need [R] int32): the key of the kk-th largest
    element, and how many elements of weight with key == thr complete the kk (total weight above thr + need = kk).
    """
    r = keys.shape[0]
    need = torch.full((r,), kk, dtype=torch.float64 if weights is not None else torch.int64)
    prefix = torch.zeros(r, dtype=torch.int32)
    w = None if weights is None else weights.reshape(-1)
    high = None  # keys >> (shift + width) of the current level: the digits chosen so far
    for level, (shift, width) in enumerate(_DIGITS):
        nb = 1 << width
        shifted = keys >> shift if shift else keys
        digit = shifted & (nb - 1) if level else shifted.clone()  # level 0: keys < 2**31, no mask needed
        if level:  # only keys that share the digits chosen so far; the rest go to an overflow bin
            digit.masked_fill_(high != prefix[:, None], nb)
        high = shifted
        digit += torch.arange(0, r * (nb + 1), nb + 1, dtype=torch.int32).view(r, 1)
        hist = torch.bincount(digit.view(-1), weights=w, minlength=r * (nb + 1)).view(r, nb + 1)[:, :nb]
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # [R, nb]: weight with digit >= d
        d = (at_least >= need[:, None]).sum(-1) - 1  # the largest digit that still reaches `need`
        above = torch.where(d + 1 < nb, at_least.gather(1, (d + 1).clamp_max(nb - 1)[:, None])[:, 0], 0)
        need = need - above
        prefix = (prefix << width) | d.to(torch.int32)
    return prefix, need.round().to(torch.int32)
