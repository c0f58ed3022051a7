// NormHead on the CPU: Ŵ[v] = W[v] / max(‖W[v]‖₂, eps) and its backward, fp32/fp16/bf16, fp32 math
// (the row's sum of squares in fp64).
//
// Rows are spread over threads with at::parallel_for; each row is one pass for the sum of squares and
// one for the output (`#pragma omp simd` inner loops). The backward of a row is
//   dW = rinv · (g − Ŵ (g·Ŵ))      when ‖W‖ ≥ eps (Ŵ = W · rinv in fp32),
//   dW = rinv · g                  otherwise (the divisor is the constant eps).
// Shapes: weight, w_hat, grad, dweight [V, D]; rinv fp32 [V] = 1 / max(‖W[v]‖, eps).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"

namespace baichuan {
namespace {

template <typename scalar_t>
void norm_head_fwd_kernel(const scalar_t* w, scalar_t* out, float* rinv, int64_t V, int64_t D, float eps) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, V, grain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const scalar_t* row = w + v * D;
      // fp64 sum of squares: an fp32 one overflows once ‖W[v]‖ > ~1.8e19 (bf16 weights reach 3.4e38)
      // and would give Ŵ = 0; 1 / ‖W‖ itself fits fp32 (down to its subnormals).
      double ss = 0.0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < D; ++j) ss += static_cast<double>(row[j]) * static_cast<double>(row[j]);
      const float r = static_cast<float>(1.0 / std::max(std::sqrt(ss), static_cast<double>(eps)));
      rinv[v] = r;
      scalar_t* o = out + v * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(static_cast<float>(row[j]) * r);
    }
  });
}

template <typename scalar_t>
void norm_head_bwd_kernel(const scalar_t* g, const scalar_t* w, const float* rinv, scalar_t* dw, int64_t V, int64_t D,
                          float eps) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, V, grain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const scalar_t* gr = g + v * D;
      const scalar_t* wr = w + v * D;
      const float r = rinv[v];
      const bool clamped = r >= 1.f / eps;  // ‖W‖ <= eps: constant divisor
      float dot = 0.f;                       // g · Ŵ
      // Ŵ = W · r first: g · W alone overflows fp32 for rows near the bf16 range.
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < D; ++j) dot += static_cast<float>(gr[j]) * (static_cast<float>(wr[j]) * r);
      if (clamped) dot = 0.f;
      scalar_t* o = dw + v * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j)
        o[j] = static_cast<scalar_t>(r * (static_cast<float>(gr[j]) - static_cast<float>(wr[j]) * r * dot));
    }
  });
}

void check_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, D], got shape ", weight.sizes());
  check_float(weight, "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor for the CPU kernel, got ", weight.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> norm_head_weight_fwd_cpu(const at::Tensor& weight, double eps) {
  check_weight(weight);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  at::Tensor out = at::empty_like(weight);
  at::Tensor rinv = at::empty({weight.size(0)}, weight.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "norm_head_weight_fwd_cpu", [&] {
    norm_head_fwd_kernel<scalar_t>(weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rinv.data_ptr<float>(),
                                   weight.size(0), weight.size(1), static_cast<float>(eps));
  });
  return {out, rinv};
}

at::Tensor norm_head_weight_bwd_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& rinv,
                                    double eps) {
  check_weight(weight);
  TORCH_CHECK(grad.sizes() == weight.sizes(), "grad must have the shape of weight ", weight.sizes(), ", got ",
              grad.sizes());
  check_same(grad, "grad", weight, "weight");
  check_contiguous(grad, "grad");
  TORCH_CHECK(rinv.dim() == 1 && rinv.size(0) == weight.size(0) && rinv.scalar_type() == at::kFloat,
              "rinv must be float32 [", weight.size(0), "], got ", rinv.scalar_type(), " ", rinv.sizes());
  check_contiguous(rinv, "rinv");
  at::Tensor dw = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "norm_head_weight_bwd_cpu", [&] {
    norm_head_bwd_kernel<scalar_t>(grad.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rinv.data_ptr<float>(),
                                   dw.data_ptr<scalar_t>(), weight.size(0), weight.size(1), static_cast<float>(eps));
  });
  return dw;
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("norm_head_weight_fwd", &norm_head_weight_fwd_cpu);
  m.impl("norm_head_weight_bwd", &norm_head_weight_bwd_cpu);
}

}  // namespace baichuan
