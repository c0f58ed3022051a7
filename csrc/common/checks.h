// Argument checks shared by the CPU and CUDA implementations of every op: a user who calls
// torch.ops.baichuan.* directly gets the same clear, argument-naming errors as the Python API.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

// AT_DISPATCH over exactly the kernels' dtypes (fp32 / fp16 / bf16): no unused double instantiations.
#define BAICHUAN_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace baichuan {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(), ")");
}

inline void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " (", a.device(), ") and ", b_name, " (", b.device(),
              ") must be on the same device");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " (", a.scalar_type(), ") and ", b_name, " (",
              b.scalar_type(), ") must have the same dtype");
}

// RMSNorm: x [N, D] contiguous, residual (optional) like x, weight [D], same dtype and device.
inline void check_rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                               const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [N, D], got shape ", x.sizes());
  check_float(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must have shape [", x.size(1),
              "], got ", weight.sizes());
  check_same(x, "x", weight, "weight");
  check_contiguous(weight, "weight");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have the shape of x ", x.sizes(), ", got ",
                residual->sizes());
    check_same(x, "x", *residual, "residual");
    check_contiguous(*residual, "residual");
  }
}

// dy [N, D], dresidual_out (optional) [N, D], s [N, D], weight [D], rstd float32 [N].
inline void check_rms_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dresidual_out,
                               const at::Tensor& s, const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm_fwd(s, dresidual_out, weight);
  TORCH_CHECK(dy.sizes() == s.sizes(), "dy must have the shape of x ", s.sizes(), ", got ", dy.sizes());
  check_same(dy, "dy", s, "x");
  check_contiguous(dy, "dy");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == s.size(0), "rstd must have shape [", s.size(0), "], got ",
              rstd.sizes());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat, "rstd must be float32, got ", rstd.scalar_type());
  TORCH_CHECK(rstd.device() == s.device(), "rstd must be on ", s.device(), ", got ", rstd.device());
  check_contiguous(rstd, "rstd");
}

}  // namespace baichuan
