// Weight-only quantized matmul, CUDA: the decode GEMV (M <= 16 rows of bf16/fp16 x).
//
// Semantics: baichuan_kernels/reference/quant_matmul.py; formats: csrc/common/quant_matmul_checks.h.
// Prefill-sized M runs the Triton GEMM (baichuan_kernels/triton/quant_matmul.py).
//
// One warp per weight row n (kWarps rows per block), optionally split over K (grid.y): each lane
// streams 16-byte loads of the packed row (32 int4 codes or 16 int8 codes per load, kUnroll loads in
// flight), dequantises in registers and multiplies with the matching x elements of every row m < M
// (x is tiny and stays in L1/L2), accumulating in fp32. A warp shuffle reduction ends the row.
//   bits = 4: w = q * scale[n, g] + zero[n, g]   (a lane's 32 codes always lie in one group)
//   bits = 8: acc += q * x, times scale[n] at the end (q exact in fp32)
// Codes become floats without I2F: 0x4B000000 | v is the float 2^23 + v, so one OR and one FADD.
//   NF4 (bits = 4 with a codebook): w = codebook[q] * absmax[n, g]; the 16-entry codebook sits in
//   shared memory (loaded once per block; a lookup is one conflict-free LDS: 16 words, 16 banks).
// Split-K: when the rows alone cannot fill the GPU (N small against the SM count) and K is large,
// the K range is cut into S slices; slice partials go to an fp32 [S, M, N] buffer that a second
// kernel sums in a fixed order (deterministic, no atomics). int8 rows that are not 16-byte aligned
// (K % 16 != 0) take the same kernel with 1-byte loads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/quant_matmul_checks.h"

namespace baichuan {
namespace {

using cuda::ceil_div;
using cuda::from_float;
using cuda::is_aligned;
using cuda::load_pack;
using cuda::Pack;
using cuda::round_up;
using cuda::to_float;
using cuda::warp_reduce_sum;

constexpr int kWarps = 8;       // weight rows per block (one warp each)
constexpr int kUnroll = 4;      // 16-byte weight loads in flight per lane
constexpr int kMaxM = 16;       // rows of x the GEMV serves
constexpr int kSplitAlign = 1024;  // K slices are multiples of this (>= one warp step of codes)

// Exact conversion of a small unsigned integer v < 2^23 to float.
__device__ __forceinline__ float small_uint_to_float(uint32_t v) {
  return __uint_as_float(0x4B000000u | v) - 8388608.0f;
}

// The EPL fp32 weights of one lane step. BYTES = 16: four 32-bit words of packed codes.
template <int BITS, int BYTES>
struct Dequant;

template <>
struct Dequant<4, 16> {  // element 8j + t = nibble t of word j (even k low nibble)
  static constexpr int EPL = 32;
  __device__ __forceinline__ static void run(const Pack<uint32_t, 4>& p, float s, float z, float (&w)[EPL]) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int t = 0; t < 8; ++t) w[8 * j + t] = fmaf(small_uint_to_float((p.v[j] >> (4 * t)) & 0xFu), s, z);
  }
};

template <>
struct Dequant<8, 16> {  // element 4j + t = signed byte t of word j; the scale comes at the end
  static constexpr int EPL = 16;
  __device__ __forceinline__ static void run(const Pack<uint32_t, 4>& p, float, float, float (&w)[EPL]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t u = p.v[j] ^ 0x80808080u;  // q + 128 in each byte
#pragma unroll
      for (int t = 0; t < 4; ++t) w[4 * j + t] = small_uint_to_float((u >> (8 * t)) & 0xFFu) - 128.0f;
    }
  }
};

template <>
struct Dequant<8, 1> {
  static constexpr int EPL = 1;
  __device__ __forceinline__ static void run(const Pack<uint32_t, 4>& p, float, float, float (&w)[EPL]) {
    w[0] = static_cast<float>(static_cast<int8_t>(p.v[0] & 0xFFu));
  }
};

// NF4: element 8j + t = nibble t of word j, decoded through the shared codebook, times the absmax.
__device__ __forceinline__ void dequant_nf4(const Pack<uint32_t, 4>& p, float s, const float* cb, float (&w)[32]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int t = 0; t < 8; ++t) w[8 * j + t] = cb[(p.v[j] >> (4 * t)) & 0xFu] * s;
}

