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
