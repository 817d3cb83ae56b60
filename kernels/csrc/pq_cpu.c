/* Native CPU kernels of pqpatch's decode step (loaded through ctypes by kernels/native.py; plain C, no headers
 * beyond the C library, so it compiles in well under a second with the system compiler and needs no torch headers).
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
#include <stdint.h>
#include <string.h>

#define PF_FAR 32
#define PF_NEAR 4
#define MAX_DIM 1024

static inline void prefetch_row(const char *base, int64_t row, int64_t row_bytes, int far) {
    const char *p = base + row * row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64) {
        if (far) __builtin_prefetch(p + b, 0, 1);
        else __builtin_prefetch(p + b, 0, 3);
    }
}

static inline void widen_bf16(const uint16_t *x, float *y, int64_t d) {
    for (int64_t i = 0; i < d; i++) {
        uint32_t u = (uint32_t)x[i] << 16;
        memcpy(&y[i], &u, 4);
    }
}

#ifdef __FLT16_MAX__
static inline void widen_f16(const _Float16 *x, float *y, int64_t d) {
    for (int64_t i = 0; i < d; i++) y[i] = (float)x[i];
}
#define HAS_F16 1
#else
#define HAS_F16 0
#endif

/* one row as float32: the row itself for float32, else widened into buf */
static inline const float *row_f32(const char *src, int dtype, int64_t row, int64_t d, float *buf) {
    if (dtype == 0) return (const float *)src + row * d;
    if (dtype == 1) { widen_bf16((const uint16_t *)src + row * d, buf, d); return buf; }
#if HAS_F16
    widen_f16((const _Float16 *)src + row * d, buf, d);
#endif
    return buf;
}

static inline int64_t elem_bytes(int dtype) { return dtype == 0 ? 4 : 2; }

/* Whether this build has the dtype (float16 needs the compiler's _Float16). */
int pq_has_dtype(int dtype) { return dtype == 0 || dtype == 1 || (dtype == 2 && HAS_F16); }

typedef float v16f __attribute__((vector_size(64)));  /* GCC / clang vector extension: 16 floats */

/* ---- row loops: scattered spans and contiguous runs ----------------------------------------------------------
 * A row list mixes scattered rows (a selection) and contiguous runs (the sink and the recent window). The two want
 * different loops, measured on the CI VM (AMD EPYC, 8 x 6820 rows of 128 float32 on huge pages, G = 4):
 *   - scattered rows are bound by memory latency and the software prefetches carry them; the loops compiled for a
 *     runtime head dim keep the prefetches effective (logits 2.2 ms, values 2.4 ms). The same loops compiled with
 *     constant shapes (fully unrolled, each row's 8 lines demanded at once) ran 2x slower, with or without the
 *     prefetches (5.0-5.3 ms): they, not the prefetches, then set how many misses are in flight;
 *   - contiguous runs are streamed by the hardware prefetcher and bound by arithmetic: there the constant-shape
 *     copies with independent per-head accumulators win (8 x 3278 rows: logits 0.92 -> 0.42 ms, values 0.97 ->
 *     0.40 ms against a 0.45 ms plain read of the same bytes).
 * So each row list is cut into runs of >= RUN_MIN consecutive rows, taken by the contiguous loops, and the
 * stretches between them, taken by the scattered loops. The prefetches look ahead over the flat list either way. */
#define RUN_MIN 16

/* The (query heads per KV head, head dim) pairs whose contiguous-run loops get a constant-shape copy. Other
 * shapes run the generic copy (same results). */
#define GD_CASES(X) X(1, 64) X(1, 128) X(1, 256) X(2, 64) X(2, 128) X(2, 256) \
                    X(4, 64) X(4, 128) X(4, 256) X(8, 64) X(8, 128) X(8, 256)

/* dots[h] = q_h . k for the w <= 8 query heads of one row, with independent 16-lane accumulators per head (one
 * accumulator per dot makes a row's d / 16 FMAs one dependency chain) and each chunk of the row loaded once for
 * all heads. Inlined with w constant. */
static inline __attribute__((always_inline)) void row_dots(const float *restrict qt, const float *restrict k,
                                                          int64_t d, int64_t w, float *restrict dots) {
    v16f acc[8];
    for (int64_t h = 0; h < w; h++) acc[h] = (v16f){0};
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        v16f x;
        memcpy(&x, k + j, sizeof x);
        for (int64_t h = 0; h < w; h++) {
            v16f y;
            memcpy(&y, qt + h * d + j, sizeof y);
            acc[h] += x * y;
        }
    }
    for (int64_t h = 0; h < w; h++) {
        float s = 0.0f;
        for (int64_t l = 0; l < 16; l++) s += acc[h][l];
        for (int64_t jj = j; jj < d; jj++) s += qt[h * d + jj] * k[jj];  /* d not a multiple of 16 */
        dots[h] = s;
    }
}

