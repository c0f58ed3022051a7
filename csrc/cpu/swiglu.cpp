// SwiGLU on the CPU: y = silu(gate) * up, forward and backward, fp32/fp16/bf16, fp32 math.
//
//   forward   y     = g * sig(g) * u                                    reads g, u; writes y
//   backward  dgate = dy * u * sig(g) * (1 + g * (1 - sig(g)))          reads dy, g, u;
//             dup   = dy * g * sig(g)                                   writes dgate, dup
//
// gate/up/dy are [N, F] row views (unit stride along F, any row stride), so the halves of a fused
// [N, 2F] matmul output are read where they lie. Work is split over rows and, for few long rows, over
// column chunks (at::parallel_for over N * chunks). The inner loops are written for the compiler's
// vectoriser, and the sigmoid runs on AVX2 + FMA intrinsics when available (sigmoid_array).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "common/swiglu_checks.h"

namespace baichuan {
namespace {

// sig[j] = 1 / (1 + exp(-g[j])) for n fp32 values. With AVX2 + FMA (the build adds -mavx2 -mfma
// when the build CPU has them): 8 lanes at a time, exp by Cody-Waite range reduction + a degree-6
// polynomial (max relative error ~8e-8, i.e. ~1 ulp) and an exact division. GCC does not vectorise
// std::exp (nor a hand-written polynomial with clamps: "control flow in loop"), hence intrinsics.
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 sigmoid8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 big = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), g);  // exp(-g)
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), big);
  const __m256 k = _mm256_sub_ps(t, big);                             // round(x / ln2)
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);    // x - k ln2 (hi part)
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), r);          //           (lo part)
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, one));  // e^r
  // 2^k from the integer in t's low mantissa bits
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000)),
                       _mm256_set1_epi32(127)),
      23);
  return _mm256_div_ps(one, _mm256_fmadd_ps(p, _mm256_castsi256_ps(e), one));
}
#endif

void sigmoid_array(const float* g, float* sig, int64_t n) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(sig + j, sigmoid8(_mm256_loadu_ps(g + j)));
#endif
  for (; j < n; ++j) sig[j] = 1.0f / (1.0f + std::exp(-g[j]));
}

// fp32 rows in one register pass (no staging through L1 tiles).
void swiglu_fwd_f32(const float* g, const float* u, float* y, int64_t n) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 <= n; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), _mm256_loadu_ps(u + j)));
  }
#endif
  for (; j < n; ++j) y[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
}

void swiglu_bwd_f32(const float* d, const float* g, const float* u, float* dg, float* du, int64_t n) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; j + 8 <= n; j += 8) {
    const __m256 dv = _mm256_loadu_ps(d + j), gv = _mm256_loadu_ps(g + j);
    const __m256 s = sigmoid8(gv), silu = _mm256_mul_ps(gv, s);
    _mm256_storeu_ps(du + j, _mm256_mul_ps(dv, silu));
    const __m256 dsilu = _mm256_fmadd_ps(silu, _mm256_sub_ps(one, s), s);  // s + silu (1 - s)
    _mm256_storeu_ps(dg + j, _mm256_mul_ps(_mm256_mul_ps(dv, _mm256_loadu_ps(u + j)), dsilu));
  }
#endif
  for (; j < n; ++j) {
    const float s = 1.0f / (1.0f + std::exp(-g[j])), silu = g[j] * s;
    du[j] = d[j] * silu;
    dg[j] = d[j] * u[j] * (s + silu * (1.0f - s));
  }
}

// Columns per task: long rows are cut so that even N = 1 keeps every thread busy; each task walks
// its columns in L1-resident tiles of kTile fp32 values.
constexpr int64_t kChunk = 4096;
constexpr int64_t kTile = 512;

template <typename T>
void swiglu_fwd_kernel(const at::Tensor& gate, const at::Tensor& up, at::Tensor& y) {
  const int64_t N = gate.size(0), F = gate.size(1);
  const int64_t gs = gate.stride(0), us = up.stride(0);
  const T* gp = gate.const_data_ptr<T>();
  const T* upp = up.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t chunks = (F + kChunk - 1) / kChunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / chunks, j0 = (task % chunks) * kChunk, j1 = std::min(F, j0 + kChunk);
      const T* g = gp + i * gs;
      const T* u = upp + i * us;
      T* yr = yp + i * F;
      if constexpr (std::is_same_v<T, float>) {
        swiglu_fwd_f32(g + j0, u + j0, yr + j0, j1 - j0);
        continue;
      }
      float gf[kTile], sig[kTile];
      for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
        const int64_t n = std::min(kTile, j1 - t0);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gf[j] = static_cast<float>(g[t0 + j]);
        sigmoid_array(gf, sig, n);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yr[t0 + j] = static_cast<T>(gf[j] * sig[j] * static_cast<float>(u[t0 + j]));
      }
    }
  });
}

