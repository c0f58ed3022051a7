// Rotate-half RoPE, CUDA: apply_rope (forward, backward, in place) and the fused W_pack split
// split_qkv_rope (forward, backward), all through ONE kernel template.
//
// With h = Dh / 2 and the fp32 cos/sin row c, s of the token's position p (position_ids[b, t] or t):
//   forward     y[i] = x[i] c[i] - x[i+h] s[i],        y[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
//   transposed  y[i] = x[i] c[i] + x[i+h] s[i+h],      y[i+h] = x[i+h] c[i+h] - x[i] s[i]   (backward)
// fp32 math, one rounding per output; dtype fp32 / fp16 / bf16.
//
// One block per token (b, t). A token's work is up to three "planes" — strided [B, T, H, Dh] source
// and destination — of which planes 0 and 1 (q, k) are rotated and plane 2 (v) is copied. A pack is
// VW = 16 / sizeof(T) elements of the first half of a head together with the matching VW elements of
// the second half: 16-byte loads and stores throughout (VW = 1 when Dh / 2, a stride or a pointer is
// not a 16-byte multiple). Thread tx owns pack tx % TPP of every head half and walks the (plane,
// head) pairs tx / TPP, tx / TPP + HPB, ...: it loads its fp32 cos/sin values once (float4 loads)
// and reuses them for every head of the token (7B bf16: TPP = 8, HPB = 32, 256 threads).
//   apply_rope          planes q -> q_out, k -> k_out (or q -> q, k -> k in place)
//   split_qkv_rope      planes qkv[:, :, 0] -> q, qkv[:, :, 1] -> k, qkv[:, :, 2] -> v   (qkv read once)
//   split_qkv_rope_bwd  planes dq -> dqkv[:, :, 0], dk -> dqkv[:, :, 1], dv -> dqkv[:, :, 2]
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "common/cuda_utils.cuh"
#include "common/rope_checks.h"

namespace baichuan {
namespace {

using cuda::ceil_div;
using cuda::float_to_pack;
using cuda::is_aligned;
using cuda::load_pack;
using cuda::Pack;
using cuda::round_up;
using cuda::store_pack;
using cuda::to_float;

constexpr int kMaxThreads = 256;

template <typename T>
struct Plane {
  const T* src;
  T* dst;
  int64_t sb, st, sh;  // source strides (elements) of B, T, H; unit stride along Dh
  int64_t db, dt, dh;  // destination strides
};

template <typename T>
struct RopeParams {
  Plane<T> planes[3];
  int num_planes;       // 2 (q, k) or 3 (q, k, v copied)
  const float* cos;     // [S, Dh]
  const float* sin;     // [S, Dh]
  const int64_t* pos;   // [B, T] or nullptr
  int64_t seq, H, half, S;  // tokens per sequence (T), heads, Dh / 2, table rows
};

// VW fp32 values at p (float4 loads when VW is a multiple of 4; p then 16-byte aligned).
template <int VW>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[VW]) {
  if constexpr (VW % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VW / 4; ++q) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p) + q);
      out[4 * q] = v.x;
      out[4 * q + 1] = v.y;
      out[4 * q + 2] = v.z;
      out[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VW; ++e) out[e] = __ldg(p + e);
  }
}

