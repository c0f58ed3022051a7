// RMSNorm (+ fused residual add), forward and backward, CUDA.
//
// Semantics: baichuan_kernels/reference/rms_norm.py. Shapes: x, residual, y, dy, dx [N, D] contiguous,
// weight [D], rstd fp32 [N]; dtype fp32 / fp16 / bf16 (one template per kernel), fp32 arithmetic.
//
// Forward, one row per "row group" of TPR threads (threadIdx.x), RPB rows per block (threadIdx.y):
//   s = x (+ residual, added in fp32 and rounded to the dtype -> residual_out)
//   r = rsqrt(sum(s^2) / D + eps)                    (group reduction: warp shuffles + shared memory)
//   (a row whose fp32 sum of squares overflows, |s| beyond ~1.8e19, is summed again scaled by 2^-96:
//   r = 2^-96 * rsqrt(sum((2^-96 s)^2) / D + eps * 2^-192), as the reference does, not r = 0)
//   y = (s * r) * w                                  (fp32, rounded once)
// Backward (xhat = s * r, g = dy * w, all fp32):
//   dx = r * (g - xhat * sum(g * xhat) / D) (+ dresidual_out), rounded once
//   dweight = sum over rows of dy * xhat, deterministic two-stage reduction: a persistent grid
//   (G = SMs x resident blocks) walks the rows; each row group sums dy * xhat of the rows it visits
//   into its own fp32 row of a partial buffer [P = G * RPB, D]; a second kernel adds the P partials
//   of each column in a fixed order. No atomics: bitwise reproducible run to run on a given GPU.
//
// Memory access. A row is cut into 16-byte packs (VW = 16 / sizeof(T) elements: 8 for 16-bit types,
// 4 for fp32); thread tx of a row group owns packs tx, tx + TPR, ... Three kernel shapes per pass:
//   row-in-registers (the fast path: D * sizeof(T) % 16 == 0, aligned pointers, D <= 16384 fwd /
//     8192 bwd in 16-bit types, half that in fp32): each thread issues all its loads of a pass at once
//     (predicated, zero-filled), keeps the row in registers across the reduction, so every tensor is
//     read from memory once. Forward: 4 packs per thread, TPR <= 512 (D = 4096 bf16: TPR = 128).
//     Backward: 2 packs of dy and of s per thread, TPR <= 512 (D = 4096 bf16: TPR = 256), the dweight
//     partial kept in shared memory [RPB, D] (registers would spill); software-pipelined: the block's
//     next row of dy and s is loaded before this row's reduction (its loads overlap the barrier and
//     the dx stores: twice the bytes in flight, 96 registers on sm_90a, no spills).
//   row-loop with 16-byte packs (longer aligned rows) and row-loop with VW = 1 (odd D, unaligned
//     pointers): strided loops; the second pass re-reads the row (mostly cache hits); backward
//     accumulates its dweight partial in place in global memory.
// Small D: TPR = 32 (one warp per row) and RPB = 256 / TPR rows per block.
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
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::to_float;

// Row-in-registers kernels: packs per thread and the thread limit per row. The launch bound of 512
// threads leaves up to 128 registers per thread (forward uses ~60-85, backward ~100, no spills).
constexpr float kOverflowScale = 1.2621774483536189e-29f;  // 2^-96: rows whose sum of squares overflows
constexpr int kFwdVecs = 4;
constexpr int kFwdMaxThreads = 512;
constexpr int kBwdVecs = 2;
constexpr int kBwdMaxThreads = 512;
// Row-loop kernels (any D, any alignment).
constexpr int kLoopElems = 8;  // about this many elements per thread
constexpr int kLoopMaxThreads = 512;
constexpr int kBlockTarget = 256;  // small rows: several rows per block, about this many threads

// Threads per row (TPR, multiple of 32) and rows per block (RPB) for rows of `n` items, `per` per thread.
dim3 row_block(int64_t n, int per, int max_threads) {
  return cuda::row_group_block(n, per, max_threads, kBlockTarget);
}

