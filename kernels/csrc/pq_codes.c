/* Native CPU kernels of pqpatch's decode step: the PQ scores through the codes (kernels/native.py loads them). The
 * code table and the per-token scores of the top-k, the softmax denominators (one pass over the codes), and the
 * whole top-k of a sequence in one call. Radix select: pq_select.c. */
#include "pq_common.h"
#include "pq_simd.h"

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
        for (; c0 < kc; c0++) {  /* the last K % 16 entries (all of them for K < 16) */
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

/* Softmax denominators of the PQ logits over one sequence's candidates, per row (KV head) and query head:
 *   z[r, g] = sum_i ex0[r, c0_i, g] * ex1[r, c1_i, g]      (m = 2; m = 1: sum_i ex0[r, c0_i, g])
 * with ex = exp(lut - max over K) in float64, transposed and zero-padded to [rows, m, 256, G] (a token reads G
 * contiguous doubles; rows K..255 are zero). Computed as sum_c1 ex1[c1, g] * P[c1, g] with P[c1, g] = sum over
 * tokens with code c1 of ex0[c0, g]: per token G additions into the row of its c1 (256 x G arrays in L1). It
 * replaces the joint-code histogram (65536 zeroed bins per head for b = 8), its float64 copy and a bilinear matmul.
 * codes: token i of row r at codes + r * cs0 + i * cs1; part: [2 * 256 * G] float64 scratch. Returns 0, or -1 for a
 * bad argument or a code >= kc. */
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

/* ---- the whole PQ top-k of one sequence in one call (cpu_select.select_fused) ------------------------------------
 * Per row: the softmax denominators (z_row, the bits of pq_code_z), the two factor tables of the group score
 * score = sum_g fa[c1, g] * fb[g, c0] with fa[c1, g] = e1[g, c1] / z_g in float32 (for m = 1 one row, 1 / z_g) and
 * fb = e0: the factorised softmax of `cpu_select._code_scores`, whose float32 table is its ATen counterpart. Then
 * the code table (`build_table`), every token's score through its codes (`score_row`) and the radix select. One
 * call instead of ~20 ATen ops and three kernels between them (~0.2 ms per step warm, more with cold caches after
 * a layer's attention).
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
        pq_select_row(work, hist, cand, flag, n, kk, extra ? extra + r * x : 0, x, out + r * (kk + x), thr_out + r);
        if (!(thr_out[r] >= low)) return -3;
    }
    return 0;
}