// acc += sum_e w[e] * x[e] over EPL elements of x at p (aligned for 16-byte packs when EPL allows).
template <typename T, int EPL>
__device__ __forceinline__ float dot_x(const T* p, const float (&w)[EPL], float acc) {
  constexpr int VX = EPL * sizeof(T) >= 16 ? 16 / static_cast<int>(sizeof(T)) : 1;
#pragma unroll
  for (int i = 0; i < EPL / VX; ++i) {
    const Pack<T, VX> xv = load_pack<T, VX>(p + i * VX);
#pragma unroll
    for (int e = 0; e < VX; ++e) acc = fmaf(w[i * VX + e], to_float(xv.v[e]), acc);
  }
  return acc;
}

template <typename T, int BITS, int BYTES, int MT, bool NF4>
__global__ void __launch_bounds__(kWarps * 32)
quant_gemv_kernel(const T* __restrict__ x,             // [M, K]
                  const uint8_t* __restrict__ q,       // [N, K * BITS / 8] packed codes
                  const float* __restrict__ scales,    // [N] (bits 8) | [N, K / group] (bits 4)
                  const float* __restrict__ zeros,     // [N, K / group] (bits 4) | nullptr (bits 8, NF4)
                  const float* __restrict__ codebook,  // [16] (NF4) | nullptr
                  T* __restrict__ y,                   // [M, N]      (one K slice)
                  float* __restrict__ partial,         // [S, M, N]   (S > 1 K slices)
                  int M, int N, int K, int group_size, int k_slice) {
  using D = Dequant<BITS, BYTES>;
  constexpr int EPL = D::EPL;        // codes per lane per load
  constexpr int STEP = 32 * EPL;     // codes per warp per load
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarps + threadIdx.x / 32;
  __shared__ float cb_s[16];
  if (NF4) {  // before any thread leaves: the one block-level barrier
    if (threadIdx.x < 16) cb_s[threadIdx.x] = __ldg(codebook + threadIdx.x);
    __syncthreads();
  }
  if (n >= N) return;  // uniform over the warp; no block-level barrier below
  const int k_begin = blockIdx.y * k_slice;
  const int k_end = min(K, k_begin + k_slice);
  const uint8_t* qrow = q + static_cast<int64_t>(n) * K * BITS / 8;
  const int G = BITS == 4 ? K / group_size : 1;

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  for (int k0 = k_begin + lane * EPL; k0 < k_end; k0 += kUnroll * STEP) {
    Pack<uint32_t, 4> packed[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll in flight
      const int k = k0 + u * STEP;
      if (BYTES == 16) {
        packed[u] = k < k_end ? load_pack<uint32_t, 4>(reinterpret_cast<const uint32_t*>(qrow + k * BITS / 8))
                              : Pack<uint32_t, 4>{};
      } else {
        packed[u].v[0] = k < k_end ? qrow[k] : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = k0 + u * STEP;
      if (k < k_end) {
        float s = 0.0f, z = 0.0f;
        if (BITS == 4) {
          const int64_t gi = static_cast<int64_t>(n) * G + k / group_size;
          s = __ldg(scales + gi);
          if (!NF4) z = __ldg(zeros + gi);
        }
        float w[EPL];
        if constexpr (NF4 && BITS == 4 && BYTES == 16) {
          dequant_nf4(packed[u], s, cb_s, w);
        } else {
          D::run(packed[u], s, z, w);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < M) acc[m] = dot_x<T, EPL>(x + static_cast<int64_t>(m) * K + k, w, acc[m]);
      }
    }
  }
  const float row_scale = BITS == 8 ? __ldg(scales + n) : 1.0f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float v = warp_reduce_sum(acc[m]) * row_scale;
    if (lane == 0 && m < M) {
      const int64_t i = static_cast<int64_t>(m) * N + n;
      if (partial != nullptr) {
        partial[static_cast<int64_t>(blockIdx.y) * M * N + i] = v;
      } else {
        y[i] = from_float<T>(v);
      }
    }
  }
}

// y[i] = sum_s partial[s, i] in slice order.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, T* __restrict__ y, int S, int64_t MN) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float acc = 0.0f;
  for (int s = 0; s < S; ++s) acc += partial[s * MN + i];
  y[i] = from_float<T>(acc);
}