// s = x (+ residual), rounded to T: one pack at element offset j.
template <typename T, int VW>
__device__ __forceinline__ Pack<T, VW> load_s(const T* x, const T* residual, int j) {
  Pack<T, VW> v = load_pack<T, VW>(x + j);
  if (residual != nullptr) {
    const Pack<T, VW> r = load_pack<T, VW>(residual + j);
#pragma unroll
    for (int e = 0; e < VW; ++e) v.v[e] = from_float<T>(to_float(v.v[e]) + to_float(r.v[e]));
  }
  return v;
}

// y = (s * r) * w, rounded once.
template <typename T, int VW>
__device__ __forceinline__ Pack<T, VW> scale(const Pack<T, VW>& s, float r, const Pack<T, VW>& w) {
  Pack<T, VW> out;
#pragma unroll
  for (int e = 0; e < VW; ++e) out.v[e] = from_float<T>(to_float(s.v[e]) * r * to_float(w.v[e]));
  return out;
}

// ------------------------------------------------------------------------------------------------
// Forward kernels. Grid: ceil(N / RPB) blocks of (TPR, RPB) threads; row = blockIdx.x * RPB + ty.

// Row in registers. D % VW == 0, D / VW <= kFwdVecs * TPR, all pointers aligned to Pack<T, VW>.
// Loads are issued all at once (predicated, zero-filled) before any use, so each thread has
// 2 kFwdVecs (3 kFwdVecs when fused) 16-byte loads in flight.
template <typename T, int VW>
__global__ void __launch_bounds__(kFwdMaxThreads)
rms_norm_fwd_kernel(const T* __restrict__ x,         // [N, D]
                    const T* __restrict__ residual,  // [N, D], or nullptr (no fused add)
                    const T* __restrict__ weight,    // [D]
                    T* __restrict__ y,               // [N, D]
                    T* __restrict__ residual_out,    // [N, D] s = x + residual (when residual)
                    float* __restrict__ rstd,        // [N]
                    int64_t N, int D, float eps) {
  __shared__ float smem[kFwdMaxThreads / cuda::kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < N;
  const int64_t off = valid ? row * D : 0;
  const int nvec = D / VW;  // packs per row; this thread's are i = k * TPR + tx, k < kFwdVecs

  Pack<T, VW> s[kFwdVecs], res[kFwdVecs], w[kFwdVecs];
#pragma unroll
  for (int k = 0; k < kFwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    const bool in = valid && i < nvec;
    s[k] = in ? load_pack<T, VW>(x + off + i * VW) : Pack<T, VW>{};
    if (residual != nullptr) res[k] = in ? load_pack<T, VW>(residual + off + i * VW) : Pack<T, VW>{};
    w[k] = in ? load_pack<T, VW>(weight + i * VW) : Pack<T, VW>{};  // cache hits; in flight with x
  }
  float sumsq = 0.0f;
#pragma unroll
  for (int k = 0; k < kFwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    if (residual != nullptr) {  // s = x + residual, rounded to T (zero + zero for absent packs)
#pragma unroll
      for (int e = 0; e < VW; ++e) s[k].v[e] = from_float<T>(to_float(s[k].v[e]) + to_float(res[k].v[e]));
      if (valid && i < nvec) store_pack<T, VW>(residual_out + off + i * VW, s[k]);
    }
#pragma unroll
    for (int e = 0; e < VW; ++e) sumsq += to_float(s[k].v[e]) * to_float(s[k].v[e]);
  }
  float total = group_reduce_sum(sumsq, smem), f = 1.0f;
  if (__syncthreads_or(total == INFINITY)) {  // block-uniform: the reduction below has barriers
    float sc = 0.0f;
#pragma unroll
    for (int k = 0; k < kFwdVecs; ++k)
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const float t = to_float(s[k].v[e]) * kOverflowScale;
        sc += t * t;
      }
    sc = group_reduce_sum(sc, smem);
    if (total == INFINITY) total = sc, f = kOverflowScale;
  }
  const float r = f * rsqrtf(total / static_cast<float>(D) + eps * f * f);
  if (!valid) return;  // no barrier below
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < kFwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    if (i < nvec) store_pack<T, VW>(y + off + i * VW, scale<T, VW>(s[k], r, w[k]));
  }
}

