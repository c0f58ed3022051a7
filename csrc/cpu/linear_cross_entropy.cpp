// Fused LM head (NormHead) + cross-entropy + max-z loss on the CPU: chunked at::mm GEMMs (fp32) and an
// at::parallel_for row kernel for the column scale, max / argmax, logsumexp, target logit and the
// gradient of the logits, in place on the one [C, V] fp32 chunk of logits. The chunk loop and the
// algorithm are described in csrc/common/linear_cross_entropy_checks.h.
//
// Shapes: hidden [N, D], weight [V, D], labels [N]; per-row outputs fp32 [N]; grads fp32 [N, D], [V, D].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/linear_cross_entropy_checks.h"

namespace baichuan {
namespace {

// One row of logits (length V, in place). Summation order fixed per row: deterministic.
void lce_row(const LceRows& a, int64_t i) {
  float* l = a.logits + i * a.V;
  const int64_t V = a.V;
  const int64_t y = a.labels[i];
  const bool keep = y != a.ignore_index;
  if (a.rinv != nullptr) {
    const float* r = a.rinv;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) l[v] *= r[v];
  }
  float m = -std::numeric_limits<float>::infinity();
  int64_t am = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (l[v] > m) {
      m = l[v];
      am = v;
    } else if (l[v] != l[v]) {  // a NaN logit: the max (and z) is NaN, as the reference's amax
      m = l[v];
      am = v;
      break;
    }
  }
  // Sum of exp in fp64 (a 125,696-term fp32 running sum would lose ~1e-5 relative).
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += static_cast<double>(std::exp(l[v] - m));
  // m = +inf (an infinite logit): logsumexp is +inf, as torch.logsumexp gives (inf - inf would be NaN).
  const float lse = m == std::numeric_limits<float>::infinity() ? m : m + static_cast<float>(std::log(s));
  a.ce[i] = keep ? lse - l[y] : 0.f;
  a.row_max[i] = keep ? m : 0.f;
  a.argmax[i] = keep ? am : 0;
  if (!a.grad) return;
  const float g = keep ? (a.row_grad != nullptr ? a.row_grad[i] : 1.f) : 0.f;
  if (g == 0.f) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) l[v] = 0.f;
    return;
  }
  for (int64_t v = 0; v < V; ++v) l[v] = g * std::exp(l[v] - lse);
  l[y] -= g;
  if (a.rinv != nullptr) {
    const float* r = a.rinv;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) l[v] *= r[v];
  }
}

void lce_rows_cpu(const LceRows& a) {
  at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) lce_row(a, i);
  });
}

void check_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, int64_t ignore_index) {
  check_linear_cross_entropy(hidden, weight, labels);
  TORCH_CHECK(hidden.device().is_cpu(), "hidden must be a CPU tensor for the CPU kernel, got ", hidden.device());
  check_labels_in_range(labels, weight.size(0), ignore_index);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                             bool norm_head, double z_loss_weight, int64_t ignore_index, c10::string_view reduction,
                             int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  check_cpu(hidden, weight, labels, ignore_index);
  const std::string red(reduction);
  check_reduction(red);
  auto [ce_rows, row_max, argmax, rinv, dh, dw] = lce_driver(hidden, weight, labels, c10::nullopt, norm_head,
                                                             ignore_index, chunk_size, grad_hidden, grad_weight,
                                                             lce_rows_cpu);
  auto [loss, ce, z] = lce_reduce(ce_rows, row_max, labels, ignore_index, z_loss_weight, red);
  return {loss, ce, z, row_max, argmax, rinv, dh, dw};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                const at::Tensor& labels, const at::Tensor& grad_rows,
                                                                bool norm_head, int64_t ignore_index,
                                                                int64_t chunk_size, bool grad_hidden,
                                                                bool grad_weight) {
  check_cpu(hidden, weight, labels, ignore_index);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == hidden.size(0), "grad_rows must have shape [N=",
              hidden.size(0), "], got ", grad_rows.sizes());
  TORCH_CHECK(grad_rows.device() == hidden.device(), "grad_rows must be on ", hidden.device());
  auto out = lce_driver(hidden, weight, labels, grad_rows, norm_head, ignore_index, chunk_size, grad_hidden,
                        grad_weight, lce_rows_cpu);
  return {std::get<4>(out), std::get<5>(out)};
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
}

}  // namespace baichuan