static inline __attribute__((always_inline)) void row_dots_any(const float *qt, const float *k, int64_t d,
                                                              int64_t g, float *dots) {
    for (int64_t h0 = 0; h0 < g; h0 += 8) {  /* heads in groups of up to 8 */
        const int64_t w = g - h0 < 8 ? g - h0 : 8;
        const float *qh = qt + h0 * d;
        if (w == 4) row_dots(qh, k, d, 4, dots + h0);
        else if (w == 8) row_dots(qh, k, d, 8, dots + h0);
        else if (w == 1) row_dots(qh, k, d, 1, dots + h0);
        else if (w == 2) row_dots(qh, k, d, 2, dots + h0);
        else row_dots(qh, k, d, w, dots + h0);
    }
}

/* The arguments of one span of one row list: entries s in [s0, s1) of list t, flat index i = base_i + s. */
typedef struct {
    const float *q;      /* [G, D] this list's query group (logits) or [G, S] its weights (values) */
    const char *src;
    int dtype;
    const int64_t *rows; /* the whole flat [T * S] list: the prefetches look ahead across lists */
    int64_t total, base_i, g, s_count;
    float *out;          /* logits: this list's [G, ld] rows; values: its [G, Dv] accumulators */
    int64_t ld;
    float scale, fill;
} span_t;

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

/* end of the run of consecutive rows starting at s (a skipped entry is a run of its own) */
static inline int64_t run_end(const int64_t *r, int64_t s, int64_t n) {
    int64_t j = s + 1;
    if (r[s] < 0) return j;
    while (j < n && r[j] == r[j - 1] + 1) j++;
    return j;
}

/* calls scattered(a, d, s0, s1) and run(a, d, s0, s1) over one list's spans, in order */
static void for_spans(const span_t *a, int64_t d, void (*scattered)(const span_t *, int64_t, int64_t, int64_t),
                      void (*run)(const span_t *, int64_t, int64_t, int64_t)) {
    const int64_t *r = a->rows + a->base_i, n = a->s_count;
    int64_t s = 0;
    while (s < n) {
        int64_t b = s, e = n;
        while (b < n) {  /* the next run of >= RUN_MIN rows at or after s */
            e = run_end(r, b, n);
            if (e - b >= RUN_MIN) break;
            b = e;
        }
        if (b > s) scattered(a, d, s, b);
        if (b < n) run(a, d, b, e);
        s = b < n ? e : n;
    }
}

/* logits[t, g, s] = scale * (q[t, g] . src[rows[t, s]]); `fill` where rows[t, s] < 0. logits rows are ld floats
 * apart (ld >= s_count: the caller's buffer may hold more slots after these). Returns 0, or -1 for a bad argument. */
int pq_gather_logits(const float *q, const void *src, int dtype, const int64_t *rows, int64_t t_count,
                     int64_t g_count, int64_t s_count, int64_t d, float *logits, int64_t ld, float scale,
                     float fill) {
    if (!pq_has_dtype(dtype) || d <= 0 || d > MAX_DIM || ld < s_count || g_count <= 0) return -1;
    for (int64_t t = 0; t < t_count; t++) {
        const span_t a = {q + t * g_count * d, (const char *)src, dtype, rows, t_count * s_count, t * s_count,
                          g_count, s_count, logits + t * g_count * ld, ld, scale, fill};
        for_spans(&a, d, logits_scattered, logits_run);
    }
    return 0;
}

/* out[t, g, :] += sum_s p[t, g, s] * src[rows[t, s]]; entries with rows[t, s] < 0 are skipped (not read; their
 * weight is ignored). A weight of exactly 0 adds nothing (up to a row holding inf or NaN, which a contiguous run
 * multiplies by 0 as the reference's matmul does). Returns 0, or -1 for a bad argument. */
int pq_gather_values(const float *p, const void *src, int dtype, const int64_t *rows, int64_t t_count,
                     int64_t g_count, int64_t s_count, int64_t dv, float *out) {
    if (!pq_has_dtype(dtype) || dv <= 0 || dv > MAX_DIM || g_count <= 0) return -1;
    for (int64_t t = 0; t < t_count; t++) {
        const span_t a = {p + t * g_count * s_count, (const char *)src, dtype, rows, t_count * s_count,
                          t * s_count, g_count, s_count, out + t * g_count * dv, 0, 0.0f, 0.0f};
        for_spans(&a, dv, values_scattered, values_run);
    }
    return 0;
}