// Grid: one block per token; blockDim.x = TPP * HPB threads, thread tx owns the packs j = tx % TPP
// (+ m TPP) of a head half and walks the (plane, head) pairs hp = tx / TPP (+ m HPB). Its cos/sin
// values are loaded once per pack and reused for every head of the token (registers, not re-read);
// the hot loop has only 32-bit index arithmetic, and two heads per thread are in flight at once.
template <typename T, int VW, bool kTranspose>
__global__ void __launch_bounds__(kMaxThreads) rope_kernel(const RopeParams<T> prm, int tpp) {
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / prm.seq, t = bt - b * prm.seq;
  const int64_t p = prm.pos != nullptr ? prm.pos[bt] : t;
  CUDA_KERNEL_ASSERT(p >= 0 && p < prm.S);
  const float* crow = prm.cos + p * 2 * prm.half;
  const float* srow = prm.sin + p * 2 * prm.half;
  const int packs = static_cast<int>(prm.half / VW);  // per head half
  const int H = static_cast<int>(prm.H);
  const int pairs = prm.num_planes * H;               // (plane, head) pairs of the token
  const int hpb = blockDim.x / tpp;                   // pairs walked at once by the block
  const int tx = threadIdx.x;
  for (int pk = tx % tpp; pk < packs; pk += tpp) {  // one iteration unless Dh / 2 > VW * kMaxThreads
    const int j = pk * VW;
    float c1[VW], c2[VW], s1[VW], s2[VW];
    load_f32<VW>(crow + j, c1);
    load_f32<VW>(crow + prm.half + j, c2);
    load_f32<VW>(srow + j, s1);
    load_f32<VW>(srow + prm.half + j, s2);
#pragma unroll 2
    for (int hp = tx / tpp; hp < pairs; hp += hpb) {
      const int pl = hp / H, hh = hp - pl * H;
      const Plane<T>& P = prm.planes[pl];
      const T* x = P.src + b * P.sb + t * P.st + hh * P.sh + j;
      T* y = P.dst + b * P.db + t * P.dt + hh * P.dh + j;
      const Pack<T, VW> x1 = load_pack<T, VW>(x), x2 = load_pack<T, VW>(x + prm.half);
      if (pl == 2) {  // v: plain copy
        store_pack<T, VW>(y, x1);
        store_pack<T, VW>(y + prm.half, x2);
        continue;
      }
      float y1[VW], y2[VW];
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const float a = to_float(x1.v[e]), d = to_float(x2.v[e]);
        if (kTranspose) {
          y1[e] = a * c1[e] + d * s2[e];
          y2[e] = d * c2[e] - a * s1[e];
        } else {
          y1[e] = a * c1[e] - d * s1[e];
          y2[e] = d * c2[e] + a * s2[e];
        }
      }
      store_pack<T, VW>(y, float_to_pack<T, VW>(y1));
      store_pack<T, VW>(y + prm.half, float_to_pack<T, VW>(y2));
    }
  }
}

template <typename T>
Plane<T> make_plane(const at::Tensor& src, const at::Tensor& dst) {
  return {src.const_data_ptr<T>(), static_cast<T*>(dst.data_ptr()), src.stride(0), src.stride(1), src.stride(2),
          dst.stride(0), dst.stride(1), dst.stride(2)};
}

// 16-byte packs apply when Dh / 2, every stride and every pointer (tables included) allow them.
template <typename T>
bool use_16b(const RopeParams<T>& prm) {
  constexpr int64_t VW = cuda::VecWidth<T>::k16B;
  if (prm.half % VW != 0 || !is_aligned(prm.cos, 16) || !is_aligned(prm.sin, 16)) return false;
  for (int i = 0; i < prm.num_planes; ++i) {
    const Plane<T>& P = prm.planes[i];
    const int64_t strides[6] = {P.sb, P.st, P.sh, P.db, P.dt, P.dh};
    for (const int64_t s : strides)
      if (s % VW != 0) return false;
    if (!is_aligned(P.src, 16) || !is_aligned(P.dst, 16)) return false;
  }
  return true;
}

