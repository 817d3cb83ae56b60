"""Triton body of `pq_log_partition`: per-head log-sum-exp of the PQ logits over the candidates [lo, hi).

The per-token work is the PQ top-k's own (`kernels._triton.pq_topk`): `_lut_kernel` builds the row's lookup table
and `_stats_kernel` (grid (R, P), program p walks the blocks p, p + P, ... of [lo, hi)) gathers each token's
log2-scaled logits from it and keeps an online per-head (max, sum exp2) -> part[r, p, 2, GP]. `_merge_kernel`
(grid R) merges the P partials of a row into natural-log log-partitions [R, G], -inf for rows without candidates.
The grid is static and nothing reads device data on the host, so the launch sequence can be captured in a CUDA graph.
`pq_shortlist` launches the same merge on the partials of the PQ top-k's own statistics pass (no second pass).

Bytes per row: m * N code bytes (read once), the LUT (1-16 KiB, L1-resident) and 2 * P * GP * 4 of partials.
"""

import triton
import triton.language as tl


@triton.jit
def _merge_kernel(part_ptr, out_ptr, P, G: tl.constexpr, GP: tl.constexpr, PP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    pr = tl.arange(0, PP)
    g = tl.arange(0, GP)
    part = part_ptr + r * P * (2 * GP) + pr[:, None] * (2 * GP) + g[None, :]
    pmax = tl.load(part, mask=pr[:, None] < P, other=float("-inf"))  # [PP, GP]
    psum = tl.load(part + GP, mask=pr[:, None] < P, other=0.0)
    gmax = tl.max(pmax, 0)
    safe = tl.where(gmax == float("-inf"), 0.0, gmax)  # no candidate anywhere in the row: tot = 0 below
    tot = tl.sum(psum * tl.exp2(pmax - safe[None, :]), 0)
    lse2 = tl.where(tot > 0, safe + tl.log2(tl.where(tot > 0, tot, 1.0)), float("-inf"))
    tl.store(out_ptr + r * G + g, lse2 * 0.6931471805599453, mask=g < G)  # log2 -> natural log
