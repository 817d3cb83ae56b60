"""Per-head log-partition of the PQ-approximate logits over the candidates: what exact re-ranking normalises by.

Why re-ranking needs it. The selection rule (see `reference`) scores token n by sum_g p_g(n), with p_g a softmax
over *all* candidates. Re-ranking knows exact logits only for its shortlist; a softmax over the shortlist alone
re-weights the heads (a head whose mass lies mostly outside the shortlist is inflated), and on planted GQA keys that
made re-ranking (r = 2) agree *less* with the oracle than the codes alone (tests/test_cache.py, lowest set overlap
over the KV heads: 0.98 -> 0.93 at G = 4, 0.975 -> 0.885 at G = 8). Normalising the exact logits by each head's
log-partition estimated through the codes, log Z_g = log sum_n exp(approx logit), keeps the oracle's head
weighting, and re-ranking then matched the oracle's set exactly on those keys (overlap 1.0 at G = 1, 4, 8; r = 2, 4).

    log_partition_ref(query, centroids, codes, lo, hi, scaling) -> [B, Hkv, G] float32 (-inf: no candidate)
    log_partition_cpu(...)                                      -> the same, via the joint-code histogram (m <= 2)

The public op is `kernels.pq_log_partition` (torch.library op `pqpatch::pq_log_partition`): "torch" runs the
reference, "cpu" `log_partition_cpu`, "triton" the PQ top-k's LUT and softmax-statistics kernels plus a merge
(`kernels._triton.log_partition`). `kernels.rerank_topk(..., log_z=...)` consumes it. A decode step gets it from
`kernels.pq_shortlist` instead, together with the PQ shortlist, from the same pass over the codes.

Shapes: query [B, Hkv, G, D]; centroids [B, Hkv, m, K, Ds] (m * Ds = D; "residual" stages pass the query repeated
per stage, see `quality.residual_query`); codes [B, Hkv, N, m] uint8; lo, hi [B] integer. Never imports triton.
"""

from __future__ import annotations

import torch

from . import native
from .cpu_select import JointCodes, joint_codes, pq_lut
from .reference import candidate_mask

__all__ = ["log_partition_ref", "log_partition_cpu", "check_log_partition_inputs", "log_z_factors",
           "native_z", "sequence_z", "z_from_counts"]


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)


