// Flash attention on the CPU: blocked online-softmax forward and a recompute-from-lse backward, with
// an optional ALiBi bias slope_h * (j - i) computed in fp32 and a causal mask, over packed (varlen)
// sequences. Never materialises T x T: the forward works on BLOCK_M queries x BLOCK_N keys at a time,
// the backward on one (sequence, head) pair with fp32 copies of its q, k, v, dout rows.
//
// Precision: fp32 scores, bias, softmax and accumulation; the probabilities are rounded to the input
// dtype before the P.V product (like the reference and the GPU kernels); out rounded once.
//
// Shapes: q, k, v, out, dout, dq, dk, dv: [total_T, H, Dh] contiguous; cu_seqlens int32 [S+1];
// lse fp32 [H, total_T]; alibi_slopes fp32 [H] or None.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/attention_checks.h"

namespace baichuan {
namespace {

constexpr int64_t BLOCK_M = 64;  // queries per forward work item
constexpr int64_t BLOCK_N = 64;  // keys per inner block

// Copy rows [row0, row0 + n) of head h from a packed [total_T, H, Dh] tensor into fp32 dst [n, Dh].
template <typename scalar_t>
inline void load_rows(const scalar_t* src, int64_t row0, int64_t n, int64_t h, int64_t H, int64_t Dh, float* dst,
                      float mul = 1.f) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* s = src + ((row0 + r) * H + h) * Dh;
    float* d = dst + r * Dh;
#pragma omp simd
    for (int64_t c = 0; c < Dh; ++c) d[c] = static_cast<float>(s[c]) * mul;
  }
}

// x[j] = exp(x[j] - shift) for j < n without libm calls: Cephes-style range reduction
// exp(v) = 2^k · exp(r), |r| <= ln2/2, degree-6 polynomial (about 1 ulp); v <= -87.33 (including -inf)
// gives exactly 0, NaN stays NaN (a NaN score must poison its row, as in the reference). Attention
// only needs v <= 0. (GCC 12 keeps this loop scalar under the default
// -ftrapping-math: its float selects count as control flow; -fno-trapping-math would vectorise it.)
inline void exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float v0 = x[j] - shift;
    float v = v0 > -87.33f ? v0 : -87.33f;  // also maps -inf
    v = v < 88.f ? v : 88.f;
    const std::int32_t ki = static_cast<std::int32_t>(v * 1.44269504088896341f + 128.5f) - 128;  // round(v·log2e)
    const float k = static_cast<float>(ki);
    const float r = v - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.f;
    const float y = e * __builtin_bit_cast(float, (ki + 127) << 23);
    x[j] = v0 > -87.33f ? y : (v0 != v0 ? v0 : 0.f);
  }
}

template <typename scalar_t>
inline float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Transpose an fp32 [n, Dh] block into dst [Dh, BLOCK_N] (columns past n are left as they are).
inline void transpose_block(const float* src, int64_t n, int64_t Dh, float* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < Dh; ++c) dst[c * BLOCK_N + r] = src[r * Dh + c];
}

