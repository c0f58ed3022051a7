// Device helpers shared by the CUDA attention kernels (csrc/cuda/attention.cu, decode_attention.cu):
//   - tensor-core primitives for sm_80+ as inline PTX: cp.async (16-byte, zero-fill), ldmatrix(.trans),
//     mma.sync.aligned.m16n8k16 with fp32 accumulators, fp32x2 -> bf16x2 / f16x2 packing,
//   - the XOR swizzle of [rows, Dh] 16-bit tiles in shared memory (conflict-free ldmatrix),
//   - quad max / sum (online softmax rows) and lane-group sums (decode dot products), ex2.approx.
// The forward handles its inputs as raw 16-bit words (uint16_t): the element type only matters to the mma and
// to the fp32 -> 16-bit conversions, selected by the `kBf16` template flag.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace baichuan {
namespace cuda {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------------
// Shared-memory addressing. A tile of R rows x D 16-bit elements is stored row-major with its
// 16-byte chunks permuted per row: chunk c of row r lives at chunk position c ^ (r & 7). Eight
// consecutive rows of the same logical chunk (one 8x8 ldmatrix matrix) then hit 8 different 16-byte
// bank groups: conflict-free for D = 64 (128-byte rows) and D = 128 (256-byte rows).
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);  // element offset
}

// Byte offset of (row, chunk) in such a tile. For chunk = 2x + c (c = 0, 1) and x < D / 16,
// lane_offset(row, 2x + c) == lane_offset(row, c) ^ (x << 5): the step to the next 16 columns is an XOR.
template <int D>
__device__ __forceinline__ uint32_t lane_offset(int row, int chunk) {
  return static_cast<uint32_t>(swz<D>(row, chunk)) * 2u;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes 16 zero bytes (src unread).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 16-bit matrices; lane l supplies the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D[16x8] += A[16x16] (row) * B[16x8] (col); bf16 or fp16 operands, fp32 accumulators.
// Fragment layout (g = lane / 4, c = lane % 4): a0 (g, 2c..2c+1), a1 (g+8, 2c..), a2 (g, 2c+8..),
// a3 (g+8, 2c+8..); b0 (k 2c..2c+1, n g), b1 (k 2c+8.., n g); d0,d1 (g, 2c..2c+1), d2,d3 (g+8, 2c..).
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two fp32 -> one 32-bit word of two 16-bit values (round to nearest even); `lo` in the low half.
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

// 2^x on the special-function unit (ex2.approx, ~2 ulp; subnormal results flush to 0, which no
// softmax weight notices). exp2(-inf) = 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ------------------------------------------------------------------------------------------------
// Reductions over the 4 lanes of a quad (the threads sharing one row of an mma fragment) and over lane groups.

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Sum over groups of G consecutive lanes (G a power of two <= 32); every lane gets its group's sum.
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace attn
}  // namespace cuda
}  // namespace baichuan
