// Flash attention forward (FA2-style) on tensor cores, with ALiBi, causal masking and varlen, CUDA.
//
// Schema (csrc/registration.cpp):
//   attention_fwd(q, k, v, cu_seqlens, alibi_slopes?, softmax_scale, causal, max_seqlen) -> (out, lse)
// Semantics: baichuan_kernels/reference/attention.py. q, k, v, out: packed [total_T, H, Dh], contiguous;
// cu_seqlens int32 [S+1] on the device (sequence s = rows cu[s] .. cu[s+1]-1, positions from 0);
// alibi_slopes fp32 [H] or None; lse fp32 [H, total_T] = natural-log logsumexp of the scaled + biased
// scores of each query row (-inf, with zero output, for a row with no allowed key).
//   s(i, j) = softmax_scale * <q_i, k_j> + slope_h * (j - i)   (fp32), masked to -inf where j > i (causal)
//
// SUPPORTED: fp16 and bf16 inputs, head dim Dh = 64 or 128. fp32 inputs are REFUSED with a TORCH_CHECK
// error ("... fp32 ... not supported"): fp32 must stay fp32-accurate and the tensor-core path would round
// it, so the op wiring (ops/attention.py) routes fp32 to the Triton / CPU backends. Other Dh: error
// naming the head dim. No backward here (the Triton / CPU backward consumes `lse`).
//
// Kernel: one CTA = 128 query rows of one (sequence, head), 8 warps x 16 rows (mma m16n8k16, fp32
// accumulators). Grid (ceil(max_seqlen / 128), H, S); the heaviest (last) query blocks of a causal
// sequence are scheduled first. Per CTA:
//   Q tile [128, Dh] -> shared (cp.async) -> registers (ldmatrix, kept for the whole loop);
//   for each key block of 64 (two-stage cp.async pipeline: block n+1 of K and V streams into the other
//   stage while block n is computed):
//     S = Q K^T (ldmatrix on K), x = S * scale * log2e + slope * log2e * (j - i) in fp32,
//     mask (only in the blocks that need it: causal diagonal, sequence end), online softmax with exp2f
//     (running max m and per-thread partial row sums l in fp32), O = O * 2^(m_old - m_new) + P V
//     with P rounded to the input dtype in registers (the C fragment of S is the A fragment of P V)
//     and ldmatrix.trans on V.
//   Causal block skipping: key blocks past the CTA's last row are never loaded; within the diagonal
//   block a warp whose 16 rows precede the block skips its mma work.
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

#include "common/attention_checks.h"
#include "common/attention_cuda.cuh"

namespace baichuan {
namespace {

using namespace cuda::attn;

constexpr int kBlockM = 128;  // query rows per CTA
constexpr int kBlockN = 64;   // keys per pipeline stage
constexpr int kWarps = 8;     // 16 query rows each
constexpr int kThreads = kWarps * 32;

template <int DH>
constexpr int fwd_smem_bytes() {
  return (kBlockM + 4 * kBlockN) * DH * 2;  // Q + 2 x (K, V), 16-bit
}

// Copy rows [row0, row0 + ROWS) of one head into a swizzled shared tile; rows >= len become zeros.
// base: element 0 of the head in row 0 of the sequence; ld: elements between consecutive rows.
template <int ROWS, int DH>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* base, int64_t ld, int row0, int len) {
  constexpr int kChunks = DH / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % kThreads == 0, "tile must split evenly over the CTA");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + threadIdx.x;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < len;
    const uint16_t* src = base + (valid ? static_cast<int64_t>(row0 + r) * ld : 0) + c * 8;
    cp_async_16(smem_u32(tile + swz<DH>(r, c)), src, valid);
  }
}

template <bool kBf16, int DH, bool kCausal, bool kAlibi>
__global__ void __launch_bounds__(kThreads, 1)
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
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sQ = smem;                          // [128, DH]
  uint16_t* sK = sQ + kBlockM * DH;             // [2][64, DH]
  uint16_t* sV = sK + 2 * kBlockN * DH;         // [2][64, DH]

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

  const int wm0 = m0 + warp * 16;            // first row of this warp (position in the sequence)
  const int rows[2] = {wm0 + g, wm0 + g + 8};  // this thread's two fragment rows
  uint32_t qf[kKT][4];                       // Q fragments, loaded once
  float o[kDT][4];                           // output accumulators