template <typename T, int BITS, int BYTES, bool NF4>
void launch(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
            const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& codebook, int group_size,
            int k_slice, int S, at::Tensor& y, at::Tensor& partial, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)), N = static_cast<int>(qdata.size(0));
  const dim3 grid(ceil_div(N, kWarps), S), block(kWarps * 32);
  const T* xp = x.const_data_ptr<T>();
  const uint8_t* qp = static_cast<const uint8_t*>(qdata.const_data_ptr());
  const float* zp = zeros.has_value() ? zeros->const_data_ptr<float>() : nullptr;
  const float* cbp = codebook.has_value() ? codebook->const_data_ptr<float>() : nullptr;
  float* pp = S > 1 ? partial.data_ptr<float>() : nullptr;
  T* yp = y.data_ptr<T>();
  auto go = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(xp, qp, scales.const_data_ptr<float>(), zp, cbp, yp, pp, M, N, K,
                                       group_size, k_slice);
  };
  if (M == 1) {
    go(quant_gemv_kernel<T, BITS, BYTES, 1, NF4>);
  } else if (M <= 4) {
    go(quant_gemv_kernel<T, BITS, BYTES, 4, NF4>);
  } else {
    go(quant_gemv_kernel<T, BITS, BYTES, kMaxM, NF4>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define QUANT_DISPATCH_HALF_BF16(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

at::Tensor quant_matmul_fwd_cuda(const at::Tensor& x_in, const at::Tensor& qdata, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                 const c10::optional<at::Tensor>& codebook) {
  const int64_t N = check_quant_matmul_fwd(x_in, qdata, scales, zeros, bits, group_size, codebook);
  TORCH_CHECK(x_in.is_cuda(), "quant_matmul_fwd_cuda: tensors must be on a CUDA device, got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "x must be float16 or bfloat16 for the CUDA GEMV (fp32 x: the Triton backend), got ",
              x_in.scalar_type());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(M <= kMaxM, "x must have at most ", kMaxM, " rows for the CUDA GEMV (larger M: the Triton GEMM), got ",
              M);
  TORCH_CHECK(K < (int64_t{1} << 30) && N < (int64_t{1} << 30), "quant_matmul_fwd_cuda: K and N must be < 2^30");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  // 16-byte packs of x need an aligned base (rows are aligned whenever the vector path runs).
  const at::Tensor x = is_aligned(x_in.const_data_ptr(), 16) ? x_in : x_in.clone();
  const bool vec8 = K % 16 == 0 && is_aligned(qdata.const_data_ptr(), 16);
  TORCH_CHECK(bits == 8 || is_aligned(qdata.const_data_ptr(), 16), "qdata must be 16-byte aligned");

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t row_blocks = ceil_div<int64_t>(N, kWarps);
  const int64_t want = ceil_div<int64_t>(8LL * sms, row_blocks);  // 8 blocks of 256 threads fill an SM
  int64_t S = std::max<int64_t>(1, std::min<int64_t>(want, K / (2 * kSplitAlign)));
  const int64_t k_slice = round_up<int64_t>(ceil_div<int64_t>(K, S), kSplitAlign);
  S = ceil_div<int64_t>(K, k_slice);
  at::Tensor partial = S > 1 ? at::empty({S, M, N}, x.options().dtype(at::kFloat)) : at::Tensor();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int gs = static_cast<int>(group_size), ks = static_cast<int>(k_slice), s = static_cast<int>(S);
  QUANT_DISPATCH_HALF_BF16(x.scalar_type(), "quant_matmul_fwd_cuda", [&] {
    if (bits == 4 && codebook.has_value()) {
      launch<scalar_t, 4, 16, true>(x, qdata, scales, zeros, codebook, gs, ks, s, y, partial, stream);
    } else if (bits == 4) {
      launch<scalar_t, 4, 16, false>(x, qdata, scales, zeros, codebook, gs, ks, s, y, partial, stream);
    } else if (vec8) {
      launch<scalar_t, 8, 16, false>(x, qdata, scales, zeros, codebook, gs, ks, s, y, partial, stream);
    } else {
      launch<scalar_t, 8, 1, false>(x, qdata, scales, zeros, codebook, gs, ks, s, y, partial, stream);
    }
    if (S > 1) {
      const int64_t MN = M * N;
      splitk_reduce_kernel<scalar_t><<<ceil_div<int64_t>(MN, 256), 256, 0, stream>>>(
          partial.const_data_ptr<float>(), y.data_ptr<scalar_t>(), s, MN);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) { m.impl("quant_matmul_fwd", &baichuan::quant_matmul_fwd_cuda); }
