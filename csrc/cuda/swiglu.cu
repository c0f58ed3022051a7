// SwiGLU, forward and backward, CUDA: y = silu(gate) * up, fp32 math, one rounding per output.
//
//   forward   y     = g * sig(g) * u                               reads g, u; writes y      (3 passes)
//   backward  dgate = dy * u * (sig(g) + silu(g) * (1 - sig(g)))   reads dy, g, u;
//             dup   = dy * silu(g)                                 writes dgate, dup         (5 passes)
//
// gate, up, dy: [N, F] row views (unit stride along F, any row stride: the halves of a fused [N, 2F]
// matmul output are read in place); outputs [N, F] contiguous. dtype fp32 / fp16 / bf16, one
// template per kernel. Each thread moves 16-byte packs (VW = 16 / sizeof(T) elements) through a
// grid-stride loop over the N * F / VW packs; when F, the row strides or a pointer are not 16-byte
// multiples the same kernel runs with VW = 1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

#include "common/cuda_utils.cuh"
#include "common/swiglu_checks.h"

namespace baichuan {
namespace {

using cuda::ceil_div;
using cuda::float_to_pack;
using cuda::is_aligned;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::to_float;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T, int VW>
__global__ void __launch_bounds__(kThreads)
swiglu_fwd_kernel(const T* __restrict__ gate,  // [N, F], row stride gs
                  const T* __restrict__ up,    // [N, F], row stride us
                  T* __restrict__ y,           // [N, F] contiguous
                  int64_t N, int64_t F, int64_t gs, int64_t us) {
  const int64_t per_row = F / VW, total = N * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row, j = (idx - row * per_row) * VW;
    const Pack<T, VW> g = load_pack<T, VW>(gate + row * gs + j);
    const Pack<T, VW> u = load_pack<T, VW>(up + row * us + j);
    float out[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      const float gf = to_float(g.v[e]);
      out[e] = gf * sigmoidf(gf) * to_float(u.v[e]);
    }
    store_pack<T, VW>(y + row * F + j, float_to_pack<T, VW>(out));
  }
}

template <typename T, int VW>
__global__ void __launch_bounds__(kThreads)
swiglu_bwd_kernel(const T* __restrict__ dy,    // [N, F], row stride ds
                  const T* __restrict__ gate,  // [N, F], row stride gs
                  const T* __restrict__ up,    // [N, F], row stride us
                  T* __restrict__ dgate,       // [N, F], row stride dgs (F, or 2F: halves of dh)
                  T* __restrict__ dup,         // [N, F], row stride dus
                  int64_t N, int64_t F, int64_t ds, int64_t gs, int64_t us, int64_t dgs, int64_t dus) {
  const int64_t per_row = F / VW, total = N * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row, j = (idx - row * per_row) * VW;
    const Pack<T, VW> d = load_pack<T, VW>(dy + row * ds + j);
    const Pack<T, VW> g = load_pack<T, VW>(gate + row * gs + j);
    const Pack<T, VW> u = load_pack<T, VW>(up + row * us + j);
    float dg[VW], du[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      const float gf = to_float(g.v[e]), df = to_float(d.v[e]);
      const float s = sigmoidf(gf), silu = gf * s;
      du[e] = df * silu;
      dg[e] = df * to_float(u.v[e]) * (s + silu * (1.0f - s));
    }
    store_pack<T, VW>(dgate + row * dgs + j, float_to_pack<T, VW>(dg));
    store_pack<T, VW>(dup + row * dus + j, float_to_pack<T, VW>(du));
  }
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// 16-byte packs apply when F, every row stride and every pointer are 16-byte multiples.
template <typename T>
bool use_16b(int64_t F, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  constexpr int64_t VW = cuda::VecWidth<T>::k16B;
  if (F % VW != 0) return false;
  for (int64_t s : strides)
    if (s % VW != 0) return false;
  for (const void* p : ptrs)
    if (!is_aligned(p, 16)) return false;
  return true;
}

unsigned grid_for(int64_t packs) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div<int64_t>(packs, kThreads), kMaxBlocks)));
}

}  // namespace

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_fwd(gate, up);
  TORCH_CHECK(gate.is_cuda(), "swiglu_fwd_cuda: gate must be a CUDA tensor, got ", gate.device());
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor y = at::empty(gate.sizes(), gate.options());  // [N, F]
  const int64_t N = gate.size(0), F = gate.size(1);
  if (y.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t gs = row_stride(gate), us = row_stride(up);
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(gate.scalar_type(), "swiglu_fwd_cuda", [&] {
    using T = scalar_t;
    constexpr int VW = cuda::VecWidth<T>::k16B;
    if (use_16b<T>(F, {gs, us}, {gate.const_data_ptr(), up.const_data_ptr(), y.const_data_ptr()})) {
      swiglu_fwd_kernel<T, VW><<<grid_for(N * F / VW), kThreads, 0, stream>>>(
          gate.const_data_ptr<T>(), up.const_data_ptr<T>(), y.mutable_data_ptr<T>(), N, F, gs, us);
    } else {
      swiglu_fwd_kernel<T, 1><<<grid_for(N * F), kThreads, 0, stream>>>(
          gate.const_data_ptr<T>(), up.const_data_ptr<T>(), y.mutable_data_ptr<T>(), N, F, gs, us);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// dgate, dup: [N, F] outputs (contiguous, or the two halves of one dh [N, 2F]).
void swiglu_bwd_into(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, at::Tensor& dgate,
                     at::Tensor& dup) {
  const int64_t N = gate.size(0), F = gate.size(1);
  if (N == 0 || F == 0) return;
  const c10::cuda::CUDAGuard guard(gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t ds = row_stride(dy), gs = row_stride(gate), us = row_stride(up);
  const int64_t dgs = row_stride(dgate), dus = row_stride(dup);
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(gate.scalar_type(), "swiglu_bwd_cuda", [&] {
    using T = scalar_t;
    constexpr int VW = cuda::VecWidth<T>::k16B;
    if (use_16b<T>(F, {ds, gs, us, dgs, dus}, {dy.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(),
                                               dgate.const_data_ptr(), dup.const_data_ptr()})) {
      swiglu_bwd_kernel<T, VW><<<grid_for(N * F / VW), kThreads, 0, stream>>>(
          dy.const_data_ptr<T>(), gate.const_data_ptr<T>(), up.const_data_ptr<T>(), dgate.mutable_data_ptr<T>(),
          dup.mutable_data_ptr<T>(), N, F, ds, gs, us, dgs, dus);
    } else {
      swiglu_bwd_kernel<T, 1><<<grid_for(N * F), kThreads, 0, stream>>>(
          dy.const_data_ptr<T>(), gate.const_data_ptr<T>(), up.const_data_ptr<T>(), dgate.mutable_data_ptr<T>(),
          dup.mutable_data_ptr<T>(), N, F, ds, gs, us, dgs, dus);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_swiglu_bwd(dy, gate, up);
  TORCH_CHECK(gate.is_cuda(), "swiglu_bwd_cuda: gate must be a CUDA tensor, got ", gate.device());
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  swiglu_bwd_into(dy, gate, up, dgate, dup);
  return {dgate, dup};
}

// Fused layout h [N, 2F] = [gate | up]: halves read in place; dgate, dup written into the halves of dh.
at::Tensor swiglu_packed_fwd_cuda(const at::Tensor& h) {
  const int64_t F = check_swiglu_packed(h);
  return swiglu_fwd_cuda(h.narrow(1, 0, F), h.narrow(1, F, F));
}

at::Tensor swiglu_packed_bwd_cuda(const at::Tensor& dy, const at::Tensor& h) {
  const int64_t F = check_swiglu_packed(h);
  const at::Tensor gate = h.narrow(1, 0, F), up = h.narrow(1, F, F);
  check_swiglu_bwd(dy, gate, up);
  TORCH_CHECK(h.is_cuda(), "swiglu_packed_bwd_cuda: h must be a CUDA tensor, got ", h.device());
  at::Tensor dh = at::empty({h.size(0), 2 * F}, h.options());
  at::Tensor dgate = dh.narrow(1, 0, F), dup = dh.narrow(1, F, F);
  swiglu_bwd_into(dy, gate, up, dgate, dup);
  return dh;
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("swiglu_fwd", &baichuan::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &baichuan::swiglu_bwd_cuda);
  m.impl("swiglu_packed_fwd", &baichuan::swiglu_packed_fwd_cuda);
  m.impl("swiglu_packed_bwd", &baichuan::swiglu_packed_bwd_cuda);
}
