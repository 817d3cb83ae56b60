/* Native CPU kernels of pqpatch's decode step: the weighted sum of listed value rows (sparse attention). Layouts
 * and the span machinery: pq_logits.c, pq_rows.h. */
#include "pq_rows.h"

/* ot[h, :] += sum_u w[h][u] * v_u over 4 rows and the w_count <= 8 heads: each output chunk is loaded and stored
 * once per 4 rows (row by row, the output traffic of 2 x G x Dv floats per row bounds a contiguous run). */
static inline __attribute__((always_inline)) void rows4_axpy(const float *const v[4], const float wt[8][4],
                                                            int64_t dv, int64_t w_count, float *restrict ot) {
    const float *restrict v0 = v[0], *restrict v1 = v[1], *restrict v2 = v[2], *restrict v3 = v[3];
    for (int64_t h = 0; h < w_count; h++) {
        const float a0 = wt[h][0], a1 = wt[h][1], a2 = wt[h][2], a3 = wt[h][3];
        float *restrict og = ot + h * dv;
        for (int64_t j = 0; j < dv; j++) og[j] += a0 * v0[j] + a1 * v1[j] + a2 * v2[j] + a3 * v3[j];
    }
}

static const float zero_row[MAX_DIM];  /* what a missing entry of a block of 4 reads, with weight 0 */

/* a contiguous run (no skipped entry in it), 4 rows at a time */
static inline __attribute__((always_inline)) void values_block_span(const span_t *a, int64_t g, int64_t dv,
                                                                   int64_t s0, int64_t s1) {
    const char *base = a->src;
    const int dtype = a->dtype;
    const int64_t *rows = a->rows + a->base_i, *ahead = a->rows;
    const int64_t rb = dv * elem_bytes(dtype), total = a->total, i0 = a->base_i, sc = a->s_count;
    const float *pt = a->q;
    float *out = a->out;
    float buf[4][MAX_DIM], wt[8][4];
    for (int64_t s = s0; s < s1; s += 4) {
        const int64_t n4 = s1 - s < 4 ? s1 - s : 4;
        const float *v[4];
        for (int64_t u = 0; u < 4; u++) {
            const int64_t i = i0 + s + u;
            if (u < n4 && i + PF_FAR < total && ahead[i + PF_FAR] >= 0) prefetch_row(base, ahead[i + PF_FAR], rb, 1);
            if (u < n4 && i + PF_NEAR < total && ahead[i + PF_NEAR] >= 0) prefetch_row(base, ahead[i + PF_NEAR], rb, 0);
            v[u] = u < n4 ? row_f32(base, dtype, rows[s + u], dv, buf[u]) : zero_row;
        }
        for (int64_t h0 = 0; h0 < g; h0 += 8) {
            const int64_t w = g - h0 < 8 ? g - h0 : 8;
            for (int64_t h = 0; h < w; h++)
                for (int64_t u = 0; u < 4; u++) wt[h][u] = u < n4 ? pt[(h0 + h) * sc + s + u] : 0.0f;
            float *oh = out + h0 * dv;
            if (w == 4) rows4_axpy(v, wt, dv, 4, oh);
            else if (w == 8) rows4_axpy(v, wt, dv, 8, oh);
            else if (w == 1) rows4_axpy(v, wt, dv, 1, oh);
            else if (w == 2) rows4_axpy(v, wt, dv, 2, oh);
            else rows4_axpy(v, wt, dv, w, oh);
        }
    }
}

static __attribute__((noinline)) void values_run(const span_t *a, int64_t dv, int64_t s0, int64_t s1) {
#define VALUES_CASE(G, D) if (a->g == G && dv == D) { values_block_span(a, G, D, s0, s1); return; }
    GD_CASES(VALUES_CASE)
#undef VALUES_CASE
    values_block_span(a, a->g, dv, s0, s1);
}

/* scattered entries one row at a time (see the section comment); a weight of exactly 0 (an exp that underflowed)
 * adds nothing, so its row's values are not used */
static __attribute__((noinline)) void values_scattered(const span_t *a, int64_t dv, int64_t s0, int64_t s1) {
    const char *base = a->src;
    const int dtype = a->dtype;
    const int64_t *rows = a->rows + a->base_i, *ahead = a->rows;
    const int64_t rb = dv * elem_bytes(dtype), total = a->total, i0 = a->base_i, g = a->g, sc = a->s_count;
    const float *pt = a->q;
    float *ot = a->out;
    float buf[MAX_DIM];
    for (int64_t s = s0; s < s1; s++) {
        const int64_t i = i0 + s;
        if (i + PF_FAR < total && ahead[i + PF_FAR] >= 0) prefetch_row(base, ahead[i + PF_FAR], rb, 1);
        if (i + PF_NEAR < total && ahead[i + PF_NEAR] >= 0) prefetch_row(base, ahead[i + PF_NEAR], rb, 0);
        if (rows[s] < 0) continue;
        const float *v = row_f32(base, dtype, rows[s], dv, buf);
        for (int64_t h = 0; h < g; h++) {
            const float w = pt[h * sc + s];
            if (w == 0.0f) continue;
            float *og = ot + h * dv;
#pragma omp simd
            for (int64_t j = 0; j < dv; j++) og[j] += w * v[j];
        }
    }
}

/* out[t, g, :] += sum_s p[t, g, s] * src[rows[t, s]]; entries with rows[t, s] < 0 are skipped (not read; their
 * weight is ignored). A weight of exactly 0 adds nothing (up to a row holding inf or NaN, which a contiguous run
 * multiplies by 0 as the reference's matmul does). Returns 0, or -1 for a bad argument. */
int pq_gather_values(const float *p, const void *src, int dtype, const int64_t *rows, int64_t t_count,
                     int64_t g_count, int64_t s_count, int64_t dv, float *out) {
    if (!has_dtype(dtype) || dv <= 0 || dv > MAX_DIM || g_count <= 0) return -1;
    for (int64_t t = 0; t < t_count; t++) {
        const span_t a = {p + t * g_count * s_count, (const char *)src, dtype, rows, t_count * s_count,
                          t * s_count, g_count, s_count, out + t * g_count * dv, 0, 0.0f, 0.0f};
        for_spans(&a, dv, values_scattered, values_run);
    }
    return 0;
}
