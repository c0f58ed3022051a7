// Argument checks of the SwiGLU kernels (CPU and CUDA): the same argument-naming errors on every device.
//
// gate, up: [N, F] row-major *views*: unit stride along F and any row stride >= F, so the two halves
// of one fused [N, 2F] matmul output (gate = h[:, :F], up = h[:, F:], row stride 2F) are read in place.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace baichuan {

// A 2-D [N, F] view whose rows are dense (stride(1) == 1) and do not overlap (stride(0) >= F).
inline void check_row_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [N, F], got shape ", t.sizes());
  if (t.numel() == 0) return;  // nothing is read
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride along F (got strides ",
              t.strides(), ")");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), name,
              " rows must not overlap: row stride >= F required (got strides ", t.strides(), ")");
}

inline void check_swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_row_view(gate, "gate");
  check_row_view(up, "up");
  check_float(gate, "gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "up must have the shape of gate ", gate.sizes(), ", got ", up.sizes());
  check_same(gate, "gate", up, "up");
}

inline void check_swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_fwd(gate, up);
  check_row_view(dy, "dy");
  TORCH_CHECK(dy.sizes() == gate.sizes(), "dy must have the shape of gate ", gate.sizes(), ", got ", dy.sizes());
  check_same(dy, "dy", gate, "gate");
}

// h: [N, 2F], the fused gate/up projection output (gate = h[:, :F], up = h[:, F:]); any row stride.
inline int64_t check_swiglu_packed(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2, "h must be 2-D [N, 2F], got shape ", h.sizes());
  TORCH_CHECK(h.size(1) % 2 == 0, "h's last dim must be even (gate and up halves), got ", h.size(1));
  check_row_view(h, "h");
  check_float(h, "h");
  return h.size(1) / 2;
}

}  // namespace baichuan
