// Decode attention (one new query per sequence against a KV cache), split-K "flash-decoding", CUDA.
//
// Schema (csrc/registration.cpp):
//   decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, alibi_slopes?, softmax_scale) -> out
// Semantics: baichuan_kernels/reference/decode_attention.py. q, out [B, H, Dh]; k_cache, v_cache
// [B, S_max, H, Dh] contiguous; cache_seqlens int32 [B]; alibi_slopes fp32 [H] or None. Sequence b has
// L = cache_seqlens[b] valid cache rows; its query sits at position L - 1:
//   x_j = softmax_scale * <q, k_j> + slope_h * (j - (L - 1))   (fp32),   out = softmax(x) V
// L = 0 gives zeros; rows j >= L are never read; an L outside [0, S_max] (the Python API does not
// check GPU lengths on the host: no sync) reads nothing and gives a NaN row. Rows whose every score is
// -inf give zeros; a NaN anywhere in a valid row's scores or values reaches the output. dtypes fp32 /
// fp16 / bf16 (SIMT, fp32 math; the probabilities are NOT rounded to the input dtype before P V: that
// only adds error). Dh = 64 or 128 (else an error naming Dh).
//
// Bound by reading K and V once (MHA: every (b, h) owns its rows, so sharing a CTA between heads
// saves no loads). One pass over the cache:
// Stage 1, grid (splits, H, B), 128 threads: CTA `split` takes keys [split * split_len, ...) of
//   (b, h). A "stream" of TPK = Dh / VW lanes (VW = 16 / sizeof(T): one 16-byte load per lane, a
//   whole 128/256-byte row per stream, coalesced) owns every NS-th key (NS = 128 / TPK streams per
//   CTA). Per step a stream issues kUnroll K rows and kUnroll V rows (all loads in flight before
//   any use), dots q (registers, pre-scaled by scale * log2 e) with each K row, reduces over its lanes
//   with shuffles, and does an online-softmax update (fp32, log2 units) of its own (m, l, acc[VW]).
//   The NS streams merge through shared memory; one split: out = acc / l directly, else (acc, m, l)
//   go to fp32 partial buffers.
// Stage 2 (several splits), grid (H, B), Dh threads: M = max m_s, out = sum acc_s 2^(m_s - M) /
//   sum l_s 2^(m_s - M).
// Split plan: baichuan_kernels/ops/decode_attention.py decode_split_plan (same constants here):
//   splits ~ ceil(4 * SMs / (B * H)), split_len a multiple of 64, so a batch-1 decode fills the GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <unordered_map>

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
constexpr int kUnroll = 4;          // K rows (and as many V rows) in flight per stream and step
constexpr int kSplitAlign = 64;     // split_len granularity (SPLIT_ALIGN in ops/decode_attention.py)
constexpr int kCtasPerSm = 4;       // CTAS_PER_SM
constexpr int kMaxSplits = 128;     // MAX_SPLITS

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
  constexpr int TPK = DH / VW;                          // lanes per stream (one key row)
  constexpr int NS = kThreads / TPK;                    // streams per CTA
  static_assert(TPK <= 32 && 32 % TPK == 0 && NS >= 1, "a key row must fit in one warp");
  __shared__ float s_acc[NS][DH];
  __shared__ float s_m[NS], s_l[NS];

  const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const int L = seqlens[b];
  const int j0 = split * split_len;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  if (L < 0 || L > S_max || j0 >= L) {  // out of range (NaN row), or nothing to attend to here
    if (splits == 1) {
      const float fill = (L < 0 || L > S_max) ? NAN : 0.0f;
      for (int d = threadIdx.x; d < DH; d += kThreads) out[bh * DH + d] = T(fill);
    }
    return;  // (several splits: the combine kernel knows which splits wrote a partial)
  }
  const int j1 = min(L, j0 + split_len);
  const int st = threadIdx.x / TPK, gl = threadIdx.x % TPK;
  const int64_t ld = static_cast<int64_t>(H) * DH;  // elements between cache rows
  const int64_t cache0 = static_cast<int64_t>(b) * S_max * ld + static_cast<int64_t>(h) * DH + gl * VW;
  const float slope_log2 = slopes != nullptr ? slopes[h] * kLog2e : 0.0f;

  float qv[VW];
  {
    const Pack<T, VW> qp = load_pack<T, VW>(q + bh * DH + gl * VW);
#pragma unroll
    for (int e = 0; e < VW; ++e) qv[e] = to_float(qp.v[e]) * scale_log2;
  }
  float m = -INFINITY, l = 0.0f, acc[VW];