/* ---- top-k selection over non-negative float scores (the PQ shortlist) ----------------------------------------
 * For each of `rows` rows of n scores: the kk best, ties at the k-th score going to the earliest positions, joined
 * with up to x extra positions (-1 = none), written ascending then -1: out [rows, kk + x] int64. Non-negative floats
 * order like their bits, so the k-th largest is found by a radix select on the bits: one counting pass over 2048
 * buckets of the high bits, then the bucket's members (compacted) are resolved with two more digit passes.
 * thr_out [rows]: the k-th largest score. work, cand: [n] uint32 scratch; flag: [n] bytes, all zero (left zero).
 * Return codes: 0; -2 when a score is NaN or negative (the caller reports it); -1 for a bad argument.
 *
 * With AVX-512 (F, BW, VL; what -march=native enables on Zen 4 / Ice Lake and later) the full passes over a row run
 * 16 tokens per instruction: the table lookups are gathers, the bucket compaction and the emitting pass compress
 * the kept lanes (into a register, then one unaligned store: compress-to-memory is microcoded on Zen 4). Measured
 * per head of 32K tokens on the CI VM: emitting 45 -> 4 us, compaction 18 -> 3 us, scoring 28 -> 18 us plus the
 * histogram. Without it the scalar loops below (same results: the tests run both builds, see native.py).
 */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAS_AVX512 1
#else
#define HAS_AVX512 0
#endif

/* Whether this build has the AVX-512 loops (reported by native.py; the tests compare both builds). */
int pq_has_avx512(void) { return HAS_AVX512; }

static int64_t pick_digit(const int64_t *hist, int64_t nb, int64_t *need) {
    int64_t cum = 0;
    for (int64_t d = nb - 1; d >= 0; d--) {
        if (cum + hist[d] >= *need) { *need -= cum; return d; }
        cum += hist[d];
    }
    return 0;  /* unreachable when need <= number of keys */
}

/* cand[0..m) = the keys of work[0..n) whose top 11 bits are d1, in order; returns m */
static int64_t compact_bucket(const uint32_t *work, int64_t n, uint32_t d1, uint32_t *cand) {
    int64_t m = 0, i = 0;
#if HAS_AVX512
    const __m512i vd = _mm512_set1_epi32((int)d1);
    for (; i + 16 <= n; i += 16) {  /* m <= i: the 16-lane store stays inside cand[0..n) */
        const __m512i k = _mm512_loadu_si512(work + i);
        const __mmask16 keep = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(k, 20), vd);
        _mm512_storeu_si512(cand + m, _mm512_maskz_compress_epi32(keep, k));
        m += __builtin_popcount(keep);
    }
#endif
    for (; i < n; i++) {  /* branch-free: the bucket test is unpredictable */
        cand[m] = work[i];
        m += (work[i] >> 20) == d1;
    }
    return m;
}

/* The positions kept (key above thr, the first `need` keys equal to thr, flagged), ascending, into cand; returns
 * their count. flag: [n] bytes or NULL (no extra positions). */
static int64_t emit_kept(const uint32_t *work, const uint8_t *flag, int64_t n, uint32_t thr, int64_t need,
                         uint32_t *cand) {
    int64_t c = 0, i = 0;
#if HAS_AVX512
    const __m512i vt = _mm512_set1_epi32((int)thr), v16 = _mm512_set1_epi32(16);
    __m512i vi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {  /* c <= i: the 16-lane store stays inside cand[0..n) */
        const __m512i k = _mm512_loadu_si512(work + i);
        __mmask16 keep = _mm512_cmpgt_epu32_mask(k, vt);
        __mmask16 tie = _mm512_cmpeq_epi32_mask(k, vt);
        if (flag) {
            const __m128i f = _mm_loadu_si128((const __m128i *)(flag + i));
            keep |= _mm_test_epi8_mask(f, f);
        }
        for (; tie && need > 0; need--) {  /* ties in position order: the lowest lanes first */
            keep |= tie & (__mmask16)(-tie);
            tie &= tie - 1;
        }
        _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi32(keep, vi));
        c += __builtin_popcount(keep);
        vi = _mm512_add_epi32(vi, v16);
    }
#endif
    for (; i < n; i++) {  /* branch-free: a position is written always (into cand: index c <= i < n, in bounds)
                             and kept when selected */
        const uint32_t k = work[i];
        const int64_t tie = (k == thr) & (need > 0);
        need -= tie;
        cand[c] = (uint32_t)i;
        c += (k > thr) | tie | (flag ? flag[i] : 0);
    }
    return c;
}

