// Fused LM head (NormHead) + cross-entropy + max-z loss, CUDA: the chunk loop of
// csrc/common/linear_cross_entropy_checks.h (GEMMs through at::mm / addmm = cuBLAS, 16-bit inputs with
// fp32 output) plus one fused row kernel per chunk, in place on the [C, V] fp32 logits:
//
//   pass 1  l = S · rinv (stored back), per-thread max / first argmax, block reduction (value, index)
//   pass 2  sum of exp(l − max) (fp32 per thread, tree reduction) -> lse; ce = lse − l[y]; zmax = max
//   pass 3  (gradients) l = g · (exp(l − lse) − [v == y]) · rinv
//
// One block of kRowThreads threads per row; each thread strides over the row (coalesced), so a row of
// V = 125,696 fp32 logits is three sweeps of 491 KB, mostly from L2. Deterministic (fixed reduction
// order). Shapes: hidden [N, D], weight [V, D], labels [N]; per-row outputs fp32 [N].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cfloat>

#include "common/cuda_utils.cuh"
#include "common/linear_cross_entropy_checks.h"

namespace baichuan {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / cuda::kWarpSize;

// The larger value wins; on a tie the smaller index (the first maximum, like the CPU kernel).
__device__ __forceinline__ void max_arg_merge(float& v, int64_t& i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__global__ void __launch_bounds__(kRowThreads) lce_row_kernel(LceRows a) {
  __shared__ float s_val[kRowWarps];
  __shared__ int64_t s_idx[kRowWarps];
  __shared__ float s_sum[kRowWarps];
  const int64_t row = blockIdx.x;
  const int64_t V = a.V;
  float* l = a.logits + row * V;
  const int64_t y = a.labels[row];
  const bool keep = y != a.ignore_index;
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;

  // Pass 1: column scale (NormHead), max and first argmax.
  float best = -FLT_MAX;
  int64_t best_i = V;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    float x = l[v];
    if (a.rinv != nullptr) {
      x *= a.rinv[v];
      l[v] = x;
    }
    if (x > best || best_i == V) {
      best = x;
      best_i = v;
    }
  }
#pragma unroll
  for (int off = cuda::kWarpSize / 2; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, best_i, off);
    max_arg_merge(best, best_i, ov, oi);
  }
  if (lane == 0) {
    s_val[warp] = best;
    s_idx[warp] = best_i;
  }
  __syncthreads();  // also publishes the scaled logits of pass 1 to the whole block
  best = s_val[0];
  best_i = s_idx[0];
  for (int w = 1; w < kRowWarps; ++w) max_arg_merge(best, best_i, s_val[w], s_idx[w]);
  const float m = best;
  const float target = keep ? l[y] : 0.f;

  // Pass 2: sum of exp -> logsumexp.
  float s = 0.f;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += expf(l[v] - m);
  s = cuda::group_reduce_sum(s, s_sum);  // ends with a barrier: every thread has read l[y]
  // An infinite logit: lse = +inf (torch.logsumexp), not inf - inf = NaN. A NaN logit (skipped by the
  // max above) makes s NaN: the row max follows, as the reference's amax.
  const float lse = m == INFINITY ? m : m + logf(s);
  const float zmax = (s != s && m != INFINITY) ? s : m;
  if (threadIdx.x == 0) {
    a.ce[row] = keep ? lse - target : 0.f;
    a.row_max[row] = keep ? zmax : 0.f;
    a.argmax[row] = keep ? best_i : 0;
  }
  if (!a.grad) return;

  // Pass 3: gradient of the raw logits S, in place.
  const float g = keep ? (a.row_grad != nullptr ? a.row_grad[row] : 1.f) : 0.f;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    float p = g == 0.f ? 0.f : g * (expf(l[v] - lse) - (v == y ? 1.f : 0.f));
    if (a.rinv != nullptr) p *= a.rinv[v];
    l[v] = p;
  }
}

void lce_rows_cuda(const LceRows& a) {
  if (a.rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  lce_row_kernel<<<static_cast<unsigned>(a.rows), kRowThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, int64_t ignore_index) {
  check_linear_cross_entropy(hidden, weight, labels);
  TORCH_CHECK(hidden.is_cuda(), "hidden must be a CUDA tensor for the CUDA kernel, got ", hidden.device());
  check_labels_in_range(labels, weight.size(0), ignore_index);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_fwd_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              bool norm_head, double z_loss_weight, int64_t ignore_index, c10::string_view reduction,
                              int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  check_cuda(hidden, weight, labels, ignore_index);
  const std::string red(reduction);
  check_reduction(red);
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto out = lce_driver(hidden, weight, labels, c10::nullopt, norm_head, ignore_index, chunk_size, grad_hidden,
                        grad_weight, lce_rows_cuda);
  auto red_out = lce_reduce(std::get<0>(out), std::get<1>(out), labels, ignore_index, z_loss_weight, red);
  return {std::get<0>(red_out), std::get<1>(red_out), std::get<2>(red_out), std::get<1>(out), std::get<2>(out),
          std::get<3>(out),     std::get<4>(out),     std::get<5>(out)};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                 const at::Tensor& labels, const at::Tensor& grad_rows,
                                                                 bool norm_head, int64_t ignore_index,
                                                                 int64_t chunk_size, bool grad_hidden,
                                                                 bool grad_weight) {
  check_cuda(hidden, weight, labels, ignore_index);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == hidden.size(0), "grad_rows must have shape [N=",
              hidden.size(0), "], got ", grad_rows.sizes());
  TORCH_CHECK(grad_rows.device() == hidden.device(), "grad_rows must be on ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto out = lce_driver(hidden, weight, labels, grad_rows, norm_head, ignore_index, chunk_size, grad_hidden,
                        grad_weight, lce_rows_cuda);
  return {std::get<4>(out), std::get<5>(out)};
}

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
}

}  // namespace baichuan
