// Argument checks for the attention ops (attention_fwd, attention_bwd, decode_attention_fwd), shared
// by the CPU (csrc/cpu/attention.cpp, csrc/cpu/decode_attention.cpp) and CUDA implementations.
//
// Conventions (csrc/registration.cpp):
//   q, k, v, out, dout: [total_T, H, Dh] contiguous, one float dtype (fp32/fp16/bf16);
//   cu_seqlens: int32 [S+1] on q's device (values are not read here: that would sync a GPU);
//   lse: fp32 [H, total_T]; alibi_slopes: fp32 [H] or None;
//   decode: q [B, H, Dh], k_cache/v_cache [B, S_max, H, Dh], cache_seqlens int32 [B].
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace baichuan {

// Head dims every attention kernel supports.
inline bool attention_head_dim_supported(int64_t Dh) { return Dh == 16 || Dh == 32 || Dh == 64 || Dh == 128; }

inline void check_attention_head_dim(int64_t Dh) {
  TORCH_CHECK(attention_head_dim_supported(Dh), "head dim Dh (the last dimension of q) must be 16, 32, 64 or 128, got ",
              Dh);
}

inline void check_alibi_slopes_arg(const c10::optional<at::Tensor>& alibi_slopes, int64_t H, const at::Tensor& q) {
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& s = *alibi_slopes;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == H, "alibi_slopes must have shape [", H, "] (one slope per head), got ",
              s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.device() == q.device(), "alibi_slopes (", s.device(), ") must be on q's device (", q.device(), ")");
  check_contiguous(s, "alibi_slopes");
}

// attention_fwd(q, k, v, cu_seqlens, alibi_slopes, softmax_scale, causal, max_seqlen)
inline void check_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, const c10::optional<at::Tensor>& alibi_slopes,
                                double softmax_scale, int64_t max_seqlen) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-D packed [total_T, H, Dh], got shape ", q.sizes());
  check_float(q, "q");
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  check_same(q, "q", k, "k");
  check_same(q, "q", v, "v");
  check_contiguous(q, "q");
  check_contiguous(k, "k");
  check_contiguous(v, "v");
  check_attention_head_dim(q.size(2));
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2,
              "cu_seqlens must be 1-D [num_seqs + 1] with at least 2 entries, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.device() == q.device(), "cu_seqlens (", cu_seqlens.device(), ") must be on q's device (",
              q.device(), ")");
  check_contiguous(cu_seqlens, "cu_seqlens");
  check_alibi_slopes_arg(alibi_slopes, q.size(1), q);
  TORCH_CHECK(softmax_scale > 0, "softmax_scale must be positive, got ", softmax_scale);
  TORCH_CHECK(max_seqlen >= 0, "max_seqlen must be non-negative, got ", max_seqlen);
}

// attention_bwd(dout, q, k, v, out, lse, cu_seqlens, alibi_slopes, softmax_scale, causal, max_seqlen, deterministic)
inline void check_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                const at::Tensor& cu_seqlens, const c10::optional<at::Tensor>& alibi_slopes,
                                double softmax_scale, int64_t max_seqlen) {
  check_attention_fwd(q, k, v, cu_seqlens, alibi_slopes, softmax_scale, max_seqlen);
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  check_same(q, "q", dout, "dout");
  check_same(q, "q", out, "out");
  check_contiguous(dout, "dout");
  check_contiguous(out, "out");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), "lse must have shape [",
              q.size(1), ", ", q.size(0), "] ([H, total_T]), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "lse (", lse.device(), ") must be on q's device (", q.device(), ")");
  check_contiguous(lse, "lse");
}

// decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, alibi_slopes, softmax_scale)
inline void check_decode_attention_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& cache_seqlens,
                                       const c10::optional<at::Tensor>& alibi_slopes, double softmax_scale) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-D [B, H, Dh], got shape ", q.sizes());
  check_float(q, "q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == q.size(0) && k_cache.size(2) == q.size(1) &&
                  k_cache.size(3) == q.size(2),
              "k_cache must have shape [", q.size(0), ", S_max, ", q.size(1), ", ", q.size(2), "], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  check_same(q, "q", k_cache, "k_cache");
  check_same(q, "q", v_cache, "v_cache");
  check_contiguous(q, "q");
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  check_attention_head_dim(q.size(2));
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q.size(0), "cache_seqlens must have shape [",
              q.size(0), "], got ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == q.device(), "cache_seqlens (", cache_seqlens.device(),
              ") must be on q's device (", q.device(), ")");
  check_contiguous(cache_seqlens, "cache_seqlens");
  check_alibi_slopes_arg(alibi_slopes, q.size(1), q);
  TORCH_CHECK(softmax_scale > 0, "softmax_scale must be positive, got ", softmax_scale);
}

}  // namespace baichuan