// Any D: strided loop over the packs of the row (VW = 1 for odd D or unaligned pointers); the
// second pass re-reads x (+ residual), mostly from cache.
template <typename T, int VW>
__global__ void __launch_bounds__(kLoopMaxThreads)
rms_norm_fwd_rowloop_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                            const T* __restrict__ weight, T* __restrict__ y, T* __restrict__ residual_out,
                            float* __restrict__ rstd, int64_t N, int D, float eps) {
  __shared__ float smem[kLoopMaxThreads / cuda::kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < N;
  const int64_t off = valid ? row * D : 0;
  const T* res = residual != nullptr ? residual + off : nullptr;
  const int nvec = D / VW;
  float sumsq = 0.0f;
  if (valid) {
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, VW> sv = load_s<T, VW>(x + off, res, i * VW);
      if (res != nullptr) store_pack<T, VW>(residual_out + off + i * VW, sv);
#pragma unroll
      for (int e = 0; e < VW; ++e) sumsq += to_float(sv.v[e]) * to_float(sv.v[e]);
    }
  }
  float total = group_reduce_sum(sumsq, smem), f = 1.0f;
  if (__syncthreads_or(total == INFINITY)) {  // block-uniform: the reduction below has barriers
    float sc = 0.0f;
    if (valid) {
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Pack<T, VW> sv = load_s<T, VW>(x + off, res, i * VW);
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const float t = to_float(sv.v[e]) * kOverflowScale;
          sc += t * t;
        }
      }
    }
    sc = group_reduce_sum(sc, smem);
    if (total == INFINITY) total = sc, f = kOverflowScale;
  }
  const float r = f * rsqrtf(total / static_cast<float>(D) + eps * f * f);
  if (!valid) return;
  if (threadIdx.x == 0) rstd[row] = r;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x)
    store_pack<T, VW>(y + off + i * VW,
                      scale<T, VW>(load_s<T, VW>(x + off, res, i * VW), r, load_pack<T, VW>(weight + i * VW)));
}

// ------------------------------------------------------------------------------------------------
// Backward, stage 1. Persistent grid of G blocks of (TPR, RPB) threads; block b handles rows
// (b + k G) RPB + ty, writes their dx, and its row group's dweight partial dw_partial[b RPB + ty, :].

