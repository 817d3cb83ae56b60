"""Triton bodies of `pq_topk`: query + centroids + codes -> the k best tokens of every (sequence, KV head).

R = B * Hkv rows; every kernel after the first has grid (R, P): program p of row r walks the blocks p, p + P, ...
of the row's candidate range [lo, hi), so the work follows the filled prefix, not the preallocated N, and the grid
is static (no host sync: the launch sequence can be captured in a CUDA graph).

  1. _lut_kernel     (R, m, cdiv(K, BLOCK_C))  lut[r, j, c, g] = log2(e) * scaling * q_g[j-th slice] . centroid[j, c].
                     Zeroes the row's histogram/counter workspace.
  2. _stats_kernel   (R, P)  logits of a block = sum_j lut[j, code_j] (gathers from a 1-16 KiB table that stays in
                     L1), online per-head (max, sum exp2) over the program's blocks -> part[r, p, 2, GP].
  3. _score_kernel   (R, P)  per-head log2-sum-exp2 from the partials; recomputes the logits (cheaper than writing
                     and re-reading [N, G] fp32); group score s = sum_g exp2(l_g - lse_g) in (0, G]; 31-bit order
                     key = bits(s) + 1 (bits of a non-negative float sort like the float; +1 keeps a valid token
                     whose score underflowed to 0 above "no token"); 256-bin histogram of the key's bits 30..23.
  4. _refine_kernel  (R, P) x 2  the boundary digit of the level above is found from its histogram (every program
                     repeats that 256-element scan: cheaper than a launch); 256-bin histogram of the next 8 bits
                     among keys on the boundary. After 3 levels the k-th largest key is known to 24 of 31 bits, i.e.
                     to 2**-16 of the score: closer scores are treated as ties.
  5. _select_kernel  (R, P)  keys above the 24-bit boundary prefix take slots [0, k - need) through an atomic
                     counter and a block cumsum; keys on it take [k - need, k) first come first served; rows with
                     fewer than k candidates get -1 in the remaining slots.

Histograms use tl.histogram (warp ballots, then shared-memory atomics) and one masked global atomic per non-empty
bin per program; 256 bins keep the ballot cost at ~2 instructions per element (1024 bins would cost ~10).

Bytes (N candidates per row, R rows): codes 2 * R * N * m (read by passes 2 and 3), keys 4 * R * N written once and
read 3 times, indices 8 * R * k, LUT/centroids/partials < 1 MB. Llama-3-8B shape at N = 128K (R = 8, m = 2,
k = N/5): 4 MB of codes + 17 MB of key traffic (it fits the 50 MB L2) + 1.7 MB of indices, i.e. ~7 us at DRAM
speed; the LUT gathers are ~2 M vector loads from L1. Six dependent launches of 500+ programs each put the
expected time at ~15-20 us under a CUDA graph (target <= 25 us), dominated by launch gaps and pass latency, not
by bytes; torch.topk of N/5 alone takes ~150 us there.
"""

import triton
import triton.language as tl

NUM_BINS = 256
WS_SIZE = 3 * NUM_BINS + 2  # per row: 3 histograms, then the counters of "above" and "on the boundary" keys


@triton.jit
def _row_range(lo_ptr, hi_ptr, b, N):
    """Candidate range [lo, hi) of sequence b, clipped to [0, N] (hi < lo means no candidate)."""
    lo = tl.load(lo_ptr + b).to(tl.int64)
    hi = tl.load(hi_ptr + b).to(tl.int64)
    lo = tl.minimum(tl.maximum(lo, 0), N)
    hi = tl.minimum(tl.maximum(hi, lo), N)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _block_logits(codes_row, stride_cn, stride_cm, lut_row, offs, msk,
                  M: tl.constexpr, KC: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr):
    """log2-scaled logits [BLOCK_N, GP] of the tokens `offs` (rows where ~msk hold garbage)."""
    g = tl.arange(0, GP)
    acc = tl.zeros([BLOCK_N, GP], dtype=tl.float32)
    for j in tl.static_range(M):
        c = tl.load(codes_row + offs * stride_cn + j * stride_cm, mask=msk, other=0).to(tl.int32)
        c = tl.minimum(c, KC - 1)  # a code >= K is a caller bug; never read outside the table
        # the G entries of one (j, c) are contiguous: one vector load per token and sub-space
        acc += tl.load(lut_row + ((j * KC + c) * GP)[:, None] + g[None, :])
    return acc


