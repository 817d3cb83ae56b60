/* The span machinery shared by the row loops (pq_logits.c, pq_values.c): a row list is cut into contiguous runs
 * and scattered stretches, each taken by its own loop. */
#ifndef PQ_ROWS_H
#define PQ_ROWS_H
#include "pq_common.h"

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
 * shapes run the generic copy. The copies sum a row's products in different orders (the compiler reassociates the
 * vector reductions), so a row's logit can differ in the last bits between a run and a scattered stretch; the
 * tests compare both against float64 with a tolerance. */
#define GD_CASES(X) X(1, 64) X(1, 128) X(1, 256) X(2, 64) X(2, 128) X(2, 256) \
                    X(4, 64) X(4, 128) X(4, 256) X(8, 64) X(8, 128) X(8, 256)

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

typedef void (*span_fn)(const span_t *, int64_t, int64_t, int64_t);

/* end of the run of consecutive rows starting at s (a skipped entry is a run of its own) */
static inline int64_t run_end(const int64_t *r, int64_t s, int64_t n) {
    int64_t j = s + 1;
    if (r[s] < 0) return j;
    while (j < n && r[j] == r[j - 1] + 1) j++;
    return j;
}

/* calls scattered(a, d, s0, s1) and run(a, d, s0, s1) over one list's spans, in order */
static inline void for_spans(const span_t *a, int64_t d, span_fn scattered, span_fn run) {
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

#endif
