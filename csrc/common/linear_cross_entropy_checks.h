// Fused LM head (NormHead) + cross-entropy + max-z loss: argument checks and the chunked driver shared
// by the CPU (csrc/cpu/linear_cross_entropy.cpp) and CUDA (csrc/cuda/linear_cross_entropy.cu) ops.
//
// Semantics: baichuan_kernels/reference/linear_cross_entropy.py. Shapes: hidden [N, D], weight [V, D]
// (same float dtype, contiguous), labels [N] int32/int64.
//
// Algorithm (one pass over rows, chunks of C rows; only one [C, V] fp32 block of logits is ever alive):
//   rinv[v]   = 1 / max(‖W[v]‖, 1e-12)                   (norm_head; never materialises Ŵ = W · rinv)
//   S         = h_c @ Wᵀ                                  [C, V] fp32 (GEMM: at::mm, cuBLAS on CUDA)
//   row kernel (device specific, in place on S):
//     l = S · rinv (column scale)  ->  max, argmax, lse (two passes), target logit  ->  ce, zmax
//     when gradients are wanted:  S <- g_n · (softmax(l) − onehot(y)) · rinv[v]     (g_n = 0 if ignored)
//   dH_c      = S @ W                          (= dlogits @ Ŵ)                      [C, D] fp32
//   A        += Sᵀ @ h_c                       (= rinv ⊙ dŴ, accumulated in fp32)    [V, D] fp32
// and once at the end, the exact gradient through the row normalisation (Ŵ = W · rinv):
//   dW[v] = rinv (dŴ − Ŵ (dŴ·Ŵ)) = A[v] − rinv² (A[v]·W[v]) W[v]       (only rinv for ‖W[v]‖ < eps)
// The row weights g_n are 1 in the forward pass of a mean/sum reduction (the gradient computed in the
// forward pass, scaled by the upstream gradient afterwards) or the upstream per-row gradient in the
// recompute pass of reduction "none". The max-z term's gradient is sparse (one logit per row) and is
// added by the Python autograd (baichuan_kernels/ops/linear_cross_entropy.py) from row_max / argmax.
//
// 16-bit inputs: on CUDA the GEMMs read bf16/fp16 and write fp32 (at::mm / addmm with out_dtype),
// the grad GEMMs take S rounded to the input dtype; on the CPU every GEMM runs in fp32 (W is converted
// once: an extra V × D fp32 copy for 16-bit weights).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "common/checks.h"

namespace baichuan {

constexpr double kNormHeadEps = 1e-12;
// Default chunk when the caller passes chunk_size <= 0: about this many fp32 logits (256 MiB).
constexpr int64_t kLceDefaultChunkElements = int64_t(1) << 26;

inline void check_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& labels) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be 2-D [N, D], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, D], got shape ", weight.sizes());
  check_float(hidden, "hidden");
  check_contiguous(hidden, "hidden");
  check_contiguous(weight, "weight");
  check_same(hidden, "hidden", weight, "weight");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight must have shape [V, D=", hidden.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one row (V > 0)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must have shape [N=", hidden.size(0),
              "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == hidden.device(), "labels (", labels.device(), ") and hidden (", hidden.device(),
              ") must be on the same device");
}

inline void check_reduction(const std::string& reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
}

// Labels out of [0, V) that are not ignore_index: a clear error instead of an out-of-bounds read.
inline void check_labels_in_range(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(V)));
  TORCH_CHECK(!bad.any().item<bool>(), "labels must be in [0, V=", V, ") or ignore_index=", ignore_index);
}

// Rows of logits per chunk: chunk_size when positive, else about kLceDefaultChunkElements logits.
inline int64_t lce_chunk_rows(int64_t chunk_size, int64_t N, int64_t V) {
  const int64_t c = chunk_size > 0 ? chunk_size : std::max<int64_t>(1, kLceDefaultChunkElements / std::max<int64_t>(V, 1));
  return std::max<int64_t>(1, std::min<int64_t>(c, std::max<int64_t>(N, 1)));
}

// What the row kernel of one chunk reads and writes. logits: [rows, V] fp32 contiguous, in place.
struct LceRows {
  float* logits;           // in: S = h @ Wᵀ; out (grad): g · (softmax − onehot) · rinv
  int64_t rows, V;
  const int64_t* labels;   // [rows]
  const float* rinv;       // [V] or nullptr (norm_head=False)
  const float* row_grad;   // [rows] CE gradient weight per row, or nullptr (1 for every kept row)
  int64_t ignore_index;
  bool grad;               // write the gradient of the logits in place
  float* ce;               // [rows] lse − target (0 at ignored rows)
  float* row_max;          // [rows] max logit (0 at ignored rows)
  int64_t* argmax;         // [rows] first index of the max (0 at ignored rows)
};

// rinv [V] fp32 = 1 / max(‖W[v]‖₂, eps), computed in chunks of rows (no full fp32 copy of W). A row
// whose fp32 norm overflows (bf16 weights beyond ~1.8e19) takes 2^-96 / ‖2^-96 W[v]‖, as the reference
// (norm_head_weight_ref) does, instead of rinv = 0.
inline at::Tensor lce_row_rinv(const at::Tensor& weight) {
  constexpr float kScale = 1.2621774483536189e-29f;  // 2^-96
  const int64_t V = weight.size(0), D = weight.size(1);
  at::Tensor rinv = at::empty({V}, weight.options().dtype(at::kFloat));
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(D, 1));
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    at::Tensor w = weight.narrow(0, v0, n).to(at::kFloat);
    const at::Tensor norm = at::linalg_vector_norm(w, 2, {1}, false, c10::nullopt);
    const at::Tensor scaled = at::linalg_vector_norm(w * kScale, 2, {1}, false, c10::nullopt);
    rinv.narrow(0, v0, n).copy_(
        at::where(norm.isinf(), scaled.reciprocal() * kScale, norm.clamp_min(kNormHeadEps).reciprocal()));
  }
  return rinv;
}

