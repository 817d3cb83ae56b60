"""CPU fast path of `pq_shortlist` (backend "cpu"): the PQ top-k of `cpu_select.pq_topk_cpu` and the per-head
log-partition of `log_partition.log_partition_cpu`, from one lookup table and one joint-code histogram per sequence.

Why: a decode step with exact re-ranking needs both the shortlist (the top r * k tokens by PQ group score) and each
head's log-partition over all candidates (what the exact logits are normalised by). Both are computed through the
codes, and on CPU both start from the histogram of the candidates' joint codes (`cpu_select.joint_codes`): it is the
only per-token work of the log-partition, and the first step of the top-k's code-table path. Run as two ops, the
histogram (and the lookup table) was built twice per step; here it is built once and read by both.

Equality with the separate ops: the same functions run on the same table and the same counts, so the indices equal
`pq_topk_cpu`'s and log_z equals `log_partition_cpu`'s bit for bit (tests/test_pq_shortlist.py checks both). Where
the top-k does not use the code table (a short candidate list, every candidate fitting into k, k = 0) the histogram
is still built once for the log-partition, as the separate op does. m > 2 (no code-domain path in either op): the
two separate functions, one after the other.
"""

from __future__ import annotations

import torch

from .cpu_select import _check_inputs, _select, joint_codes, pq_lut, pq_topk_cpu
from .log_partition import log_partition_ref, log_z_factors, log_z_from_counts

__all__ = ["pq_shortlist_cpu"]


def pq_shortlist_cpu(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, k: int, scaling: float,
                     k_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PQ top-k and the per-head log-partition of the same candidates, from one histogram.

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
    if m > 2:
        idx = pq_topk_cpu(query, centroids, codes, lo, hi, kk, scaling)
        return (torch.nn.functional.pad(idx, (0, k - kk), value=-1),
                log_partition_ref(query, centroids, codes, lo, hi, scaling))
    out = torch.full((b, h, k), -1, dtype=torch.int64)
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
        hist = joint_codes(c, kc)  # the one per-token pass over this sequence's codes
        log_z[bi] = log_z_from_counts(ex[bi], shift[bi], hist.counts(torch.float64))
        kb = min(kk, e - a)
        if kb == 0:
            continue
        if kb == e - a:  # every candidate fits: no scoring needed
            out[bi, :, :kb] = torch.arange(a, e)
            continue
        out[bi, :, :kb] = _select(lut[bi], c, kb, hist).add_(a)
    return out, log_z
