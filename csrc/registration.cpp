// Every op schema of baichuan_kernels, in the one TORCH_LIBRARY(baichuan) block of the process, and the
// pybind11 module `baichuan_kernels._C` (build information). Implementations register per device in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu with TORCH_LIBRARY_IMPL(baichuan, CPU|CUDA, m).
//
// Shapes in the schemas: N rows, D features.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifndef BAICHUAN_VERSION
#define BAICHUAN_VERSION "unknown"
#endif
#ifndef BAICHUAN_CUDA_ARCHS
#define BAICHUAN_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(baichuan, m) {
  // RMSNorm (+ fused residual add). x, residual: [N, D]; weight: [D].
  //   y [N, D]; residual_out = x + residual [N, D] (a [0] tensor when residual is None); rstd fp32 [N].
  m.def("rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor y, Tensor residual_out, Tensor rstd)");
  // dy: [N, D]; dresidual_out: gradient reaching residual_out (or None); s: the normalised input
  // (x, or residual_out when fused); rstd: fp32 [N].  dx [N, D] (also d residual); dweight [D].
  m.def("rms_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor s, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
  // NormHead. weight, w_hat, grad, dweight: [V, D] contiguous; rinv fp32 [V] = 1 / max(‖W[v]‖, eps).
  m.def("norm_head_weight_fwd(Tensor weight, float eps) -> (Tensor w_hat, Tensor rinv)");
  m.def("norm_head_weight_bwd(Tensor grad, Tensor weight, Tensor rinv, float eps) -> Tensor dweight");
  // Chunked LM head + CE + max-z (csrc/common/linear_cross_entropy_checks.h). hidden [N, D], weight [V, D],
  //   labels int [N]. loss/ce/z: fp32 scalars ("mean"/"sum") or [N] ("none"); row_max fp32 [N], argmax
  //   int64 [N] (0 at ignored rows); rinv fp32 [V] or [0]; dhidden fp32 [N, D] / dweight fp32 [V, D] (or
  //   [0]): the CE part of the gradient for unit row weights, computed in the forward pass when asked.
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor labels, bool norm_head, float z_loss_weight, int ignore_index, str reduction, int chunk_size, bool grad_hidden, bool grad_weight) -> (Tensor loss, Tensor ce, Tensor z, Tensor row_max, Tensor argmax, Tensor rinv, Tensor dhidden, Tensor dweight)");
  //   The memory-bounded recompute pass: the CE gradient for per-row weights grad_rows fp32 [N].
  m.def("linear_cross_entropy_bwd(Tensor hidden, Tensor weight, Tensor labels, Tensor grad_rows, bool norm_head, int ignore_index, int chunk_size, bool grad_hidden, bool grad_weight) -> (Tensor dhidden, Tensor dweight)");
  // SwiGLU: y = silu(gate) * up. gate, up, dy: [N, F] views with unit stride along F and any row stride
  // >= F (the two halves of one fused [N, 2F] matmul output are read in place, no copies).
  //   y, dgate, dup: [N, F] contiguous.
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor y");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  // Fused layout: h [N, 2F] = [gate | up] (any row stride) -> y [N, F]; backward dy -> dh [N, 2F].
  m.def("swiglu_packed_fwd(Tensor h) -> Tensor y");
  m.def("swiglu_packed_bwd(Tensor dy, Tensor h) -> Tensor dh");
  // Rotate-half RoPE in fp32. q, k: [B, T, H, Dh] (unit stride along Dh, any other strides); cos, sin:
  // fp32 [S, Dh] contiguous; position_ids: int64 [B, T] (None: token t uses row t). Outputs contiguous.
  // bwd applies the transposed rotation (dq -> d q_in); apply_rope_inplace rotates q and k in place.
  m.def("apply_rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids) -> (Tensor q_out, Tensor k_out)");
  m.def("apply_rope_bwd(Tensor dq, Tensor dk, Tensor cos, Tensor sin, Tensor? position_ids) -> (Tensor dq_in, Tensor dk_in)");
  m.def("apply_rope_inplace(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids) -> ()");
  // W_pack split + RoPE: qkv [B, T, 3*H*Dh] contiguous -> q, k (rotated), v: [B, T, H, Dh] contiguous,
  // qkv read once. bwd: dq, dk, dv [B, T, H, Dh] (unit stride along Dh) -> dqkv [B, T, 3*H*Dh] in one pass.
  m.def("split_qkv_rope_fwd(Tensor qkv, Tensor cos, Tensor sin, Tensor? position_ids, int num_heads) -> (Tensor q, Tensor k, Tensor v)");
  m.def("split_qkv_rope_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin, Tensor? position_ids) -> Tensor dqkv");
  // Attention (packed varlen). q, k, v, out, dout, dq, dk, dv: [total_T, H, Dh] contiguous;
  //   cu_seqlens int32 [S+1]; lse fp32 [H, total_T] (natural-log logsumexp of the scaled+biased scores);
  //   alibi_slopes fp32 [H] or None; bias slope_h*(j - i) (positions within the sequence); causal masks j > i.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor? alibi_slopes, float softmax_scale, bool causal, int max_seqlen) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, Tensor? alibi_slopes, float softmax_scale, bool causal, int max_seqlen, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decode attention. q [B, H, Dh]; k_cache, v_cache [B, S_max, H, Dh]; cache_seqlens int32 [B];
  //   query position cache_seqlens[b]-1, bias slope*(j - (L-1)); out [B, H, Dh] (zeros when L == 0).
  m.def("decode_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? alibi_slopes, float softmax_scale) -> Tensor");
  // Weight-only quantized matmul. x [M, K]; bits=8: qdata int8 [N, K], scales fp32 [N], zeros None;
  //   bits=4: qdata uint8 [N, K/2] (even k low nibble), scales, zeros fp32 [N, K/group_size];
  //   bits=4 with codebook fp32 [16] (NF4): zeros None, w = codebook[q] * scales[n, g].  y [M, N].
  m.def("quant_matmul_fwd(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int bits, int group_size, Tensor? codebook=None) -> Tensor y");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = BAICHUAN_VERSION;
#ifdef BAICHUAN_WITH_CUDA
  info["cuda"] = true;
  pybind11::list archs;
  std::string all = BAICHUAN_CUDA_ARCHS, item;
  for (char c : all + ";") {
    if (c == ';' || c == ' ') {
      if (!item.empty()) archs.append(item);
      item.clear();
    } else {
      item += c;
    }
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["cuda_archs"] = pybind11::list();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "baichuan_kernels compiled kernels (CPU C++, and CUDA when built with it)";
  module.def("build_info", &build_info, "version, CUDA compiled or not, CUDA archs, OpenMP threads");
}
