/* Native CPU kernels of pqpatch's decode step: the radix top-k (kernels/native.py loads them).
 *
 * Top-k selection over non-negative float scores (the PQ shortlist, the re-ranking).
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
#include "pq_common.h"
#include "pq_simd.h"

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
void pq_select_row(const uint32_t *work, int64_t *hist1, uint32_t *cand, uint8_t *flag, int64_t n, int64_t kk,
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
        pq_select_row(work, hist, cand, flag, n, kk, extra ? extra + r * x : 0, x, out + r * (kk + x), thr_out + r);
    }
    return 0;
}

/* ---- exact re-ranking (cpu_rerank): the score arithmetic around the exp, and the pick ---------------------------
 * The score of shortlist entry s of row t is sum_g exp(raw[t, g, s] - lz[t, g] - mx[t]) with mx[t] the row's
 * largest raw - lz (the per-head log-partitions lz are finite here: the caller replaced infinities by 0). The exp
 * stays in torch (`exp_`: the same bits as the ATen path); these two kernels replace the ~10 ATen passes around it
 * (copy, subtractions, max, group sum, masks, gathers: ~1 ms per layer at 8 x 6820 entries).
 * pq_rerank_prep: ws[t, g, s] = raw[t, g, s] - lz[t, g] - mx[t] (mx = 0 where that maximum is not finite). */
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
        pq_select_row(work, hist, cand, flag, s_count, kk, 0, 0, tt, &thr);  /* columns, ascending, into top */
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
