// Weight-only quantized matmul on the CPU: y[M, N] = x[M, K] @ dequantize(qweight)^T, fp32 accumulation.
//
// Formats: csrc/common/quant_matmul_checks.h (semantics: baichuan_kernels/reference/quant_matmul.py).
//
// GEMV path (M <= 16, decode): blocks of 16 rows of the packed weight are spread over threads
// (at::parallel_for); int4 rows are walked in K chunks whose fp32 x slice of all M rows fits L1
// (32 KiB; M = 1 at Baichuan widths: whole rows, streamed sequentially; int8: whole rows), and each
// row chunk is dequantised in registers (AVX2 when the build has it, a plain loop otherwise) once per
// tile of up to 4 x rows, accumulating in fp32. x is converted to fp32 once per call (M x K, small).
//   bits = 8:  y[m, n] = scale[n] * sum_k q[n, k] x[m, k]                       (q exact in fp32)
//   bits = 4:  y[m, n] = sum_g scale[n, g] * sum_{k in g} q[n, k] x[m, k] + zero[n, g] * xsum[m, g]
//              with xsum[m, g] = sum_{k in g} x[m, k] computed once per call. The codes are consumed
//              in the packed order: every 16-byte load holds 32 codes (k .. k+31), low nibbles = even
//              k, high nibbles = odd k, so x is pre-permuted once per call (per 16 elements: the 8
//              even ones, then the 8 odd ones) and each nibble vector meets a contiguous x vector.
//   NF4 (bits = 4 with a codebook): the same walk; a code becomes codebook[q] by a 16-entry lookup
//              in registers (AVX2: two 8-lane permutes, blended on bit 3 of the code), and
//              y[m, n] = sum_g absmax[n, g] * sum_{k in g} codebook[q[n, k]] x[m, k]  (no zero term).
// With AVX-512 F+BW at run time (csrc/cpu/quant_matmul_avx512.h) the GEMV runs 16-lane kernels that
// serve several weight rows per x load (x chunks of 16 KiB); same arithmetic, x permuted per 32.
// GEMM path (M > 16, prefill): blocks of weight rows are dequantised to fp32 (in parallel, ~8 MiB
// per block, w = q * scale + zero as in the reference) and multiplied with at::mm.
// Every output element is computed by one thread in a fixed order: results do not depend on threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "common/quant_matmul_checks.h"
#include "cpu/quant_matmul_avx512.h"

