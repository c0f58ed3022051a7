// Flash attention forward (FA2-style) on tensor cores, with ALiBi, causal masking and varlen, CUDA.
//
// Schema (csrc/registration.cpp):
//   attention_fwd(q, k, v, cu_seqlens, alibi_slopes?, softmax_scale, causal, max_seqlen) -> (out, lse)
// Semantics: baichuan_kernels/reference/attention.py. q, k, v, out: packed [total_T, H, Dh], contiguous;
// cu_seqlens int32 [S+1] on the device (sequence s = rows cu[s] .. cu[s+1]-1, positions from 0);
// alibi_slopes fp32 [H] or None; lse fp32 [H, total_T] = natural-log logsumexp of the scaled + biased
// scores of each query row (+inf, with zero output, for a row with no allowed key, as on CPU and Triton).
//   s(i, j) = softmax_scale * <q_i, k_j> + slope_h * (j - i)   (fp32), masked to -inf where j > i (causal)
//
// SUPPORTED: fp16 and bf16 inputs, head dim Dh = 64 or 128. fp32 inputs are REFUSED with a TORCH_CHECK
// error ("q must be float16 or bfloat16 ... fp32 is not supported by the tensor-core kernel"): fp32 must
// stay fp32-accurate and the tensor-core path would round it, so the op wiring (ops/attention.py) must
// route fp32 to the Triton / CPU backends. Dh 16 / 32 (accepted by attention_checks.h): refused with an
// error naming the head dim. No CUDA attention_bwd (the Triton / CPU backward consumes `lse`).
// max_seqlen must be >= the longest sequence (rows past it would be left unwritten; not checked here,
// reading cu_seqlens would sync).
//
// Kernel (FA2-style): one CTA = 128 query rows of one (sequence, head), 4 warps x 32 rows (two m16 tiles
// per warp, so every K / V fragment read from shared memory feeds two mma.sync m16n8k16; fp32
// accumulators). Grid (ceil(max_seqlen / 128), H, S); the heaviest (last) query blocks of a causal
// sequence are scheduled first. 255 registers (Dh 128; a few spill slots, touched ~10 times per key
// block of 256 mma) or ~240 (Dh 64), 96 / 64 KiB shared memory: 2 CTAs (8 warps) per SM on H100.
// Per CTA:
//   Q tile [128, Dh] -> shared memory (cp.async), read as A fragments (ldmatrix) at every key block;
//   for each key block of 64 (two-stage cp.async pipeline: block n+1 of K and V streams into the other
//   stage while block n is computed):
//     S = Q K^T (ldmatrix on K), x = S * scale * log2e + slope * log2e * (j - i) in fp32,
//     mask (only in the blocks that need it: causal diagonal, sequence end), online softmax with exp2
//     (ex2.approx; running max m and per-thread partial row sums l in fp32), O = O * 2^(m_old - m_new)
//     + P V with P rounded to the input dtype in registers (the C fragment of S is the A fragment of
//     P V) and ldmatrix.trans on V.
//   Causal block skipping: key blocks past the CTA's last row are never loaded; within the diagonal
//   block a warp whose 32 rows precede the block skips its mma work.
//   Epilogue: O / l -> 16-bit, staged through the (swizzled) Q tile in shared memory for 16-byte
//   coalesced stores; lse = (m + log2 l) * ln 2.
// Shared memory: Q 128 x Dh + 2 stages x (K, V) 64 x Dh, 16-bit, XOR-swizzled 16-byte chunks
// (csrc/common/attention_cuda.cuh): 64 KiB (Dh 64) / 96 KiB (Dh 128).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/attention_checks.h"
#include "common/attention_cuda.cuh"

