// Rotate-half RoPE on the CPU (apply_rope, its in-place variant, and the fused W_pack split
// split_qkv_rope), forward and backward, fp32/fp16/bf16 storage, fp32 math.
//
// With h = Dh / 2, c = cos[p], s = sin[p] (fp32 rows of the table, p = position_ids[b, t] or t):
//   forward     y[i]   = x[i] c[i]       - x[i+h] s[i]            (= x cos + rotate_half(x) sin)
//               y[i+h] = x[i+h] c[i+h]   + x[i] s[i+h]
//   backward    the transpose: dx[i]   = dy[i] c[i]     + dy[i+h] s[i+h]
//                              dx[i+h] = dy[i+h] c[i+h] - dy[i] s[i]
// Every kernel here is one walk over the B*T tokens (at::parallel_for): a token's cos/sin row is read
// once and applied to each "plane" — a [B, T, H, Dh] strided source and destination, rotated or
// copied (v of split_qkv_rope). So split_qkv_rope reads qkv once and writes q, k, v once, and its
// backward reads dq, dk, dv once and writes dqkv once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

#include "common/rope_checks.h"

namespace baichuan {
namespace {

// One [B, T, H, Dh] source -> destination mapping, strides in elements (Dh stride is 1).
template <typename T>
struct Plane {
  const T* src;
  int64_t sb, st, sh;
  T* dst;
  int64_t db, dt, dh;
  bool rotate;  // false: plain copy (v)
};

template <typename T>
Plane<T> plane(const at::Tensor& src, at::Tensor& dst, bool rotate) {
  return {src.const_data_ptr<T>(), src.stride(0), src.stride(1), src.stride(2),
          dst.data_ptr<T>(),       dst.stride(0), dst.stride(1), dst.stride(2), rotate};
}

template <typename T, bool kTranspose>
inline void rotate_head(const T* x, T* y, const float* __restrict__ c, const float* __restrict__ s,
                        int64_t h) {
  // x may alias y (in place; hence no __restrict__ on them): iteration i reads elements i and i + h
  // into registers before writing the same two elements.
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + h]);
    if (kTranspose) {
      y[i] = static_cast<T>(x1 * c[i] + x2 * s[i + h]);
      y[i + h] = static_cast<T>(x2 * c[i + h] - x1 * s[i]);
    } else {
      y[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      y[i + h] = static_cast<T>(x2 * c[i + h] + x1 * s[i + h]);
    }
  }
}