def check_log_partition_inputs(query, centroids, codes, lo, hi) -> None:
    """Argument checks of `kernels.pq_log_partition`, shared by every backend: a ValueError naming the offending
    shape, dtype or device (no data is read, so nothing synchronises)."""

    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    for name, t in (("query", query), ("centroids", centroids), ("codes", codes), ("lo", lo), ("hi", hi)):
        check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    check(query.dim() == 4 and query.dtype in _FLOATS, f"query must be a float32/bfloat16/float16 tensor "
          f"[B, Hkv, G, D], got {query.dtype} {tuple(query.shape)}")
    check(centroids.dim() == 5 and centroids.dtype in _FLOATS, f"centroids must be a float32/bfloat16/float16 "
          f"tensor [B, Hkv, m, K, Ds], got {centroids.dtype} {tuple(centroids.shape)}")
    b, h, _, d = query.shape
    m, kc, ds = centroids.shape[2:]
    check(tuple(centroids.shape[:2]) == (b, h), f"centroids {tuple(centroids.shape)} do not match query "
          f"{tuple(query.shape)} in [B, Hkv]")
    check(m >= 1 and m * ds == d, f"centroids describe {m} sub-spaces of {ds} dims but the query has head dim {d} "
          f"(residual stages: pass quality.residual_query(query, stages))")
    check(1 <= kc <= 256, f"uint8 codes address at most 256 centroids per sub-space, got K = {kc}")
    check(codes.dim() == 4 and codes.dtype == torch.uint8 and tuple(codes.shape[:2]) == (b, h)
          and codes.shape[3] == m, f"codes must be a uint8 tensor [B, Hkv, N, m] = [{b}, {h}, N, {m}], got "
          f"{codes.dtype} {tuple(codes.shape)}")
    for name, t in (("lo", lo), ("hi", hi)):
        check(t.dtype in _INTS and tuple(t.shape) == (b,),
              f"{name} must be an int32/int64 tensor of shape [{b}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("centroids", centroids), ("codes", codes), ("lo", lo), ("hi", hi)):
        check(t.device == query.device, f"{name} is on {t.device} but the query is on {query.device}")


def _lut(query: torch.Tensor, centroids: torch.Tensor, scaling: float) -> torch.Tensor:
    """[B, Hkv, m, G, K] float32: scaled inner products of each query sub-vector with every centroid (one batched
    matmul against the transposed centroid table: no copy of the [B, Hkv, m, K, Ds] table)."""
    b, h, g, d = query.shape
    m, _, ds = centroids.shape[2:]
    q = query.float().reshape(b, h, g, m, ds).transpose(2, 3)  # [B, Hkv, m, G, Ds]
    return torch.matmul(q, centroids.float().transpose(-1, -2)) * scaling


def log_partition_ref(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                      hi: torch.Tensor, scaling: float) -> torch.Tensor:
    """log sum over candidates lo[b] <= n < hi[b] of exp(scaling * q_g . reconstructed k_n): [B, Hkv, G] float32."""
    b, h, g, _ = query.shape
    m = centroids.shape[2]
    n = codes.shape[2]
    lut = _lut(query, centroids, scaling)
    idx = codes.long().permute(0, 1, 3, 2)[:, :, :, None, :].expand(b, h, m, g, n)  # [B, Hkv, m, G, N]
    logits = torch.gather(lut, 4, idx).sum(dim=2)  # [B, Hkv, G, N]
    valid = candidate_mask(lo, hi, n)  # [B, N]
    return logits.masked_fill(~valid[:, None, None, :], float("-inf")).logsumexp(dim=-1)


def log_partition_cpu(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                      hi: torch.Tensor, scaling: float) -> torch.Tensor:
    """`log_partition_ref` on CPU without per-token float arithmetic for m <= 2 (module doc of `cpu_select`): with the
    histogram C[c1, c0] of the candidates' joint codes, Z_g = sum C[c1, c0] exp(lut1[g, c1]) exp(lut0[g, c0]) is one
    bilinear form per head, computed in float64 after subtracting each sub-space's maximum over all K centroids (so
    it cannot overflow; it underflows to -inf only if the candidates' best logit lies ~700 nats below that sum of
    maxima). Other m: the reference.

    Cost per sequence (m = 2): the token work is one int32 histogram of the Hkv x n' joint codes
    (`cpu_select.joint_codes`); then Hkv [G, K] x [K, K] float64 products, independent of n'. Llama-3-8B layer
    (B = 1, Hkv = 8, G = 4, m = 2, K = 256), one thread, float32: 1.3-1.6 ms at 32K candidates and 2.7-2.9 ms at
    128K, i.e. 20-23% and 15% of `pq_topk_cpu` selecting the rerank=2 shortlist (N/5) from the same codes
    (`benchmarks/bench_log_partition.py`; the reference: 6-12 / 40-85 ms). `kernels.pq_shortlist` computes it
    together with that top-k from one histogram (`cpu_shortlist.pq_shortlist_cpu`). With the native kernels the
    per-token work is instead one pass that sums each token's factors by its codes (`native.code_z`, no
    histogram; `sequence_z` picks the route)."""
    b, h, g, _ = query.shape
    m, kc, _ = centroids.shape[2:]
    n = codes.shape[2]
    if m > 2:
        return log_partition_ref(query, centroids, codes, lo, hi, scaling)
    ex, shift = log_z_factors(pq_lut(query, centroids, scaling))
    out = torch.full((b, h, g), float("-inf"))
    for bi, (a, e) in enumerate(zip(lo.tolist(), hi.tolist())):
        a, e = max(0, int(a)), min(n, int(e))
        if e <= a:
            continue
        out[bi] = (sequence_z(ex[bi], codes[bi, :, a:e]).log() + shift[bi]).float()
    return out


def log_z_factors(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 factors of the log-partition from the lookup table lut [B, Hkv, m, G, K] float32
    (`cpu_select.pq_lut`): (ex [B, Hkv, m, G, K] = exp(lut - its maximum over K), each <= 1; shift [B, Hkv, G], the
    sum of the m subtracted maxima, added back in log space)."""
    lut = lut.double()
    mx = lut.amax(dim=-1, keepdim=True)  # [B, Hkv, m, G, 1]
    return (lut - mx).exp_(), mx.sum(dim=2)[..., 0]


def native_z(codes: torch.Tensor) -> bool:
    """Whether `sequence_z` takes the denominators of these codes [Hkv, n, m] from the native kernel (no histogram
    is built then)."""
    return native.available() and codes.stride(2) == 1


def sequence_z(ex: torch.Tensor, codes: torch.Tensor, hist: JointCodes | None = None) -> torch.Tensor:
    """One sequence's softmax denominators [Hkv, G] float64 from its `log_z_factors` ex [Hkv, m, G, K] and its
    candidates' codes [Hkv, n, m] uint8 (m <= 2): one pass over the codes in the native kernel (`native.code_z`),
    else through the joint-code histogram (`hist`, or built here) and `z_from_counts`. Every CPU op that needs the
    denominators (`log_partition_cpu`, the shortlist, `pq_topk`'s native path) takes them from here, so they agree
    bit for bit."""
    if native_z(codes):
        return native.code_z(ex, codes)
    if hist is None:
        hist = joint_codes(codes, ex.shape[-1])
    return z_from_counts(ex, hist.counts(torch.float64))


def z_from_counts(ex: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The softmax denominators before the shift, [Hkv, G] float64: sum over candidates of exp(lut0 - max0) *
    exp(lut1 - max1), from `log_z_factors`' ex [Hkv, m, G, K] and counts [Hkv, rows, K] float64 (m <= 2): the
    histogram route of `sequence_z`."""
    # z[h, g, c1] = sum_c0 exp(lut0[g, c0]) C[c1, c0] (this operand order is MKL's fastest for the shape)
    z = torch.bmm(ex[:, 0], counts.transpose(1, 2))  # [Hkv, G, K] x [Hkv, K, rows] -> [Hkv, G, rows]
    return (z * ex[:, 1]).sum(dim=-1) if ex.shape[1] == 2 else z[..., 0]  # [Hkv, G]


def _joint_histogram(c: torch.Tensor, kc: int) -> torch.Tensor:
    """c: [Hkv, n, m] uint8 codes (m <= 2). Returns float64 counts [Hkv, K, K] of the pairs (c1, c0) for m = 2,
    [Hkv, 1, K] of c0 for m = 1: a view of a per-thread workspace, valid until the next call on this thread
    (`cpu_select.joint_codes`, where the counting is described)."""
    return joint_codes(c, kc).counts(torch.float64)