namespace baichuan {
namespace {

constexpr int64_t kGemvMaxM = 16;  // M above this takes the dequantise + at::mm path
constexpr int kTileM = 4;          // x rows served by one pass over a weight row
constexpr int64_t kRowBlock = 16;  // weight rows per block of the GEMV (accumulators: 16 x 16 floats)
constexpr int64_t kChunkFloats = 8192;  // the fp32 x chunk of all M rows kept in L1 (32 KiB)

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// ---------------------------------------------------------------------------------------------
// bits = 4, groups [g0, g1) of one weight row n against MT x rows, added to out[0 .. MT).
// q: K/2 bytes; s, z: [G]; xp: permuted fp32 x rows (stride K); xs: group sums of x (stride G).
// cb: the NF4 codebook [16] (then z and xs are unused) or nullptr (affine int4).
template <int MT, bool NF4>
void w4_gemv_row(const uint8_t* q, const float* s, const float* z, const float* cb, const float* xp, const float* xs,
                 int64_t K, int64_t gs, int64_t g0, int64_t g1, float* out) {
  const int64_t G = K / gs;
#ifdef __AVX2__
  const __m256 cb_lo = NF4 ? _mm256_loadu_ps(cb) : _mm256_setzero_ps();      // codebook[0..7]
  const __m256 cb_hi = NF4 ? _mm256_loadu_ps(cb + 8) : _mm256_setzero_ps();  // codebook[8..15]
  auto decode = [&](__m256i c) {  // 8 codes (int32 lanes, 0..15) -> 8 floats
    if (!NF4) return _mm256_cvtepi32_ps(c);
    const __m256 lo = _mm256_permutevar8x32_ps(cb_lo, c), hi = _mm256_permutevar8x32_ps(cb_hi, c);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // bit 3 -> sign
  };
  constexpr int NACC = MT == 1 ? 4 : 2;  // independent FMA chains per x row
  __m256 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi32(0xF);
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc[MT][NACC];
    for (int m = 0; m < MT; ++m)
      for (int a = 0; a < NACC; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {  // gs is a multiple of 32
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));  // codes k .. k+31
      const __m256i b0 = _mm256_cvtepu8_epi32(b);                                       // bytes 0..7
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));                    // bytes 8..15
      const __m256 lo0 = decode(_mm256_and_si256(b0, low4));  // k, k+2, ..., k+14
      const __m256 hi0 = decode(_mm256_srli_epi32(b0, 4));    // k+1, ..., k+15
      const __m256 lo1 = decode(_mm256_and_si256(b1, low4));  // k+16, ..., k+30
      const __m256 hi1 = decode(_mm256_srli_epi32(b1, 4));    // k+17, ..., k+31
      for (int m = 0; m < MT; ++m) {
        const float* xr = xp + m * K + k;
        acc[m][0] = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(xr), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(xr + 8), acc[m][1]);
        acc[m][NACC - 2] = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(xr + 16), acc[m][NACC - 2]);
        acc[m][NACC - 1] = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(xr + 24), acc[m][NACC - 1]);
      }
    }
    const __m256 sv = _mm256_set1_ps(s[g]);
    for (int m = 0; m < MT; ++m) {
      __m256 a = _mm256_add_ps(acc[m][0], acc[m][1]);
      if (NACC == 4) a = _mm256_add_ps(a, _mm256_add_ps(acc[m][NACC - 2], acc[m][NACC - 1]));
      tot[m] = _mm256_fmadd_ps(a, sv, tot[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] += hsum(tot[m]);
#else
  for (int64_t g = g0; g < g1; ++g) {
    for (int m = 0; m < MT; ++m) {
      const float* xr = xp + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; ++j) {  // byte j: codes 2j (low), 2j+1 (high)
        const int64_t c = j / 8 * 16 + j % 8;                     // position of code 2j in the permuted x
        const float wl = NF4 ? cb[q[j] & 0xF] : static_cast<float>(q[j] & 0xF);
        const float wh = NF4 ? cb[q[j] >> 4] : static_cast<float>(q[j] >> 4);
        acc += wl * xr[c] + wh * xr[c + 8];
      }
      out[m] += acc * s[g];
    }
  }
#endif
  if (NF4) return;
  for (int m = 0; m < MT; ++m) {
    float zx = 0.f;
    for (int64_t g = g0; g < g1; ++g) zx += z[g] * xs[m * G + g];
    out[m] += zx;
  }
}

// bits = 8, codes [k0, k1) of one weight row (K int8 codes; k0 a multiple of 16) against MT fp32 x rows
// (stride K): the unscaled dot products are added to out[0 .. MT).
template <int MT>
void w8_gemv_row(const int8_t* q, const float* xf, int64_t K, int64_t k0, int64_t k1, float* out) {
  int64_t k = k0;
#ifdef __AVX2__
  __m256 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (; k + 16 <= k1; k += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] += hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
#endif
  for (int m = 0; m < MT; ++m) {
    const float* xr = xf + m * K;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t kk = k; kk < k1; ++kk) acc += static_cast<float>(q[kk]) * xr[kk];
    out[m] += acc;
  }
}

// x [M, K] -> fp32 x (bits = 8: as is; bits = 4: permuted per 2 * half: the half even elements, then
// the half odd ones; half = 8 for the AVX2 kernels, 16 for the AVX-512 ones) and, for bits = 4, xs [M, G].
template <typename scalar_t>
void prepare_x(const scalar_t* x, int64_t M, int64_t K, int64_t bits, int64_t gs, int half, float* xf, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* xr = x + m * K;
    float* out = xf + m * K;
    if (bits == 8) {
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(xr[k]);
      continue;
    }
    for (int64_t c = 0; c < K; c += 2 * half) {
      for (int j = 0; j < half; ++j) {
        out[c + j] = static_cast<float>(xr[c + 2 * j]);
        out[c + half + j] = static_cast<float>(xr[c + 2 * j + 1]);
      }
    }
    const int64_t G = K / gs;
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += static_cast<float>(xr[k]);
      xs[m * G + g] = acc;
    }
  }
}