// Row in registers. D % VW == 0, D / VW <= kBwdVecs * TPR, all pointers aligned to Pack<T, VW>.
// Same load discipline as the forward kernel: all loads of a pass first, then the arithmetic.
// The fp32 dweight partial of each row group lives in dynamic shared memory [RPB, D] (registers
// would not hold it beside the row): each thread only touches its own columns, so no barrier.
template <typename T, int VW>
__global__ void __launch_bounds__(kBwdMaxThreads)
rms_norm_bwd_kernel(const T* __restrict__ dy,          // [N, D]
                    const T* __restrict__ dresidual,   // [N, D] gradient of residual_out, or nullptr
                    const T* __restrict__ s,           // [N, D] the normalised input
                    const T* __restrict__ weight,      // [D]
                    const float* __restrict__ rstd,    // [N]
                    T* __restrict__ dx,                // [N, D]
                    float* __restrict__ dw_partial,    // [G * RPB, D]
                    int64_t N, int D) {
  static_assert(VW % 4 == 0, "dweight accumulators are moved as float4");
  using F4 = Pack<float, 4>;
  __shared__ float smem[kBwdMaxThreads / cuda::kWarpSize];
  extern __shared__ F4 dw_smem[];                   // [RPB, D / 4]
  F4* dw_acc = dw_smem + threadIdx.y * (D / 4);     // this row group's partial, as float4
  const int nvec = D / VW;  // packs per row; this thread's are i = k * TPR + tx, k < kBwdVecs
  const float inv_d = 1.0f / static_cast<float>(D);
#pragma unroll
  for (int k = 0; k < kBwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    if (i < nvec)
#pragma unroll
      for (int q = 0; q < VW / 4; ++q) dw_acc[i * (VW / 4) + q] = F4{};
  }

  // Software pipeline over the block's rows: the next row's dy and s (and rstd) are loaded into
  // registers before this row's reduction, so the loads of one row overlap the barrier, the
  // arithmetic and the stores of the previous one (twice the bytes in flight per thread).
  Pack<T, VW> dyv[kBwdVecs], sv[kBwdVecs];
  float r = 0.0f;
  auto load_row = [&](int64_t rb_, Pack<T, VW>(&d_)[kBwdVecs], Pack<T, VW>(&s_)[kBwdVecs], float& r_) {
    const int64_t row_ = rb_ * blockDim.y + threadIdx.y;
    const bool valid_ = row_ < N;
    const int64_t off_ = valid_ ? row_ * D : 0;
#pragma unroll
    for (int k = 0; k < kBwdVecs; ++k) {
      const int i = k * blockDim.x + threadIdx.x;
      d_[k] = valid_ && i < nvec ? load_pack<T, VW>(dy + off_ + i * VW) : Pack<T, VW>{};
      s_[k] = valid_ && i < nvec ? load_pack<T, VW>(s + off_ + i * VW) : Pack<T, VW>{};
    }
    r_ = valid_ ? rstd[row_] : 0.0f;
  };
  load_row(blockIdx.x, dyv, sv, r);

  for (int64_t rb = blockIdx.x; rb * blockDim.y < N; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * blockDim.y + threadIdx.y;
    const bool valid = row < N;
    const int64_t off = valid ? row * D : 0;
    Pack<T, VW> ndy[kBwdVecs], nsv[kBwdVecs];  // the block's next row (zeros past the end)
    float nr;
    load_row(rb + gridDim.x, ndy, nsv, nr);

    // Pass 1: dot = sum(dy * w * xhat); dweight += dy * xhat.
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < kBwdVecs; ++k) {
      const int i = k * blockDim.x + threadIdx.x;
      const Pack<T, VW> w = load_pack<T, VW>(weight + min(i, nvec - 1) * VW);
#pragma unroll
      for (int e = 0; e < VW; ++e)  // absent packs are zeros: no contribution
        dot += to_float(dyv[k].v[e]) * to_float(w.v[e]) * (to_float(sv[k].v[e]) * r);
      if (valid && i < nvec) {
#pragma unroll
        for (int q = 0; q < VW / 4; ++q) {
          F4 acc = dw_acc[i * (VW / 4) + q];
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc.v[e] += to_float(dyv[k].v[4 * q + e]) * (to_float(sv[k].v[4 * q + e]) * r);
          dw_acc[i * (VW / 4) + q] = acc;
        }
      }
    }
    const float rm = r * (group_reduce_sum(dot, smem) * inv_d);  // r * mean(g * xhat)

    // Pass 2: dx = r * (dy * w - xhat * mean) (+ dresidual), xhat * mean = s * rm.
    if (valid) {
#pragma unroll
      for (int k = 0; k < kBwdVecs; ++k) {
        const int i = k * blockDim.x + threadIdx.x;
        if (i >= nvec) continue;
        const Pack<T, VW> w = load_pack<T, VW>(weight + i * VW);
        const Pack<T, VW> dr = dresidual != nullptr ? load_pack<T, VW>(dresidual + off + i * VW) : Pack<T, VW>{};
        float ds[VW];
#pragma unroll
        for (int e = 0; e < VW; ++e)
          ds[e] = r * (to_float(dyv[k].v[e]) * to_float(w.v[e]) - to_float(sv[k].v[e]) * rm) + to_float(dr.v[e]);
        store_pack<T, VW>(dx + off + i * VW, cuda::float_to_pack<T, VW>(ds));
      }
    }
#pragma unroll
    for (int k = 0; k < kBwdVecs; ++k) dyv[k] = ndy[k], sv[k] = nsv[k];
    r = nr;
  }

  F4* dw_row = reinterpret_cast<F4*>(dw_partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * D);
#pragma unroll
  for (int k = 0; k < kBwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    if (i < nvec)
#pragma unroll
      for (int q = 0; q < VW / 4; ++q) dw_row[i * (VW / 4) + q] = dw_acc[i * (VW / 4) + q];
  }
}