/* one row: keys work[0..n) -> out[0..kk+x), thr_out */
/* hist1: the keys' level-1 histogram (bits 30..20; keys < 2^31), counted by the caller in the pass that wrote them */
static void select_row(const uint32_t *work, int64_t *hist1, uint32_t *cand, uint8_t *flag, int64_t n, int64_t kk,
                       const int64_t *ex, int64_t x, int64_t *o, float *thr_out) {
    int64_t *hist = hist1;  /* [2048], reused for the next two digits */
    int64_t need = kk;
    const uint32_t d1 = (uint32_t)pick_digit(hist, 2048, &need);
    const int64_t m = compact_bucket(work, n, d1, cand);
    memset(hist, 0, 2048 * sizeof(int64_t));
    for (int64_t i = 0; i < m; i++) hist[(cand[i] >> 9) & 2047]++;  /* bits 19..9 among the bucket's members */
    const uint32_t d2 = (uint32_t)pick_digit(hist, 2048, &need);
    int64_t m2 = 0;
    for (int64_t i = 0; i < m; i++) {
        const uint32_t k = cand[i];
        cand[m2] = k;
        m2 += ((k >> 9) & 2047) == d2;
    }
    memset(hist, 0, 512 * sizeof(int64_t));
    for (int64_t i = 0; i < m2; i++) hist[cand[i] & 511]++;  /* bits 8..0 */
    const uint32_t d3 = (uint32_t)pick_digit(hist, 512, &need);
    const uint32_t thr = (d1 << 20) | (d2 << 9) | d3;  /* need: how many keys equal to thr to take */
    memcpy(thr_out, &thr, 4);
    /* emit, in position order: above thr, the first `need` ties, and the extra positions */
    int has_flag = 0;
    for (int64_t j = 0; j < x; j++)
        if (ex[j] >= 0 && ex[j] < n) { flag[ex[j]] = 1; has_flag = 1; }
    const int64_t c = emit_kept(work, has_flag ? flag : 0, n, thr, need, cand);
    for (int64_t j = 0; j < c; j++) o[j] = cand[j];
    for (int64_t j = 0; j < x; j++)
        if (ex[j] >= 0 && ex[j] < n) flag[ex[j]] = 0;
    for (int64_t j = c; j < kk + x; j++) o[j] = -1;
}

/* scores: [rows, n] float32 */
int pq_select_top(const float *scores, int64_t rows, int64_t n, int64_t kk, const int64_t *extra, int64_t x,
                  int64_t *out, float *thr_out, uint32_t *work, uint32_t *cand, uint8_t *flag) {
    if (kk <= 0 || kk > n) return -1;
    for (int64_t r = 0; r < rows; r++) {
        int bad = 0;
        const float *sr = scores + r * n;
        int64_t hist[2048];
        memset(hist, 0, sizeof(hist));
        for (int64_t i = 0; i < n; i++) {  /* keys and their level-1 histogram in one pass */
            uint32_t u;
            memcpy(&u, &sr[i], 4);
            bad |= !(sr[i] >= 0.0f);
            work[i] = u & 0x7fffffffu;  /* -0.0 reads as 0 */
            hist[work[i] >> 20]++;
        }
        if (bad) return -2;  /* NaN or negative */
        select_row(work, hist, cand, flag, n, kk, extra ? extra + r * x : 0, x, out + r * (kk + x), thr_out + r);
    }
    return 0;
}

/* ---- exact re-ranking (cpu_rerank): the score arithmetic around the exp, and the pick ---------------------------
 * The score of shortlist entry s of row t is sum_g exp(raw[t, g, s] - lz[t, g] - mx[t]) with mx[t] the row's
 * largest raw - lz (the per-head log-partitions lz are finite here: the caller replaced infinities by 0). The exp
 * stays in torch (`exp_`: the same bits as the ATen path); these two kernels replace the ~10 ATen passes around it
 * (copy, subtractions, max, group sum, masks, gathers: ~1 ms per layer at 8 x 6820 entries).
 * pq_rerank_prep: ws[t, g, s] = raw[t, g, s] - lz[t, g] - mx[t] (mx = 0 for a row with no finite entry). */
int pq_rerank_prep(const float *raw, const float *lz, int64_t t_count, int64_t g, int64_t s_count, float *ws) {
    if (g <= 0 || s_count <= 0) return -1;
    for (int64_t t = 0; t < t_count; t++) {
        const float *rt = raw + t * g * s_count;
        float *wt = ws + t * g * s_count;
        float mx = -__builtin_inff();
        for (int64_t h = 0; h < g; h++) {
            const float l = lz[t * g + h];
            const float *r = rt + h * s_count;
            float *w = wt + h * s_count;
            float m = -__builtin_inff();
            for (int64_t i = 0; i < s_count; i++) {
                w[i] = r[i] - l;
                m = w[i] > m ? w[i] : m;
            }
            mx = m > mx ? m : mx;
        }
        if (!(mx > -__builtin_inff() && mx < __builtin_inff())) mx = 0.0f;
        for (int64_t i = 0; i < g * s_count; i++) wt[i] -= mx;
    }
    return 0;
}