@triton.jit
def _lut_kernel(q_ptr, cent_ptr, lut_ptr, ws_ptr, HKV, scale,
                stride_qb, stride_qh, stride_qg, stride_qd,
                stride_cb, stride_ch, stride_cm, stride_ck, stride_cd,
                M: tl.constexpr, KC: tl.constexpr, DS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                GD: tl.constexpr, DSP: tl.constexpr, BLOCK_C: tl.constexpr, WS: tl.constexpr):
    r = tl.program_id(0)
    j = tl.program_id(1)
    cb = tl.program_id(2)
    b = (r // HKV).to(tl.int64)
    h = (r % HKV).to(tl.int64)
    g = tl.arange(0, GD)
    d = tl.arange(0, DSP)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + (j * DS + d)[None, :] * stride_qd,
                mask=(g[:, None] < G) & (d[None, :] < DS), other=0.0).to(tl.float32)  # [GD, DSP]
    cen = tl.load(cent_ptr + b * stride_cb + h * stride_ch + j * stride_cm
                  + c[:, None] * stride_ck + d[None, :] * stride_cd,
                  mask=(c[:, None] < KC) & (d[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_C, DSP]
    # fp32 "ieee": the table is tiny, and tf32 rounding would reorder near-tied tokens
    t = tl.dot(cen, tl.trans(q), input_precision="ieee") * scale  # [BLOCK_C, GD]
    lut_row = lut_ptr + r.to(tl.int64) * (M * KC * GP) + j * (KC * GP)
    tl.store(lut_row + c[:, None] * GP + g[None, :], t, mask=(c[:, None] < KC) & (g[None, :] < GP))
    if (j == 0) & (cb == 0):
        w = tl.arange(0, 1024)
        tl.store(ws_ptr + r.to(tl.int64) * WS + w, tl.zeros([1024], dtype=tl.int32), mask=w < WS)


@triton.jit
def _stats_kernel(codes_ptr, lut_ptr, part_ptr, lo_ptr, hi_ptr, N, HKV,
                  stride_cb, stride_ch, stride_cn, stride_cm,
                  M: tl.constexpr, KC: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    b = r // HKV
    lo, hi = _row_range(lo_ptr, hi_ptr, b, N)
    codes_row = codes_ptr + b.to(tl.int64) * stride_cb + (r % HKV).to(tl.int64) * stride_ch
    lut_row = lut_ptr + r.to(tl.int64) * (M * KC * GP)
    run_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    run_s = tl.zeros([GP], dtype=tl.float32)
    for blk in range(p, tl.cdiv(hi - lo, BLOCK_N), P):
        offs = lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
        msk = offs < hi
        lg = _block_logits(codes_row, stride_cn, stride_cm, lut_row, offs, msk, M, KC, GP, BLOCK_N)
        lg = tl.where(msk[:, None], lg, float("-inf"))
        new_m = tl.maximum(run_m, tl.max(lg, 0))  # finite: a block holds >= 1 candidate
        run_s = run_s * tl.exp2(run_m - new_m) + tl.sum(tl.exp2(lg - new_m[None, :]), 0)
        run_m = new_m
    g = tl.arange(0, GP)
    part_row = part_ptr + (r.to(tl.int64) * P + p) * (2 * GP)
    tl.store(part_row + g, run_m)
    tl.store(part_row + GP + g, run_s)


@triton.jit
def _score_kernel(codes_ptr, lut_ptr, part_ptr, keys_ptr, ws_ptr, lo_ptr, hi_ptr, N, HKV,
                  stride_cb, stride_ch, stride_cn, stride_cm,
                  M: tl.constexpr, KC: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, PP: tl.constexpr,
                  BLOCK_N: tl.constexpr, WS: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    b = r // HKV
    lo, hi = _row_range(lo_ptr, hi_ptr, b, N)
    # per-head log2 of the softmax denominator, merged from the P partials of this row
    pr = tl.arange(0, PP)
    g = tl.arange(0, GP)
    part = part_ptr + r.to(tl.int64) * P * (2 * GP) + pr[:, None] * (2 * GP) + g[None, :]
    pmax = tl.load(part, mask=pr[:, None] < P, other=float("-inf"))  # [PP, GP]
    psum = tl.load(part + GP, mask=pr[:, None] < P, other=0.0)
    gmax = tl.max(pmax, 0)
    gmax = tl.where(gmax == float("-inf"), 0.0, gmax)  # row without candidates: no block below uses it
    tot = tl.sum(psum * tl.exp2(pmax - gmax[None, :]), 0)
    lse = gmax + tl.log2(tl.where(tot > 0, tot, 1.0))  # tot = 0 only without candidates
    lse = tl.where(g < G, lse, float("inf"))  # padded heads contribute exp2(-inf) = 0

    codes_row = codes_ptr + b.to(tl.int64) * stride_cb + (r % HKV).to(tl.int64) * stride_ch
    lut_row = lut_ptr + r.to(tl.int64) * (M * KC * GP)
    keys_row = keys_ptr + r.to(tl.int64) * N
    hist = tl.zeros([256], dtype=tl.int32)
    for blk in range(p, tl.cdiv(hi - lo, BLOCK_N), P):
        offs = lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
        msk = offs < hi
        lg = _block_logits(codes_row, stride_cn, stride_cm, lut_row, offs, msk, M, KC, GP, BLOCK_N)
        score = tl.sum(tl.exp2(lg - lse[None, :]), 1)  # [BLOCK_N] in [0, G]
        key = score.to(tl.int32, bitcast=True) + 1  # in [1, 2**31)
        tl.store(keys_row + offs, key, mask=msk)
        hist += tl.histogram(key >> 23, 256, mask=msk)
    bins = tl.arange(0, 256)
    tl.atomic_add(ws_ptr + r.to(tl.int64) * WS + bins, hist, mask=hist > 0)


@triton.jit
def _boundary_digit(hist_ptr, need):
    """Digit d of the need-th largest key in a 256-bin histogram, and how many keys on d are still needed."""
    bins = tl.arange(0, 256)
    h = tl.load(hist_ptr + bins)
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys with digit >= d
    d = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > d, h, 0), 0)
    return d, need - above


@triton.jit
def _boundary(ws_row, k, LEVELS: tl.constexpr):
    """(prefix, need, total): the first LEVELS digits of the k-th largest key, how many keys with exactly that
    prefix belong to the top k, and the row's candidate count. prefix = -1 (every key is above it) and need = 0
    when the row has at most k candidates."""
    total = tl.sum(tl.load(ws_row + tl.arange(0, 256)), 0)
    prefix = total * 0
    need = total * 0 + k
    for lvl in tl.static_range(LEVELS):
        d, need = _boundary_digit(ws_row + lvl * 256, need)
        prefix = prefix * 256 + d
    take_all = total <= k
    return tl.where(take_all, -1, prefix), tl.where(take_all, 0, need), total


@triton.jit
def _refine_kernel(keys_ptr, ws_ptr, lo_ptr, hi_ptr, kv_ptr, k, N, HKV,
                   LEVEL: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    lo, hi = _row_range(lo_ptr, hi_ptr, r // HKV, N)
    ws_row = ws_ptr + r.to(tl.int64) * WS
    kk = tl.minimum(tl.load(kv_ptr).to(tl.int32), k)  # tokens to select (<= the k slots): a runtime value
    prefix, need, total = _boundary(ws_row, kk, LEVEL)
    keys_row = keys_ptr + r.to(tl.int64) * N
    hist = tl.zeros([256], dtype=tl.int32)
    for blk in range(p, tl.cdiv(hi - lo, BLOCK_N), P):
        offs = lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
        msk = offs < hi
        key = tl.load(keys_row + offs, mask=msk, other=0)
        on = msk & ((key >> (31 - 8 * LEVEL)) == prefix)
        hist += tl.histogram((key >> (23 - 8 * LEVEL)) & 255, 256, mask=on)
    bins = tl.arange(0, 256)
    tl.atomic_add(ws_row + LEVEL * 256 + bins, hist, mask=hist > 0)


@triton.jit
def _select_kernel(keys_ptr, ws_ptr, out_ptr, lo_ptr, hi_ptr, kv_ptr, k, N, HKV,
                   BLOCK_N: tl.constexpr, WS: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    lo, hi = _row_range(lo_ptr, hi_ptr, r // HKV, N)
    ws_row = ws_ptr + r.to(tl.int64) * WS
    kk = tl.minimum(tl.load(kv_ptr).to(tl.int32), k)  # tokens to select; slots [kk, k) stay -1
    prefix, need, total = _boundary(ws_row, kk, 3)
    first_tie = kk - need  # keys above the prefix fill [0, first_tie), keys on it [first_tie, kk)
    keys_row = keys_ptr + r.to(tl.int64) * N
    out_row = out_ptr + r.to(tl.int64) * k
    for blk in range(p, tl.cdiv(hi - lo, BLOCK_N), P):
        offs = lo + blk * BLOCK_N + tl.arange(0, BLOCK_N)
        msk = offs < hi
        key = tl.load(keys_row + offs, mask=msk, other=0) >> 7
        above = (msk & (key > prefix)).to(tl.int32)
        on = (msk & (key == prefix)).to(tl.int32)
        base = tl.atomic_add(ws_row + 3 * 256, tl.sum(above, 0))
        pos = base + tl.cumsum(above, 0) - 1
        tl.store(out_row + pos, offs.to(tl.int64), mask=above > 0)
        tbase = tl.atomic_add(ws_row + 3 * 256 + 1, tl.sum(on, 0))
        rank = tbase + tl.cumsum(on, 0) - 1
        tl.store(out_row + first_tie + rank, offs.to(tl.int64), mask=(on > 0) & (rank < need))
    if p == 0:  # fewer candidates than slots (or kk < k): the rest is -1
        for s in range(tl.minimum(total, kk), k, 1024):
            so = s + tl.arange(0, 1024)
            tl.store(out_row + so, tl.full([1024], -1, dtype=tl.int64), mask=so < k)
