// AVX-512 inner kernels of the CPU quantized GEMV (csrc/cpu/quant_matmul.cpp), compiled with function
// target attributes and chosen at run time when the CPU has AVX-512 F+BW (the rest of the extension
// keeps the build's flags).
//
// Each call serves NR weight rows against MT (<= 4) x rows over a K range, so one x vector load feeds
// NR FMAs and one decoded weight vector feeds MT FMAs (32 zmm registers: NR*MT accumulators, twice
// that for 4-bit, plus NR weights and one x). Same arithmetic as the AVX2 kernels:
//   bits = 8:  out[r][m] += sum_k q[r, k] x[m, k]               (the row scale comes later)
//   bits = 4:  out[r][m] += sum_g s[r, g] * sum_{k in g} c[r, k] x[m, k]
//              with c = q (affine int4; the zero term is added by the caller) or codebook[q] (NF4,
//              one 16-lane permute: the codebook lives in a register).
// 4-bit x is permuted per 32 elements (the 16 even ones, then the 16 odd ones), matching one 16-byte
// load of 32 codes split into its low nibbles (even k) and high nibbles (odd k).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define BAICHUAN_HAVE_AVX512_PATH 1
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

// GCC 12's zmm zero idiom (_mm512_setzero_ps and friends start from an undefined register) trips
// -Wmaybe-uninitialized at every inlined use; the values are all defined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace baichuan {
namespace avx512 {

#define BAICHUAN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// BAICHUAN_NO_AVX512=1 in the environment (read once) keeps the AVX2 kernels (tests cover both).
inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         std::getenv("BAICHUAN_NO_AVX512") == nullptr;
  return ok;
}

// bits = 8: rows q + r * ldq (r < NR), codes [k0, k1) (k0 a multiple of 16), x rows xf + m * K.
// out[r * ostride + m] += the unscaled dot products.
template <int NR, int MT>
BAICHUAN_AVX512 void w8_block(const int8_t* q, int64_t ldq, const float* xf, int64_t K, int64_t k0, int64_t k1,
                              float* out, int64_t ostride) {
  __m512 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    __m512 w[NR];
    for (int r = 0; r < NR; ++r)
      w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * ldq + k))));
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(xf + m * K + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) {
      float tail = 0.f;
      for (int64_t kk = k; kk < k1; ++kk) tail += static_cast<float>(q[r * ldq + kk]) * xf[m * K + kk];
      out[r * ostride + m] += _mm512_reduce_add_ps(acc[r][m]) + tail;
    }
}

// bits = 4 / NF4: rows q + r * (K / 2), groups [g0, g1) of gs codes (gs a multiple of 32), scales
// s + r * G, x rows xp + m * K (permuted per 32). out[r * ostride + m] += the scaled group sums.
template <int NR, int MT, bool NF4>
BAICHUAN_AVX512 void w4_block(const uint8_t* q, const float* s, const float* cb, const float* xp, int64_t K,
                              int64_t gs, int64_t g0, int64_t g1, float* out, int64_t ostride) {
  const int64_t G = K / gs, ldq = K / 2;
  const __m512 table = NF4 ? _mm512_loadu_ps(cb) : _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi32(0xF);
  __m512 tot[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      __m512 lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * ldq + k / 2)));
        const __m512i cl = _mm512_and_si512(b, low4), ch = _mm512_srli_epi32(b, 4);
        lo[r] = NF4 ? _mm512_permutexvar_ps(cl, table) : _mm512_cvtepi32_ps(cl);  // codes k, k+2, ..., k+30
        hi[r] = NF4 ? _mm512_permutexvar_ps(ch, table) : _mm512_cvtepi32_ps(ch);  // codes k+1, ..., k+31
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 xe = _mm512_loadu_ps(xp + m * K + k), xo = _mm512_loadu_ps(xp + m * K + k + 16);
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(hi[r], xo, _mm512_fmadd_ps(lo[r], xe, acc[r][m]));
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 sv = _mm512_set1_ps(s[r * G + g]);
      for (int m = 0; m < MT; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[r * ostride + m] += _mm512_reduce_add_ps(tot[r][m]);
}

#undef BAICHUAN_AVX512

}  // namespace avx512
}  // namespace baichuan

#pragma GCC diagnostic pop
#endif