// dW = A − rinv² (A·W) W per row, in place on the fp32 accumulator A = rinv ⊙ dŴ (rows with
// ‖W[v]‖ < eps keep A: their normalisation divides by the constant eps).
inline void lce_norm_head_backward_(at::Tensor& acc, const at::Tensor& weight, const at::Tensor& rinv) {
  const int64_t V = weight.size(0), D = weight.size(1);
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(D, 1));
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    at::Tensor a = acc.narrow(0, v0, n);
    at::Tensor w = weight.narrow(0, v0, n).to(at::kFloat);
    at::Tensor r = rinv.narrow(0, v0, n);
    at::Tensor coef = (a * w).sum(1) * r * r;                       // [n]
    coef = at::where(r.lt(1.0 / kNormHeadEps), coef, at::zeros_like(coef));
    a.sub_(w * coef.unsqueeze(1));
  }
}

// The chunk loop, device-generic (at:: GEMMs); `row_kernel(const LceRows&)` is the device's fused
// softmax / CE / max-z / grad-logits kernel. Returns (ce_rows [N], row_max [N], argmax [N] int64,
// rinv [V] or [0], dhidden fp32 [N, D] or [0], dweight fp32 [V, D] or [0]) — the CE part of the
// gradients with row weights `row_grad` (None: 1 per kept row), through the normalisation.
template <typename RowKernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_driver(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const c10::optional<at::Tensor>& row_grad, bool norm_head, int64_t ignore_index, int64_t chunk_size,
    bool grad_hidden, bool grad_weight, RowKernel row_kernel) {
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const bool grad = grad_hidden || grad_weight;
  // 16-bit GEMMs with fp32 output on CUDA; fp32 GEMMs on the CPU.
  const bool native16 = hidden.is_cuda() && hidden.scalar_type() != at::kFloat;
  const at::Tensor w_op = native16 ? weight : weight.to(at::kFloat);  // [V, D]
  const at::Tensor rinv = norm_head ? lce_row_rinv(weight) : at::empty({0}, f32);
  at::Tensor rg;
  if (row_grad.has_value()) rg = row_grad->to(at::kFloat).contiguous();

  at::Tensor ce = at::empty({N}, f32), row_max = at::empty({N}, f32);
  at::Tensor argmax = at::empty({N}, labels.options());
  at::Tensor dh = grad_hidden ? at::empty({N, D}, f32) : at::empty({0}, f32);
  at::Tensor dw = grad_weight ? at::zeros({V, D}, f32) : at::empty({0}, f32);
  const int64_t C = lce_chunk_rows(chunk_size, N, V);
  at::Tensor buf = at::empty({std::min(C, std::max<int64_t>(N, 1)), V}, f32);  // the one logits chunk
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t n = std::min(C, N - r0);
    const at::Tensor h = hidden.narrow(0, r0, n);
    const at::Tensor h_op = native16 ? h : h.to(at::kFloat);
    at::Tensor logits = buf.narrow(0, 0, n);
    if (native16) {
      at::mm_out(logits, h_op, w_op.t(), at::kFloat);
    } else {
      at::mm_out(logits, h_op, w_op.t());
    }
    LceRows a;
    a.logits = logits.data_ptr<float>();
    a.rows = n;
    a.V = V;
    a.labels = labels.data_ptr<int64_t>() + r0;
    a.rinv = norm_head ? rinv.data_ptr<float>() : nullptr;
    a.row_grad = row_grad.has_value() ? rg.data_ptr<float>() + r0 : nullptr;
    a.ignore_index = ignore_index;
    a.grad = grad;
    a.ce = ce.data_ptr<float>() + r0;
    a.row_max = row_max.data_ptr<float>() + r0;
    a.argmax = argmax.data_ptr<int64_t>() + r0;
    row_kernel(a);
    if (!grad) continue;
    if (native16) {
      const at::Tensor g16 = logits.to(hidden.scalar_type());
      if (grad_hidden) {
        at::Tensor dh_c = dh.narrow(0, r0, n);
        at::mm_out(dh_c, g16, w_op, at::kFloat);
      }
      if (grad_weight) at::addmm_out(dw, dw, g16.t(), h_op, at::kFloat);
    } else {
      if (grad_hidden) {
        at::Tensor dh_c = dh.narrow(0, r0, n);
        at::mm_out(dh_c, logits, w_op);
      }
      if (grad_weight) dw.addmm_(logits.t(), h_op);
    }
  }
  if (grad_weight && norm_head) lce_norm_head_backward_(dw, weight, rinv);
  return {ce, row_max, argmax, rinv, dh, dw};
}

// (loss, ce, z) from the per-row terms: reduction "none" -> [N] vectors, "mean"/"sum" -> fp32 scalars.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_reduce(const at::Tensor& ce_rows, const at::Tensor& row_max,
                                                                 const at::Tensor& labels, int64_t ignore_index,
                                                                 double z_loss_weight, const std::string& reduction) {
  const at::Tensor z_rows = row_max * row_max;
  if (reduction == "none") return {ce_rows + z_rows * z_loss_weight, ce_rows, z_rows};
  at::Tensor ce = ce_rows.sum(), z = z_rows.sum();
  if (reduction == "mean") {
    const at::Tensor kept = labels.ne(ignore_index).sum().clamp_min(1).to(at::kFloat);
    ce = ce / kept;
    z = z / kept;
  }
  return {ce + z * z_loss_weight, ce, z};
}

}  // namespace baichuan
