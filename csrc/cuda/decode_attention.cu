// Decode attention (one new query per sequence against a KV cache), split-K "flash-decoding", CUDA.
//
// Schema (csrc/registration.cpp):
//   decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, alibi_slopes?, softmax_scale) -> out
// Semantics: baichuan_kernels/reference/decode_attention.py. q, out [B, H, Dh]; k_cache, v_cache
// [B, S_max, H, Dh] contiguous; cache_seqlens int32 [B]; alibi_slopes fp32 [H] or None. Sequence b has
// n = min(L, S_max) valid cache rows (L = cache_seqlens[b]); its query sits at position L - 1:
//   x_j = softmax_scale * <q, k_j> + slope_h * (j - (L - 1))   (fp32),   out = softmax(x) V
// L <= 0 gives zeros; rows j >= n are never read. dtypes fp32 / fp16 / bf16 (SIMT kernel, fp32 math;
// the probabilities are NOT rounded to the input dtype before P V: that only adds error, and the
// result is then at least as accurate as the reference's). Dh = 64 or 128 (else an error naming Dh).
//
// Stage 1, grid (splits, H, B), 128 threads: CTA `split` takes keys [split * split_len, ...) of
// sequence b, head h (CTAs past n exit at once).
//   scores: a group of TPK = Dh / VW threads reads one key row (VW = 16 / sizeof(T) elements = one
//   16-byte load per thread, the row's 128/256 bytes coalesced), dots it with q (fp32, q pre-scaled by
//   scale * log2 e), reduces over the group with shuffles; the CTA covers 128 / TPK keys per pass and
//   keeps kUnroll passes of loads in flight. Scores (log2 units) go to shared memory.
//   softmax: CTA max m, p_j = exp2(x_j - m), CTA sum l (fp32).
//   P V: the same thread groups read V rows (16 bytes per thread) and accumulate p_j * v_j in fp32;
//   the groups' partial sums are added through shared memory.
//   One split: out = acc / l directly. Several: (acc, m, l) of the split go to fp32 partial buffers.
// Stage 2 (several splits), grid (H, B), Dh threads: M = max m_s, out = sum acc_s 2^(m_s - M) /
//   sum l_s 2^(m_s - M).
// splits = ceil(S_max / split_len) with split_len a multiple of 64 (64 .. 8192) chosen so that
// B * H * splits is about 4 CTAs per SM: small batches still fill the GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/attention_checks.h"
#include "common/attention_cuda.cuh"
#include "common/cuda_utils.cuh"

