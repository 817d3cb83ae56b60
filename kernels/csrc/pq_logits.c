/* Native CPU kernels of pqpatch's decode step: the logits of listed rows (sparse attention, re-ranking) and the
 * lookup table. Loaded through ctypes by kernels/native.py, which compiles the four sources (pq_logits.c,
 * pq_values.c, pq_select.c, pq_codes.c) into one shared object: plain C, no headers beyond the C library and the
 * compiler's, so they build in ~2 s with the system compiler and need no torch headers.
 *
 * Why native: a sparse decode step reads a few thousand scattered K/V rows (256-512 bytes) per KV head. Through
 * ATen that is index_select (a copy) then a matmul; the copy is latency bound (the hardware prefetchers do not
 * follow a scattered row list) and the rows are written and read a second time. Here each row is read once, in
 * the listed order, with software prefetches issued ahead from the index list itself: to L2 `PF_FAR` rows ahead
 * (enough misses in flight to cover DRAM latency) and to L1 `PF_NEAR` rows ahead, and the dot products (or the
 * value accumulation) happen while the row is in L1. Measured on the 2-core CI VM (AMD EPYC, 1 thread, 32K x 8
 * heads x 128 float32 keys on huge pages, 6820 ascending rows per head): 2.5 ms vs 7.8 ms for index_select + bmm.
 *
 * Layout conventions (all arrays contiguous, row-major):
 *   q      [T, G, D]   float32   one query group per row list (T = B * Hkv lists)
 *   src    [R, D]      float32 / bfloat16 / float16 rows of the flattened cache (row r = (b * Hkv + h) * N + n)
 *   rows   [T, S]      int64     row numbers into src; a negative entry is skipped (not read)
 *   logits [T, G, S]   float32   written: scale * (q . row) for every listed row (`fill` for a skipped entry)
 *   p      [T, G, S]   float32   softmax weights (a skipped entry's weight is ignored)
 *   out    [T, G, Dv]  float32   accumulated: out += sum_s p[:, :, s] * row_s
 * dtype codes: 0 float32, 1 bfloat16, 2 float16.
 */
#include "pq_rows.h"

int pq_has_dtype(int dtype) { return has_dtype(dtype); }

/* the logits of entries [s0, s1) of one list, one row at a time (inlined with runtime or constant shapes) */
static inline __attribute__((always_inline)) void logits_span(const span_t *a, int64_t g, int64_t d, int64_t s0,
                                                             int64_t s1) {
    /* the fields in locals: the loop stores floats, and reloading the fields after each store measured slower */
    const char *base = a->src;
    const int dtype = a->dtype;
    const int64_t *rows = a->rows + a->base_i, *ahead = a->rows;
    const int64_t rb = d * elem_bytes(dtype), total = a->total, i0 = a->base_i, ld = a->ld;
    const float *qt = a->q;
    const float scale = a->scale, fill = a->fill;
    float *out = a->out;
    float buf[MAX_DIM], dots[8];
    for (int64_t s = s0; s < s1; s++) {
        const int64_t i = i0 + s;
        if (i + PF_FAR < total && ahead[i + PF_FAR] >= 0) prefetch_row(base, ahead[i + PF_FAR], rb, 1);
        if (i + PF_NEAR < total && ahead[i + PF_NEAR] >= 0) prefetch_row(base, ahead[i + PF_NEAR], rb, 0);
        float *lo = out + s;
        if (rows[s] < 0) {
            for (int64_t h = 0; h < g; h++) lo[h * ld] = fill;
            continue;
        }
        const float *k = row_f32(base, dtype, rows[s], d, buf);
        for (int64_t h0 = 0; h0 < g; h0 += 8) {
            const int64_t w = g - h0 < 8 ? g - h0 : 8;
            row_dots_any(qt + h0 * d, k, d, w, dots);
            for (int64_t h = 0; h < w; h++) lo[(h0 + h) * ld] = dots[h] * scale;
        }
    }
}

/* noinline with runtime shapes: see the section comment (the constant-shape copy is slower on scattered rows) */
static __attribute__((noinline)) void logits_scattered(const span_t *a, int64_t d, int64_t s0, int64_t s1) {
    logits_span(a, a->g, d, s0, s1);
}

static __attribute__((noinline)) void logits_run(const span_t *a, int64_t d, int64_t s0, int64_t s1) {
#define LOGITS_CASE(G, D) if (a->g == G && d == D) { logits_span(a, G, D, s0, s1); return; }
    GD_CASES(LOGITS_CASE)
#undef LOGITS_CASE
    logits_span(a, a->g, d, s0, s1);
}

/* logits[t, g, s] = scale * (q[t, g] . src[rows[t, s]]); `fill` where rows[t, s] < 0. logits rows are ld floats
 * apart (ld >= s_count: the caller's buffer may hold more slots after these). Returns 0, or -1 for a bad argument. */
int pq_gather_logits(const float *q, const void *src, int dtype, const int64_t *rows, int64_t t_count,
                     int64_t g_count, int64_t s_count, int64_t d, float *logits, int64_t ld, float scale,
                     float fill) {
    if (!has_dtype(dtype) || d <= 0 || d > MAX_DIM || ld < s_count || g_count <= 0) return -1;
    for (int64_t t = 0; t < t_count; t++) {
        const span_t a = {q + t * g_count * d, (const char *)src, dtype, rows, t_count * s_count, t * s_count,
                          g_count, s_count, logits + t * g_count * ld, ld, scale, fill};
        for_spans(&a, d, logits_scattered, logits_run);
    }
    return 0;
}

/* ---- the lookup table of a decode step (cpu_select.pq_lut) -----------------------------------------------------
 * lut[r, mm, g, c] = scaling * (q[r, g, mm * Ds : (mm + 1) * Ds] . cent[r, mm, c, :]) for rows r (B * Hkv), sub-
 * spaces mm < m, query heads g < G, centroids c < K. Per centroid row the G dots share its loads (`row_dots`); the
 * query's sub-vectors are first copied contiguous (qs scratch: [G, Ds]). Why not ATen's bmm: on the CI VM the 16
 * small [4 x 64] x [64 x 256] products cost 0.07 ms warm but 0.33 ms after a layer's attention has evicted the
 * caches (0.2 ms of it with the data already cached: the library's code and dispatch), once per layer and step.
 * q: [rows, G, D] float32; cent: [rows, m, K, Ds] float32, contiguous; out: [rows, m, G, K]. */
int pq_lut(const float *q, const float *cent, int64_t rows, int64_t m, int64_t g, int64_t kc, int64_t ds,
           float scaling, float *out, float *qs) {
    if (m <= 0 || g <= 0 || kc <= 0 || ds <= 0 || ds > MAX_DIM) return -1;
    float dots[8];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t mm = 0; mm < m; mm++) {
            for (int64_t j = 0; j < g; j++) memcpy(qs + j * ds, q + (r * g + j) * m * ds + mm * ds, ds * sizeof(float));
            const float *cr = cent + (r * m + mm) * kc * ds;
            float *o = out + (r * m + mm) * g * kc;
            for (int64_t c = 0; c < kc; c++)
                for (int64_t h0 = 0; h0 < g; h0 += 8) {
                    const int64_t w = g - h0 < 8 ? g - h0 : 8;
                    row_dots_any(qs + h0 * ds, cr + c * ds, ds, w, dots);
                    for (int64_t h = 0; h < w; h++) o[(h0 + h) * kc + c] = dots[h] * scaling;
                }
        }
    return 0;
}