namespace baichuan {
namespace {

using namespace cuda::attn;

constexpr int kBlockM = 128;  // query rows per CTA
constexpr int kBlockN = 64;   // keys per pipeline stage
constexpr int kWarps = 4;     // kWarpRows query rows each
constexpr int kWarpRows = kBlockM / kWarps;  // 32: two m16 tiles share every K / V fragment
constexpr int kThreads = kWarps * 32;

// CTAs per SM the register allocation aims for (255 registers; a cap of 168 for 3 CTAs of Dh 64 spilled).
template <int DH>
constexpr int kMinCtas = 2;

template <int DH>
constexpr int fwd_smem_bytes() {
  return (kBlockM + 4 * kBlockN) * DH * 2;  // Q + 2 x (K, V), 16-bit
}

// Copy rows [row0, row0 + ROWS) of one head into a swizzled shared tile; rows >= len become zeros.
// base: element 0 of the head in row 0 of the sequence; ld: elements between consecutive rows.
// Thread t copies chunk t % kChunks of rows t / kChunks + it * kRowsPerIt: the row & 7 of its rows,
// hence its swizzled chunk, is the same at every step (kRowsPerIt is a multiple of 8).
template <int ROWS, int DH>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* base, int64_t ld, int row0, int len) {
  constexpr int kChunks = DH / 8;                 // 16-byte chunks per row
  constexpr int kRowsPerIt = kThreads / kChunks;  // 8 (Dh 128) or 16 (Dh 64)
  static_assert(kRowsPerIt % 8 == 0 && ROWS % kRowsPerIt == 0, "tile must split evenly over the CTA");
  const int r0 = threadIdx.x / kChunks, c0 = threadIdx.x % kChunks;
  const uint32_t dst = smem_u32(tile + swz<DH>(r0, c0));
  const uint16_t* src = base + static_cast<int64_t>(row0 + r0) * ld + c0 * 8;
#pragma unroll
  for (int it = 0; it < ROWS / kRowsPerIt; ++it) {
    const bool valid = row0 + r0 + it * kRowsPerIt < len;
    cp_async_16(dst + it * kRowsPerIt * DH * 2, valid ? src + it * kRowsPerIt * ld : base, valid);
  }
}

template <bool kBf16, int DH, bool kCausal, bool kAlibi>
__global__ void __launch_bounds__(kThreads, kMinCtas<DH>)
attention_fwd_kernel(const uint16_t* __restrict__ q,      // [total_T, H, DH]
                     const uint16_t* __restrict__ k,      // [total_T, H, DH]
                     const uint16_t* __restrict__ v,      // [total_T, H, DH]
                     uint16_t* __restrict__ out,          // [total_T, H, DH]
                     float* __restrict__ lse,             // [H, total_T]
                     const int* __restrict__ cu_seqlens,  // [S + 1]
                     const float* __restrict__ slopes,    // [H] (kAlibi)
                     float scale_log2,                    // softmax_scale * log2(e)
                     int H, int64_t total_T) {
  constexpr int kDT = DH / 8;       // n8 tiles of the output row (and 16-byte chunks per row)
  constexpr int kKT = DH / 16;      // k16 steps of Q K^T
  constexpr int kNT = kBlockN / 8;  // n8 tiles of S
  constexpr int kMT = kWarpRows / 16;  // m16 tiles per warp
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sQ = smem;                   // [128, DH]
  uint16_t* sK = sQ + kBlockM * DH;      // [2][64, DH]
  uint16_t* sV = sK + 2 * kBlockN * DH;  // [2][64, DH]

  const int seq = blockIdx.z, h = blockIdx.y;
  const int start = cu_seqlens[seq];
  const int len = cu_seqlens[seq + 1] - start;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;  // heaviest causal blocks first
  if (m0 >= len) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;  // fragment row group / column pair
  const int64_t ld = static_cast<int64_t>(H) * DH;
  const int64_t head0 = static_cast<int64_t>(start) * ld + static_cast<int64_t>(h) * DH;
  const uint16_t* qh = q + head0;
  const uint16_t* kh = k + head0;
  const uint16_t* vh = v + head0;
  const int n_end = kCausal ? min(len, m0 + kBlockM) : len;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;
  const float slope_log2 = kAlibi ? slopes[h] * kLog2e : 0.0f;

  load_tile<kBlockM, DH>(sQ, qh, ld, m0, len);
  load_tile<kBlockN, DH>(sK, kh, ld, 0, len);
  load_tile<kBlockN, DH>(sV, vh, ld, 0, len);
  cp_async_commit();

  const int wr0 = warp * kWarpRows;  // first row of this warp in the tile
  const int wm0 = m0 + wr0;          // ... and in the sequence
  // Fragment row r = 2 * mt + half of this thread: sequence position wm0 + 16 mt + 8 half + g.
  float o[kMT][kDT][4];                              // output accumulators
  float m_run[2 * kMT], l_run[2 * kMT];              // running max (log2 units), partial row sums
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int t = 0; t < kDT; ++t) o[mt][t][0] = o[mt][t][1] = o[mt][t][2] = o[mt][t][3] = 0.0f;
    m_run[2 * mt] = m_run[2 * mt + 1] = -INFINITY;
    l_run[2 * mt] = l_run[2 * mt + 1] = 0.0f;
  }

  // ldmatrix lane roles (fragment layouts: csrc/common/attention_cuda.cuh), as byte offsets of the row
  // this lane points at for chunk step 0: A from Q (16 rows, k lo / hi), B from K (2 n-tiles, k lo / hi),
  // B from V (trans: k lo / hi, 2 n-tiles). Chunk step x (16-element step kt of Q K^T, or 16-column
  // step p of P V) is the same offset ^ (x << 5): the swizzle XORs the chunk index, and the tile
  // offsets added below (multiples of 16 rows) keep row & 7.
  const uint32_t q_off = lane_offset<DH>(lane % 16, lane / 16);
  const uint32_t k_off = lane_offset<DH>((lane / 16) * 8 + lane % 8, (lane / 8) % 2);
  const uint32_t v_off = lane_offset<DH>(((lane / 8) % 2) * 8 + lane % 8, lane / 16);
  const uint32_t sQ_u32 = smem_u32(sQ) + wr0 * DH * 2;

  // One key block. kMask: the block may need masking for some warp (sequence end or causal
  // diagonal); the key blocks before those run a copy of this body with no mask code at all.
  auto key_block = [&](auto mask_tag, int nb) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int stage = nb & 1;
    if (nb + 1 < n_blocks) {  // prefetch key block nb + 1 into the other stage
      load_tile<kBlockN, DH>(sK + (stage ^ 1) * kBlockN * DH, kh, ld, (nb + 1) * kBlockN, len);
      load_tile<kBlockN, DH>(sV + (stage ^ 1) * kBlockN * DH, vh, ld, (nb + 1) * kBlockN, len);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n0 = nb * kBlockN;
    const uint32_t tK = smem_u32(sK + stage * kBlockN * DH);
    const uint32_t tV = smem_u32(sV + stage * kBlockN * DH);
    // Warp-uniform: all rows of this warp precede every key of the block -> nothing to do.
    if (!(kCausal && n0 > wm0 + kWarpRows - 1)) {
      // S = Q K^T: [32, 64] per warp; Q fragments re-read from shared memory, K fragments used twice.
      float s[kMT][kNT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int t = 0; t < kNT; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.0f;
#pragma unroll
      for (int kt = 0; kt < kKT; ++kt) {
        uint32_t qa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
          ldmatrix_x4(qa[mt], sQ_u32 + mt * 16 * DH * 2 + (q_off ^ (kt << 5)));
#pragma unroll
        for (int p = 0; p < kNT / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4(b, tK + p * 16 * DH * 2 + (k_off ^ (kt << 5)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<kBf16>(s[mt][2 * p], qa[mt], b[0], b[1]);
            mma_16816<kBf16>(s[mt][2 * p + 1], qa[mt], b[2], b[3]);
          }
        }
      }
      // Scale, ALiBi, mask (log2 units), then the online softmax update.
      // Element (mt, t, e) of this thread: key j = n0 + 2c + col, query i = wm0 + g + row with the
      // compile-time offsets col = 8t + (e & 1), row = 16 mt + 8 (e >> 1); so j - i = dj0 + col - row
      // (exact in fp32: |j - i| < 2^24) and j < len <=> col < jlim.
      const bool need_mask = kMask && (n0 + kBlockN > len || (kCausal && n0 + kBlockN - 1 > wm0));
      const int dj0 = n0 + 2 * c - wm0 - g, jlim = len - n0 - 2 * c;
      const float fdj0 = static_cast<float>(dj0);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        float mx[2] = {m_run[2 * mt], m_run[2 * mt + 1]};
#pragma unroll
        for (int t = 0; t < kNT; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = t * 8 + (e & 1), rel = col - mt * 16 - (e >> 1) * 8;  // compile-time
            float x = s[mt][t][e] * scale_log2;
            if (kAlibi) x = fmaf(slope_log2, fdj0 + static_cast<float>(rel), x);  // slope * (j - i)
            if (kMask && need_mask && (col >= jlim || (kCausal && dj0 + rel > 0))) x = -INFINITY;
            s[mt][t][e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
          }
        }
        float base[2], alpha[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          mx[hf] = quad_max(mx[hf]);
          base[hf] = mx[hf] == -INFINITY ? 0.0f : mx[hf];  // all masked so far: exp2(-inf - 0) = 0, no NaN
          alpha[hf] = exp2_approx(m_run[2 * mt + hf] - base[hf]);
          m_run[2 * mt + hf] = mx[hf];
        }
#pragma unroll
        for (int t = 0; t < kNT; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][t][e] = exp2_approx(s[mt][t][e] - base[e >> 1]);
            rs[e >> 1] += s[mt][t][e];
          }
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) l_run[2 * mt + hf] = l_run[2 * mt + hf] * alpha[hf] + rs[hf];
#pragma unroll
        for (int t = 0; t < kDT; ++t) {
          o[mt][t][0] *= alpha[0];
          o[mt][t][1] *= alpha[0];
          o[mt][t][2] *= alpha[1];
          o[mt][t][3] *= alpha[1];
        }
      }
      // O += P V: P (rounded to the input dtype) is the A operand, 4 k16 steps over the 64 keys.
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        uint32_t pa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          pa[mt][0] = pack2<kBf16>(s[mt][2 * kt][0], s[mt][2 * kt][1]);
          pa[mt][1] = pack2<kBf16>(s[mt][2 * kt][2], s[mt][2 * kt][3]);
          pa[mt][2] = pack2<kBf16>(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
          pa[mt][3] = pack2<kBf16>(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
        }
#pragma unroll
        for (int p = 0; p < kDT / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, tV + kt * 16 * DH * 2 + (v_off ^ (p << 5)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<kBf16>(o[mt][2 * p], pa[mt], b[0], b[1]);
            mma_16816<kBf16>(o[mt][2 * p + 1], pa[mt], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
  };
  // Leading key blocks that no row of the CTA needs masked: full blocks before the sequence end and,
  // when causal, entirely at or below the CTA's first row.
  const int n_plain = min(kCausal ? (m0 + 1) / kBlockN : n_blocks, len / kBlockN);
  for (int nb = 0; nb < n_plain; ++nb) key_block(std::false_type{}, nb);
  for (int nb = n_plain; nb < n_blocks; ++nb) key_block(std::true_type{}, nb);

  // Epilogue: normalise, round, stage this warp's rows in its part of sQ (each warp only ever read its
  // own Q rows), then 16-byte coalesced stores.
  uint16_t* sO = sQ + wr0 * DH;  // wr0 is a multiple of 8: the swizzle of row r is unchanged
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float inv[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(l_run[2 * mt + hf]);
      const int i = wm0 + mt * 16 + hf * 8 + g;
      inv[hf] = l == 0.0f ? 0.0f : 1.0f / l;  // l = 0: no allowed key; a NaN l (NaN score) stays NaN
      if (c == 0 && i < len)
        lse[static_cast<int64_t>(h) * total_T + start + i] =
            l == 0.0f ? INFINITY : (m_run[2 * mt + hf] + log2f(l)) * kLn2;  // +inf like the CPU/Triton kernels: exp(s - lse) = 0 in a backward
    }
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      *reinterpret_cast<uint32_t*>(sO + swz<DH>(mt * 16 + g, t) + 2 * c) =
          pack2<kBf16>(o[mt][t][0] * inv[0], o[mt][t][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(sO + swz<DH>(mt * 16 + g + 8, t) + 2 * c) =
          pack2<kBf16>(o[mt][t][2] * inv[1], o[mt][t][3] * inv[1]);
    }
  }
  __syncwarp();
  uint16_t* oh = out + head0;
#pragma unroll
  for (int it = 0; it < kWarpRows * kDT / 32; ++it) {
    const int idx = it * 32 + lane;
    const int r = idx / kDT, ch = idx % kDT;
    if (wm0 + r < len)
      *reinterpret_cast<uint4*>(oh + static_cast<int64_t>(wm0 + r) * ld + ch * 8) =
          *reinterpret_cast<const uint4*>(sO + swz<DH>(r, ch));
  }
}

// Everything a launch needs besides the template flags.
struct FwdArgs {
  const at::Tensor &q, &k, &v, &cu_seqlens;
  at::Tensor &out, &lse;
  const float* slopes;  // nullptr: no ALiBi
  float scale_log2;
  int64_t max_seqlen;
  cudaStream_t stream;
};

template <bool kBf16, int DH, bool kCausal, bool kAlibi>
void launch_fwd(const FwdArgs& a) {
  auto kernel = attention_fwd_kernel<kBf16, DH, kCausal, kAlibi>;
  constexpr int smem = fwd_smem_bytes<DH>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>((a.max_seqlen + kBlockM - 1) / kBlockM), static_cast<unsigned>(a.q.size(1)),
                  static_cast<unsigned>(a.cu_seqlens.size(0) - 1));
  kernel<<<grid, kThreads, smem, a.stream>>>(
      static_cast<const uint16_t*>(a.q.const_data_ptr()), static_cast<const uint16_t*>(a.k.const_data_ptr()),
      static_cast<const uint16_t*>(a.v.const_data_ptr()), static_cast<uint16_t*>(a.out.mutable_data_ptr()),
      a.lse.mutable_data_ptr<float>(), a.cu_seqlens.const_data_ptr<int>(), a.slopes, a.scale_log2,
      static_cast<int>(a.q.size(1)), a.q.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kBf16, int DH>
void dispatch_flags(bool causal, const FwdArgs& a) {
  const bool alibi = a.slopes != nullptr;
  if (causal) {
    if (alibi) launch_fwd<kBf16, DH, true, true>(a);
    else launch_fwd<kBf16, DH, true, false>(a);
  } else {
    if (alibi) launch_fwd<kBf16, DH, false, true>(a);
    else launch_fwd<kBf16, DH, false, false>(a);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Host entry point.

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& cu_seqlens,
                                                      const c10::optional<at::Tensor>& alibi_slopes,
                                                      double softmax_scale, bool causal, int64_t max_seqlen) {
  check_attention_fwd(q, k, v, cu_seqlens, alibi_slopes, softmax_scale, max_seqlen);  // shared checks
  // What this kernel adds: CUDA, 16-bit dtypes, Dh 64 / 128, grid limits, 16-byte aligned rows.
  TORCH_CHECK(q.is_cuda(), "attention_fwd (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention_fwd (CUDA): q must be float16 or bfloat16, got ", q.scalar_type(),
              " (fp32 is not supported by the tensor-core kernel: use the triton or cpu backend)");
  const int64_t total_T = q.size(0), H = q.size(1), Dh = q.size(2);
  TORCH_CHECK(Dh == 64 || Dh == 128, "attention_fwd (CUDA): head dim Dh must be 64 or 128, got ", Dh);
  const int64_t S = cu_seqlens.size(0) - 1;
  TORCH_CHECK(H >= 1 && H <= 65535 && S <= 65535, "attention_fwd (CUDA): H (", H, ") and num_seqs (", S,
              ") must be in [1, 65535]");
  TORCH_CHECK(total_T < std::numeric_limits<int>::max(), "attention_fwd (CUDA): total_T = ", total_T,
              " is too large");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0,
                "attention_fwd (CUDA): q, k, v must be 16-byte aligned");
  // max_seqlen must be >= the longest sequence (not checked here: reading cu_seqlens would sync);
  // no sequence is longer than total_T.
  TORCH_CHECK(max_seqlen > 0 || total_T == 0, "attention_fwd: max_seqlen must be >= the longest sequence, got ",
              max_seqlen, " with total_T = ", total_T);
  max_seqlen = std::min(max_seqlen, total_T);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);                                         // [total_T, H, Dh]
  at::Tensor lse = at::empty({H, total_T}, q.options().dtype(at::kFloat));  // [H, total_T]
  if (total_T == 0 || max_seqlen == 0) return {out, lse};
  const FwdArgs args{q, k, v, cu_seqlens, out, lse,
                     alibi_slopes.has_value() ? alibi_slopes->const_data_ptr<float>() : nullptr,
                     static_cast<float>(softmax_scale * 1.4426950408889634), max_seqlen,
                     c10::cuda::getCurrentCUDAStream()};
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (bf16 && Dh == 64) dispatch_flags<true, 64>(causal, args);
  else if (bf16) dispatch_flags<true, 128>(causal, args);
  else if (Dh == 64) dispatch_flags<false, 64>(causal, args);
  else dispatch_flags<false, 128>(causal, args);
  return {out, lse};
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) { m.impl("attention_fwd", &baichuan::attention_fwd_cuda); }