namespace baichuan {
namespace {

using cuda::load_pack;
using cuda::Pack;
using cuda::to_float;
using namespace cuda::attn;

constexpr int kThreads = 128;
constexpr int kUnroll = 4;        // key rows in flight per thread
constexpr int kSplitAlign = 64;   // split_len granularity
constexpr int kCtasPerSm = 4;     // target occupancy of the split grid
constexpr int kMaxSplitLen = 8192;  // keys per CTA at most (32 KB of scores in shared memory)

// Max / sum over the CTA (kThreads); red: kThreads / 32 floats. Every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  v = red[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) v = kMax ? fmaxf(v, red[w]) : v + red[w];
  __syncthreads();  // red is reused
  return v;
}

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads)
decode_split_kernel(const T* __restrict__ q,              // [B, H, DH]
                    const T* __restrict__ k_cache,        // [B, S_max, H, DH]
                    const T* __restrict__ v_cache,        // [B, S_max, H, DH]
                    const int* __restrict__ seqlens,      // [B]
                    const float* __restrict__ slopes,     // [H] or nullptr
                    float* __restrict__ part_acc,         // [B, H, splits, DH] (splits > 1)
                    float* __restrict__ part_ml,          // [B, H, splits, 2]  (splits > 1)
                    T* __restrict__ out,                  // [B, H, DH]         (splits == 1)
                    float scale_log2, int H, int S_max, int split_len) {
  constexpr int VW = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  constexpr int TPK = DH / VW;                          // threads per key row
  constexpr int KPP = kThreads / TPK;                   // key rows per pass of the CTA
  static_assert(TPK <= 32 && KPP >= 1, "a key row must fit in one warp");
  extern __shared__ float s_p[];                        // [split_len]: scores, then probabilities
  __shared__ float s_acc[KPP][DH];
  __shared__ float s_red[kThreads / 32];

  const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const int L = seqlens[b];
  const int n = min(L, S_max);
  const int j0 = split * split_len;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  if (j0 >= n) {  // nothing to attend to (L <= 0 when this is the only split)
    if (splits == 1)
      for (int d = threadIdx.x; d < DH; d += kThreads) out[bh * DH + d] = T(0.0f);
    return;
  }
  const int j1 = min(n, j0 + split_len);
  const int grp = threadIdx.x / TPK, gl = threadIdx.x % TPK;
  const int64_t ld = static_cast<int64_t>(H) * DH;  // elements between cache rows
  const int64_t cache0 = static_cast<int64_t>(b) * S_max * ld + static_cast<int64_t>(h) * DH + gl * VW;
  const float slope_log2 = slopes != nullptr ? slopes[h] * kLog2e : 0.0f;

  float qv[VW];
  {
    const Pack<T, VW> qp = load_pack<T, VW>(q + bh * DH + gl * VW);
#pragma unroll
    for (int e = 0; e < VW; ++e) qv[e] = to_float(qp.v[e]) * scale_log2;
  }

  // Scores, in log2 units.
  // (Warp-uniform trip counts: the group shuffles need every lane of the warp.)
  for (int jb = j0; jb < j1; jb += KPP * kUnroll) {
    Pack<T, VW> kp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * KPP + grp;
      kp[u] = j < j1 ? load_pack<T, VW>(k_cache + cache0 + j * ld) : Pack<T, VW>{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * KPP + grp;
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < VW; ++e) dot = fmaf(qv[e], to_float(kp[u].v[e]), dot);
      dot = group_sum<TPK>(dot);
      if (gl == 0 && j < j1) s_p[j - j0] = fmaf(slope_log2, static_cast<float>(j - (L - 1)), dot);
    }
  }
  __syncthreads();

  // Softmax over the split.
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < j1 - j0; i += kThreads) mx = fmaxf(mx, s_p[i]);
  mx = block_reduce<true>(mx, s_red);
  const float shift = mx == -INFINITY ? 0.0f : mx;  // every score -inf (by value): p = 0, not NaN
  float sum = 0.0f;
  for (int i = threadIdx.x; i < j1 - j0; i += kThreads) {
    const float p = exp2f(s_p[i] - shift);
    s_p[i] = p;
    sum += p;
  }
  sum = block_reduce<false>(sum, s_red);  // (its barrier also publishes s_p)

  // acc = sum_j p_j v_j over this group's keys, then over the groups.
  float acc[VW];