/* pq_rerank_pick: ex [T, G, S] = exp(ws); the entry scores sum_g ex[t, g, s] (in g order, as torch's sum over the
 * group), 0 for an empty entry (ix >= n: the caller sorts them to the row's tail), the kk best per row (ties to the
 * earliest), and their positions top[t, j] = ix[t, col] and exact logits sel[t, g, j] = raw[t, g, col] in slot order;
 * slots after the selected ones, and an empty entry taken as a tie, get -1 / -inf. top: [T, k], sel: [T, G, k];
 * work, cand: [S] uint32 scratch, flag: [S] zero bytes. Returns 0, -2 for a NaN score, -1 for a bad argument. */
int pq_rerank_pick(const float *ex, const float *raw, const int64_t *ix, int64_t n, int64_t t_count, int64_t g,
                   int64_t s_count, int64_t kk, int64_t k, int64_t *top, float *sel, uint32_t *work, uint32_t *cand,
                   uint8_t *flag) {
    if (g <= 0 || kk <= 0 || kk > s_count || kk > k) return -1;
    int64_t hist[2048];
    for (int64_t t = 0; t < t_count; t++) {
        const float *et = ex + t * g * s_count, *rt = raw + t * g * s_count;
        const int64_t *xt = ix + t * s_count;
        int bad = 0;
        memset(hist, 0, sizeof(hist));
        for (int64_t i = 0; i < s_count; i++) {
            float sc = 0.0f;
            if (xt[i] < n) {
                sc = et[i];
                for (int64_t h = 1; h < g; h++) sc += et[h * s_count + i];
            }
            uint32_t u;
            memcpy(&u, &sc, 4);
            bad |= !(sc >= 0.0f);
            work[i] = u & 0x7fffffffu;
            hist[work[i] >> 20]++;
        }
        if (bad) return -2;
        int64_t *tt = top + t * k;
        float thr;
        select_row(work, hist, cand, flag, s_count, kk, 0, 0, tt, &thr);  /* columns, ascending, into top */
        float *st = sel + t * g * k;
        for (int64_t j = 0; j < kk; j++) {
            const int64_t col = tt[j];
            const int ok = xt[col] < n;
            tt[j] = ok ? xt[col] : -1;
            for (int64_t h = 0; h < g; h++) st[h * k + j] = ok ? rt[h * s_count + col] : -__builtin_inff();
        }
        for (int64_t j = kk; j < k; j++) {
            tt[j] = -1;
            for (int64_t h = 0; h < g; h++) st[h * k + j] = -__builtin_inff();
        }
    }
    return 0;
}

/* One row's code table tab[c1 * 256 + c0] = sum_j a[c1, j] * b[j, c0] for c1 < r_count, c0 < kc (a: [R, G],
 * b: [G, K]). Row stride 256 whatever K: a token's entry is then tab[its two code bytes read as one little-endian
 * uint16], and no code byte can index outside the 65536-entry table. Blocked over c0 with the G products summed in
 * registers (restrict: no aliasing, so the compiler vectorises over c0). */
static void build_table(const float *restrict a, const float *restrict b, int64_t r_count, int64_t g, int64_t kc,
                        float *restrict tab) {
    for (int64_t c1 = 0; c1 < r_count; c1++) {
        const float *ar = a + c1 * g;
        float *t = tab + c1 * 256;
        int64_t c0 = 0;
        for (; c0 + 16 <= kc; c0 += 16) {  /* 16 entries in registers (one AVX-512 vector), G products each */
            float acc[16];
            for (int64_t l = 0; l < 16; l++) acc[l] = ar[0] * b[c0 + l];
            for (int64_t j = 1; j < g; j++)
                for (int64_t l = 0; l < 16; l++) acc[l] += ar[j] * b[j * kc + c0 + l];
            for (int64_t l = 0; l < 16; l++) t[c0 + l] = acc[l];
        }
        for (; c0 < kc; c0++) {  /* K < 16 (b <= 3) */
            float acc = 0.0f;
            for (int64_t j = 0; j < g; j++) acc += ar[j] * b[j * kc + c0];
            t[c0] = acc;
        }
    }
}

/* keys (score bits) of one row's n tokens through tab and their level-1 histogram. Returns bit 0: a code beyond the
 * table (c0 >= kc or c1 >= r_count), bit 1: a NaN or negative score. */
