/* Shared helpers of the native CPU kernels (pq_logits.c, pq_values.c, pq_select.c, pq_codes.c; compiled together
 * into one shared object by kernels/native.py). Plain C: no headers beyond the C library and the compiler's intrinsics. */
#ifndef PQ_COMMON_H
#define PQ_COMMON_H
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
static inline int has_dtype(int dtype) { return dtype == 0 || dtype == 1 || (dtype == 2 && HAS_F16); }

typedef float v16f __attribute__((vector_size(64)));  /* GCC / clang vector extension: 16 floats */

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



/* The radix select of one row (pq_select.c), shared by every selection kernel: keys work[0..n) -> the kk best
 * positions ascending joined with the extra positions, out[0..kk + x), and the kk-th key as a float, thr_out. */
__attribute__((visibility("hidden"))) void pq_select_row(const uint32_t *work, int64_t *hist1, uint32_t *cand,
                                                        uint8_t *flag, int64_t n, int64_t kk, const int64_t *ex,
                                                        int64_t x, int64_t *o, float *thr_out);

#endif