template <typename T, bool kTranspose, int VW>
void launch_vw(const RopeParams<T>& prm, int64_t tokens, cudaStream_t stream) {
  // TPP threads per head half (one pack each), HPB (plane, head) pairs at once: TPP * HPB <= 256.
  const int64_t packs = prm.half / VW, pairs = prm.num_planes * prm.H;
  const int tpp = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(packs, kMaxThreads)));
  const int hpb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pairs, kMaxThreads / tpp)));
  rope_kernel<T, VW, kTranspose><<<static_cast<unsigned>(tokens), tpp * hpb, 0, stream>>>(prm, tpp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// planes: (source, destination) pairs of [B, T, H, Dh] tensors; the first two rotated, a third copied.
template <bool kTranspose>
void launch(std::initializer_list<std::pair<at::Tensor, at::Tensor>> planes, const at::Tensor& cos,
            const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids) {
  const at::Tensor& x0 = planes.begin()->first;
  if (x0.numel() == 0) return;
  const int64_t B = x0.size(0), T_ = x0.size(1);
  TORCH_CHECK(B * T_ <= std::numeric_limits<int32_t>::max(), "rope: too many tokens (", B * T_, ")");
  TORCH_CHECK(3 * x0.size(2) * x0.size(3) <= std::numeric_limits<int32_t>::max(), "rope: too many heads x head dim (",
              x0.size(2), " x ", x0.size(3), ")");
  const c10::cuda::CUDAGuard guard(x0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BAICHUAN_DISPATCH_FLOAT_HALF_BF16(x0.scalar_type(), "rope_cuda", [&] {
    using T = scalar_t;
    RopeParams<T> prm{};
    prm.num_planes = 0;
    for (const auto& pr : planes) prm.planes[prm.num_planes++] = make_plane<T>(pr.first, pr.second);
    prm.cos = cos.const_data_ptr<float>();
    prm.sin = sin.const_data_ptr<float>();
    prm.pos = position_ids.has_value() ? position_ids->const_data_ptr<int64_t>() : nullptr;
    prm.seq = T_;
    prm.H = x0.size(2);
    prm.half = x0.size(3) / 2;
    prm.S = cos.size(0);
    if (use_16b<T>(prm)) {
      launch_vw<T, kTranspose, cuda::VecWidth<T>::k16B>(prm, B * T_, stream);
    } else {
      launch_vw<T, kTranspose, 1>(prm, B * T_, stream);
    }
  });
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin,
                                                       const c10::optional<at::Tensor>& position_ids) {
  check_rope(q, k, cos, sin, position_ids);
  check_cuda(q, "q");
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  launch<false>({{q, qo}, {k, ko}}, cos, sin, position_ids);
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_bwd_cuda(const at::Tensor& dq, const at::Tensor& dk,
                                                       const at::Tensor& cos, const at::Tensor& sin,
                                                       const c10::optional<at::Tensor>& position_ids) {
  check_rope(dq, dk, cos, sin, position_ids, "dq", "dk");
  check_cuda(dq, "dq");
  at::Tensor dqi = at::empty(dq.sizes(), dq.options()), dki = at::empty(dk.sizes(), dk.options());
  launch<true>({{dq, dqi}, {dk, dki}}, cos, sin, position_ids);
  return {dqi, dki};
}

void apply_rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                             const c10::optional<at::Tensor>& position_ids) {
  check_rope(q, k, cos, sin, position_ids);
  check_cuda(q, "q");
  TORCH_CHECK(!q.is_same(k), "q and k must be different tensors for the in-place rotation");
  launch<false>({{q, q}, {k, k}}, cos, sin, position_ids);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_rope_fwd_cuda(const at::Tensor& qkv, const at::Tensor& cos,
                                                                       const at::Tensor& sin,
                                                                       const c10::optional<at::Tensor>& position_ids,
                                                                       int64_t num_heads) {
  const int64_t Dh = check_split_qkv(qkv, num_heads);
  const int64_t B = qkv.size(0), T_ = qkv.size(1), H = num_heads;
  check_rope_tables(cos, sin, position_ids, B, T_, Dh, qkv);
  check_cuda(qkv, "qkv");
  const at::Tensor parts = qkv.view({B, T_, 3, H, Dh});
  at::Tensor q = at::empty({B, T_, H, Dh}, qkv.options());
  at::Tensor k = at::empty_like(q), v = at::empty_like(q);
  launch<false>({{parts.select(2, 0), q}, {parts.select(2, 1), k}, {parts.select(2, 2), v}}, cos, sin,
                position_ids);
  return {q, k, v};
}

at::Tensor split_qkv_rope_bwd_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   const c10::optional<at::Tensor>& position_ids) {
  check_rope(dq, dk, cos, sin, position_ids, "dq", "dk");
  check_heads(dv, "dv");
  TORCH_CHECK(dv.sizes() == dq.sizes(), "dv must have the shape of dq ", dq.sizes(), ", got ", dv.sizes());
  check_same(dq, "dq", dv, "dv");
  check_cuda(dq, "dq");
  const int64_t B = dq.size(0), T_ = dq.size(1), H = dq.size(2), Dh = dq.size(3);
  at::Tensor dqkv = at::empty({B, T_, 3 * H * Dh}, dq.options());
  const at::Tensor parts = dqkv.view({B, T_, 3, H, Dh});
  launch<true>({{dq, parts.select(2, 0)}, {dk, parts.select(2, 1)}, {dv, parts.select(2, 2)}}, cos, sin,
               position_ids);
  return dqkv;
}

}  // namespace baichuan

TORCH_LIBRARY_IMPL(baichuan, CUDA, m) {
  m.impl("apply_rope_fwd", &baichuan::apply_rope_fwd_cuda);
  m.impl("apply_rope_bwd", &baichuan::apply_rope_bwd_cuda);
  m.impl("apply_rope_inplace", &baichuan::apply_rope_inplace_cuda);
  m.impl("split_qkv_rope_fwd", &baichuan::split_qkv_rope_fwd_cuda);
  m.impl("split_qkv_rope_bwd", &baichuan::split_qkv_rope_bwd_cuda);
}