#ifdef BAICHUAN_HAVE_AVX512_PATH
// One (rows, x-tile) step of the AVX-512 GEMV: NR weight rows from n, MT x rows from m0.
template <int NR, int MT>
void avx512_step(int64_t K, int64_t gs, int64_t bits, int64_t k0, int64_t k1, const float* xr, const float* sp,
                 const float* cb, const uint8_t* q4, const int8_t* q8, int64_t n, float* out) {
  if (bits == 8) {
    avx512::w8_block<NR, MT>(q8 + n * K, K, xr, K, k0, k1, out, kGemvMaxM);
  } else if (cb != nullptr) {
    avx512::w4_block<NR, MT, true>(q4 + n * (K / 2), sp + n * (K / gs), cb, xr, K, gs, k0 / gs, k1 / gs, out,
                                   kGemvMaxM);
  } else {
    avx512::w4_block<NR, MT, false>(q4 + n * (K / 2), sp + n * (K / gs), cb, xr, K, gs, k0 / gs, k1 / gs, out,
                                    kGemvMaxM);
  }
}

// Rows [n, n1) of one block against x rows [m0, m0 + MT): NR rows per call (w8: 4; 4-bit: 4, 4, 3, 2
// for MT = 1..4, what 32 zmm registers hold), single rows for the rest.
template <int MT>
void avx512_rows(int64_t K, int64_t gs, int64_t bits, int64_t k0, int64_t k1, const float* xr, const float* sp,
                 const float* cb, const uint8_t* q4, const int8_t* q8, int64_t n, int64_t n1, float* out) {
  constexpr int NR4 = MT <= 2 ? 4 : MT == 3 ? 3 : 2;
  const int nr = bits == 8 ? 4 : NR4;
  for (; n + nr <= n1; n += nr, out += nr * kGemvMaxM) {
    if (bits == 8) {
      avx512_step<4, MT>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n, out);
    } else {
      avx512_step<NR4, MT>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n, out);
    }
  }
  for (; n < n1; ++n, out += kGemvMaxM) avx512_step<1, MT>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n, out);
}

template <typename scalar_t>
void gemv_avx512(int64_t M, int64_t K, int64_t N, int64_t bits, int64_t gs, const float* xfp, const float* xsp,
                 const float* sp, const float* zp, const float* cb, const uint8_t* q4, const int8_t* q8,
                 scalar_t* yp) {
  const int64_t G = bits == 4 ? K / gs : 1;
  // The x chunk of all M rows: 16 KiB of fp32 (half of L1), a multiple of 128 (of every group size).
  const int64_t chunk = std::min<int64_t>(K, std::max<int64_t>(128, 4096 / M / 128 * 128));
  at::parallel_for(0, N, kRowBlock, [&](int64_t nb0, int64_t nb1) {
    float acc[kRowBlock * kGemvMaxM];
    for (int64_t n0 = nb0; n0 < nb1; n0 += kRowBlock) {
      const int64_t n1 = std::min(nb1, n0 + kRowBlock);
      std::fill(acc, acc + kRowBlock * kGemvMaxM, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t k1 = std::min(K, k0 + chunk);
        for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
          const float* xr = xfp + m0 * K;
          float* out = acc + m0;
          switch (std::min<int64_t>(kTileM, M - m0)) {
            case 1: avx512_rows<1>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n0, n1, out); break;
            case 2: avx512_rows<2>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n0, n1, out); break;
            case 3: avx512_rows<3>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n0, n1, out); break;
            default: avx512_rows<4>(K, gs, bits, k0, k1, xr, sp, cb, q4, q8, n0, n1, out); break;
          }
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        const float row_scale = bits == 8 ? sp[n] : 1.f;
        for (int64_t m = 0; m < M; ++m) {
          float v = acc[(n - n0) * kGemvMaxM + m];
          if (bits == 4 && cb == nullptr) {  // the zero term: sum_g zero[n, g] * xsum[m, g]
            float zx = 0.f;
            for (int64_t g = 0; g < G; ++g) zx += zp[n * G + g] * xsp[m * G + g];
            v += zx;
          }
          yp[m * N + n] = static_cast<scalar_t>(v * row_scale);
        }
      }
    }
  });
}
#endif

