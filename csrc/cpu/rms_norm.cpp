// RMSNorm (+ fused residual add) on the CPU: forward and backward, fp32/fp16/bf16, fp32 accumulation.
//
// Rows are spread over threads with at::parallel_for; each row is one pass of loads whose inner loops
// are written for the compiler's vectoriser (`#pragma omp simd`, -O3 -mavx2 -mfma when the build CPU
// has them). dweight is reduced deterministically: rows are cut into a number of blocks that depends
// only on N (never on the thread count), each block writes its own fp32 partial row, and the partials
// are summed in block order.
//
// Shapes: x, residual, y, residual_out, dy, dx: [N, D]; weight, dweight: [D]; rstd: fp32 [N].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"

namespace baichuan {
namespace {

// Forward of one row. `s_row` (float scratch, length D) receives the normalised input in fp32.
template <typename scalar_t>
void rms_norm_fwd_row(const scalar_t* x, const scalar_t* residual, const scalar_t* weight, scalar_t* y,
                      scalar_t* residual_out, float* rstd, float* s_row, int64_t D, float eps) {
  float sumsq = 0.f;
  if (residual != nullptr) {
    // s = x + residual, rounded to the storage dtype: the value later layers (and the backward) see.
#pragma omp simd reduction(+ : sumsq)
    for (int64_t j = 0; j < D; ++j) {
      const scalar_t s = static_cast<scalar_t>(static_cast<float>(x[j]) + static_cast<float>(residual[j]));
      residual_out[j] = s;
      const float sf = static_cast<float>(s);
      s_row[j] = sf;
      sumsq += sf * sf;
    }
  } else {
#pragma omp simd reduction(+ : sumsq)
    for (int64_t j = 0; j < D; ++j) {
      const float sf = static_cast<float>(x[j]);
      s_row[j] = sf;
      sumsq += sf * sf;
    }
  }
  const float r = 1.f / std::sqrt(sumsq / static_cast<float>(D) + eps);
  *rstd = r;
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) {
    y[j] = static_cast<scalar_t>(s_row[j] * r * static_cast<float>(weight[j]));
  }
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
    std::vector<float> s_row(D);
    for (int64_t i = begin; i < end; ++i) {
      rms_norm_fwd_row<scalar_t>(xp + i * D, rp ? rp + i * D : nullptr, wp, yp + i * D, sp ? sp + i * D : nullptr,
                                 rsp + i, s_row.data(), D, eps);
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
  const float inv_d = 1.f / static_cast<float>(D);

  at::parallel_for(0, num_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> g(D), xhat(D);
    for (int64_t b = b_begin; b < b_end; ++b) {
      float* dw = pp + b * D;
      for (int64_t j = 0; j < D; ++j) dw[j] = 0.f;
      for (int64_t i = b * block; i < std::min(N, (b + 1) * block); ++i) {
        const scalar_t* dyr = dyp + i * D;
        const scalar_t* sr = sp + i * D;
        const float r = rsp[i];
        float dot = 0.f;  // Σ_j g_j · xhat_j
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; ++j) {
          const float dyj = static_cast<float>(dyr[j]);
          const float xh = static_cast<float>(sr[j]) * r;
          const float gj = dyj * static_cast<float>(wp[j]);
          xhat[j] = xh;
          g[j] = gj;
          dw[j] += dyj * xh;
          dot += gj * xh;
        }
        const float mean_dot = dot * inv_d;
        scalar_t* dxr = dxp + i * D;
        if (drp != nullptr) {
          const scalar_t* drr = drp + i * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j)
            dxr[j] = static_cast<scalar_t>(r * (g[j] - xhat[j] * mean_dot) + static_cast<float>(drr[j]));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) dxr[j] = static_cast<scalar_t>(r * (g[j] - xhat[j] * mean_dot));
        }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rms_norm_bwd_cpu", [&] {
    rms_norm_bwd_kernel<scalar_t>(dy, dresidual_out, s, weight, rstd, dx, dweight);
  });
  return {dx, dweight};
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace baichuan
