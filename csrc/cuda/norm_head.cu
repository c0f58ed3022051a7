// NormHead, CUDA: Ŵ[v] = W[v] / max(‖W[v]‖₂, eps) and its backward, fp32 / fp16 / bf16, fp32 math.
//
// One block of kThreads threads per row, strided loops (any D, scalar accesses; rows are re-read for
// the second pass, from L1/L2). Backward (Ŵ = W · rinv in fp32, g the incoming gradient):
//   dW = rinv · (g − Ŵ (g·Ŵ))   when ‖W‖ ≥ eps,    dW = rinv · g   otherwise.
// Shapes: weight, w_hat, grad, dweight [V, D] contiguous; rinv fp32 [V].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace baichuan {
namespace {

using cuda::from_float;
using cuda::to_float;

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
norm_head_fwd_kernel(const T* __restrict__ w, T* __restrict__ out, float* __restrict__ rinv, int D, float eps) {
  __shared__ float smem[kThreads / cuda::kWarpSize];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * D;
  float ss = 0.f;
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    const float x = to_float(w[off + j]);
    ss += x * x;
  }
  float total = cuda::group_reduce_sum(ss, smem), f = 1.f;
  if (total == INFINITY) {  // ‖W[v]‖ beyond ~1.8e19 (bf16 weights): sum again scaled by 2^-96 (exact), as
    ss = 0.f;               // the reference does, instead of giving Ŵ = 0 (uniform: one row per block)
    f = 1.2621774483536189e-29f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
      const float x = to_float(w[off + j]) * f;
      ss += x * x;
    }
    total = cuda::group_reduce_sum(ss, smem);
  }
  const float r = f / fmaxf(sqrtf(total), eps * f);
  if (threadIdx.x == 0) rinv[blockIdx.x] = r;
  for (int j = threadIdx.x; j < D; j += blockDim.x) out[off + j] = from_float<T>(to_float(w[off + j]) * r);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
norm_head_bwd_kernel(const T* __restrict__ g, const T* __restrict__ w, const float* __restrict__ rinv,
                     T* __restrict__ dw, int D, float inv_eps) {
  __shared__ float smem[kThreads / cuda::kWarpSize];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * D;
  const float r = rinv[blockIdx.x];
  float dot = 0.f;
  // Ŵ = W · r first: g · W alone overflows fp32 for rows near the bf16 range.
  for (int j = threadIdx.x; j < D; j += blockDim.x) dot += to_float(g[off + j]) * (to_float(w[off + j]) * r);
  dot = cuda::group_reduce_sum(dot, smem);
  if (!(r < inv_eps)) dot = 0.f;  // ‖W‖ <= eps: the divisor is the constant eps
  for (int j = threadIdx.x; j < D; j += blockDim.x)
    dw[off + j] = from_float<T>(r * (to_float(g[off + j]) - to_float(w[off + j]) * r * dot));
}

void check_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, D], got shape ", weight.sizes());
  check_float(weight, "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK(weight.is_cuda(), "weight must be a CUDA tensor for the CUDA kernel, got ", weight.device());
  TORCH_CHECK(weight.size(1) <= INT32_MAX, "weight rows are too long: D = ", weight.size(1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> norm_head_weight_fwd_cuda(const at::Tensor& weight, double eps) {
  check_weight(weight);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty_like(weight);
  at::Tensor rinv = at::empty({weight.size(0)}, weight.options().dtype(at::kFloat));
  const int64_t V = weight.size(0);
  if (V == 0) return {out, rinv};
  const int D = static_cast<int>(weight.size(1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(weight.scalar_type(), "norm_head_weight_fwd_cuda", [&] {
    norm_head_fwd_kernel<scalar_t><<<static_cast<unsigned>(V), kThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rinv.data_ptr<float>(), D, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, rinv};
}

at::Tensor norm_head_weight_bwd_cuda(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& rinv,
                                     double eps) {
  check_weight(weight);
  TORCH_CHECK(grad.sizes() == weight.sizes(), "grad must have the shape of weight ", weight.sizes(), ", got ",
              grad.sizes());
  check_same(grad, "grad", weight, "weight");
  check_contiguous(grad, "grad");
  TORCH_CHECK(rinv.dim() == 1 && rinv.size(0) == weight.size(0) && rinv.scalar_type() == at::kFloat,
              "rinv must be float32 [", weight.size(0), "], got ", rinv.scalar_type(), " ", rinv.sizes());
  TORCH_CHECK(rinv.device() == weight.device(), "rinv must be on ", weight.device());
  check_contiguous(rinv, "rinv");
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor dw = at::empty_like(weight);
  const int64_t V = weight.size(0);
  if (V == 0) return dw;
  const int D = static_cast<int>(weight.size(1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(weight.scalar_type(), "norm_head_weight_bwd_cuda", [&] {
    norm_head_bwd_kernel<scalar_t><<<static_cast<unsigned>(V), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rinv.data_ptr<float>(), dw.data_ptr<scalar_t>(), D,
        static_cast<float>(1.0 / eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dw;
}

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("norm_head_weight_fwd", &norm_head_weight_fwd_cuda);
  m.impl("norm_head_weight_bwd", &norm_head_weight_bwd_cuda);
}

}  // namespace baichuan
