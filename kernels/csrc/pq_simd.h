/* AVX-512 (F, BW, VL: what -march=native enables on Zen 4 / Ice Lake and later) for the selection loops; without
 * it their scalar loops (same results: the tests compare both builds, see native.py). Only the selection sources
 * include this: the intrinsics header alone takes ~0.3 s to parse. */
#ifndef PQ_SIMD_H
#define PQ_SIMD_H
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAS_AVX512 1
#else
#define HAS_AVX512 0
#endif
#endif
