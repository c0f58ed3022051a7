// SwiGLU on the CPU: y = silu(gate) * up, forward and backward, fp32/fp16/bf16, fp32 math.
//
//   forward   y     = g * sig(g) * u                                    reads g, u; writes y
//   backward  dgate = dy * u * sig(g) * (1 + g * (1 - sig(g)))          reads dy, g, u;
//             dup   = dy * g * sig(g)                                   writes dgate, dup
//
// gate/up/dy are [N, F] row views (unit stride along F, any row stride), so the halves of a fused
// [N, 2F] matmul output are read where they lie. Work is split over rows and, for few long rows, over
// column chunks (at::parallel_for over N * chunks). The inner loops are written for the compiler's
// vectoriser: sigmoid uses a branch-free exp (Cody-Waite reduction + degree-6 polynomial, ~1 ulp),
// since std::exp does not vectorise without -ffast-math / libmvec.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "common/swiglu_checks.h"

namespace baichuan {
namespace {

// exp(x) for x in fp32, branch-free so `#pragma omp simd` loops vectorise. Inputs are clamped to
// [-87.3, 88.7] (the result stays a normal float; silu's tails are unaffected at fp32 precision).
inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);  // round(x / ln2)
  float r = x - n * 0.693359375f;                                      // Cody-Waite: ln2 = hi + lo
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float g) { return 1.0f / (1.0f + vexp(-g)); }

// Columns per task: long rows are cut so that even N = 1 keeps every thread busy.
constexpr int64_t kChunk = 4096;

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
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const float gf = static_cast<float>(g[j]);
        yr[j] = static_cast<T>(gf * sigmoid(gf) * static_cast<float>(u[j]));
      }
    }
  });
}

template <typename T>
void swiglu_bwd_kernel(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, at::Tensor& dgate,
                       at::Tensor& dup) {
  const int64_t N = gate.size(0), F = gate.size(1);
  const int64_t ds = dy.stride(0), gs = gate.stride(0), us = up.stride(0);
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
      T* dg = dgp + i * F;
      T* du = dup_ + i * F;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const float gf = static_cast<float>(g[j]), df = static_cast<float>(d[j]);
        const float s = sigmoid(gf);
        const float silu = gf * s;
        du[j] = static_cast<T>(df * silu);
        dg[j] = static_cast<T>(df * static_cast<float>(u[j]) * (s + silu * (1.0f - s)));
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

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}

}  // namespace baichuan
