"""CPU fast path of `pq_shortlist` (backend "cpu"): the PQ top-k of `cpu_select.pq_topk_cpu` and the per-head
log-partition of `log_partition.log_partition_cpu`, from one lookup table and one joint-code histogram per sequence.

Why: a decode step with exact re-ranking needs both the shortlist (the top r * k tokens by PQ group score) and each
head's log-partition over all candidates (what the exact logits are normalised by). Both are computed through the
codes, and on CPU both start from the histogram of the candidates' joint codes (`cpu_select.joint_codes`): it is the
only per-token work of the log-partition, and the first step of the top-k's code-table path. Run as two ops, the
histogram (and the lookup table) was built twice per step; here it is built once and read by both.

With the native kernels (`native.py`) that per-token work is one pass summing each token's factors by its codes
(`native.code_z`, through `log_partition.sequence_z`): no histogram is built, and the denominators it gives are
also the top-k's: where the top-k scores through the code table, the denominators and the selection are one native
call per sequence (`cpu_select.select_fused`), with the bits of `sequence_z`.

Equality with the separate ops: the same functions run on the same table and the same counts, so the indices equal
`pq_topk_cpu`'s and log_z equals `log_partition_cpu`'s bit for bit (tests/test_pq_shortlist.py checks both). Where
the top-k does not use the code table (a short candidate list, every candidate fitting into k, k = 0) the histogram
is still built once for the log-partition, as the separate op does. m > 2 (no code-domain path in either op): the
two separate functions, one after the other.
"""

from __future__ import annotations

import torch

from .cpu_select import (_check_inputs, _emit, _select, joint_codes, mark, pq_lut, pq_topk_cpu, select_fused,
                         uses_code_table)
from .log_partition import log_partition_ref, log_z_factors, native_z, sequence_z

__all__ = ["pq_shortlist_cpu"]


def pq_shortlist_cpu(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, k: int, scaling: float,
                     k_valid: torch.Tensor | None = None,
                     outliers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PQ top-k and the per-head log-partition of the same candidates, from one per-token pass over the codes.

    query: [B, Hkv, G, D] float; centroids: [B, Hkv, m, K, Ds] float (m * Ds = D, K <= 256); codes: [B, Hkv, N, m]
    uint8 (only [lo, hi) is read); lo, hi: [B] integer; k_valid: optional 1-element integer CPU tensor, the number
    of slots to fill (<= k). Returns (idx [B, Hkv, k] int64: the best min(k, k_valid, candidates) positions in
    ascending order, then -1, as `pq_topk_cpu` padded to k; log_z [B, Hkv, G] float32: log sum_n exp(logit), -inf
    for a sequence without candidates, as `log_partition_cpu`).
    """
    _check_inputs(query, centroids, codes, lo, hi, k)
    b, h, g, _ = query.shape
    m, kc, _ = centroids.shape[2:]
    n = codes.shape[2]
    kk = k if k_valid is None else max(0, min(int(k_valid), k))  # a CPU tensor: reading it costs no device sync
    x = 0 if outliers is None else outliers.shape[-1]
    if m > 2:
        idx = torch.nn.functional.pad(pq_topk_cpu(query, centroids, codes, lo, hi, kk, scaling), (0, k - kk), value=-1)
        if x:
            idx = _union_rows(idx, outliers, lo, hi, n)
        return idx, log_partition_ref(query, centroids, codes, lo, hi, scaling)
    out = torch.full((b, h, k + x), -1, dtype=torch.int64)
    log_z = torch.full((b, h, g), float("-inf"))
    if n == 0:
        return out, log_z
    lut = pq_lut(query, centroids, scaling)  # [B, Hkv, m, G, K] float32: the top-k's table
    ex, shift = log_z_factors(lut)  # its float64 factors: the log-partition's
    for bi, (a, e) in enumerate(zip(lo.tolist(), hi.tolist())):
        a, e = max(0, int(a)), min(n, int(e))
        if e <= a:
            continue  # no candidate: idx stays -1, log_z -inf
        c = codes[bi, :, a:e]
        kb = min(kk, e - a)
        extra = None if x == 0 else _relative(outliers[bi], a, e)
        if 0 < kb < e - a and native_z(c) and uses_code_table(m, kc, g, e - a):
            # denominators and selection in one native call; the same bits as the separate route below
            fused = select_fused(lut[bi], c, kb, extra, ex=ex[bi])
            if fused is not None:
                pos, z = fused
                log_z[bi] = (z.log() + shift[bi]).float()
                out[bi, :, :pos.shape[1]] = pos.add_(a) if extra is None else torch.where(pos >= 0, pos + a, -1)
                continue
        # the one per-token pass for the log-partition: the native kernel's, or the joint-code histogram (then
        # shared with the ATen top-k)
        hist = None if native_z(c) else joint_codes(c, kc)
        z = sequence_z(ex[bi], c, hist)  # [Hkv, G] float64, also the top-k's denominators
        log_z[bi] = (z.log() + shift[bi]).float()  # = log_partition_cpu's
        if kb == e - a:  # every candidate fits (outliers included): no scoring needed
            out[bi, :, :kb] = torch.arange(a, e)
            continue
        if kb == 0:
            if extra is not None:  # nothing selected: the outliers alone
                pos = _emit(torch.zeros(h, e - a, dtype=torch.bool), 0, extra)
                out[bi, :, :x] = torch.where(pos >= 0, pos + a, -1)
            continue
        # reached only where select_fused was tried and lost float32's range, or does not apply (then _select does not
        # take the native route either)
        pos = _select(lut[bi], c, kb, hist, extra, fused=False)  # [Hkv, kb (+ X)] relative positions, -1 after
        out[bi, :, :pos.shape[1]] = pos.add_(a) if extra is None else torch.where(pos >= 0, pos + a, -1)
    return out, log_z


def _relative(outliers: torch.Tensor, a: int, e: int) -> torch.Tensor:
    """[Hkv, X] positions of one sequence (outliers, or a selection) -> positions relative to its first candidate a,
    -1 for an empty entry and for one outside the candidates [a, e)."""
    return torch.where((outliers >= a) & (outliers < e), outliers - a, -1)


def _union_rows(idx: torch.Tensor, outliers: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """idx [B, Hkv, k] (ascending positions, then -1) joined with outliers [B, Hkv, X]: [B, Hkv, k + X] ascending,
    then -1 (the m > 2 path, which has no selection mask of its own to merge into)."""
    b, h, k = idx.shape
    x = outliers.shape[-1]
    out = torch.full((b, h, k + x), -1, dtype=torch.int64)
    for bi, (a, e) in enumerate(zip(lo.tolist(), hi.tolist())):
        a, e = max(0, int(a)), min(n, int(e))
        if e <= a:
            continue
        sel = _relative(idx[bi], a, e)  # the selection: the same count in every row, min(k_valid, k, e - a)
        kb = int((sel[0] >= 0).sum()) if h else 0
        pos = _emit(mark(torch.zeros(h, e - a, dtype=torch.bool), sel), kb, _relative(outliers[bi], a, e))
        out[bi, :, :pos.shape[1]] = torch.where(pos >= 0, pos + a, -1)
    return out