template <typename T>
void swiglu_bwd_kernel(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, at::Tensor& dgate,
                       at::Tensor& dup) {
  const int64_t N = gate.size(0), F = gate.size(1);
  const int64_t ds = dy.stride(0), gs = gate.stride(0), us = up.stride(0);
  const int64_t dgs = dgate.stride(0), dus = dup.stride(0);  // F, or 2F for the halves of dh
  const T* dyp = dy.const_data_ptr<T>();
  const T* gp = gate.const_data_ptr<T>();
  const T* upp = up.const_data_ptr<T>();
  T* dgp = dgate.mutable_data_ptr<T>();
  T* dup_ = dup.mutable_data_ptr<T>();
  const int64_t chunks = (F + kChunk - 1) / kChunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / chunks, j0 = (task % chunks) * kChunk, j1 = std::min(F, j0 + kChunk);
      const T* d = dyp + i * ds;
      const T* g = gp + i * gs;
      const T* u = upp + i * us;
      T* dg = dgp + i * dgs;
      T* du = dup_ + i * dus;
      if constexpr (std::is_same_v<T, float>) {
        swiglu_bwd_f32(d + j0, g + j0, u + j0, dg + j0, du + j0, j1 - j0);
        continue;
      }
      float gf[kTile], sig[kTile];
      for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
        const int64_t n = std::min(kTile, j1 - t0);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gf[j] = static_cast<float>(g[t0 + j]);
        sigmoid_array(gf, sig, n);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float df = static_cast<float>(d[t0 + j]), s = sig[j], silu = gf[j] * s;
          du[t0 + j] = static_cast<T>(df * silu);
          dg[t0 + j] = static_cast<T>(df * static_cast<float>(u[t0 + j]) * (s + silu * (1.0f - s)));
        }
      }
    }
  });
}

}  // namespace

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_fwd(gate, up);
  TORCH_CHECK(gate.device().is_cpu(), "gate must be a CPU tensor for the CPU kernel, got ", gate.device());
  at::Tensor y = at::empty(gate.sizes(), gate.options());  // [N, F] contiguous
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd_cpu",
                                  [&] { swiglu_fwd_kernel<scalar_t>(gate, up, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate,
                                                  const at::Tensor& up) {
  check_swiglu_bwd(dy, gate, up);
  TORCH_CHECK(gate.device().is_cpu(), "gate must be a CPU tensor for the CPU kernel, got ", gate.device());
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  if (dgate.numel() == 0) return {dgate, dup};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd_cpu",
                                  [&] { swiglu_bwd_kernel<scalar_t>(dy, gate, up, dgate, dup); });
  return {dgate, dup};
}

// Fused layout: h [N, 2F] = [gate | up]. The forward reads the halves in place; the backward writes
// dgate and dup straight into the halves of one dh [N, 2F] (no zero-fill, no copies, no add).
at::Tensor swiglu_packed_fwd_cpu(const at::Tensor& h) {
  const int64_t F = check_swiglu_packed(h);
  return swiglu_fwd_cpu(h.narrow(1, 0, F), h.narrow(1, F, F));
}

at::Tensor swiglu_packed_bwd_cpu(const at::Tensor& dy, const at::Tensor& h) {
  const int64_t F = check_swiglu_packed(h);
  const at::Tensor gate = h.narrow(1, 0, F), up = h.narrow(1, F, F);
  check_swiglu_bwd(dy, gate, up);
  TORCH_CHECK(h.device().is_cpu(), "h must be a CPU tensor for the CPU kernel, got ", h.device());
  at::Tensor dh = at::empty({h.size(0), 2 * F}, h.options());
  if (dh.numel() == 0) return dh;
  at::Tensor dgate = dh.narrow(1, 0, F), dup = dh.narrow(1, F, F);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "swiglu_packed_bwd_cpu",
                                  [&] { swiglu_bwd_kernel<scalar_t>(dy, gate, up, dgate, dup); });
  return dh;
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
  m.impl("swiglu_packed_fwd", &swiglu_packed_fwd_cpu);
  m.impl("swiglu_packed_bwd", &swiglu_packed_bwd_cpu);
}

}  // namespace baichuan
