// RMSNorm (+ fused residual add) on the CPU: forward and backward, fp32/fp16/bf16, fp32 accumulation.
//
// Rows are spread over threads with at::parallel_for; each row is one pass of loads whose inner loops
// are written for the compiler's vectoriser (`#pragma omp simd`, -O3 -mavx2 -mfma -mf16c when the build
// CPU has them); bf16/fp16 rows are converted to fp32 scratch rows once (common/cpu_convert.h).
// dweight is reduced deterministically: rows are cut into a number of blocks that depends only on N
// (never on the thread count), each block writes its own fp32 partial row, and the partials are summed
// in block order.
//
// Shapes: x, residual, y, residual_out, dy, dx: [N, D]; weight, dweight: [D]; rstd: fp32 [N].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_convert.h"

namespace baichuan {
namespace {

// Per-thread fp32 scratch rows (length D each).
struct Scratch {
  std::vector<float> a, b, w;
  explicit Scratch(int64_t D) : a(D), b(D), w(D) {}
};

// Forward of one row: the row is converted to fp32 once (vectorised), normalised, converted back.
template <typename scalar_t>
void rms_norm_fwd_row(const scalar_t* x, const scalar_t* residual, scalar_t* y, scalar_t* residual_out, float* rstd,
                      Scratch& t, int64_t D, float eps) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  float* s = t.a.data();
  float* tmp = t.b.data();
  const float* w = t.w.data();
  if constexpr (kFloat) {
    if (residual == nullptr) s = const_cast<float*>(x);  // read in place: fp32 needs no conversion
  }
  if (s != static_cast<const void*>(x)) load_row_f32(x, s, D);
  if (residual != nullptr) {
    // s = x + residual, rounded to the storage dtype: the value later layers (and the backward) see.
    load_row_f32(residual, tmp, D);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) s[j] += tmp[j];
    store_row(s, residual_out, D);
    load_row_f32(residual_out, s, D);
  }
  double sumsq = 0.0;  // fp64 lanes: as accurate as torch's pairwise fp32 sum whatever the vectoriser does
#pragma omp simd reduction(+ : sumsq)
  for (int64_t j = 0; j < D; ++j) sumsq += static_cast<double>(s[j]) * s[j];
  const float r = static_cast<float>(1.0 / std::sqrt(sumsq / static_cast<double>(D) + eps));
  *rstd = r;
  float* out = tmp;
  if constexpr (kFloat) out = y;  // write in place
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) out[j] = s[j] * r * w[j];
  if constexpr (!kFloat) store_row(tmp, y, D);
}

template <typename scalar_t>
void rms_norm_fwd_kernel(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                         at::Tensor& y, at::Tensor& residual_out, at::Tensor& rstd, float eps) {
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* sp = residual.has_value() ? residual_out.data_ptr<scalar_t>() : nullptr;
  float* rsp = rstd.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    Scratch t(D);
    load_row_f32(wp, t.w.data(), D);
    for (int64_t i = begin; i < end; ++i) {
      rms_norm_fwd_row<scalar_t>(xp + i * D, rp ? rp + i * D : nullptr, yp + i * D, sp ? sp + i * D : nullptr,
                                 rsp + i, t, D, eps);
    }
  });
}

// Rows per dweight block: a function of N only, so the summation order never depends on threads.
int64_t rows_per_block(int64_t N) { return std::max<int64_t>(16, (N + 255) / 256); }

template <typename scalar_t>
void rms_norm_bwd_kernel(const at::Tensor& dy, const c10::optional<at::Tensor>& dresidual_out, const at::Tensor& s,
                         const at::Tensor& weight, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dweight) {
  const int64_t N = s.size(0), D = s.size(1);
  const int64_t block = rows_per_block(N);
  const int64_t num_blocks = (N + block - 1) / block;
  at::Tensor partial = at::empty({num_blocks, D}, s.options().dtype(at::kFloat));  // [num_blocks, D]
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* drp = dresidual_out.has_value() ? dresidual_out->data_ptr<scalar_t>() : nullptr;
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const float* rsp = rstd.data_ptr<float>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  float* pp = partial.data_ptr<float>();
  const double inv_d = 1.0 / static_cast<double>(D);

  at::parallel_for(0, num_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    Scratch t(D);
    std::vector<float> dres(drp != nullptr ? D : 0);
    float* g = t.a.data();     // dy, then dy · w
    float* xhat = t.b.data();  // s · r
    const float* w = t.w.data();
    load_row_f32(wp, t.w.data(), D);
    for (int64_t b = b_begin; b < b_end; ++b) {
      float* dw = pp + b * D;
      for (int64_t j = 0; j < D; ++j) dw[j] = 0.f;
      for (int64_t i = b * block; i < std::min(N, (b + 1) * block); ++i) {
        const float r = rsp[i];
        load_row_f32(dyp + i * D, g, D);
        load_row_f32(sp + i * D, xhat, D);
        double dot = 0.0;  // Σ_j g_j · xhat_j, fp64 lanes
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; ++j) {
          const float xh = xhat[j] * r;
          xhat[j] = xh;
          dw[j] += g[j] * xh;
          g[j] *= w[j];
          dot += static_cast<double>(g[j]) * xh;
        }
        const float mean_dot = static_cast<float>(dot * inv_d);
        if (drp != nullptr) {
          load_row_f32(drp + i * D, dres.data(), D);
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) g[j] = r * (g[j] - xhat[j] * mean_dot) + dres[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) g[j] = r * (g[j] - xhat[j] * mean_dot);
        }
        store_row(g, dxp + i * D, D);
      }
    }
  });

  // dweight[j] = Σ_b partial[b, j], summed in block order.
  at::Tensor dw32 = at::empty({D}, s.options().dtype(at::kFloat));
  float* dwp = dw32.data_ptr<float>();
  at::parallel_for(0, D, 1024, [&](int64_t j_begin, int64_t j_end) {
    for (int64_t j = j_begin; j < j_end; ++j) dwp[j] = 0.f;
    for (int64_t b = 0; b < num_blocks; ++b) {
      const float* row = pp + b * D;
#pragma omp simd
      for (int64_t j = j_begin; j < j_end; ++j) dwp[j] += row[j];
    }
  });
  dweight.copy_(dw32);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x,
                                                                const c10::optional<at::Tensor>& residual,
                                                                const at::Tensor& weight, double eps) {
  check_rms_norm_fwd(x, residual, weight);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor residual_out = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    rms_norm_fwd_kernel<scalar_t>(x, residual, weight, y, residual_out, rstd, static_cast<float>(eps));
  });
  return {y, residual_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy,
                                                    const c10::optional<at::Tensor>& dresidual_out,
                                                    const at::Tensor& s, const at::Tensor& weight,
                                                    const at::Tensor& rstd) {
  check_rms_norm_bwd(dy, dresidual_out, s, weight, rstd);
  TORCH_CHECK(s.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", s.device());
  at::Tensor dx = at::empty_like(s);
  at::Tensor dweight = at::empty_like(weight);
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(s.scalar_type(), "rms_norm_bwd_cpu", [&] {
    rms_norm_bwd_kernel<scalar_t>(dy, dresidual_out, s, weight, rstd, dx, dweight);
  });
  return {dx, dweight};
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace baichuan
