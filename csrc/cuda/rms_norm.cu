// RMSNorm (+ fused residual add), forward and backward, CUDA.
//
// Semantics: baichuan_kernels/reference/rms_norm.py. Shapes: x, residual, y, dy, dx [N, D] contiguous,
// weight [D], rstd fp32 [N]; dtype fp32 / fp16 / bf16 (one template per kernel), fp32 arithmetic.
//
// Forward, one row per "row group" of TPR threads (threadIdx.x), RPB rows per block (threadIdx.y):
//   s = x (+ residual, added in fp32 and rounded to the dtype -> residual_out)
//   r = rsqrt(sum(s^2) / D + eps)                    (group reduction: warp shuffles + shared memory)
//   y = (s * r) * w                                  (fp32, rounded once)
// Each thread owns the 16-byte packs i = tx, tx + TPR, ... of its row (VW = 16 / sizeof(T) elements
// per pack) and keeps up to kVecsPerThread of them in registers between the two passes, so for
// D * sizeof(T) <= kMaxThreads * kVecsPerThread * 16 bytes (bf16 D <= 16384, fp32 D <= 8192) x is
// read from memory exactly once. Longer rows are processed in chunks and re-read for the second pass.
// Rows whose byte length or pointers are not 16-byte aligned (odd D) take the same kernel with VW = 1.
// TPR = clamp(round_up(ceil(D / VW / kVecsPerThread), 32), 32, 512): D = 4096 bf16 -> 128 threads
// with 4 packs each; small D -> one warp per row, several rows per block.
//
// Backward (xhat = s * r, g = dy * w, all fp32):
//   ds = r * (g - xhat * sum(g * xhat) / D) (+ dresidual_out)   -> dx, rounded once
//   dweight = sum over rows of dy * xhat                        -> deterministic two-stage reduction:
//   a persistent grid (blocks = SMs x occupancy) walks the rows; each row group accumulates its
//   columns of dy * xhat in fp32 registers over the rows it visits and writes one row of a
//   partial buffer [P = grid * RPB, D]; a second kernel sums the P partials of each column in a
//   fixed order. No atomics: bitwise reproducible run to run on a given GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace baichuan {
namespace {

using cuda::ceil_div;
using cuda::from_float;
using cuda::group_reduce_sum;
using cuda::is_aligned;
using cuda::load_pack;
using cuda::Pack;
using cuda::round_up;
using cuda::store_pack;
using cuda::to_float;

constexpr int kVecsPerThread = 4;   // packs of a row each thread keeps in registers
constexpr int kMaxThreads = 512;    // threads per block (launch bound: <= 128 registers per thread)
constexpr int kBlockTarget = 256;   // small rows: pack rows into blocks of about this many threads
constexpr int kReduceCols = 32;     // dweight reduction block: 32 columns x
constexpr int kReduceRows = 16;     //   16 partial rows at a time

// Threads per row (multiple of 32) and rows per block for rows of `nvec` packs.
dim3 row_block(int64_t nvec) {
  const int64_t want = round_up<int64_t>(ceil_div<int64_t>(nvec, kVecsPerThread), cuda::kWarpSize);
  const int tpr = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(cuda::kWarpSize, want)));
  const int rpb = std::max(1, kBlockTarget / tpr);
  return dim3(tpr, rpb);
}

// s = x (+ residual), rounded to T: one pack.
template <typename T, int VW>
__device__ __forceinline__ Pack<T, VW> load_s(const T* x, const T* residual, int64_t idx) {
  Pack<T, VW> v = load_pack<T, VW>(x + idx);
  if (residual != nullptr) {
    const Pack<T, VW> r = load_pack<T, VW>(residual + idx);
#pragma unroll
    for (int e = 0; e < VW; ++e) v.v[e] = from_float<T>(to_float(v.v[e]) + to_float(r.v[e]));
  }
  return v;
}

