// Argument checks of quant_matmul_fwd, shared by the CPU and CUDA implementations (a user calling
// torch.ops.baichuan.quant_matmul_fwd directly gets the same argument-naming errors as the Python API).
//
// The packed formats (baichuan_kernels/reference/quant_matmul.py):
//   bits = 8: qdata int8 [N, K], scales fp32 [N], zeros None             w = q * scale[n]
//   bits = 4: qdata uint8 [N, K/2] (even k: low nibble, odd k: high nibble),
//             scales, zeros fp32 [N, K/group_size]                       w = q * scale[n, g] + zero[n, g]
//   bits = 4 with a codebook (NF4): qdata as for bits = 4, scales fp32 [N, K/group_size] (absmax),
//             zeros None, codebook fp32 [16]                               w = codebook[q] * scale[n, g]
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace baichuan {

// x [M, K] contiguous fp32/fp16/bf16; returns N.
inline int64_t check_quant_matmul_fwd(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                                      const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                      const c10::optional<at::Tensor>& codebook) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  check_float(x, "x");
  check_contiguous(x, "x");
  const int64_t K = x.size(1);
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qdata.dim() == 2, "qdata must be 2-D, got shape ", qdata.sizes());
  const int64_t N = qdata.size(0);
  check_contiguous(qdata, "qdata");
  check_contiguous(scales, "scales");
  TORCH_CHECK(qdata.device() == x.device(), "qdata (", qdata.device(), ") and x (", x.device(),
              ") must be on the same device");
  TORCH_CHECK(scales.device() == x.device(), "scales (", scales.device(), ") and x (", x.device(),
              ") must be on the same device");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32, got ", scales.scalar_type());
  if (bits == 8) {
    TORCH_CHECK(qdata.scalar_type() == at::kChar, "qdata must be int8 for bits=8, got ", qdata.scalar_type());
    TORCH_CHECK(qdata.size(1) == K, "qdata must have shape [N, K=", K, "] for bits=8, got ", qdata.sizes());
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "scales must have shape [", N, "] for bits=8, got ",
                scales.sizes());
    TORCH_CHECK(!zeros.has_value(), "zeros must be None for bits=8");
    TORCH_CHECK(!codebook.has_value(), "codebook must be None for bits=8");
  } else {
    TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "group_size must be 32, 64 or 128 for bits=4, got ", group_size);
    TORCH_CHECK(K % group_size == 0, "group_size ", group_size, " must divide K = ", K);
    const int64_t G = K / group_size;
    TORCH_CHECK(qdata.scalar_type() == at::kByte, "qdata must be uint8 for bits=4, got ", qdata.scalar_type());
    TORCH_CHECK(qdata.size(1) * 2 == K, "qdata must have shape [N, K/2=", K / 2, "] for bits=4, got ",
                qdata.sizes());
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "scales must have shape [", N,
                ", ", G, "] for bits=4, got ", scales.sizes());
    if (codebook.has_value()) {  // NF4: codebook[q] * absmax
      TORCH_CHECK(!zeros.has_value(), "zeros must be None when a codebook is given (NF4)");
      TORCH_CHECK(codebook->scalar_type() == at::kFloat && codebook->dim() == 1 && codebook->size(0) == 16,
                  "codebook must be float32 [16], got ", codebook->scalar_type(), " ", codebook->sizes());
      TORCH_CHECK(codebook->device() == x.device(), "codebook (", codebook->device(), ") and x (", x.device(),
                  ") must be on the same device");
      check_contiguous(*codebook, "codebook");
      return N;
    }
    TORCH_CHECK(zeros.has_value(), "zeros must be given for bits=4 (or a codebook for NF4)");
    TORCH_CHECK(zeros->scalar_type() == at::kFloat, "zeros must be float32, got ", zeros->scalar_type());
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "zeros must have the shape of scales ", scales.sizes(), ", got ",
                zeros->sizes());
    TORCH_CHECK(zeros->device() == x.device(), "zeros (", zeros->device(), ") and x (", x.device(),
                ") must be on the same device");
    check_contiguous(*zeros, "zeros");
  }
  return N;
}

}  // namespace baichuan
