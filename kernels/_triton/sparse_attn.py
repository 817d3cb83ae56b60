"""Triton bodies of `sparse_decode_attention`: exact attention of one decode query over an index list.

Flash-decoding over the S slots of idx [B, Hkv, S]:
  1. _split_kernel  grid (R, SPLITS), R = B * Hkv. Program (r, s) owns slots [s * CHUNK, (s + 1) * CHUNK) and
                    all G query heads of KV head r (one K/V row read serves G heads; K/V are never expanded or
                    copied). Per BLOCK_S slots: load the indices, gather the K rows straight from the cache
                    (D contiguous elements each, masked where idx = -1), logits = Q[GP, D] @ K^T on tensor cores
                    (G padded to 16 rows, the minimum tl.dot tile), online softmax in exp2, acc += P @ V.
                    Writes the split's normalised output and log2-sum-exp2 in fp32.
  2. _merge_kernel  grid (R, G): log-sum-exp merge of the SPLITS partials -> out (input dtype), lse (natural log).

Bytes (bf16, Llama-3-8B shape, N = 128K, S = k = N/5, Hkv = 8): S * Hkv * (D + Dv) * 2 = 107 MB of K/V rows plus
S * Hkv * 8 = 1.7 MB of indices; partials are R * SPLITS * G * (Dv + 1) * 4 = 1 MB. At the H100's ~3.35 TB/s the
bound is ~33 us; gathered 256-byte rows reach ~70-80% of it, so ~45 us is expected (target <= 57 us). SPLITS is
chosen so R * SPLITS ~ 4 programs per SM: at B = 1 the whole GPU streams the rows.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to_bf16_grid(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still held in fp32. The interpreter's fp32 -> bf16
    cast truncates (a compiled kernel rounds), which would double the output error on CPU; this makes the
    following cast exact there."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_part_ptr, lse_part_ptr,
                  N, S, HKV, CHUNK, qk_scale,
                  stride_qb, stride_qh, stride_qg, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ib, stride_ih, stride_is,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  DV: tl.constexpr, DVP: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, SPLIT_P: tl.constexpr):
    # UPCAST (interpreter + bf16 only): the interpreter keeps bf16 as raw uint16 bits and its tl.dot would multiply
    # the bits, so operands go through fp32 there; P is still rounded to the value dtype first, as on the GPU.
    r = tl.program_id(0)
    sp = tl.program_id(1)
    SPLITS = tl.num_programs(1)
    b = (r // HKV).to(tl.int64)
    h = (r % HKV).to(tl.int64)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + d[None, :] * stride_qd,
                mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)  # [GP, DP]
    if UPCAST:
        q = q.to(tl.float32)
    k_row = k_ptr + b * stride_kb + h * stride_kh
    v_row = v_ptr + b * stride_vb + h * stride_vh
    idx_row = idx_ptr + b * stride_ib + h * stride_ih

    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([GP], dtype=tl.float32)  # running denominator
    acc = tl.zeros([GP, DVP], dtype=tl.float32)
    s_end = tl.minimum(sp * CHUNK + CHUNK, S)
    for s0 in range(sp * CHUNK, s_end, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        ix = tl.load(idx_row + offs * stride_is, mask=offs < s_end, other=-1).to(tl.int64)
        valid = (ix >= 0) & (ix < N)
        kt = tl.load(k_row + ix[:, None] * stride_kn + d[None, :] * stride_kd,
                     mask=valid[:, None] & (d[None, :] < D), other=0.0)  # [BLOCK_S, DP]
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale  # [GP, BLOCK_S]
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all slots so far empty: avoid -inf - -inf
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_row + ix[:, None] * stride_vn + dv[None, :] * stride_vd,
                     mask=valid[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_S, DVP]
        # P enters the tensor cores in the value dtype; a bf16 P alone (8-bit mantissa) would add an error as
        # large as the final output rounding, so P = hi + lo in two MMAs (16-bit mantissa, fp32 accumulation):
        # the extra MMA is free in this memory-bound loop
        p_hi = p.to(v_ptr.dtype.element_ty)
        p_lo = (p - p_hi.to(tl.float32)).to(v_ptr.dtype.element_ty)
        if UPCAST:
            vt = vt.to(tl.float32)
            p_hi = p_hi.to(tl.float32)
            p_lo = p_lo.to(tl.float32)
        pv = tl.dot(p_hi, vt, input_precision=PRECISION)
        if SPLIT_P:
            pv = tl.dot(p_lo, vt, acc=pv, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    part = r.to(tl.int64) * SPLITS + sp
    tl.store(o_part_ptr + (part * G + g[:, None]) * DV + dv[None, :], o, mask=(g[:, None] < G) & (dv[None, :] < DV))
    tl.store(lse_part_ptr + part * G + g, lse2, mask=g < G)


@triton.jit
def _merge_kernel(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, SPLITS,
                  G: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, SPP: tl.constexpr, BLOCK_SP: tl.constexpr,
                  ROUND_BF16: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    sp = tl.arange(0, SPP)
    lse2 = tl.load(lse_part_ptr + (r * SPLITS + sp) * G + g, mask=sp < SPLITS, other=float("-inf"))
    mx = tl.max(lse2, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    denom = tl.sum(tl.exp2(lse2 - mx), 0)
    dv = tl.arange(0, DVP)
    acc = tl.zeros([DVP], dtype=tl.float32)
    for c0 in range(0, SPLITS, BLOCK_SP):  # chunks keep the [splits, Dv] tile small
        c = c0 + tl.arange(0, BLOCK_SP)
        w = tl.exp2(tl.load(lse_part_ptr + (r * SPLITS + c) * G + g, mask=c < SPLITS, other=float("-inf")) - mx)
        o = tl.load(o_part_ptr + ((r * SPLITS + c[:, None]) * G + g) * DV + dv[None, :],
                    mask=(c[:, None] < SPLITS) & (dv[None, :] < DV), other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    has = denom > 0
    out = acc / tl.where(has, denom, 1.0)
    if ROUND_BF16:  # interpreter only, see _round_to_bf16_grid
        out = _round_to_bf16_grid(out)
    tl.store(out_ptr + (r * G + g) * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)
    # natural log for the caller: ln(x) = log2(x) * ln(2)
    tl.store(lse_ptr + r * G + g, tl.where(has, (mx + tl.log2(tl.where(has, denom, 1.0))) * 0.6931471805599453,
                                           float("-inf")))