// ------------------------------------------------------------------------------------------------
// Forward. Grid: ceil(N / RPB) blocks of (TPR, RPB) threads. D % VW == 0; pointers VW-pack aligned.
template <typename T, int VW>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_fwd_kernel(const T* __restrict__ x,         // [N, D]
                    const T* __restrict__ residual,  // [N, D], or nullptr (no fused add)
                    const T* __restrict__ weight,    // [D]
                    T* __restrict__ y,               // [N, D]
                    T* __restrict__ residual_out,    // [N, D] s = x + residual (when residual)
                    float* __restrict__ rstd,        // [N]
                    int64_t N, int64_t D, float eps) {
  __shared__ float smem[kMaxThreads / cuda::kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < N;
  const int64_t nvec = D / VW;                                         // packs per row
  const int64_t chunk = static_cast<int64_t>(kVecsPerThread) * blockDim.x;  // packs per pass of the group
  const bool in_regs = nvec <= chunk;                                  // whole row held in registers
  const int64_t base = row * D;

  // Pass 1: s (stored when fused), sum of squares.
  Pack<T, VW> s[kVecsPerThread];
  float sumsq = 0.0f;
  if (valid) {
    for (int64_t c0 = 0; c0 < nvec; c0 += chunk) {
#pragma unroll
      for (int k = 0; k < kVecsPerThread; ++k) {
        const int64_t i = c0 + k * blockDim.x + threadIdx.x;
        if (i < nvec) {
          s[k] = load_s<T, VW>(x, residual, base + i * VW);
          if (residual != nullptr) store_pack<T, VW>(residual_out + base + i * VW, s[k]);
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            const float f = to_float(s[k].v[e]);
            sumsq += f * f;
          }
        }
      }
    }
  }
  const float r = rsqrtf(group_reduce_sum(sumsq, smem) / static_cast<float>(D) + eps);
  if (!valid) return;  // no barrier below
  if (threadIdx.x == 0) rstd[row] = r;

  // Pass 2: y = (s * r) * w.
  for (int64_t c0 = 0; c0 < nvec; c0 += chunk) {
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) {
      const int64_t i = c0 + k * blockDim.x + threadIdx.x;
      if (i < nvec) {
        const Pack<T, VW> sv = in_regs ? s[k] : load_s<T, VW>(x, residual, base + i * VW);
        const Pack<T, VW> w = load_pack<T, VW>(weight + i * VW);
        Pack<T, VW> out;
#pragma unroll
        for (int e = 0; e < VW; ++e) out.v[e] = from_float<T>(to_float(sv.v[e]) * r * to_float(w.v[e]));
        store_pack<T, VW>(y + base + i * VW, out);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, stage 1. Persistent grid of G blocks of (TPR, RPB) threads; block b handles rows
// (b + k G) RPB + threadIdx.y. Writes dx and dw_partial[b * RPB + threadIdx.y, :].
template <typename T, int VW>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_bwd_kernel(const T* __restrict__ dy,            // [N, D]
                    const T* __restrict__ dresidual,     // [N, D] gradient of residual_out, or nullptr
                    const T* __restrict__ s,             // [N, D] the normalised input
                    const T* __restrict__ weight,        // [D]
                    const float* __restrict__ rstd,      // [N]
                    T* __restrict__ dx,                  // [N, D]
                    float* __restrict__ dw_partial,      // [G * RPB, D]
                    int64_t N, int64_t D) {
  __shared__ float smem[kMaxThreads / cuda::kWarpSize];
  const int64_t nvec = D / VW;
  const int64_t chunk = static_cast<int64_t>(kVecsPerThread) * blockDim.x;
  const bool in_regs = nvec <= chunk;
  const float inv_d = 1.0f / static_cast<float>(D);
  float* dw_row = dw_partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * D;

  // dweight accumulators: registers when the row fits, else this thread's columns of dw_row
  // (zeroed here; only this thread ever touches them, so no barrier is needed).
  float dw_acc[kVecsPerThread][VW];
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k)
#pragma unroll
    for (int e = 0; e < VW; ++e) dw_acc[k][e] = 0.0f;
  if (!in_regs)
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x)
      for (int e = 0; e < VW; ++e) dw_row[i * VW + e] = 0.0f;

  for (int64_t rb = blockIdx.x; rb * blockDim.y < N; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * blockDim.y + threadIdx.y;
    const bool valid = row < N;
    const float r = valid ? rstd[row] : 0.0f;
    const int64_t base = row * D;

    // Pass 1: dot = sum(g * xhat); dweight += dy * xhat.
    Pack<T, VW> dyv[kVecsPerThread], sv[kVecsPerThread];
    float dot = 0.0f;
    if (valid) {
      for (int64_t c0 = 0; c0 < nvec; c0 += chunk) {
#pragma unroll
        for (int k = 0; k < kVecsPerThread; ++k) {
          const int64_t i = c0 + k * blockDim.x + threadIdx.x;
          if (i < nvec) {
            dyv[k] = load_pack<T, VW>(dy + base + i * VW);
            sv[k] = load_pack<T, VW>(s + base + i * VW);
            const Pack<T, VW> w = load_pack<T, VW>(weight + i * VW);
#pragma unroll
            for (int e = 0; e < VW; ++e) {
              const float d = to_float(dyv[k].v[e]);
              const float xhat = to_float(sv[k].v[e]) * r;
              dot += d * to_float(w.v[e]) * xhat;
              if (in_regs) dw_acc[k][e] += d * xhat;
              else dw_row[i * VW + e] += d * xhat;
            }
          }
        }
      }
    }
    const float mean = group_reduce_sum(dot, smem) * inv_d;

    // Pass 2: dx = r * (g - xhat * mean) (+ dresidual).
    if (valid) {
      for (int64_t c0 = 0; c0 < nvec; c0 += chunk) {
#pragma unroll
        for (int k = 0; k < kVecsPerThread; ++k) {
          const int64_t i = c0 + k * blockDim.x + threadIdx.x;
          if (i < nvec) {
            const Pack<T, VW> d = in_regs ? dyv[k] : load_pack<T, VW>(dy + base + i * VW);
            const Pack<T, VW> sk = in_regs ? sv[k] : load_pack<T, VW>(s + base + i * VW);
            const Pack<T, VW> w = load_pack<T, VW>(weight + i * VW);
            float ds[VW];
#pragma unroll
            for (int e = 0; e < VW; ++e) {
              const float g = to_float(d.v[e]) * to_float(w.v[e]);
              ds[e] = r * (g - to_float(sk.v[e]) * r * mean);
            }
            if (dresidual != nullptr) {
              const Pack<T, VW> dr = load_pack<T, VW>(dresidual + base + i * VW);
#pragma unroll
              for (int e = 0; e < VW; ++e) ds[e] += to_float(dr.v[e]);
            }
            store_pack<T, VW>(dx + base + i * VW, cuda::float_to_pack<T, VW>(ds));
          }
        }
      }
    }
  }

  if (in_regs) {
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) {
      const int64_t i = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      if (i < nvec)
#pragma unroll
        for (int e = 0; e < VW; ++e) dw_row[i * VW + e] = dw_acc[k][e];
    }
  }
}