// C[m, n] += A[m, k] . B[k, n], all fp32 row-major (leading dims lda, ldb, ldc); n a multiple of 16.
// A 4 x 16 register tile of C is accumulated over the whole k loop (the compiler keeps t[][] in
// eight vector registers), so the inner loop is loads + FMAs with no store-to-load chains.
inline void gemm_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t m,
                     int64_t n, int64_t k) {
  constexpr int64_t TM = 4, TN = 16;
  for (int64_t i0 = 0; i0 < m; i0 += TM) {
    const int64_t rows = std::min(TM, m - i0);
    const float* a[TM];
    for (int64_t r = 0; r < TM; ++r) a[r] = A + std::min(i0 + r, m - 1) * lda;  // short tiles repeat a row
    for (int64_t j0 = 0; j0 < n; j0 += TN) {
      float t[TM][TN];
      for (int64_t r = 0; r < TM; ++r)
        for (int64_t c = 0; c < TN; ++c) t[r][c] = C[std::min(i0 + r, m - 1) * ldc + j0 + c];
      for (int64_t kk = 0; kk < k; ++kk) {
        const float* b = B + kk * ldb + j0;
        for (int64_t r = 0; r < TM; ++r) {
          const float ar = a[r][kk];
#pragma omp simd
          for (int64_t c = 0; c < TN; ++c) t[r][c] += ar * b[c];
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < TN; ++c) C[(i0 + r) * ldc + j0 + c] = t[r][c];
    }
  }
}

// Scores of a [nm, Dh] query block against a key block given transposed, kT [Dh, BLOCK_N] (nn valid
// columns): s[i, j] = <q_i, k_j> (q pre-scaled) + slope * (j - i) with positions (q0 + i, k0 + j);
// -inf where masked. s is [nm, BLOCK_N]; columns >= nn are garbage and never read.
inline void block_scores(const float* q, const float* kT, int64_t nm, int64_t nn, int64_t Dh, int64_t q0, int64_t k0,
                         float slope, bool causal, float* s) {
  std::fill(s, s + nm * BLOCK_N, 0.f);
  gemm_acc(q, Dh, kT, BLOCK_N, s, BLOCK_N, nm, BLOCK_N, Dh);
  for (int64_t i = 0; i < nm; ++i) {
    float* si = s + i * BLOCK_N;
    const int64_t qpos = q0 + i;
    if (slope != 0.f) {
#pragma omp simd
      for (int64_t j = 0; j < nn; ++j) si[j] += slope * static_cast<float>(k0 + j - qpos);
    }
    if (causal) {
      for (int64_t j = std::max<int64_t>(0, qpos - k0 + 1); j < nn; ++j) si[j] = -std::numeric_limits<float>::infinity();
    }
  }
}

struct WorkItem {
  int64_t start;  // first row of the sequence in the packed tensor
  int64_t len;    // sequence length
  int64_t m0;     // first query (position within the sequence) of the block
};

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::vector<int64_t>& bounds, const float* slopes, float scale, bool causal,
                          at::Tensor& out, at::Tensor& lse) {
  const int64_t total = q.size(0), H = q.size(1), Dh = q.size(2);
  std::vector<WorkItem> items;
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    const int64_t len = bounds[s + 1] - bounds[s];
    for (int64_t m0 = 0; m0 < len; m0 += BLOCK_M) items.push_back({bounds[s], len, m0});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, n_items * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qb(BLOCK_M * Dh), kb(BLOCK_N * Dh), kT(Dh * BLOCK_N, 0.f), vb(BLOCK_N * Dh), acc(BLOCK_M * Dh),
        s(BLOCK_M * BLOCK_N);
    std::vector<float> m(BLOCK_M), l(BLOCK_M);
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem& it = items[w / H];
      const int64_t h = w % H;
      const float slope = slopes ? slopes[h] : 0.f;
      const int64_t nm = std::min(BLOCK_M, it.len - it.m0);
      load_rows(qp, it.start + it.m0, nm, h, H, Dh, qb.data(), scale);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t n_end = causal ? std::min(it.len, it.m0 + nm) : it.len;
      for (int64_t n0 = 0; n0 < n_end; n0 += BLOCK_N) {
        const int64_t nn = std::min(BLOCK_N, n_end - n0);
        load_rows(kp, it.start + n0, nn, h, H, Dh, kb.data());
        load_rows(vp, it.start + n0, nn, h, H, Dh, vb.data());
        transpose_block(kb.data(), nn, Dh, kT.data());
        block_scores(qb.data(), kT.data(), nm, nn, Dh, it.m0, n0, slope, causal, s.data());
        for (int64_t i = 0; i < nm; ++i) {
          float* si = s.data() + i * BLOCK_N;
          float mx = m[i];
          for (int64_t j = 0; j < nn; ++j) mx = std::max(mx, si[j]);  // skips NaN: exp_shifted keeps it
          if (mx == neg_inf) {
            bool nan = false;  // rare path: a block whose scores are all -inf or NaN (e.g. a NaN q row)
            for (int64_t j = 0; j < nn; ++j) nan |= si[j] != si[j];
            if (!nan) {  // nothing allowed in this block for this row
              std::fill(si, si + nn, 0.f);
              continue;
            }
            mx = std::numeric_limits<float>::quiet_NaN();  // the row's result is NaN, as in the reference
          }
          const float alpha = std::exp(m[i] - mx);  // 0 when m[i] was -inf
          exp_shifted(si, nn, mx);
          float rs = 0.f;
#pragma omp simd reduction(+ : rs)
          for (int64_t j = 0; j < nn; ++j) rs += si[j];
          if (!std::is_same<scalar_t, float>::value) {
            for (int64_t j = 0; j < nn; ++j) si[j] = round_to<scalar_t>(si[j]);
          }
          l[i] = l[i] * alpha + rs;
          m[i] = mx;
          float* ai = acc.data() + i * Dh;
#pragma omp simd
          for (int64_t c = 0; c < Dh; ++c) ai[c] *= alpha;
        }
        gemm_acc(s.data(), BLOCK_N, vb.data(), Dh, acc.data(), Dh, nm, Dh, nn);  // acc += P . V
      }
      for (int64_t i = 0; i < nm; ++i) {
        const int64_t row = it.start + it.m0 + i;
        scalar_t* o = op + (row * H + h) * Dh;
        const float inv = l[i] == 0.f ? 0.f : 1.f / l[i];  // l = 0: no allowed key; l = NaN stays NaN
        const float* ai = acc.data() + i * Dh;
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) o[c] = static_cast<scalar_t>(ai[c] * inv);
        // A row with no allowed key: lse = +inf makes every recomputed probability 0 in the backward.
        lp[h * total + row] = l[i] == 0.f ? std::numeric_limits<float>::infinity() : m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const std::vector<int64_t>& bounds,
                          const float* slopes, float scale, bool causal, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv) {
  const int64_t total = q.size(0), H = q.size(1), Dh = q.size(2);
  const int64_t S = static_cast<int64_t>(bounds.size()) - 1;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();

  // One work item per (sequence, head): sequential inside, so dq is reduced in a fixed order.
  at::parallel_for(0, S * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, kf, vf, dof, dqf, delta, dkb(BLOCK_N * Dh), dvb(BLOCK_N * Dh);
    std::vector<float> s(BLOCK_M * BLOCK_N), dp(BLOCK_M * BLOCK_N), kT(Dh * BLOCK_N, 0.f), vT(Dh * BLOCK_N, 0.f);
    std::vector<float> pT(BLOCK_N * BLOCK_M), dsT(BLOCK_N * BLOCK_M);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t seq = w / H, h = w % H;
      const int64_t start = bounds[seq], len = bounds[seq + 1] - bounds[seq];
      if (len == 0) continue;
      const float slope = slopes ? slopes[h] : 0.f;
      qf.resize(len * Dh);
      kf.resize(len * Dh);
      vf.resize(len * Dh);
      dof.resize(len * Dh);
      dqf.assign(len * Dh, 0.f);
      delta.resize(len);
      load_rows(qp, start, len, h, H, Dh, qf.data(), scale);
      load_rows(kp, start, len, h, H, Dh, kf.data());
      load_rows(vp, start, len, h, H, Dh, vf.data());
      load_rows(dop, start, len, h, H, Dh, dof.data());
      for (int64_t i = 0; i < len; ++i) {  // delta_i = <dout_i, out_i>
        const scalar_t* o = op + ((start + i) * H + h) * Dh;
        const float* d = dof.data() + i * Dh;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < Dh; ++c) acc += d[c] * static_cast<float>(o[c]);
        delta[i] = acc;
      }
      const float* lrow = lp + h * total + start;
      for (int64_t n0 = 0; n0 < len; n0 += BLOCK_N) {
        const int64_t nn = std::min(BLOCK_N, len - n0);
        std::fill(dkb.begin(), dkb.end(), 0.f);
        std::fill(dvb.begin(), dvb.end(), 0.f);
        const float* kb = kf.data() + n0 * Dh;
        const float* vb = vf.data() + n0 * Dh;
        transpose_block(kb, nn, Dh, kT.data());
        transpose_block(vb, nn, Dh, vT.data());
        const int64_t m_begin = causal ? (n0 / BLOCK_M) * BLOCK_M : 0;
        for (int64_t m0 = m_begin; m0 < len; m0 += BLOCK_M) {
          const int64_t nm = std::min(BLOCK_M, len - m0);
          const float* qb = qf.data() + m0 * Dh;
          const float* dob = dof.data() + m0 * Dh;
          block_scores(qb, kT.data(), nm, nn, Dh, m0, n0, slope, causal, s.data());
          std::fill(dp.begin(), dp.begin() + nm * BLOCK_N, 0.f);
          gemm_acc(dob, Dh, vT.data(), BLOCK_N, dp.data(), BLOCK_N, nm, BLOCK_N, Dh);  // dP = dout . V^T
          for (int64_t i = 0; i < nm; ++i) {
            float* si = s.data() + i * BLOCK_N;
            float* dpi = dp.data() + i * BLOCK_N;
            exp_shifted(si, nn, lrow[m0 + i]);  // P, exact 0 where masked
            const float di = delta[m0 + i];
            for (int64_t j = 0; j < nn; ++j) {
              const float p = si[j];
              dpi[j] = p * (dpi[j] - di);  // dS (before the scale)
              pT[j * BLOCK_M + i] = round_to<scalar_t>(p);
              dsT[j * BLOCK_M + i] = dpi[j];
            }
          }
          gemm_acc(pT.data(), BLOCK_M, dob, Dh, dvb.data(), Dh, nn, Dh, nm);  // dv += round(P)^T . dout
          gemm_acc(dsT.data(), BLOCK_M, qb, Dh, dkb.data(), Dh, nn, Dh, nm);  // dk += dS^T . (scale q)
          gemm_acc(dp.data(), BLOCK_N, kb, Dh, dqf.data() + m0 * Dh, Dh, nm, Dh, nn);  // dq += dS . K
        }
        for (int64_t j = 0; j < nn; ++j) {
          const int64_t row = start + n0 + j;
          scalar_t* dkr = dkp + (row * H + h) * Dh;
          scalar_t* dvr = dvp + (row * H + h) * Dh;
          const float* a = dkb.data() + j * Dh;
          const float* b = dvb.data() + j * Dh;
#pragma omp simd
          for (int64_t c = 0; c < Dh; ++c) {
            dkr[c] = static_cast<scalar_t>(a[c]);
            dvr[c] = static_cast<scalar_t>(b[c]);
          }
        }
      }
      for (int64_t i = 0; i < len; ++i) {
        scalar_t* dqr = dqp + ((start + i) * H + h) * Dh;
        const float* a = dqf.data() + i * Dh;
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) dqr[c] = static_cast<scalar_t>(a[c] * scale);
      }
    }
  });
}