static int score_row(const float *tab, const uint8_t *cr, int64_t cs1, int64_t m, int64_t kc, int64_t r_count,
                     int64_t n, uint32_t *work, int64_t *hist) {
    int bad = 0;
    int64_t i = 0;
#if HAS_AVX512 && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (m == 2 && cs1 == 2) {  /* packed pairs: 16 tokens' (c0, c1) are 16 little-endian uint16 table indices */
        const __m512i low = _mm512_set1_epi32(0x7fffffff), byte = _mm512_set1_epi32(0xff);
        __m512i max0 = _mm512_setzero_si512(), max1 = _mm512_setzero_si512();
        __mmask16 neg = 0;
        for (; i + 256 <= n; i += 256) {
            for (int64_t s = i; s < i + 256; s += 16) {
                const __m512i j = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(cr + 2 * s)));
                max0 = _mm512_max_epu32(max0, _mm512_and_si512(j, byte));
                max1 = _mm512_max_epu32(max1, _mm512_srli_epi32(j, 8));
                const __m512 sc = _mm512_i32gather_ps(j, tab, 4);
                neg |= _mm512_cmp_ps_mask(sc, _mm512_setzero_ps(), _CMP_NGE_UQ);  /* NaN or < 0 */
                _mm512_storeu_si512(work + s, _mm512_and_si512(_mm512_castps_si512(sc), low));
            }
            /* counted once the block's stores have retired: a scalar load straight after a vector store of the
               same lanes does not forward and stalls (measured 4-8x slower) */
            for (int64_t s = i; s < i + 256; s++) hist[work[s] >> 20]++;
        }
        bad |= (_mm512_reduce_max_epu32(max0) >= (uint32_t)kc) | (_mm512_reduce_max_epu32(max1) >= (uint32_t)r_count);
        bad |= (neg != 0) << 1;
    }
#endif
    for (; i < n; i++) {  /* scores, keys and the level-1 histogram in one pass */
        const uint8_t *c = cr + i * cs1;
        const int64_t c0 = c[0], c1 = m == 2 ? c[1] : 0;
        bad |= (c0 >= kc) | (c1 >= r_count);
        const float sc = tab[c1 * 256 + c0];  /* in bounds for any code bytes (65536 entries) */
        uint32_t u;
        memcpy(&u, &sc, 4);
        bad |= (!(sc >= 0.0f)) << 1;
        work[i] = u & 0x7fffffffu;
        hist[work[i] >> 20]++;
    }
    return bad;
}

/* The PQ group score of token i of row r, from its codes (c0, c1) and two small per-row factor tables:
 *   score = sum_g fa[r, c1, g] * fb[r, g, c0]
 * (fa = exp(lut1 - max) / Z_g, fb = exp(lut0 - max): the factorised softmax of `cpu_select._code_scores`; m = 1
 * passes one fa row and reads c1 = 0). The row's code table (`build_table`, vectorised over c0; R x K floats at row
 * stride 256: 256 KB for b = 8, in L2) is built first, then read once per token: cheaper than G products per token,
 * and than one table for all rows (2 MB for 8 heads, a lookup per token then misses L2).
 * fa: [rows, R, G]; fb: [rows, G, K]; codes: uint8, token i of row r at codes + r * cs0 + i * cs1 (c0, then c1 at
 * +1 when m = 2); tab: [65536] float32 scratch (entries outside R x K are never initialised: a code that reads one
 * is reported, -1). */
int pq_select_top_pq(const float *fa, const float *fb, const uint8_t *codes, int64_t cs0, int64_t cs1, int64_t m,
                     int64_t g, int64_t r_count, int64_t kc, int64_t rows, int64_t n, int64_t kk,
                     const int64_t *extra, int64_t x, int64_t *out, float *thr_out, uint32_t *work, uint32_t *cand,
                     uint8_t *flag, float *tab) {
    if (kk <= 0 || kk > n || g <= 0 || (m != 1 && m != 2) || kc <= 0 || kc > 256 || r_count <= 0
        || r_count > 256 || (m == 1 && r_count != 1))
        return -1;
    for (int64_t r = 0; r < rows; r++) {
        build_table(fa + r * r_count * g, fb + r * g * kc, r_count, g, kc, tab);
        int64_t hist[2048];
        memset(hist, 0, sizeof(hist));
        const int bad = score_row(tab, codes + r * cs0, cs1, m, kc, r_count, n, work, hist);
        if (bad & 1) return -1;  /* a code beyond the centroids */
        if (bad) return -2;      /* NaN or negative */
        select_row(work, hist, cand, flag, n, kk, extra ? extra + r * x : 0, x, out + r * (kk + x), thr_out + r);
    }
    return 0;
}

typedef double v4d __attribute__((vector_size(32)));  /* GCC / clang vector extension: 4 doubles */