template <typename scalar_t>
void quant_gemv(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t gs, const float* cb, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qdata.size(0);
  const int64_t G = bits == 4 ? K / gs : 1;
  at::Tensor xf = at::empty({M, K}, x.options().dtype(at::kFloat));
  at::Tensor xs = at::empty({M, G}, x.options().dtype(at::kFloat));
#ifdef BAICHUAN_HAVE_AVX512_PATH
  const bool wide = avx512::available();
#else
  const bool wide = false;
#endif
  prepare_x<scalar_t>(x.data_ptr<scalar_t>(), M, K, bits, gs, wide ? 16 : 8, xf.data_ptr<float>(),
                      xs.data_ptr<float>());
  const float* xfp = xf.data_ptr<float>();
  const float* xsp = xs.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = bits == 4 && cb == nullptr ? zeros->data_ptr<float>() : nullptr;
  const uint8_t* q4 = bits == 4 ? qdata.data_ptr<uint8_t>() : nullptr;
  const int8_t* q8 = bits == 8 ? qdata.data_ptr<int8_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  // Blocks of kRowBlock weight rows per task; K in chunks so that the x chunk of all M rows (32 KiB
  // fp32) stays in L1 while the rows of the block stream past it (M = 1: whole rows, sequential).
  // A chunk is a multiple of 128: of every group size and of the 16-code vector step. int8 rows are
  // walked whole (measured faster at M = 4 and 16 on a 2-core Zen 5: one sequential stream per row).
  const int64_t chunk = bits == 8 ? K : std::max<int64_t>(128, kChunkFloats / M / 128 * 128);
#ifdef BAICHUAN_HAVE_AVX512_PATH
  if (wide) {
    gemv_avx512(M, K, N, bits, gs, xfp, xsp, sp, zp, cb, q4, q8, yp);
    return;
  }
#endif
  at::parallel_for(0, N, kRowBlock, [&](int64_t nb0, int64_t nb1) {
    float acc[kRowBlock * kGemvMaxM];
    for (int64_t n0 = nb0; n0 < nb1; n0 += kRowBlock) {
      const int64_t n1 = std::min(nb1, n0 + kRowBlock);
      std::fill(acc, acc + kRowBlock * kGemvMaxM, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t k1 = std::min(K, k0 + chunk);
        for (int64_t n = n0; n < n1; ++n) {
          float* out_n = acc + (n - n0) * kGemvMaxM;
          for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
            const int mt = static_cast<int>(std::min<int64_t>(kTileM, M - m0));
            const float* xr = xfp + m0 * K;
            float* out = out_n + m0;
            if (bits == 4) {
              const uint8_t* q = q4 + n * (K / 2);
              const float *s = sp + n * G, *z = zp == nullptr ? nullptr : zp + n * G, *xsr = xsp + m0 * G;
              const int64_t g0 = k0 / gs, g1 = k1 / gs;
              if (cb != nullptr) {
                switch (mt) {
                  case 1: w4_gemv_row<1, true>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                  case 2: w4_gemv_row<2, true>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                  case 3: w4_gemv_row<3, true>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                  default: w4_gemv_row<4, true>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                }
              } else {
                switch (mt) {
                  case 1: w4_gemv_row<1, false>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                  case 2: w4_gemv_row<2, false>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                  case 3: w4_gemv_row<3, false>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                  default: w4_gemv_row<4, false>(q, s, z, cb, xr, xsr, K, gs, g0, g1, out); break;
                }
              }
            } else {
              const int8_t* q = q8 + n * K;
              switch (mt) {
                case 1: w8_gemv_row<1>(q, xr, K, k0, k1, out); break;
                case 2: w8_gemv_row<2>(q, xr, K, k0, k1, out); break;
                case 3: w8_gemv_row<3>(q, xr, K, k0, k1, out); break;
                default: w8_gemv_row<4>(q, xr, K, k0, k1, out); break;
              }
            }
          }
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        const float row_scale = bits == 8 ? sp[n] : 1.f;
        for (int64_t m = 0; m < M; ++m)
          yp[m * N + n] = static_cast<scalar_t>(acc[(n - n0) * kGemvMaxM + m] * row_scale);
      }
    }
  });
}

