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

// Row-in-registers kernels. Forward: up to 4 packs of a row per thread, <= 512 threads per row
// (<= 128 registers per thread). Backward also holds fp32 dweight accumulators for its columns, so
// 2 packs per thread and up to 1024 threads (<= 64 registers, high occupancy for the persistent
// grid). Both cover rows of up to 512 * 4 = 1024 * 2 = 2048 packs: D <= 16384 (16-bit), 8192 (fp32).
constexpr int kFwdVecs = 4;
constexpr int kFwdMaxThreads = 512;
constexpr int kBwdVecs = 4;
constexpr int kBwdMaxThreads = 512;
// Row-loop kernels (any D, any alignment): scalar accesses, strided loops, second pass re-reads.
constexpr int kLoopElems = 8;  // about this many elements per thread
constexpr int kLoopMaxThreads = 512;
constexpr int kBlockTarget = 256;  // small rows: several rows per block, about this many threads
constexpr int kReduceCols = 32;    // dweight reduction block: 32 columns x
constexpr int kReduceRows = 16;    //   16 partial rows at a time

// Threads per row (TPR, multiple of 32) and rows per block (RPB) for rows of `n` items, `per` per thread.
dim3 row_block(int64_t n, int per, int max_threads) {
  const int64_t want = round_up<int64_t>(ceil_div<int64_t>(n, per), cuda::kWarpSize);
  const int tpr = static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(cuda::kWarpSize, want)));
  return dim3(tpr, std::max(1, kBlockTarget / tpr));
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
// kFwdVecs (x2 when fused) 16-byte loads in flight; weight indices are clamped instead of predicated.
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

  Pack<T, VW> s[kFwdVecs], res[kFwdVecs];
#pragma unroll
  for (int k = 0; k < kFwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    s[k] = valid && i < nvec ? load_pack<T, VW>(x + off + i * VW) : Pack<T, VW>{};
    if (residual != nullptr)
      res[k] = valid && i < nvec ? load_pack<T, VW>(residual + off + i * VW) : Pack<T, VW>{};
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
  const float r = rsqrtf(group_reduce_sum(sumsq, smem) / static_cast<float>(D) + eps);
  if (!valid) return;  // no barrier below
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < kFwdVecs; ++k) {
    const int i = k * blockDim.x + threadIdx.x;
    const Pack<T, VW> w = load_pack<T, VW>(weight + min(i, nvec - 1) * VW);
    if (i < nvec) store_pack<T, VW>(y + off + i * VW, scale<T, VW>(s[k], r, w));
  }
}

// Any D and alignment: scalar loop; the second pass re-reads x (+ residual) (cache hits mostly).
template <typename T>
__global__ void __launch_bounds__(kLoopMaxThreads)
rms_norm_fwd_rowloop_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                            const T* __restrict__ weight, T* __restrict__ y, T* __restrict__ residual_out,
                            float* __restrict__ rstd, int64_t N, int D, float eps) {
  __shared__ float smem[kLoopMaxThreads / cuda::kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < N;
  const int64_t off = valid ? row * D : 0;
  const T* res = residual != nullptr ? residual + off : nullptr;
  float sumsq = 0.0f;
  if (valid) {
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
      const Pack<T, 1> s = load_s<T, 1>(x + off, res, j);
      if (res != nullptr) residual_out[off + j] = s.v[0];
      sumsq += to_float(s.v[0]) * to_float(s.v[0]);
    }
  }
  const float r = rsqrtf(group_reduce_sum(sumsq, smem) / static_cast<float>(D) + eps);
  if (!valid) return;
  if (threadIdx.x == 0) rstd[row] = r;
  for (int j = threadIdx.x; j < D; j += blockDim.x)
    y[off + j] = scale<T, 1>(load_s<T, 1>(x + off, res, j), r, load_pack<T, 1>(weight + j)).v[0];
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

  for (int64_t rb = blockIdx.x; rb * blockDim.y < N; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * blockDim.y + threadIdx.y;
    const bool valid = row < N;
    const int64_t off = valid ? row * D : 0;
    const float r = valid ? rstd[row] : 0.0f;

    // Pass 1: dot = sum(dy * w * xhat); dweight += dy * xhat.
    Pack<T, VW> dyv[kBwdVecs], sv[kBwdVecs];
#pragma unroll
    for (int k = 0; k < kBwdVecs; ++k) {
      const int i = k * blockDim.x + threadIdx.x;
      dyv[k] = valid && i < nvec ? load_pack<T, VW>(dy + off + i * VW) : Pack<T, VW>{};
      sv[k] = valid && i < nvec ? load_pack<T, VW>(s + off + i * VW) : Pack<T, VW>{};
    }
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
        const Pack<T, VW> w = load_pack<T, VW>(weight + min(i, nvec - 1) * VW);
        const Pack<T, VW> dr = dresidual != nullptr && i < nvec ? load_pack<T, VW>(dresidual + off + i * VW)
                                                                : Pack<T, VW>{};
        float ds[VW];
#pragma unroll
        for (int e = 0; e < VW; ++e)
          ds[e] = r * (to_float(dyv[k].v[e]) * to_float(w.v[e]) - to_float(sv[k].v[e]) * rm) + to_float(dr.v[e]);
        if (i < nvec) store_pack<T, VW>(dx + off + i * VW, cuda::float_to_pack<T, VW>(ds));
      }
    }
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