#pragma unroll
  for (int t = 0; t < kDT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 units)
  float l_run[2] = {0.0f, 0.0f};            // this thread's partial row sums

  // ldmatrix lane roles (see attention_cuda.cuh for the fragment layouts).
  const int a_row = lane % 16, a_chk = lane / 16;               // A (Q): rows 0-15, chunk lo/hi
  const int b_row = (lane / 16) * 8 + lane % 8, b_chk = (lane / 8) % 2;  // B from K: 2 n-tiles, k lo/hi
  const int v_row = ((lane / 8) % 2) * 8 + lane % 8, v_chk = lane / 16;  // B from V (trans)

  for (int nb = 0; nb < n_blocks; ++nb) {
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
    if (nb == 0) {
#pragma unroll
      for (int kt = 0; kt < kKT; ++kt)
        ldmatrix_x4(qf[kt], smem_u32(sQ + swz<DH>(warp * 16 + a_row, kt * 2 + a_chk)));
    }
    const int n0 = nb * kBlockN;
    const uint16_t* tK = sK + stage * kBlockN * DH;
    const uint16_t* tV = sV + stage * kBlockN * DH;
    // Warp-uniform: all 16 rows of this warp precede every key of the block -> nothing to do.
    if (!(kCausal && n0 > wm0 + 15)) {
      // S = Q K^T: [16, 64] per warp.
      float s[kNT][4];
#pragma unroll
      for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
      for (int kt = 0; kt < kKT; ++kt) {
#pragma unroll
        for (int p = 0; p < kNT / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4(b, smem_u32(tK + swz<DH>(p * 16 + b_row, kt * 2 + b_chk)));
          mma_16816<kBf16>(s[2 * p], qf[kt], b[0], b[1]);
          mma_16816<kBf16>(s[2 * p + 1], qf[kt], b[2], b[3]);
        }
      }
      // Scale, ALiBi, mask (log2 units), then the online softmax update.
      const bool need_mask = n0 + kBlockN > len || (kCausal && n0 + kBlockN - 1 > wm0);
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = n0 + t * 8 + 2 * c + (e & 1), i = rows[e >> 1];
          float x = s[t][e] * scale_log2;
          if (kAlibi) x = fmaf(slope_log2, static_cast<float>(j - i), x);
          if (need_mask && (j >= len || (kCausal && j > i))) x = -INFINITY;
          s[t][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
      float base[2], alpha[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max(mx[r]);
        base[r] = mx[r] == -INFINITY ? 0.0f : mx[r];  // all masked so far: exp2(-inf - 0) = 0, no NaN
        alpha[r] = exp2f(m_run[r] - base[r]);
        m_run[r] = mx[r];
      }
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[t][e] = exp2f(s[t][e] - base[e >> 1]);
          rs[e >> 1] += s[t][e];
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        o[t][0] *= alpha[0];
        o[t][1] *= alpha[0];
        o[t][2] *= alpha[1];
        o[t][3] *= alpha[1];
      }
      // O += P V: P (rounded to the input dtype) is the A operand, 4 k16 steps over the 64 keys.
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        const uint32_t pa[4] = {pack2<kBf16>(s[2 * kt][0], s[2 * kt][1]), pack2<kBf16>(s[2 * kt][2], s[2 * kt][3]),
                                pack2<kBf16>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                                pack2<kBf16>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
        for (int p = 0; p < kDT / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, smem_u32(tV + swz<DH>(kt * 16 + v_row, p * 2 + v_chk)));
          mma_16816<kBf16>(o[2 * p], pa, b[0], b[1]);
          mma_16816<kBf16>(o[2 * p + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
  }

  // Epilogue: normalise, round, stage this warp's 16 rows in its part of sQ, store 16 bytes per lane.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    if (c == 0 && rows[r] < len)
      lse[static_cast<int64_t>(h) * total_T + start + rows[r]] =
          l > 0.0f ? (m_run[r] + log2f(l)) * kLn2 : -INFINITY;
  }
  uint16_t* sO = sQ + warp * 16 * DH;  // rows of this warp only (row & 7 is unchanged by the offset)
#pragma unroll
  for (int t = 0; t < kDT; ++t) {
    *reinterpret_cast<uint32_t*>(sO + swz<DH>(g, t) + 2 * c) = pack2<kBf16>(o[t][0] * inv[0], o[t][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sO + swz<DH>(g + 8, t) + 2 * c) = pack2<kBf16>(o[t][2] * inv[1], o[t][3] * inv[1]);
  }
  __syncwarp();
  uint16_t* oh = out + head0;
#pragma unroll
  for (int it = 0; it < 16 * kDT / 32; ++it) {
    const int idx = it * 32 + lane;
    const int r = idx / kDT, ch = idx % kDT;
    if (wm0 + r < len)
      *reinterpret_cast<uint4*>(oh + static_cast<int64_t>(wm0 + r) * ld + ch * 8) =
          *reinterpret_cast<const uint4*>(sO + swz<DH>(r, ch));
  }
}

template <bool kBf16, int DH, bool kCausal, bool kAlibi>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                const at::Tensor& cu_seqlens, const float* slopes, float scale_log2, int64_t max_seqlen,
                cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<kBf16, DH, kCausal, kAlibi>;
  constexpr int smem = fwd_smem_bytes<DH>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t S = cu_seqlens.size(0) - 1;
  const dim3 grid(static_cast<unsigned>((max_seqlen + kBlockM - 1) / kBlockM), static_cast<unsigned>(q.size(1)),
                  static_cast<unsigned>(S));
  kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const uint16_t*>(q.const_data_ptr()), static_cast<const uint16_t*>(k.const_data_ptr()),
      static_cast<const uint16_t*>(v.const_data_ptr()), static_cast<uint16_t*>(out.mutable_data_ptr()),
      lse.mutable_data_ptr<float>(), cu_seqlens.const_data_ptr<int>(), slopes, scale_log2,
      static_cast<int>(q.size(1)), q.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kBf16, int DH>
void dispatch_flags(bool causal, bool alibi, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse, const at::Tensor& cu, const float* slopes, float scale_log2,
                    int64_t max_seqlen, cudaStream_t stream) {
  if (causal) {
    if (alibi) launch_fwd<kBf16, DH, true, true>(q, k, v, out, lse, cu, slopes, scale_log2, max_seqlen, stream);
    else launch_fwd<kBf16, DH, true, false>(q, k, v, out, lse, cu, slopes, scale_log2, max_seqlen, stream);
  } else {
    if (alibi) launch_fwd<kBf16, DH, false, true>(q, k, v, out, lse, cu, slopes, scale_log2, max_seqlen, stream);
    else launch_fwd<kBf16, DH, false, false>(q, k, v, out, lse, cu, slopes, scale_log2, max_seqlen, stream);
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* slopes = alibi_slopes.has_value() ? alibi_slopes->const_data_ptr<float>() : nullptr;
  const float scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  const bool alibi = slopes != nullptr;
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (bf16 && Dh == 64) dispatch_flags<true, 64>(causal, alibi, q, k, v, out, lse, cu_seqlens, slopes, scale_log2, max_seqlen, stream);
  else if (bf16) dispatch_flags<true, 128>(causal, alibi, q, k, v, out, lse, cu_seqlens, slopes, scale_log2, max_seqlen, stream);
  else if (Dh == 64) dispatch_flags<false, 64>(causal, alibi, q, k, v, out, lse, cu_seqlens, slopes, scale_log2, max_seqlen, stream);
  else dispatch_flags<false, 128>(causal, alibi, q, k, v, out, lse, cu_seqlens, slopes, scale_log2, max_seqlen, stream);
  return {out, lse};
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) { m.impl("attention_fwd", &baichuan::attention_fwd_cuda); }