#pragma unroll
  for (int e = 0; e < VW; ++e) acc[e] = 0.0f;
  for (int jb = j0; jb < j1; jb += KPP * kUnroll) {
    Pack<T, VW> vp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * KPP + grp;
      vp[u] = j < j1 ? load_pack<T, VW>(v_cache + cache0 + j * ld) : Pack<T, VW>{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * KPP + grp;
      const float p = j < j1 ? s_p[j - j0] : 0.0f;
#pragma unroll
      for (int e = 0; e < VW; ++e) acc[e] = fmaf(p, to_float(vp[u].v[e]), acc[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < VW; ++e) s_acc[grp][gl * VW + e] = acc[e];
  __syncthreads();
  for (int d = threadIdx.x; d < DH; d += kThreads) {
    float a = 0.0f;
#pragma unroll
    for (int gi = 0; gi < KPP; ++gi) a += s_acc[gi][d];
    if (splits == 1) {
      out[bh * DH + d] = T(sum == 0.0f ? 0.0f : a / sum);  // sum = 0 only when every score is -inf
    } else {
      part_acc[(bh * splits + split) * DH + d] = a;
      if (d == 0) {
        part_ml[(bh * splits + split) * 2] = mx;
        part_ml[(bh * splits + split) * 2 + 1] = sum;
      }
    }
  }
}

// Stage 2: merge the splits of one (b, h). Grid (H, B), DH threads (thread d: output element d).
template <typename T, int DH>
__global__ void __launch_bounds__(DH)
decode_combine_kernel(const float* __restrict__ part_acc,  // [B, H, splits, DH]
                      const float* __restrict__ part_ml,   // [B, H, splits, 2]
                      const int* __restrict__ seqlens,     // [B]
                      T* __restrict__ out,                 // [B, H, DH]
                      int H, int S_max, int split_len, int splits) {
  const int b = blockIdx.y, h = blockIdx.x, d = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  const int n = min(seqlens[b], S_max);
  if (n <= 0) {
    out[bh * DH + d] = T(0.0f);
    return;
  }
  const int ns = min(splits, (n + split_len - 1) / split_len);  // splits that wrote a partial
  const float* ml = part_ml + bh * splits * 2;
  float m = -INFINITY;
  for (int s = 0; s < ns; ++s) m = fmaxf(m, ml[2 * s]);
  if (m == -INFINITY) m = 0.0f;  // every score -inf (by value): all partials are 0
  float l = 0.0f, a = 0.0f;
  for (int s = 0; s < ns; ++s) {
    const float w = exp2f(ml[2 * s] - m);
    l = fmaf(ml[2 * s + 1], w, l);
    a = fmaf(part_acc[(bh * splits + s) * DH + d], w, a);
  }
  out[bh * DH + d] = T(l == 0.0f ? 0.0f : a / l);
}

template <typename T, int DH>
void launch_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& seqlens, const float* slopes, float scale_log2, at::Tensor& out,
                   cudaStream_t stream) {
  const int B = static_cast<int>(q.size(0)), H = static_cast<int>(q.size(1));
  const int S_max = static_cast<int>(k_cache.size(1));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int64_t bh = static_cast<int64_t>(B) * H;
  const int max_splits = std::max(1, (S_max + kSplitAlign - 1) / kSplitAlign);
  const int64_t fill = std::max<int64_t>(1, (int64_t{kCtasPerSm} * sms + bh - 1) / bh);  // splits to fill the GPU
  const int want = static_cast<int>(std::min<int64_t>(max_splits, fill));
  int split_len = ((S_max + want - 1) / want + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  split_len = std::min(std::max(split_len, kSplitAlign), kMaxSplitLen);
  const int splits = (S_max + split_len - 1) / split_len;
  const size_t smem = static_cast<size_t>(split_len) * sizeof(float);
  auto kernel = decode_split_kernel<T, DH>;  // smem <= 32 KB + ~4.5 KB static: under the default 48 KB
  at::Tensor part_acc, part_ml;
  if (splits > 1) {
    part_acc = at::empty({bh * splits * DH}, q.options().dtype(at::kFloat));
    part_ml = at::empty({bh * splits * 2}, q.options().dtype(at::kFloat));
  }
  float* pa = splits > 1 ? part_acc.mutable_data_ptr<float>() : nullptr;
  float* pm = splits > 1 ? part_ml.mutable_data_ptr<float>() : nullptr;
  kernel<<<dim3(splits, H, B), kThreads, smem, stream>>>(
      q.const_data_ptr<T>(), k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(), seqlens.const_data_ptr<int>(),
      slopes, pa, pm, out.mutable_data_ptr<T>(), scale_log2, H, S_max, split_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    decode_combine_kernel<T, DH><<<dim3(H, B), DH, 0, stream>>>(
        pa, pm, seqlens.const_data_ptr<int>(), out.mutable_data_ptr<T>(), H, S_max, split_len, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Host entry point.

at::Tensor decode_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& alibi_slopes,
                                     double softmax_scale) {
  check_decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, alibi_slopes, softmax_scale);  // shared checks
  // What this kernel adds: CUDA, Dh 64 / 128, grid limits, 16-byte aligned rows.
  TORCH_CHECK(q.is_cuda(), "decode_attention_fwd (CUDA): q must be a CUDA tensor, got ", q.device());
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2);
  TORCH_CHECK(Dh == 64 || Dh == 128, "decode_attention_fwd (CUDA): head dim Dh must be 64 or 128, got ", Dh);
  TORCH_CHECK(B <= 65535 && H <= 65535 && k_cache.size(1) < std::numeric_limits<int>::max(),
              "decode_attention_fwd (CUDA): B (", B, ") and H (", H, ") must be <= 65535");
  for (const at::Tensor* t : {&q, &k_cache, &v_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0,
                "decode_attention_fwd (CUDA): q, k_cache, v_cache must be 16-byte aligned");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);  // [B, H, Dh]
  if (B == 0 || H == 0) return out;
  if (k_cache.size(1) == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* slopes = alibi_slopes.has_value() ? alibi_slopes->const_data_ptr<float>() : nullptr;
  const float scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "decode_attention_fwd_cuda", [&] {
    if (Dh == 64) launch_decode<scalar_t, 64>(q, k_cache, v_cache, cache_seqlens, slopes, scale_log2, out, stream);
    else launch_decode<scalar_t, 128>(q, k_cache, v_cache, cache_seqlens, slopes, scale_log2, out, stream);
  });
  return out;
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) { m.impl("decode_attention_fwd", &baichuan::decode_attention_fwd_cuda); }