// cu_seqlens as host integers, checked: starts at 0, non-decreasing, ends at total_T.
std::vector<int64_t> read_bounds(const at::Tensor& cu_seqlens, int64_t total) {
  at::Tensor c = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> bounds(p, p + c.numel());
  TORCH_CHECK(bounds.front() == 0, "cu_seqlens must start at 0, got ", bounds.front());
  for (size_t i = 1; i < bounds.size(); ++i)
    TORCH_CHECK(bounds[i] >= bounds[i - 1], "cu_seqlens must be non-decreasing, got ", bounds[i - 1], " then ",
                bounds[i]);
  TORCH_CHECK(bounds.back() == total, "cu_seqlens must end at total_T = q.size(0) = ", total, ", got ",
              bounds.back());
  return bounds;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& cu_seqlens,
                                                     const c10::optional<at::Tensor>& alibi_slopes,
                                                     double softmax_scale, bool causal, int64_t max_seqlen) {
  check_attention_fwd(q, k, v, cu_seqlens, alibi_slopes, softmax_scale, max_seqlen);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  const std::vector<int64_t> bounds = read_bounds(cu_seqlens, q.size(0));
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  const float* slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(q, k, v, bounds, slopes, static_cast<float>(softmax_scale), causal, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, const c10::optional<at::Tensor>& alibi_slopes,
    double softmax_scale, bool causal, int64_t max_seqlen, bool deterministic) {
  check_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, alibi_slopes, softmax_scale, max_seqlen);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  (void)deterministic;  // the CPU backward is always deterministic
  const std::vector<int64_t> bounds = read_bounds(cu_seqlens, q.size(0));
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const float* slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(dout, q, k, v, out, lse, bounds, slopes, static_cast<float>(softmax_scale), causal,
                                   dq, dk, dv);
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace baichuan
