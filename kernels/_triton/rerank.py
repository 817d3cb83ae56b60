"""Triton bodies of `rerank_topk`: exact group scores of a shortlist, for the top-k that follows (torch.topk).

R = B * Hkv rows, L shortlist entries per row. Both kernels have grid (R, P): program p of row r walks the blocks
p, p + P, ... of BLOCK entries, so a row's shortlist is spread over P programs and the grid is static (no host
sync: the launch sequence can be captured in a CUDA graph).

  1. _logits_kernel  (R, P)  loads the G query rows of KV head r once, then per block: the entries' positions,
                     the listed key rows straight from the cache (D contiguous elements each; empty entries,
                     negative or >= N, are masked and never read), logits = Q[GP, D] @ K^T in float32 ("ieee":
                     the keys are widened, so a bf16 cache is scored like the reference, which computes in
                     float32; tf32 would reorder near-ties). Writes the log2-scaled logits [G, L] of the row to a
                     workspace and the program's online per-head (max, sum exp2) -> part[r, p, 2, GP].
  2. _score_kernel   (R, P)  merges the P partials of its row into per-head log2-sum-exp2, re-reads its blocks'
                     logits (cheaper than reading the key rows again) and writes the group score
                     s = sum_g exp2(l_g - lse_g) in [0, G], -inf for empty entries. With a given log-partition
                     (HAS_LZ, `log_z` of `rerank_topk`) lse_g is log_z_g plus one per-row shift, the largest
                     l_g - log_z_g of the row (from the partials' maxima): no renormalisation over the shortlist.

Bytes per row: L * D * elem of key rows (the only DRAM traffic that grows with D) + 2 * L * 8 of positions +
G * L * 4 logits written and read + L * 4 scores. Llama-3-8B layer at N = 128K, k = N/10, r = 2 (L = 26214,
R = 8, G = 4, bf16): 53.7 MB of keys, 3.4 MB of positions, 6.7 MB of logits traffic (L2-resident on an H100/H200),
i.e. ~13 us of DRAM time at ~4.5 TB/s; the top-k over the [R, L] scores (torch.topk, sorted) follows.
"""

import triton
import triton.language as tl


@triton.jit
def _logits_kernel(q_ptr, k_ptr, sl_ptr, logit_ptr, part_ptr, N, L, HKV, qk_scale,
                   stride_qb, stride_qh, stride_qg, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_sb, stride_sh, stride_sl,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    b = (r // HKV).to(tl.int64)
    h = (r % HKV).to(tl.int64)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + d[None, :] * stride_qd,
                mask=(g[:, None] < G) & (d[None, :] < D), other=0.0).to(tl.float32)  # [GP, DP]
    k_row = k_ptr + b * stride_kb + h * stride_kh
    sl_row = sl_ptr + b * stride_sb + h * stride_sh
    logit_row = logit_ptr + r.to(tl.int64) * G * L
    run_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    run_s = tl.zeros([GP], dtype=tl.float32)
    for blk in range(p, tl.cdiv(L, BLOCK), P):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        ix = tl.load(sl_row + offs * stride_sl, mask=offs < L, other=-1).to(tl.int64)
        valid = (ix >= 0) & (ix < N)
        kt = tl.load(k_row + ix[:, None] * stride_kn + d[None, :] * stride_kd,
                     mask=valid[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)  # [BLOCK, DP]
        lg = tl.dot(q, tl.trans(kt), input_precision="ieee") * qk_scale  # [GP, BLOCK], log2 units
        lg = tl.where(valid[None, :], lg, float("-inf"))
        tl.store(logit_row + g[:, None] * L + offs[None, :], lg, mask=(g[:, None] < G) & (offs[None, :] < L))
        new_m = tl.maximum(run_m, tl.max(lg, 1))
        m_safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # nothing valid so far: avoid -inf - -inf
        run_s = run_s * tl.exp2(run_m - m_safe) + tl.sum(tl.exp2(lg - m_safe[:, None]), 1)
        run_m = new_m
    part_row = part_ptr + (r.to(tl.int64) * P + p) * (2 * GP)
    tl.store(part_row + g, run_m)
    tl.store(part_row + GP + g, run_s)


@triton.jit
def _score_kernel(sl_ptr, logit_ptr, part_ptr, lz_ptr, score_ptr, N, L, HKV,
                  stride_sb, stride_sh, stride_sl, stride_zb, stride_zh, stride_zg,
                  G: tl.constexpr, GP: tl.constexpr, PP: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_LZ: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    b = (r // HKV).to(tl.int64)
    h = (r % HKV).to(tl.int64)
    pr = tl.arange(0, PP)
    g = tl.arange(0, GP)
    part = part_ptr + r.to(tl.int64) * P * (2 * GP) + pr[:, None] * (2 * GP) + g[None, :]
    pmax = tl.load(part, mask=pr[:, None] < P, other=float("-inf"))  # [PP, GP]
    gmax = tl.max(pmax, 0)  # per-head max logit over the row's entries (-inf: none)
    if HAS_LZ:
        # head g's probability under its full-candidate softmax: exp2(l_g - lz_g), lz the given log-partition
        # (natural log -> log2 units; non-finite -> 0), all heads shifted by one per-row constant, the largest
        # l_g - lz_g of the row, so nothing overflows and the ranking is unchanged
        lz = tl.load(lz_ptr + b * stride_zb + h * stride_zh + g * stride_zg, mask=g < G, other=0.0).to(tl.float32)
        lz = tl.where((lz == lz) & (tl.abs(lz) < float("inf")), lz, 0.0) * 1.4426950408889634
        shift = tl.max(tl.where(g < G, gmax - lz, float("-inf")), 0)
        shift = tl.where(shift == float("-inf"), 0.0, shift)  # a row without entries: every score below is -inf
        lse = lz + shift
    else:
        # per-head log2 of the softmax denominator over the whole row, merged from the P partials
        psum = tl.load(part + GP, mask=pr[:, None] < P, other=0.0)
        gmax = tl.where(gmax == float("-inf"), 0.0, gmax)  # a row without entries: every score below is -inf
        tot = tl.sum(psum * tl.exp2(pmax - gmax[None, :]), 0)
        lse = gmax + tl.log2(tl.where(tot > 0, tot, 1.0))
    lse = tl.where(g < G, lse, float("inf"))  # padded heads add exp2(-inf) = 0
    sl_row = sl_ptr + b * stride_sb + h * stride_sh
    logit_row = logit_ptr + r.to(tl.int64) * G * L
    score_row = score_ptr + r.to(tl.int64) * L
    for blk in range(p, tl.cdiv(L, BLOCK), P):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        ix = tl.load(sl_row + offs * stride_sl, mask=offs < L, other=-1).to(tl.int64)
        valid = (ix >= 0) & (ix < N)
        lg = tl.load(logit_row + g[:, None] * L + offs[None, :], mask=(g[:, None] < G) & (offs[None, :] < L),
                     other=float("-inf"))  # [GP, BLOCK]
        s = tl.sum(tl.exp2(lg - lse[:, None]), 0)  # [BLOCK]: in [0, G] without log_z, in [0, G] scaled with it
        tl.store(score_row + offs, tl.where(valid, s, float("-inf")), mask=offs < L)