// Any D: strided loops over packs; the dweight partial is accumulated in place in dw_partial
// (each element is only ever touched by one thread: no barrier, no atomics).
template <typename T, int VW>
__global__ void __launch_bounds__(kLoopMaxThreads)
rms_norm_bwd_rowloop_kernel(const T* __restrict__ dy, const T* __restrict__ dresidual,
                            const T* __restrict__ s, const T* __restrict__ weight,
                            const float* __restrict__ rstd, T* __restrict__ dx,
                            float* __restrict__ dw_partial, int64_t N, int D) {
  using FP = Pack<float, VW>;
  __shared__ float smem[kLoopMaxThreads / cuda::kWarpSize];
  const int nvec = D / VW;
  const float inv_d = 1.0f / static_cast<float>(D);
  FP* dw_row = reinterpret_cast<FP*>(dw_partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * D);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) dw_row[i] = FP{};

  for (int64_t rb = blockIdx.x; rb * blockDim.y < N; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * blockDim.y + threadIdx.y;
    const bool valid = row < N;
    const int64_t off = valid ? row * D : 0;
    const float r = valid ? rstd[row] : 0.0f;
    float dot = 0.0f;
    if (valid) {
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Pack<T, VW> d = load_pack<T, VW>(dy + off + i * VW), sv = load_pack<T, VW>(s + off + i * VW);
        const Pack<T, VW> w = load_pack<T, VW>(weight + i * VW);
        FP acc = dw_row[i];
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const float xhat = to_float(sv.v[e]) * r;
          dot += to_float(d.v[e]) * to_float(w.v[e]) * xhat;
          acc.v[e] += to_float(d.v[e]) * xhat;
        }
        dw_row[i] = acc;
      }
    }
    const float rm = r * (group_reduce_sum(dot, smem) * inv_d);
    if (valid) {
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Pack<T, VW> d = load_pack<T, VW>(dy + off + i * VW), sv = load_pack<T, VW>(s + off + i * VW);
        const Pack<T, VW> w = load_pack<T, VW>(weight + i * VW);
        const Pack<T, VW> dr = dresidual != nullptr ? load_pack<T, VW>(dresidual + off + i * VW) : Pack<T, VW>{};
        float ds[VW];
#pragma unroll
        for (int e = 0; e < VW; ++e)
          ds[e] = r * (to_float(d.v[e]) * to_float(w.v[e]) - to_float(sv.v[e]) * rm) + to_float(dr.v[e]);
        store_pack<T, VW>(dx + off + i * VW, cuda::float_to_pack<T, VW>(ds));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers.

template <typename T>
using FwdKernel = void (*)(const T*, const T*, const T*, T*, T*, float*, int64_t, int, float);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const T*, const T*, const float*, T*, float*, int64_t, int);

template <typename T>
void launch_fwd(FwdKernel<T> kernel, dim3 block, const at::Tensor& x, const T* residual,
                const at::Tensor& weight, at::Tensor& y, T* residual_out, at::Tensor& rstd, float eps,
                cudaStream_t stream) {
  const int64_t N = x.size(0);
  const int64_t blocks = ceil_div<int64_t>(N, block.y);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "rms_norm_fwd: too many rows (", N, ")");
  kernel<<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      x.const_data_ptr<T>(), residual, weight.const_data_ptr<T>(), y.mutable_data_ptr<T>(), residual_out,
      rstd.mutable_data_ptr<float>(), N, static_cast<int>(x.size(1)), eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// smem_bytes: dynamic shared memory per block (the row-in-registers kernel's dweight partials).
