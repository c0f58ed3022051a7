// Argument checks of the RoPE kernels (apply_rope and split_qkv_rope; CPU and CUDA).
//
// q, k (and dq, dk, dv): [B, T, H, Dh] with unit stride along Dh and any other strides (views of
// the W_pack output are fine); cos, sin: float32 [S, Dh] contiguous; position_ids: int64 [B, T]
// contiguous (or None: token t uses row t); qkv: [B, T, 3 * H * Dh] contiguous.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace baichuan {

inline void check_heads(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [B, T, H, Dh], got shape ", t.sizes());
  check_float(t, name);
  TORCH_CHECK(t.size(3) % 2 == 0, name, ": head dim Dh must be even for rotate-half RoPE, got ", t.size(3));
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, " must have unit stride along Dh (got strides ",
              t.strides(), ")");
}

// cos/sin tables and position ids, for B x T tokens of head dim Dh on `ref`'s device.
inline void check_rope_tables(const at::Tensor& cos, const at::Tensor& sin,
                              const c10::optional<at::Tensor>& position_ids, int64_t B, int64_t T, int64_t Dh,
                              const at::Tensor& ref) {
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == Dh, "cos must have shape [S, ", Dh, "], got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin must have the shape of cos ", cos.sizes(), ", got ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat, "cos must be float32, got ", cos.scalar_type());
  TORCH_CHECK(sin.scalar_type() == at::kFloat, "sin must be float32, got ", sin.scalar_type());
  check_contiguous(cos, "cos");
  check_contiguous(sin, "sin");
  TORCH_CHECK(cos.device() == ref.device() && sin.device() == ref.device(), "cos and sin must be on ",
              ref.device(), ", got ", cos.device(), " and ", sin.device());
  if (position_ids.has_value()) {
    const at::Tensor& p = *position_ids;
    TORCH_CHECK(p.dim() == 2 && p.size(0) == B && p.size(1) == T, "position_ids must have shape [", B, ", ", T,
                "], got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == at::kLong, "position_ids must be int64, got ", p.scalar_type());
    check_contiguous(p, "position_ids");
    TORCH_CHECK(p.device() == ref.device(), "position_ids must be on ", ref.device(), ", got ", p.device());
  } else {
    TORCH_CHECK(T <= cos.size(0), "cos/sin have ", cos.size(0), " rows but there are T = ", T,
                " positions (pass longer tables)");
  }
}

inline void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                       const c10::optional<at::Tensor>& position_ids, const char* qn = "q", const char* kn = "k") {
  check_heads(q, qn);
  check_heads(k, kn);
  TORCH_CHECK(k.sizes() == q.sizes(), kn, " must have the shape of ", qn, " ", q.sizes(), ", got ", k.sizes());
  check_same(q, qn, k, kn);
  check_rope_tables(cos, sin, position_ids, q.size(0), q.size(1), q.size(3), q);
}

// qkv [B, T, 3 * H * Dh] contiguous; returns Dh.
inline int64_t check_split_qkv(const at::Tensor& qkv, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 3, "qkv must be 3-D [B, T, 3 * D], got shape ", qkv.sizes());
  check_float(qkv, "qkv");
  check_contiguous(qkv, "qkv");
  TORCH_CHECK(num_heads >= 1, "num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(qkv.size(2) % (3 * num_heads) == 0, "qkv's last dim (3 * D = ", qkv.size(2),
              ") must be divisible by 3 * num_heads = ", 3 * num_heads);
  const int64_t Dh = qkv.size(2) / (3 * num_heads);
  TORCH_CHECK(Dh % 2 == 0, "head dim Dh = D / num_heads = ", Dh, " must be even for rotate-half RoPE");
  return Dh;
}

}  // namespace baichuan