/* part[c1 * g + j] += a[j] for one token */
static inline __attribute__((always_inline)) void add_row(double *p, const double *a, int64_t g) {
    if (g % 4 == 0) {  /* whole 4-double vectors: a row's loads and stores have one width, so a store forwards to
                          the next load of the same row (mixed widths stall) */
        for (int64_t j = 0; j < g; j += 4) {
            v4d x, y;
            memcpy(&x, a + j, sizeof x);
            memcpy(&y, p + j, sizeof y);
            y += x;
            memcpy(p + j, &y, sizeof y);
        }
    } else {
        for (int64_t j = 0; j < g; j++) p[j] += a[j];
    }
}

/* one row of pq_code_z; always inlined so that pq_code_z gets copies with m, g and the code stride as constants.
 * Tokens alternate between two partial tables (even / odd), so two tokens with the same c1 in a row rarely wait
 * for each other's store. No clamping: e0 and part have 256 rows, so any code byte indexes inside them (a code
 * >= K reads a zero row of e0 and is reported). Measured on the CI VM, 8 heads x 32K tokens, G = 4: 0.18 ms, vs
 * 0.56 ms for the generic clamped loop with one table. */
static inline __attribute__((always_inline)) int z_row(const double *e0, const double *e1, const uint8_t *cr,
                                                      int64_t cs1, int64_t m, int64_t g, int64_t kc, int64_t n,
                                                      double *z, double *part) {
    const int64_t r_count = m == 2 ? kc : 1;
    double *part2 = part + 256 * g;
    uint32_t mx = 0;  /* set when a code is >= K (compared, not masked: K need not be a power of two) */
    memset(part, 0, (size_t)(2 * 256 * g) * sizeof(double));
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
        const uint8_t *c = cr + i * cs1, *d = c + cs1;
        const uint32_t c0 = c[0], c1 = m == 2 ? c[1] : 0, d0 = d[0], d1 = m == 2 ? d[1] : 0;
        mx |= (uint32_t)(c0 >= kc) | (uint32_t)(d0 >= kc) | (uint32_t)(c1 >= r_count) | (uint32_t)(d1 >= r_count);
        add_row(part + c1 * g, e0 + c0 * g, g);
        add_row(part2 + d1 * g, e0 + d0 * g, g);
    }
    for (; i < n; i++) {
        const uint8_t *c = cr + i * cs1;
        const uint32_t c0 = c[0], c1 = m == 2 ? c[1] : 0;
        mx |= (uint32_t)(c0 >= kc) | (uint32_t)(c1 >= r_count);
        add_row(part + c1 * g, e0 + c0 * g, g);
    }
    for (int64_t j = 0; j < g; j++) {
        double s = 0.0;
        for (int64_t c1 = 0; c1 < r_count; c1++)
            s += (part[c1 * g + j] + part2[c1 * g + j]) * (m == 2 ? e1[c1 * g + j] : 1.0);
        z[j] = s;
    }
    return mx != 0;
}

/* Softmax denominators of the PQ logits over one sequence's candidates, per row (KV head) and query head:
 *   z[r, g] = sum_i ex0[r, c0_i, g] * ex1[r, c1_i, g]      (m = 2; m = 1: sum_i ex0[r, c0_i, g])
 * with ex = exp(lut - max over K) in float64, transposed and zero-padded to [rows, m, 256, G] (a token reads G
 * contiguous doubles; rows K..255 are zero). Computed as sum_c1 ex1[c1, g] * P[c1, g] with P[c1, g] = sum over
 * tokens with code c1 of ex0[c0, g]: per token G additions into the row of its c1 (256 x G arrays in L1). It
 * replaces the joint-code histogram (65536 zeroed bins per head for b = 8), its float64 copy and a bilinear matmul.
 * codes: token i of row r at codes + r * cs0 + i * cs1; part: [2 * 256 * G] float64 scratch. Returns 0, or -1 for a
 * bad argument or a code >= kc. */
static int z_dispatch(const double *e0, const double *e1, const uint8_t *cr, int64_t cs1, int64_t m, int64_t g,
                      int64_t kc, int64_t n, double *zr, double *part) {
    /* the common shapes (packed codes; GQA groups of Llama-3 / Mistral / Qwen / Gemma) as constant copies */
    if (m == 2 && cs1 == 2 && g == 4) return z_row(e0, e1, cr, 2, 2, 4, kc, n, zr, part);
    if (m == 2 && cs1 == 2 && g == 8) return z_row(e0, e1, cr, 2, 2, 8, kc, n, zr, part);
    if (m == 2 && cs1 == 2 && g == 2) return z_row(e0, e1, cr, 2, 2, 2, kc, n, zr, part);
    if (m == 2 && cs1 == 2 && g == 1) return z_row(e0, e1, cr, 2, 2, 1, kc, n, zr, part);
    if (m == 2) return z_row(e0, e1, cr, cs1, 2, g, kc, n, zr, part);
    return z_row(e0, e1, cr, cs1, 1, g, kc, n, zr, part);
}

