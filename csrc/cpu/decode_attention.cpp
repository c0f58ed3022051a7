// Decode attention on the CPU: one new query per sequence against the first L = cache_seqlens[b] rows
// of a KV cache, with an optional ALiBi bias slope_h * (j - (L - 1)).
//
// The cache [B, S_max, H, Dh] is read position-major: a work item is (batch b, split s) and owns the
// keys [s * split_len, (s + 1) * split_len) of every head, so it streams one contiguous block of K
// (then of V) per chunk of kChunk positions instead of H strided 256/512-byte rows per position (the
// hardware prefetchers follow a stream; the strided per-head walk was latency-bound). Per chunk:
// fp32 scores of all heads, an online-softmax update per head (running max m, sum l, rescale of the
// fp32 accumulator), then P V. Splits (a few per thread when B is small) are merged by a second
// parallel loop: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// Probabilities are not rounded to the cache dtype before P V (as the CUDA kernel; only less error).
// Rows j >= L are never read; L = 0 gives zeros; a row whose every score is -inf gives zeros; a NaN
// in a valid key's score or value reaches the output (0 * NaN included, as in the reference).
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

constexpr int64_t kChunk = 16;      // positions per online-softmax step
constexpr int64_t kMinSplit = 128;  // keys per split at least
constexpr int64_t kItemsPerThread = 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Plan {
  int64_t splits, split_len;
};

Plan split_plan(int64_t B, int64_t S_max) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = std::max<int64_t>(1, (kItemsPerThread * threads + B - 1) / B);
  const int64_t by_len = std::max<int64_t>(1, S_max / kMinSplit);
  const int64_t splits = std::min(want, by_len);
  const int64_t split_len = std::max<int64_t>(1, (S_max + splits - 1) / splits);
  return {std::max<int64_t>(1, (S_max + split_len - 1) / split_len), split_len};
}

// Keys [j0, j1) of sequence b, every head: m[H], l[H] (natural-log units) and acc[H * Dh] (fp32).
template <typename scalar_t>
void attend_range(const float* qf, const scalar_t* kb, const scalar_t* vb, int64_t H, int64_t Dh, int64_t L,
                  int64_t j0, int64_t j1, const float* slopes, float* m, float* l, float* acc, float* s) {
  const int64_t ld = H * Dh;
  std::fill(m, m + H, kNegInf);
  std::fill(l, l + H, 0.f);
  std::fill(acc, acc + ld, 0.f);
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    for (int64_t jj = 0; jj < n; ++jj) {  // scores: K rows c0 .. c0 + n, contiguous
      const scalar_t* kr = kb + (c0 + jj) * ld;
      const float rel = static_cast<float>(c0 + jj - (L - 1));
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = qf + h * Dh;
        const scalar_t* kh = kr + h * Dh;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < Dh; ++c) dot += qh[c] * static_cast<float>(kh[c]);
        s[h * kChunk + jj] = slopes ? dot + slopes[h] * rel : dot;
      }
    }
    for (int64_t h = 0; h < H; ++h) {  // online softmax per head
      float* sh = s + h * kChunk;
      float mx = m[h];
      for (int64_t jj = 0; jj < n; ++jj) mx = sh[jj] > mx ? sh[jj] : mx;  // (NaN skipped: it poisons p)
      const float shift = mx == kNegInf ? 0.f : mx;  // every score so far -inf: p = alpha = 0, not NaN
      const float alpha = std::exp(m[h] - shift);
      float sum = 0.f;
      for (int64_t jj = 0; jj < n; ++jj) {
        sh[jj] = std::exp(sh[jj] - shift);
        sum += sh[jj];
      }
      l[h] = l[h] * alpha + sum;
      m[h] = mx;
      if (alpha != 1.f) {
        float* ah = acc + h * Dh;
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) ah[c] *= alpha;
      }
    }
    for (int64_t jj = 0; jj < n; ++jj) {  // P V: V rows c0 .. c0 + n, contiguous
      const scalar_t* vr = vb + (c0 + jj) * ld;
      for (int64_t h = 0; h < H; ++h) {
        const float p = s[h * kChunk + jj];
        const scalar_t* vh = vr + h * Dh;
        float* ah = acc + h * Dh;
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) ah[c] += p * static_cast<float>(vh[c]);
      }
    }
  }
}

template <typename scalar_t>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::vector<int64_t>& lens, const float* slopes, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S_max = k_cache.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const Plan plan = split_plan(B, S_max);
  const int64_t NS = plan.splits, ld = H * Dh;
  // Partials of every (b, split): m, l [B, NS, H]; acc [B, NS, H, Dh]. A split past L: m = -inf, l = 0.
  std::vector<float> pm(B * NS * H, kNegInf), pl(B * NS * H, 0.f), pacc(B * NS * ld, 0.f);
  at::parallel_for(0, B * NS, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(ld), s(H * kChunk);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / NS, sp = w % NS, L = lens[b];
      const int64_t j0 = sp * plan.split_len, j1 = std::min(L, j0 + plan.split_len);
      if (j0 >= j1) continue;
      const scalar_t* qr = qp + b * ld;
      for (int64_t c = 0; c < ld; ++c) qf[c] = static_cast<float>(qr[c]) * scale;
      attend_range<scalar_t>(qf.data(), kp + b * S_max * ld, vp + b * S_max * ld, H, Dh, L, j0, j1, slopes,
                             &pm[w * H], &pl[w * H], &pacc[w * ld], s.data());
    }
  });
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> a(Dh);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / H, h = w % H;
      scalar_t* o = op + w * Dh;
      float M = kNegInf;
      for (int64_t sp = 0; sp < NS; ++sp) M = std::max(M, pm[(b * NS + sp) * H + h]);
      const float shift = M == kNegInf ? 0.f : M;
      float lt = 0.f;
      std::fill(a.begin(), a.end(), 0.f);
      for (int64_t sp = 0; sp < NS; ++sp) {
        const int64_t i = (b * NS + sp) * H + h;
        // A split with no key has m = -inf, l = 0, acc = 0: weight 0. (Not skipped: a split whose
        // scores are all NaN also has m = -inf, and its NaN l / acc must reach the output.)
        const float wgt = std::exp(pm[i] - shift);
        lt += wgt * pl[i];
        const float* ai = &pacc[i * Dh];
        for (int64_t c = 0; c < Dh; ++c) a[c] += wgt * ai[c];
      }
      // lt = 0: L = 0 or every score -inf -> zeros. (A NaN score leaves m finite and makes l NaN.)
      for (int64_t c = 0; c < Dh; ++c) o[c] = static_cast<scalar_t>(lt == 0.f ? 0.f : a[c] / lt);
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
  if (q.numel() == 0) return out;
  const float* slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_fwd_cpu", [&] {
    decode_attention_kernel<scalar_t>(q, k_cache, v_cache, lens, slopes, static_cast<float>(softmax_scale), out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) { m.impl("decode_attention_fwd", &decode_attention_fwd_cpu); }

}  // namespace baichuan