// Dequantise weight rows [n0, n0 + nb) into w [nb, K] fp32 (the reference's q * scale + zero, or
// codebook[q] * scale for NF4).
void dequantize_rows(const at::Tensor& qdata, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                     int64_t bits, int64_t gs, const float* cb, int64_t n0, int64_t nb, float* w) {
  const int64_t K = bits == 4 ? qdata.size(1) * 2 : qdata.size(1);
  const float* sp = scales.data_ptr<float>();
  at::parallel_for(0, nb, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = n0 + i;
      float* wr = w + i * K;
      if (bits == 8) {
        const int8_t* q = qdata.data_ptr<int8_t>() + n * K;
        const float s = sp[n];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) wr[k] = static_cast<float>(q[k]) * s;
        continue;
      }
      const int64_t G = K / gs;
      const uint8_t* q = qdata.data_ptr<uint8_t>() + n * (K / 2);
      if (cb != nullptr) {
        for (int64_t g = 0; g < G; ++g) {
          const float s = sp[n * G + g];
          for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; ++j) {
            wr[2 * j] = cb[q[j] & 0xF] * s;
            wr[2 * j + 1] = cb[q[j] >> 4] * s;
          }
        }
        continue;
      }
      const float* zp = zeros->data_ptr<float>() + n * G;
      for (int64_t g = 0; g < G; ++g) {
        const float s = sp[n * G + g], z = zp[g];
#pragma omp simd
        for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; ++j) {
          wr[2 * j] = static_cast<float>(q[j] & 0xF) * s + z;
          wr[2 * j + 1] = static_cast<float>(q[j] >> 4) * s + z;
        }
      }
    }
  });
}

at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t gs, const float* cb) {
  const int64_t M = x.size(0), K = x.size(1), N = qdata.size(0);
  at::Tensor xf = x.to(at::kFloat).contiguous();                      // [M, K]
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));     // [M, N]
  // ~8 MiB of fp32 weight rows per block (a multiple of 16 rows): stays in the last-level cache.
  const int64_t nb_max = std::min<int64_t>(N, std::max<int64_t>(16, (8 << 20) / (4 * K) / 16 * 16));
  at::Tensor w = at::empty({nb_max, K}, x.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, N - n0);
    dequantize_rows(qdata, scales, zeros, bits, gs, cb, n0, nb, w.data_ptr<float>());
    y.narrow(1, n0, nb).copy_(at::mm(xf, w.narrow(0, 0, nb).t()));  // [M, nb]
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

at::Tensor quant_matmul_fwd_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                                const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                const c10::optional<at::Tensor>& codebook) {
  const int64_t N = check_quant_matmul_fwd(x, qdata, scales, zeros, bits, group_size, codebook);
  const float* cb = codebook.has_value() ? codebook->data_ptr<float>() : nullptr;
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  const int64_t M = x.size(0);
  if (M == 0 || N == 0 || x.size(1) == 0) return at::zeros({M, N}, x.options());
  if (M > kGemvMaxM) return quant_gemm(x, qdata, scales, zeros, bits, group_size, cb);
  at::Tensor y = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quant_matmul_fwd_cpu", [&] {
    quant_gemv<scalar_t>(x, qdata, scales, zeros, bits, group_size, cb, y);
  });
  return y;
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) { m.impl("quant_matmul_fwd", &quant_matmul_fwd_cpu); }

}  // namespace baichuan