// Any D and alignment: scalar loops, the dweight partial accumulated in place in dw_partial (each
// element is only ever touched by one thread: no barrier, no atomics).
template <typename T>
__global__ void __launch_bounds__(kLoopMaxThreads)
rms_norm_bwd_rowloop_kernel(const T* __restrict__ dy, const T* __restrict__ dresidual,
                            const T* __restrict__ s, const T* __restrict__ weight,
                            const float* __restrict__ rstd, T* __restrict__ dx,
                            float* __restrict__ dw_partial, int64_t N, int D) {
  __shared__ float smem[kLoopMaxThreads / cuda::kWarpSize];
  const float inv_d = 1.0f / static_cast<float>(D);
  float* dw_row = dw_partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * D;
  for (int j = threadIdx.x; j < D; j += blockDim.x) dw_row[j] = 0.0f;

  for (int64_t rb = blockIdx.x; rb * blockDim.y < N; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * blockDim.y + threadIdx.y;
    const bool valid = row < N;
    const int64_t off = valid ? row * D : 0;
    const float r = valid ? rstd[row] : 0.0f;
    float dot = 0.0f;
    if (valid) {
      for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const float d = to_float(dy[off + j]), xhat = to_float(s[off + j]) * r;
        dot += d * to_float(weight[j]) * xhat;
        dw_row[j] += d * xhat;
      }
    }
    const float mean = group_reduce_sum(dot, smem) * inv_d;
    if (valid) {
      for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float ds = r * (to_float(dy[off + j]) * to_float(weight[j]) - to_float(s[off + j]) * r * mean);
        if (dresidual != nullptr) ds += to_float(dresidual[off + j]);
        dx[off + j] = from_float<T>(ds);
      }
    }
  }
}

// Backward, stage 2: dweight[j] = sum_p dw_partial[p, j] in a fixed order. Grid: ceil(D / 32)
// blocks of (32, 16) threads; thread (c, t) sums partial rows t, t + 16, ... of column c.
template <typename T>
__global__ void __launch_bounds__(kReduceCols * kReduceRows)
rms_norm_bwd_dweight_kernel(const float* __restrict__ dw_partial,  // [P, D]
                            T* __restrict__ dweight,                // [D]
                            int64_t P, int D) {
  __shared__ float smem[kReduceRows][kReduceCols + 1];
  const int col = blockIdx.x * kReduceCols + threadIdx.x;
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
  if (smem_bytes > 48 * 1024)  // opt in beyond the default 48 KiB (D > 12288 in 16-bit types)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
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
  rms_norm_bwd_dweight_kernel<T>
      <<<static_cast<unsigned>(ceil_div(D, kReduceCols)), dim3(kReduceCols, kReduceRows), 0, stream>>>(
          dw_partial.const_data_ptr<float>(), dweight.mutable_data_ptr<T>(), P, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The row-in-registers kernels apply when rows hold whole 16-byte packs, every row start of every
// tensor is 16-byte aligned, and D <= max_d; otherwise the row-loop kernels run.
template <typename T>
bool use_16b(int64_t D, int64_t max_d, std::initializer_list<const void*> ptrs) {
  if ((D * static_cast<int64_t>(sizeof(T))) % 16 != 0 || D > max_d) return false;
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
    if (use_16b<T>(D, kFwdVecs * kFwdMaxThreads * VW, {x.const_data_ptr(), res, weight.const_data_ptr(),
                                                       y.const_data_ptr(), res_out})) {
      launch_fwd<T>(rms_norm_fwd_kernel<T, VW>, row_block(D / VW, kFwdVecs, kFwdMaxThreads), x, res, weight, y,
                    res_out, rstd, epsf, stream);
    } else {
      launch_fwd<T>(rms_norm_fwd_rowloop_kernel<T>, row_block(D, kLoopElems, kLoopMaxThreads), x, res, weight,
                    y, res_out, rstd, epsf, stream);
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
    if (use_16b<T>(D, kBwdVecs * kBwdMaxThreads * VW, {dy.const_data_ptr(), dres, s.const_data_ptr(),
                                                       weight.const_data_ptr(), dx.const_data_ptr()})) {
      const dim3 block = row_block(D / VW, kBwdVecs, kBwdMaxThreads);
      launch_bwd<T>(rms_norm_bwd_kernel<T, VW>, block, block.y * D * sizeof(float), dy, dres, s, weight, rstd, dx,
                    dweight, stream);
    } else {
      launch_bwd<T>(rms_norm_bwd_rowloop_kernel<T>, row_block(D, kLoopElems, kLoopMaxThreads), 0, dy, dres, s,
                    weight, rstd, dx, dweight, stream);
    }
  });
  return {dx, dweight};
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("rms_norm_fwd", &baichuan::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &baichuan::rms_norm_bwd_cuda);
}