// Walks the B*T tokens; NP planes of shape [B, T, H, Dh].
template <typename T, bool kTranspose, size_t NP>
void rope_planes(const std::array<Plane<T>, NP>& planes, const at::Tensor& cos, const at::Tensor& sin,
                 const c10::optional<at::Tensor>& position_ids, int64_t B, int64_t T_, int64_t H, int64_t Dh) {
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  const int64_t* pos = position_ids.has_value() ? position_ids->const_data_ptr<int64_t>() : nullptr;
  const int64_t S = cos.size(0), h = Dh / 2;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * Dh * static_cast<int64_t>(NP)));
  at::parallel_for(0, B * T_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T_, t = bt % T_;
      const int64_t p = pos != nullptr ? pos[bt] : t;
      TORCH_CHECK(p >= 0 && p < S, "position_ids has position ", p, " but cos/sin have only ", S, " rows");
      const float* c = cp + p * Dh;
      const float* s = sp + p * Dh;
      for (const Plane<T>& pl : planes) {
        const T* x = pl.src + b * pl.sb + t * pl.st;
        T* y = pl.dst + b * pl.db + t * pl.dt;
        for (int64_t hh = 0; hh < H; ++hh) {
          if (pl.rotate) {
            rotate_head<T, kTranspose>(x + hh * pl.sh, y + hh * pl.dh, c, s, h);
          } else {
            const T* xs = x + hh * pl.sh;
            T* ys = y + hh * pl.dh;
#pragma omp simd
            for (int64_t i = 0; i < Dh; ++i) ys[i] = xs[i];
          }
        }
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

// q, k -> rotated (transposed for the backward) into qo, ko (which may be q, k themselves).
template <bool kTranspose>
void apply_rope_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                         const c10::optional<at::Tensor>& position_ids, at::Tensor& qo, at::Tensor& ko) {
  if (q.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "apply_rope_cpu", [&] {
    const std::array<Plane<scalar_t>, 2> planes = {plane<scalar_t>(q, qo, true), plane<scalar_t>(k, ko, true)};
    rope_planes<scalar_t, kTranspose, 2>(planes, cos, sin, position_ids, q.size(0), q.size(1), q.size(2),
                                         q.size(3));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& cos, const at::Tensor& sin,
                                                      const c10::optional<at::Tensor>& position_ids) {
  check_rope(q, k, cos, sin, position_ids);
  check_cpu(q, "q");
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  apply_rope_cpu_impl<false>(q, k, cos, sin, position_ids, qo, ko);
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_bwd_cpu(const at::Tensor& dq, const at::Tensor& dk,
                                                      const at::Tensor& cos, const at::Tensor& sin,
                                                      const c10::optional<at::Tensor>& position_ids) {
  check_rope(dq, dk, cos, sin, position_ids, "dq", "dk");
  check_cpu(dq, "dq");
  at::Tensor dqi = at::empty(dq.sizes(), dq.options()), dki = at::empty(dk.sizes(), dk.options());
  apply_rope_cpu_impl<true>(dq, dk, cos, sin, position_ids, dqi, dki);
  return {dqi, dki};
}

void apply_rope_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            const c10::optional<at::Tensor>& position_ids) {
  check_rope(q, k, cos, sin, position_ids);
  check_cpu(q, "q");
  TORCH_CHECK(!q.is_same(k), "q and k must be different tensors for the in-place rotation");
  apply_rope_cpu_impl<false>(q, k, cos, sin, position_ids, q, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_rope_fwd_cpu(const at::Tensor& qkv, const at::Tensor& cos,
                                                                      const at::Tensor& sin,
                                                                      const c10::optional<at::Tensor>& position_ids,
                                                                      int64_t num_heads) {
  const int64_t Dh = check_split_qkv(qkv, num_heads);
  const int64_t B = qkv.size(0), T_ = qkv.size(1), H = num_heads;
  check_rope_tables(cos, sin, position_ids, B, T_, Dh, qkv);
  check_cpu(qkv, "qkv");
  const at::Tensor parts = qkv.view({B, T_, 3, H, Dh});
  at::Tensor q = at::empty({B, T_, H, Dh}, qkv.options());
  at::Tensor k = at::empty_like(q), v = at::empty_like(q);
  if (q.numel() == 0) return {q, k, v};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "split_qkv_rope_fwd_cpu", [&] {
    const std::array<Plane<scalar_t>, 3> planes = {plane<scalar_t>(parts.select(2, 0), q, true),
                                                   plane<scalar_t>(parts.select(2, 1), k, true),
                                                   plane<scalar_t>(parts.select(2, 2), v, false)};
    rope_planes<scalar_t, false, 3>(planes, cos, sin, position_ids, B, T_, H, Dh);
  });
  return {q, k, v};
}

at::Tensor split_qkv_rope_bwd_cpu(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                  const at::Tensor& cos, const at::Tensor& sin,
                                  const c10::optional<at::Tensor>& position_ids) {
  check_rope(dq, dk, cos, sin, position_ids, "dq", "dk");
  check_heads(dv, "dv");
  TORCH_CHECK(dv.sizes() == dq.sizes(), "dv must have the shape of dq ", dq.sizes(), ", got ", dv.sizes());
  check_same(dq, "dq", dv, "dv");
  check_cpu(dq, "dq");
  const int64_t B = dq.size(0), T_ = dq.size(1), H = dq.size(2), Dh = dq.size(3);
  at::Tensor dqkv = at::empty({B, T_, 3 * H * Dh}, dq.options());
  if (dqkv.numel() == 0) return dqkv;
  at::Tensor parts = dqkv.view({B, T_, 3, H, Dh});
  at::Tensor dq_in = parts.select(2, 0), dk_in = parts.select(2, 1), dv_in = parts.select(2, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dq.scalar_type(), "split_qkv_rope_bwd_cpu", [&] {
    const std::array<Plane<scalar_t>, 3> planes = {plane<scalar_t>(dq, dq_in, true),
                                                   plane<scalar_t>(dk, dk_in, true),
                                                   plane<scalar_t>(dv, dv_in, false)};
    rope_planes<scalar_t, true, 3>(planes, cos, sin, position_ids, B, T_, H, Dh);
  });
  return dqkv;
}

TORCH_LIBRARY_IMPL(baichuan, CPU, m) {
  m.impl("apply_rope_fwd", &apply_rope_fwd_cpu);
  m.impl("apply_rope_bwd", &apply_rope_bwd_cpu);
  m.impl("apply_rope_inplace", &apply_rope_inplace_cpu);
  m.impl("split_qkv_rope_fwd", &split_qkv_rope_fwd_cpu);
  m.impl("split_qkv_rope_bwd", &split_qkv_rope_bwd_cpu);
}

}  // namespace baichuan
