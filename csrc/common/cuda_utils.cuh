// Small __host__ __device__ helpers shared by the CUDA kernels of csrc/cuda/*.cu:
//   - Pack<T, N>: N elements of T moved as ONE aligned load/store (16 bytes -> LDG.128 / STG.128),
//   - to_float / from_float: fp32 <-> c10::Half / c10::BFloat16 / float, round-to-nearest-even,
//   - warp_reduce_sum / group_reduce_sum: fp32 sums over a warp or over a group of warps of a block,
//   - is_aligned / all_aligned / ceil_div / round_up, row_group_block (launch shape of row kernels),
//   - sum_rows_kernel: deterministic fp32 column sums of per-block partials (no atomics),
//   - BAICHUAN_DISPATCH_FLOAT_HALF_BF16: AT_DISPATCH over fp32 / fp16 / bf16 only.
// Only ATen scalar types are used (c10::Half, c10::BFloat16), so it compiles with torch's default
// -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ flags.
#pragma once

#include <ATen/Dispatch.h>

#include "common/checks.h"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace baichuan {
namespace cuda {

constexpr int kWarpSize = 32;

// ------------------------------------------------------------------------------------------------
// Integer helpers.

template <typename I>
__host__ __device__ __forceinline__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

template <typename I>
__host__ __device__ __forceinline__ constexpr I round_up(I a, I b) {
  return ceil_div(a, b) * b;
}

// True when `p` may be accessed with `bytes`-wide vector instructions.
__host__ __device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// True when every non-null pointer is `bytes`-aligned.
inline bool all_aligned(std::initializer_list<const void*> ptrs, int bytes) {
  for (const void* p : ptrs)
    if (p != nullptr && !is_aligned(p, bytes)) return false;
  return true;
}

// Block shape for "row group" kernels (see group_reduce_sum): blockDim.x = threads per row, a
// multiple of 32 covering ceil(n / per) items, clamped to [32, max_threads]; blockDim.y = rows per
// block, enough to reach about `block_target` threads when rows are short.
inline dim3 row_group_block(int64_t n, int per, int max_threads, int block_target) {
  const int64_t want = round_up<int64_t>(ceil_div<int64_t>(n, per), kWarpSize);
  const int tpr = static_cast<int>(want < kWarpSize ? kWarpSize : (want > max_threads ? max_threads : want));
  return dim3(tpr, block_target / tpr > 1 ? block_target / tpr : 1);
}

// ------------------------------------------------------------------------------------------------
// Type conversion: every kernel computes in fp32 and rounds once when storing.

template <typename T>
__host__ __device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);  // c10::Half / c10::BFloat16: round-to-nearest-even
}

// ------------------------------------------------------------------------------------------------
// Vector packs. Pack<T, N> is N consecutive elements with the alignment of its whole size, so a
// load or store of one Pack is a single N * sizeof(T)-byte memory instruction when the address is
// aligned (the caller checks). N = 16 / sizeof(T) gives the 16-byte accesses memory-bound kernels
// want; N = 1 is the scalar fallback for unaligned rows.

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
struct VecWidth {
  static constexpr int k16B = 16 / static_cast<int>(sizeof(T));  // 4 for fp32, 8 for fp16 / bf16
};

// p: element pointer, aligned to sizeof(Pack<T, N>).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Unpack to / pack from fp32 registers.
template <typename T, int N>
__device__ __forceinline__ void pack_to_float(const Pack<T, N>& in, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(in.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> float_to_pack(const float (&in)[N]) {
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) out.v[i] = from_float<T>(in[i]);
  return out;
}

// ------------------------------------------------------------------------------------------------
// Reductions (fp32, fixed order: bitwise reproducible for a given launch configuration).

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over a "group": the blockDim.x threads that share threadIdx.y (e.g. the threads working
// on one row when a block of blockDim.x * blockDim.y threads handles blockDim.y rows). Requires
// blockDim.x to be a multiple of 32 and every thread of the block to call it (it may
// __syncthreads()). smem: at least blockDim.x * blockDim.y / 32 floats. Every thread of the group
// gets the sum. Safe to call repeatedly with the same smem.
__device__ __forceinline__ float group_reduce_sum(float v, float* smem) {
  v = warp_reduce_sum(v);
  const int warps_per_group = blockDim.x / kWarpSize;
  if (warps_per_group == 1) return v;  // uniform over the block: no barrier needed
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarpSize;
  if (lane == 0) smem[tid / kWarpSize] = v;
  __syncthreads();
  // Each warp re-reduces the partial sums of its own group, so every thread ends with the total.
  v = lane < warps_per_group ? smem[threadIdx.y * warps_per_group + lane] : 0.0f;
  v = warp_reduce_sum(v);
  __syncthreads();  // smem may be reused by the next call
  return v;
}

// ------------------------------------------------------------------------------------------------
// Deterministic column sums: out[j] = sum_p partial[p, j] (fp32, rounded once to T), for the
// "one fp32 partial row per block, then reduce" pattern that replaces atomics (e.g. dweight).
// Grid sum_rows_grid(D) of sum_rows_block() = (32, 16) threads: thread (c, t) adds rows t, t + 16,
// ... of its column in order, then thread (c, 0) adds the 16 results in order.
constexpr int kSumRowsCols = 32;
constexpr int kSumRowsSplit = 16;

inline dim3 sum_rows_block() { return dim3(kSumRowsCols, kSumRowsSplit); }
inline dim3 sum_rows_grid(int D) { return dim3(static_cast<unsigned>(ceil_div(D, kSumRowsCols))); }

template <typename T>
__global__ void __launch_bounds__(kSumRowsCols * kSumRowsSplit)
sum_rows_kernel(const float* __restrict__ partial,  // [P, D]
                T* __restrict__ out,                // [D]
                int64_t P, int D) {
  __shared__ float smem[kSumRowsSplit][kSumRowsCols + 1];
  const int col = blockIdx.x * kSumRowsCols + threadIdx.x;
  float acc = 0.0f;
  if (col < D)
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < P; p += kSumRowsSplit) acc += partial[p * D + col];  // loads in flight, same order
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    float total = 0.0f;
#pragma unroll
    for (int t = 0; t < kSumRowsSplit; ++t) total += smem[t][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

}  // namespace cuda
}  // namespace baichuan

// ------------------------------------------------------------------------------------------------
// Dtype dispatch over exactly the three dtypes the ops accept (the checks reject the others).
// AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...) would also instantiate every kernel for
// double, which no op accepts: a third more device code and compile time for nothing.
// BAICHUAN_DISPATCH_FLOAT_HALF_BF16 lives in common/checks.h (shared with the CPU kernels).