int pq_code_z(const double *ex, const uint8_t *codes, int64_t cs0, int64_t cs1, int64_t m, int64_t g, int64_t kc,
              int64_t rows, int64_t n, double *z, double *part) {
    if ((m != 1 && m != 2) || g <= 0 || kc <= 0 || kc > 256) return -1;
    int bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const double *e0 = ex + r * m * 256 * g, *e1 = e0 + 256 * g;
        bad |= z_dispatch(e0, e1, codes + r * cs0, cs1, m, g, kc, n, z + r * g, part);
    }
    return bad ? -1 : 0;
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

/* ---- the whole PQ top-k of one sequence in one call (cpu_select._select_fused) -----------------------------------
 * Per row: the softmax denominators (z_row, the bits of pq_code_z), the two factor tables of the group score
 * (fa[c1, g] = e1[g, c1] / z_g rounded to float32, fb = e0: `cpu_select._code_scores` with factors=True), the code
 * table, the scores and the radix select (pq_select_top_pq's loops). One call instead of ~20 ATen ops and three
 * kernels between them (~0.2 ms per step warm, more with cold caches after a layer's attention).
 * ex: [rows, m, G, K] float64, exp(lut - max over K); e32: [rows, m, G, K] float32, the same factors computed in
 * float32 (what `_code_scores` computes); z_out: [rows, G] float64, written. scratch: [4 * 256 * G] float64;
 * fscratch: [256 * G] float32; tab: [65536] float32. Returns 0; -1 bad argument / code >= K; -2 NaN or negative
 * score; -3 a denominator <= tiny (1e-20, compared in float32) or a threshold < low (1e-30): float32 factors lose
 * range there, and the caller redoes the row in float64 (`_code_scores(wide=True)`). */
int pq_topk_pq(const double *ex, const float *e32, const uint8_t *codes, int64_t cs0, int64_t cs1, int64_t m,
               int64_t g, int64_t kc, int64_t rows, int64_t n, int64_t kk, const int64_t *extra, int64_t x,
               int64_t *out, float *thr_out, double *z_out, float tiny, float low, uint32_t *work, uint32_t *cand,
               uint8_t *flag, float *tab, double *scratch, float *fscratch) {
    if ((m != 1 && m != 2) || g <= 0 || g > 256 || kc <= 0 || kc > 256 || kk <= 0 || kk > n) return -1;
    const int64_t r_count = m == 2 ? kc : 1;
    double *et = scratch, *part = scratch + 2 * 256 * g;  /* et: [m, 256, G] zero-padded, as pq_code_z reads */
    for (int64_t r = 0; r < rows; r++) {
        const double *er = ex + r * m * g * kc;
        memset(et, 0, (size_t)(2 * 256 * g) * sizeof(double));
        for (int64_t mm = 0; mm < m; mm++)
            for (int64_t j = 0; j < g; j++)
                for (int64_t c = 0; c < kc; c++) et[(mm * 256 + c) * g + j] = er[(mm * g + j) * kc + c];
        double *zr = z_out + r * g;
        const uint8_t *cr = codes + r * cs0;
        if (z_dispatch(et, et + 256 * g, cr, cs1, m, g, kc, n, zr, part)) return -1;
        float zf[256];  /* the denominators in float32, as `_code_scores` divides (g <= 256) */
        for (int64_t j = 0; j < g; j++) {
            zf[j] = (float)zr[j];
            if (!(zf[j] > tiny)) return -3;
        }
        const float *e0 = e32 + r * m * g * kc, *e1 = e0 + g * kc;  /* [G, K] each */
        for (int64_t c1 = 0; c1 < r_count; c1++)
            for (int64_t j = 0; j < g; j++) fscratch[c1 * g + j] = (m == 2 ? e1[j * kc + c1] : 1.0f) / zf[j];
        build_table(fscratch, e0, r_count, g, kc, tab);
        int64_t hist[2048];
        memset(hist, 0, sizeof(hist));
        const int bad = score_row(tab, cr, cs1, m, kc, r_count, n, work, hist);
        if (bad & 1) return -1;
        if (bad) return -2;
        select_row(work, hist, cand, flag, n, kk, extra ? extra + r * x : 0, x, out + r * (kk + x), thr_out + r);
        if (!(thr_out[r] >= low)) return -3;
    }
    return 0;
}
