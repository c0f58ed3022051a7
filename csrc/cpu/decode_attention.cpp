// Decode attention on the CPU: one new query per sequence against the first cache_seqlens[b] rows of
// a KV cache, with an optional ALiBi bias slope_h * (j - (L - 1)). One work item per (batch, head):
// fp32 scores for the L valid keys, max, exp, sum, then the probabilities (normalised, rounded to the
// cache dtype like the reference) times V accumulated in fp32. Rows j >= L are never read; L = 0 gives
// zeros.
//
// Shapes: q [B, H, Dh]; k_cache, v_cache [B, S_max, H, Dh] contiguous; cache_seqlens int32 [B];
// alibi_slopes fp32 [H] or None; out [B, H, Dh].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/attention_checks.h"

namespace baichuan {
namespace {

template <typename scalar_t>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::vector<int64_t>& lens, const float* slopes, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S_max = k_cache.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Dh), acc(Dh), s;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / H, h = w % H;
      const int64_t L = lens[b];
      scalar_t* o = op + (b * H + h) * Dh;
      if (L == 0) {
        for (int64_t c = 0; c < Dh; ++c) o[c] = static_cast<scalar_t>(0.f);
        continue;
      }
      const float slope = slopes ? slopes[h] : 0.f;
      const scalar_t* qr = qp + (b * H + h) * Dh;
      for (int64_t c = 0; c < Dh; ++c) qf[c] = static_cast<float>(qr[c]) * scale;
      s.resize(L);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < L; ++j) {
        const scalar_t* kr = kp + ((b * S_max + j) * H + h) * Dh;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < Dh; ++c) dot += qf[c] * static_cast<float>(kr[c]);
        const float sj = dot + slope * static_cast<float>(j - (L - 1));
        s[j] = sj;
        mx = (sj > mx || sj != sj) ? sj : mx;  // NaN-propagating max (std::max skips a NaN)
      }
      if (mx == -std::numeric_limits<float>::infinity()) {  // every score -inf: no usable key, zeros
        for (int64_t c = 0; c < Dh; ++c) o[c] = static_cast<scalar_t>(0.f);
        continue;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < L; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.f / sum;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const float p = static_cast<float>(static_cast<scalar_t>(s[j] * inv));
        // Keys whose probability rounds to 0 are skipped (ALiBi: most of a long cache for the steep
        // heads; ~1.5x faster at 8k). Known deviation: a NaN/inf in v there does not reach the output,
        // where the reference's 0 * NaN (and the Triton/CUDA kernels) give NaN.
        if (p == 0.f) continue;
        const scalar_t* vr = vp + ((b * S_max + j) * H + h) * Dh;
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) acc[c] += p * static_cast<float>(vr[c]);
      }
      for (int64_t c = 0; c < Dh; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

}  // namespace

at::Tensor decode_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& alibi_slopes,
                                    double softmax_scale) {
  check_decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, alibi_slopes, softmax_scale);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  at::Tensor lens_t = cache_seqlens.to(at::kLong).contiguous();
  const int64_t* lp = lens_t.data_ptr<int64_t>();
  std::vector<int64_t> lens(lp, lp + lens_t.numel());
  for (int64_t L : lens)
    TORCH_CHECK(L >= 0 && L <= k_cache.size(1), "cache_seqlens must lie in [0, S_max = ", k_cache.size(1), "], got ",
                L);
  at::Tensor out = at::empty_like(q);
  const float* slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_fwd_cpu", [&] {
    decode_attention_kernel<scalar_t>(q, k_cache, v_cache, lens, slopes, static_cast<float>(softmax_scale), out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) { m.impl("decode_attention_fwd", &decode_attention_fwd_cpu); }

}  // namespace baichuan