#pragma unroll
  for (int e = 0; e < VW; ++e) acc[e] = 0.0f;

  // Trip counts are CTA-uniform (the stream shuffles need every lane of the warp); keys past j1 load
  // nothing (zeros) and score -inf.
  for (int jb = j0; jb < j1; jb += NS * kUnroll) {
    Pack<T, VW> kp[kUnroll], vp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * NS + st;
      kp[u] = j < j1 ? load_pack<T, VW>(k_cache + cache0 + j * ld) : Pack<T, VW>{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * NS + st;
      vp[u] = j < j1 ? load_pack<T, VW>(v_cache + cache0 + j * ld) : Pack<T, VW>{};
    }
    float x[kUnroll];
    float mx = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = jb + u * NS + st;
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < VW; ++e) dot = fmaf(qv[e], to_float(kp[u].v[e]), dot);
      dot = group_sum<TPK>(dot);
      x[u] = j < j1 ? fmaf(slope_log2, static_cast<float>(j - (L - 1)), dot) : -INFINITY;
      mx = fmaxf(mx, x[u]);  // (a NaN score is skipped here and poisons l and acc below)
    }
    const float shift = mx == -INFINITY ? 0.0f : mx;  // every score so far -inf: p = alpha = 0, not NaN
    const float alpha = exp2f(m - shift);
    l *= alpha;
#pragma unroll
    for (int e = 0; e < VW; ++e) acc[e] *= alpha;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float p = exp2f(x[u] - shift);
      l += p;
#pragma unroll
      for (int e = 0; e < VW; ++e) acc[e] = fmaf(p, to_float(vp[u].v[e]), acc[e]);
    }
    m = mx;
  }

  // Merge the NS streams.
#pragma unroll
  for (int e = 0; e < VW; ++e) s_acc[st][gl * VW + e] = acc[e];
  if (gl == 0) {
    s_m[st] = m;
    s_l[st] = l;
  }
  __syncthreads();
  float mc = -INFINITY;
#pragma unroll
  for (int i = 0; i < NS; ++i) mc = fmaxf(mc, s_m[i]);
  const float shift = mc == -INFINITY ? 0.0f : mc;
  for (int d = threadIdx.x; d < DH; d += kThreads) {
    float a = 0.0f, lc = 0.0f;
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const float w = exp2f(s_m[i] - shift);  // a stream that saw no key: m = -inf, w = 0
      a = fmaf(w, s_acc[i][d], a);
      lc = fmaf(w, s_l[i], lc);
    }
    if (splits == 1) {
      out[bh * DH + d] = T(lc == 0.0f ? 0.0f : a / lc);  // lc = 0 only when every score is -inf
    } else {
      part_acc[(bh * splits + split) * DH + d] = a;
      if (d == 0) {
        part_ml[(bh * splits + split) * 2] = mc;
        part_ml[(bh * splits + split) * 2 + 1] = lc;
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
  const int n = seqlens[b];
  if (n <= 0 || n > S_max) {  // no key: zeros; a length outside the cache: a NaN row
    out[bh * DH + d] = T(n == 0 ? 0.0f : NAN);
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

// Multiprocessor count per device, queried once (the attribute query is not free on the decode path).
int sm_count(int device) {
  static std::mutex mu;
  static std::unordered_map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  counts[device] = sms;
  return sms;
}

template <typename T, int DH>
void launch_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& seqlens, const float* slopes, float scale_log2, at::Tensor& out,
                   cudaStream_t stream) {
  const int B = static_cast<int>(q.size(0)), H = static_cast<int>(q.size(1));
  const int S_max = static_cast<int>(k_cache.size(1));
  const int sms = sm_count(q.get_device());
  // decode_split_plan (ops/decode_attention.py), same constants.
  const int64_t bh = static_cast<int64_t>(B) * H;
  const int64_t want = std::max<int64_t>(1, (int64_t{kCtasPerSm} * sms + bh - 1) / bh);
  const int64_t by_len = std::max(1, (S_max + kSplitAlign - 1) / kSplitAlign);
  const int64_t plan = std::max<int64_t>(1, std::min<int64_t>({want, by_len, int64_t{kMaxSplits}}));
  const int split_len = static_cast<int>(((S_max + plan - 1) / plan + kSplitAlign - 1) / kSplitAlign * kSplitAlign);
  const int splits = (S_max + split_len - 1) / split_len;
  auto kernel = decode_split_kernel<T, DH>;
  at::Tensor part_acc, part_ml;
  if (splits > 1) {
    part_acc = at::empty({bh * splits * DH}, q.options().dtype(at::kFloat));
    part_ml = at::empty({bh * splits * 2}, q.options().dtype(at::kFloat));
  }
  float* pa = splits > 1 ? part_acc.mutable_data_ptr<float>() : nullptr;
  float* pm = splits > 1 ? part_ml.mutable_data_ptr<float>() : nullptr;
  kernel<<<dim3(splits, H, B), kThreads, 0, stream>>>(
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
