"""Triton body of `pq_assign`: nearest-centroid code of every new key in every PQ sub-space.

_assign_kernel  grid (R, m, cdiv(T, BLOCK_T)), R = B * Hkv. A program holds BLOCK_T key slices [BLOCK_T, Ds] and
                scans the K centroids of its sub-space in chunks: dist = |c|^2 - 2 x.c (|x|^2 does not change the
                argmin), fp32 "ieee" dot so near-equidistant centroids are ordered as in the fp32 reference; ties go
                to the lowest centroid index, as torch.argmin.

Bytes: T * D * elem (keys) + m * K * Ds * elem (centroids, re-read from L2 per T-block) + T * m (codes). A decode
step (T = 1) is one tiny launch; at prefill (T = 8K, D = 128, K = 64) it is compute-bound: 2 * T * K * D flops =
134 MFLOP per head on the fp32 FMA path, ~10 us for 8 heads on an H100.
"""

import triton
import triton.language as tl


@triton.jit
def _assign_kernel(x_ptr, cent_ptr, codes_ptr, T, HKV,
                   stride_xb, stride_xh, stride_xt, stride_xd,
                   stride_cb, stride_ch, stride_cm, stride_ck, stride_cd,
                   stride_ob, stride_oh, stride_ot, stride_om,
                   KC: tl.constexpr, DS: tl.constexpr, DSP: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    j = tl.program_id(1)
    tb = tl.program_id(2)
    b = (r // HKV).to(tl.int64)
    h = (r % HKV).to(tl.int64)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DSP)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + t[:, None].to(tl.int64) * stride_xt
                + (j * DS + d)[None, :] * stride_xd,
                mask=(t[:, None] < T) & (d[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_T, DSP]
    cent_row = cent_ptr + b * stride_cb + h * stride_ch + j * stride_cm
    best_d = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_T], dtype=tl.int32)
    for c0 in tl.static_range(0, KC, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cen = tl.load(cent_row + c[:, None] * stride_ck + d[None, :] * stride_cd,
                      mask=(c[:, None] < KC) & (d[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_C, DSP]
        csq = tl.sum(cen * cen, 1)  # [BLOCK_C]
        dist = csq[None, :] - 2.0 * tl.dot(x, tl.trans(cen), input_precision="ieee")  # [BLOCK_T, BLOCK_C]
        dist = tl.where(c[None, :] < KC, dist, float("inf"))
        cmin = tl.min(dist, 1)
        carg = tl.argmin(dist, 1) + c0
        better = cmin < best_d  # strict: an earlier chunk wins ties, like torch.argmin
        best_d = tl.where(better, cmin, best_d)
        best_i = tl.where(better, carg, best_i)
    tl.store(codes_ptr + b * stride_ob + h * stride_oh + t.to(tl.int64) * stride_ot + j * stride_om,
             best_i.to(tl.uint8), mask=t < T)