// Backward, stage 2: dweight[j] = sum_p dw_partial[p, j] in a fixed order. Grid: ceil(D / 32)
// blocks of (32, 16) threads; thread (c, t) sums partial rows t, t + 16, ... of column c.
template <typename T>
__global__ void __launch_bounds__(kReduceCols * kReduceRows)
rms_norm_bwd_dweight_kernel(const float* __restrict__ dw_partial,  // [P, D]
                            T* __restrict__ dweight,                // [D]
                            int64_t P, int64_t D) {
  __shared__ float smem[kReduceRows][kReduceCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  float acc = 0.0f;
  if (col < D)
    for (int64_t p = threadIdx.y; p < P; p += kReduceRows) acc += dw_partial[p * D + col];
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    float total = 0.0f;
#pragma unroll
    for (int t = 0; t < kReduceRows; ++t) total += smem[t][threadIdx.x];
    dweight[col] = from_float<T>(total);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers.

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

template <typename T, int VW>
void launch_fwd(const at::Tensor& x, const T* residual, const at::Tensor& weight, at::Tensor& y,
                T* residual_out, at::Tensor& rstd, float eps, cudaStream_t stream) {
  const int64_t N = x.size(0), D = x.size(1);
  const dim3 block = row_block(D / VW);
  const int64_t blocks = ceil_div<int64_t>(N, block.y);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "rms_norm_fwd: too many rows (", N, ")");
  rms_norm_fwd_kernel<T, VW><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      x.const_data_ptr<T>(), residual, weight.const_data_ptr<T>(), y.mutable_data_ptr<T>(), residual_out,
      rstd.mutable_data_ptr<float>(), N, D, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VW>
void launch_bwd(const at::Tensor& dy, const T* dresidual, const at::Tensor& s, const at::Tensor& weight,
                const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dweight, cudaStream_t stream) {
  const int64_t N = dy.size(0), D = dy.size(1);
  const dim3 block = row_block(D / VW);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, rms_norm_bwd_kernel<T, VW>,
                                                               static_cast<int>(block.x * block.y), 0));
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div<int64_t>(N, block.y), static_cast<int64_t>(std::max(per_sm, 1)) *
                                                              sm_count(dy.get_device())));
  const int64_t P = grid * block.y;  // partial rows
  at::Tensor dw_partial = at::empty({P, D}, dy.options().dtype(at::kFloat));
  rms_norm_bwd_kernel<T, VW><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      dy.const_data_ptr<T>(), dresidual, s.const_data_ptr<T>(), weight.const_data_ptr<T>(),
      rstd.const_data_ptr<float>(), dx.mutable_data_ptr<T>(), dw_partial.mutable_data_ptr<float>(), N, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 rblock(kReduceCols, kReduceRows);
  rms_norm_bwd_dweight_kernel<T><<<static_cast<unsigned>(ceil_div<int64_t>(D, kReduceCols)), rblock, 0, stream>>>(
      dw_partial.const_data_ptr<float>(), dweight.mutable_data_ptr<T>(), P, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte packs when every row start of every tensor is 16-byte aligned, else scalars.
template <typename T>
bool use_16b(int64_t D, std::initializer_list<const void*> ptrs) {
  if ((D * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !is_aligned(p, 16)) return false;
  return true;
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Host entry points (schemas in csrc/registration.cpp).

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x,
                                                                 const c10::optional<at::Tensor>& residual,
                                                                 const at::Tensor& weight, double eps) {
  check_rms_norm_fwd(x, residual, weight);
  TORCH_CHECK(x.is_cuda(), "rms_norm_fwd_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x);                                                        // [N, D]
  at::Tensor residual_out = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));                         // [N]
  if (N == 0) return {y, residual_out, rstd};
  if (D == 0) {  // mean over an empty row is NaN, as in the reference
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, residual_out, rstd};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    const scalar_t* res = opt_ptr<scalar_t>(residual);
    scalar_t* res_out = residual.has_value() ? residual_out.mutable_data_ptr<scalar_t>() : nullptr;
    if (use_16b<scalar_t>(D, {x.const_data_ptr(), res, weight.const_data_ptr(), y.const_data_ptr(), res_out})) {
      launch_fwd<scalar_t, cuda::VecWidth<scalar_t>::k16B>(x, res, weight, y, res_out, rstd,
                                                           static_cast<float>(eps), stream);
    } else {
      launch_fwd<scalar_t, 1>(x, res, weight, y, res_out, rstd, static_cast<float>(eps), stream);
    }
  });
  return {y, residual_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy,
                                                     const c10::optional<at::Tensor>& dresidual_out,
                                                     const at::Tensor& s, const at::Tensor& weight,
                                                     const at::Tensor& rstd) {
  check_rms_norm_bwd(dy, dresidual_out, s, weight, rstd);
  TORCH_CHECK(s.is_cuda(), "rms_norm_bwd_cuda: tensors must be on a CUDA device, got ", s.device());
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t N = s.size(0), D = s.size(1);
  at::Tensor dx = at::empty_like(s);                     // [N, D]
  at::Tensor dweight = at::empty({D}, weight.options());  // [D]
  if (N == 0 || D == 0) {
    dweight.zero_();
    return {dx, dweight};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(s.scalar_type(), "rms_norm_bwd_cuda", [&] {
    const scalar_t* dres = opt_ptr<scalar_t>(dresidual_out);
    if (use_16b<scalar_t>(D, {dy.const_data_ptr(), dres, s.const_data_ptr(), weight.const_data_ptr(),
                              dx.const_data_ptr()})) {
      launch_bwd<scalar_t, cuda::VecWidth<scalar_t>::k16B>(dy, dres, s, weight, rstd, dx, dweight, stream);
    } else {
      launch_bwd<scalar_t, 1>(dy, dres, s, weight, rstd, dx, dweight, stream);
    }
  });
  return {dx, dweight};
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("rms_norm_fwd", &baichuan::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &baichuan::rms_norm_bwd_cuda);
}