template <typename T>
void launch_bwd(BwdKernel<T> kernel, dim3 block, size_t smem_bytes, const at::Tensor& dy, const T* dresidual,
                const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd, at::Tensor& dx,
                at::Tensor& dweight, cudaStream_t stream) {
  const int64_t N = dy.size(0);
  const int D = static_cast<int>(dy.size(1));
  TORCH_INTERNAL_ASSERT(smem_bytes <= 48 * 1024);  // RPB * D <= 8192 floats by construction of row_block
  // Persistent grid: as many blocks as fit on the GPU at once (fewer when there are fewer row groups).
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block.x * block.y, smem_bytes));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dy.get_device()));
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div<int64_t>(N, block.y), static_cast<int64_t>(std::max(per_sm, 1)) * sms));
  const int64_t P = grid * block.y;  // partial rows
  at::Tensor dw_partial = at::empty({P, D}, dy.options().dtype(at::kFloat));
  kernel<<<static_cast<unsigned>(grid), block, smem_bytes, stream>>>(
      dy.const_data_ptr<T>(), dresidual, s.const_data_ptr<T>(), weight.const_data_ptr<T>(),
      rstd.const_data_ptr<float>(), dx.mutable_data_ptr<T>(), dw_partial.mutable_data_ptr<float>(), N, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Stage 2: dweight[j] = sum_p dw_partial[p, j], fixed order.
  cuda::sum_rows_kernel<T><<<cuda::sum_rows_grid(D), cuda::sum_rows_block(), 0, stream>>>(
      dw_partial.const_data_ptr<float>(), dweight.mutable_data_ptr<T>(), P, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte packs apply when rows hold whole packs and every row start of every tensor is aligned.
template <typename T>
bool aligned_16b(int64_t D, std::initializer_list<const void*> ptrs) {
  return (D * static_cast<int64_t>(sizeof(T))) % 16 == 0 && cuda::all_aligned(ptrs, 16);
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
  TORCH_CHECK(D <= std::numeric_limits<int>::max(), "rms_norm_fwd: D = ", D, " is too large");
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
    using T = scalar_t;
    constexpr int VW = cuda::VecWidth<T>::k16B;
    const T* res = opt_ptr<T>(residual);
    T* res_out = residual.has_value() ? residual_out.mutable_data_ptr<T>() : nullptr;
    const float epsf = static_cast<float>(eps);
    if (!aligned_16b<T>(D, {x.const_data_ptr(), res, weight.const_data_ptr(), y.const_data_ptr(), res_out})) {
      launch_fwd<T>(rms_norm_fwd_rowloop_kernel<T, 1>, row_block(D, kLoopElems, kLoopMaxThreads), x, res, weight,
                    y, res_out, rstd, epsf, stream);
    } else if (D <= kFwdVecs * kFwdMaxThreads * VW) {
      launch_fwd<T>(rms_norm_fwd_kernel<T, VW>, row_block(D / VW, kFwdVecs, kFwdMaxThreads), x, res, weight, y,
                    res_out, rstd, epsf, stream);
    } else {
      launch_fwd<T>(rms_norm_fwd_rowloop_kernel<T, VW>, row_block(D / VW, kLoopElems / VW, kLoopMaxThreads), x,
                    res, weight, y, res_out, rstd, epsf, stream);
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
  TORCH_CHECK(D <= std::numeric_limits<int>::max(), "rms_norm_bwd: D = ", D, " is too large");
  at::Tensor dx = at::empty_like(s);                     // [N, D]
  at::Tensor dweight = at::empty({D}, weight.options());  // [D]
  if (N == 0 || D == 0) {
    dweight.zero_();
    return {dx, dweight};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(s.scalar_type(), "rms_norm_bwd_cuda", [&] {
    using T = scalar_t;
    constexpr int VW = cuda::VecWidth<T>::k16B;
    const T* dres = opt_ptr<T>(dresidual_out);
    if (!aligned_16b<T>(D, {dy.const_data_ptr(), dres, s.const_data_ptr(), weight.const_data_ptr(),
                            dx.const_data_ptr()})) {
      launch_bwd<T>(rms_norm_bwd_rowloop_kernel<T, 1>, row_block(D, kLoopElems, kLoopMaxThreads), 0, dy, dres, s,
                    weight, rstd, dx, dweight, stream);
    } else if (D <= kBwdVecs * kBwdMaxThreads * VW) {
      const dim3 block = row_block(D / VW, kBwdVecs, kBwdMaxThreads);
      launch_bwd<T>(rms_norm_bwd_kernel<T, VW>, block, block.y * D * sizeof(float), dy, dres, s, weight, rstd, dx,
                    dweight, stream);
    } else {
      launch_bwd<T>(rms_norm_bwd_rowloop_kernel<T, VW>, row_block(D / VW, kLoopElems / VW, kLoopMaxThreads), 0,
                    dy, dres, s, weight, rstd, dx, dweight, stream);
    }
  });
  return {dx, dweight};
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("rms_norm_fwd", &baichuan::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &baichuan::rms_norm_bwd_cuda);
}
