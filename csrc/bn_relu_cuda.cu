// segfp16 bn_relu family, CUDA kernels: y = act(batch_norm(x) + residual), act = ReLU or identity, and its backward.
//
// Contract (schemas in csrc/ops.cpp, Python side in common/ops.py, CPU twin in bn_relu.cpp, its loops (the readable
// spec of these kernels) in bn_relu_cpu_loops.h):
//   x, residual, y, dy, dx, dres: one dtype (fp32, fp64, fp16, bf16), NCHW or channels_last (bn_relu.h);
//   per-channel tensors (mean, M2, invstd, weight, bias, the backward sums): float32 (float64 for fp64 x).
//   All arithmetic in float (double for fp64); per-block partial sums are merged in double in a fixed order, so
//   results are deterministic (no atomics).
// Passes, each one kernel over the tensor (plus a tiny per-channel finalize kernel after each reduction):
//   forward (training): sum(x) -> mean; sum((x - mean)^2) -> M2 (two-pass: exact for fp16 with a large mean);
//                       y = act((x - mean) * invstd * w + b + r).
//   backward:           sum(dz), sum(dz * (x - mean)) with dz = dy * (y > 0); dx (and dres = dz).
// Why faster than the ATen composition (cudnn/native BN + add + relu, each way): the add and the ReLU are folded
// into the normalise pass and into the backward passes, which removes 2 read+write passes forward and 1-2 backward
// and 3-4 launches per layer. Measured speed-up on the card: not yet (written without a GPU; see bench/kernels.py
// --only bn_relu, run by tools/device_check.sh). The reductions read x twice forward: simple first; a Welford
// single pass is the first thing to try if the bench shows the stats passes dominate.
//
// Launch shapes:
//   channels_last reductions: block (bx, 256 / bx), x over channel packs (consecutive threads read consecutive
//     16-byte packs: coalesced), y over rows; grid.y splits the N*H*W rows into P chunks -> partial [2, P, C].
//   NCHW reductions: grid (C, P), 256 threads over the N*S values of one channel (packs along S when S % V == 0).
//   elementwise: 1-D grid-stride loop over packs of V values (V = 16 bytes / sizeof(T) when every pointer is
//     16-byte aligned and C (channels_last) or S (NCHW) is a multiple of V; else V = 1).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "bn_relu.h"
#include "cuda_launch.h"  // launches, stream, guard (CUDA, or the host runner of the tests)

namespace segfp16 {
namespace {

using namespace bnr;

enum ReduceMode { kSumX = 0, kSumSqDev = 1, kBackward = 2 };
constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// One element's contribution to the two per-channel sums of each reduction mode.
template <int MODE, typename acc_t, typename T>
__device__ __forceinline__ void contrib(acc_t& s0, acc_t& s1, T x, T dy, T y, acc_t mean, bool relu) {
  const acc_t xf = static_cast<acc_t>(x);
  if (MODE == kSumX) {
    s0 += xf;
  } else if (MODE == kSumSqDev) {
    const acc_t d = xf - mean;
    s0 += d * d;
  } else {
    // the mask as ATen's threshold_backward: zero where y <= 0 (a NaN y lets the gradient through)
    const acc_t dz = (relu && static_cast<acc_t>(y) <= acc_t(0)) ? acc_t(0) : static_cast<acc_t>(dy);
    s0 += dz;
    s1 += dz * (xf - mean);
  }
}

// ---- kernels

// channels_last [R, C]: thread (tx, ty) owns channels [c0, c0 + V) and rows ty, ty + stride, ...
template <int MODE, typename T, typename acc_t, int V>
__global__ void bn_reduce_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                                      const acc_t* __restrict__ mean, bool relu, int64_t R, int64_t C,
                                      acc_t* __restrict__ partial /* [2, gridDim.y, C] */) {
  SEGFP16_DYNAMIC_SMEM(acc_t, smem);  // [2, blockDim.y, blockDim.x * V]
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < C;  // C % V == 0, so a pack is wholly in range or wholly out
  acc_t s0[V], s1[V], m[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    s0[v] = s1[v] = acc_t(0);
    m[v] = (MODE != kSumX && active) ? mean[c0 + v] : acc_t(0);
  }
  if (active) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const int64_t off = r * C + c0;
      const Pack<T, V> xv = load_pack<T, V>(x + off);
      if (MODE == kBackward) {
        const Pack<T, V> gv = load_pack<T, V>(dy + off);
        const Pack<T, V> yv = load_pack<T, V>(y + off);
#pragma unroll
        for (int v = 0; v < V; ++v) contrib<MODE, acc_t, T>(s0[v], s1[v], xv.v[v], gv.v[v], yv.v[v], m[v], relu);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) contrib<MODE, acc_t, T>(s0[v], s1[v], xv.v[v], xv.v[v], xv.v[v], m[v], relu);
      }
    }
  }
  // sum over threadIdx.y through shared memory; row 0 writes this block's partial
  const int W = blockDim.x * V;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    smem[threadIdx.y * W + threadIdx.x * V + v] = s0[v];
    smem[(blockDim.y + threadIdx.y) * W + threadIdx.x * V + v] = s1[v];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      acc_t t0 = 0, t1 = 0;
      for (int j = 0; j < static_cast<int>(blockDim.y); ++j) {
        t0 += smem[j * W + threadIdx.x * V + v];
        t1 += smem[(blockDim.y + j) * W + threadIdx.x * V + v];
      }
      partial[static_cast<int64_t>(blockIdx.y) * C + c0 + v] = t0;
      partial[(static_cast<int64_t>(gridDim.y) + blockIdx.y) * C + c0 + v] = t1;
    }
  }
}

// NCHW [N, C, S]: block (c, p) sums channel c over packs p, p + gridDim.y, ... of its N*S values (S % V == 0).
template <int MODE, typename T, typename acc_t, int V>
__global__ void bn_reduce_nchw_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                                      const acc_t* __restrict__ mean, bool relu, int64_t N, int64_t C, int64_t S,
                                      acc_t* __restrict__ partial /* [2, gridDim.y, C] */) {
  SEGFP16_STATIC_SMEM(acc_t, sh, [2][kThreads]);
  const int64_t c = blockIdx.x, SV = S / V, packs = N * SV;
  const acc_t m = MODE != kSumX ? mean[c] : acc_t(0);
  acc_t s0 = 0, s1 = 0;
  for (int64_t g = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; g < packs;
       g += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t n = g / SV, off = (n * C + c) * S + (g - n * SV) * V;
    const Pack<T, V> xv = load_pack<T, V>(x + off);
    if (MODE == kBackward) {
      const Pack<T, V> gv = load_pack<T, V>(dy + off);
      const Pack<T, V> yv = load_pack<T, V>(y + off);
#pragma unroll
      for (int v = 0; v < V; ++v) contrib<MODE, acc_t, T>(s0, s1, xv.v[v], gv.v[v], yv.v[v], m, relu);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) contrib<MODE, acc_t, T>(s0, s1, xv.v[v], xv.v[v], xv.v[v], m, relu);
    }
  }
  sh[0][threadIdx.x] = s0;
  sh[1][threadIdx.x] = s1;
  __syncthreads();
  for (int k = kThreads / 2; k > 0; k >>= 1) {  // tree: fixed order, deterministic
    if (threadIdx.x < k) {
      sh[0][threadIdx.x] += sh[0][threadIdx.x + k];
      sh[1][threadIdx.x] += sh[1][threadIdx.x + k];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[static_cast<int64_t>(blockIdx.y) * C + c] = sh[0][0];
    partial[(static_cast<int64_t>(gridDim.y) + blockIdx.y) * C + c] = sh[1][0];
  }
}

// One thread per channel merges the P partials in double: mean (kSumX), M2 (kSumSqDev), or the backward sums.
template <int MODE, typename acc_t>
__global__ void bn_finalize_kernel(const acc_t* __restrict__ partial, int64_t P, int64_t C, double count,
                                   const acc_t* __restrict__ invstd, acc_t* __restrict__ out0,
                                   acc_t* __restrict__ out1) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double t0 = 0, t1 = 0;
  for (int64_t p = 0; p < P; ++p) {
    t0 += static_cast<double>(partial[p * C + c]);
    t1 += static_cast<double>(partial[(P + p) * C + c]);
  }
  if (MODE == kSumX) {
    out0[c] = static_cast<acc_t>(t0 / count);
  } else if (MODE == kSumSqDev) {
    out0[c] = static_cast<acc_t>(t0);
  } else {
    out0[c] = static_cast<acc_t>(t0);                                     // sum(dz) = dbias
    out1[c] = static_cast<acc_t>(t1 * static_cast<double>(invstd[c]));  // sum(dz * xhat) = dweight
  }
}

// y = act((x - mean) * scale + bias + res), scale = invstd * weight, over packs of V values of one channel (NCHW)
// or V consecutive channels (channels_last).
template <bool CL, typename T, typename acc_t, int V>
__global__ void bn_apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                                const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                const acc_t* __restrict__ bias, bool relu, int64_t packs, int64_t C, int64_t S) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < packs;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * V, c = CL ? e % C : (e / S) % C;
    const Pack<T, V> xv = load_pack<T, V>(x + e);
    Pack<T, V> rv, out;
    if (res != nullptr) rv = load_pack<T, V>(res + e);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t cc = CL ? c + v : c;
      acc_t o = (static_cast<acc_t>(xv.v[v]) - mean[cc]) * scale[cc] + bias[cc];
      if (res != nullptr) o += static_cast<acc_t>(rv.v[v]);
      if (relu) o = o < acc_t(0) ? acc_t(0) : o;  // NaN passes through, as torch.relu
      out.v[v] = static_cast<T>(o);
    }
    store_pack<T, V>(y + e, out);
  }
}

// dx = k * (dz - a - (x - mean) * q), k = weight * invstd, a = mean(dz), q = invstd * mean(dz * xhat); dres = dz.
template <bool CL, typename T, typename acc_t, int V>
__global__ void bn_backward_apply_kernel(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                         T* __restrict__ dx, T* __restrict__ dres, const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ k, const acc_t* __restrict__ a,
                                         const acc_t* __restrict__ q, bool relu, int64_t packs, int64_t C, int64_t S) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < packs;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * V, c = CL ? e % C : (e / S) % C;
    const Pack<T, V> xv = load_pack<T, V>(x + e);
    const Pack<T, V> gv = load_pack<T, V>(dy + e);
    Pack<T, V> yv, dxv, drv;
    if (relu) yv = load_pack<T, V>(y + e);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t cc = CL ? c + v : c;
      const acc_t dz = (relu && static_cast<acc_t>(yv.v[v]) <= acc_t(0)) ? acc_t(0) : static_cast<acc_t>(gv.v[v]);
      dxv.v[v] = static_cast<T>(k[cc] * (dz - a[cc] - (static_cast<acc_t>(xv.v[v]) - mean[cc]) * q[cc]));
      drv.v[v] = static_cast<T>(dz);
    }
    store_pack<T, V>(dx + e, dxv);
    if (dres != nullptr) store_pack<T, V>(dres + e, drv);
  }
}

// ---- launchers

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte packs when the layout's inner extent is a multiple of V and every pointer is 16-byte aligned
template <typename T>
bool use_packs(const Layout& l, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if ((l.cl ? l.C : l.S) % V != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

int64_t elementwise_blocks(int64_t packs, const at::Tensor& x) {
  return std::max<int64_t>(1, std::min<int64_t>((packs + kThreads - 1) / kThreads, launch::sm_count(x) * 32));
}

template <bool CL, typename T, int V>
void launch_apply(const Layout& l, const at::Tensor& x, const T* xp, const T* rp, T* yp,
                  const at::opmath_type<T>* mp, const at::opmath_type<T>* sp, const at::opmath_type<T>* bp,
                  bool relu) {
  const int64_t packs = x.numel() / V;
  launch::launch<bn_apply_kernel<CL, T, at::opmath_type<T>, V>>(static_cast<unsigned>(elementwise_blocks(packs, x)),
                                                                 kThreads, 0, xp, rp, yp, mp, sp, bp, relu, packs, l.C,
                                                                 l.S);
}

template <bool CL, typename T, int V>
void launch_backward_apply(const Layout& l, const at::Tensor& x, const T* gp, const T* yp, const T* xp, T* dxp,
                           T* drp, const at::opmath_type<T>* mp, const at::opmath_type<T>* kp,
                           const at::opmath_type<T>* ap, const at::opmath_type<T>* qp, bool relu) {
  const int64_t packs = x.numel() / V;
  launch::launch<bn_backward_apply_kernel<CL, T, at::opmath_type<T>, V>>(
      static_cast<unsigned>(elementwise_blocks(packs, x)), kThreads, 0, gp, yp, xp, dxp, drp, mp, kp, ap, qp, relu,
      packs, l.C, l.S);
}

// out0[c], out1[c] from the per-channel sums of mode MODE (see bn_finalize_kernel); l.count() > 0.
template <int MODE, typename T, int V>
void channel_sums_cuda(const Layout& l, const T* x, const T* dy, const T* y, const at::Tensor& mean,
                       const at::Tensor& invstd, bool relu, at::Tensor& out0, at::Tensor& out1) {
  using acc_t = at::opmath_type<T>;
  const acc_t* mp = mean.defined() ? mean.const_data_ptr<acc_t>() : nullptr;
  at::Tensor partial;
  int64_t P;
  if (l.cl) {
    const int64_t R = l.N * l.S, groups = l.C / V;
    int bx = 1;
    while (bx < 32 && bx < groups) bx *= 2;  // up to a warp across channel packs
    const int by = kThreads / bx;
    P = std::min<int64_t>(std::max<int64_t>(1, (R + by * 16 - 1) / (by * 16)), 512);  // >= 16 rows per thread
    partial = at::empty({2, P, l.C}, out0.options());
    const dim3 grid(static_cast<unsigned>((groups + bx - 1) / bx), static_cast<unsigned>(P));
    const size_t smem = 2 * static_cast<size_t>(kThreads) * V * sizeof(acc_t);
    launch::launch<bn_reduce_nhwc_kernel<MODE, T, acc_t, V>>(grid, dim3(bx, by), smem, x, dy, y, mp, relu, R, l.C,
                                                             partial.mutable_data_ptr<acc_t>());
  } else {
    const int64_t packs = l.N * l.S / V;
    P = std::min<int64_t>(std::max<int64_t>(1, (packs + kThreads * 16 - 1) / (kThreads * 16)), 512);
    partial = at::empty({2, P, l.C}, out0.options());
    const dim3 grid(static_cast<unsigned>(l.C), static_cast<unsigned>(P));
    launch::launch<bn_reduce_nchw_kernel<MODE, T, acc_t, V>>(grid, kThreads, 0, x, dy, y, mp, relu, l.N, l.C, l.S,
                                                             partial.mutable_data_ptr<acc_t>());
  }
  const acc_t* ip = invstd.defined() ? invstd.const_data_ptr<acc_t>() : nullptr;
  launch::launch<bn_finalize_kernel<MODE, acc_t>>(static_cast<unsigned>((l.C + kThreads - 1) / kThreads), kThreads, 0,
                                                  partial.const_data_ptr<acc_t>(), P, l.C,
                                                  static_cast<double>(l.count()), ip, out0.mutable_data_ptr<acc_t>(),
                                                  out1.mutable_data_ptr<acc_t>());
}

template <int MODE, typename T>
void channel_sums_dispatch(const Layout& l, const T* x, const T* dy, const T* y, const at::Tensor& mean,
                           const at::Tensor& invstd, bool relu, at::Tensor& out0, at::Tensor& out1) {
  constexpr int V = 16 / sizeof(T);
  if (use_packs<T>(l, {x, dy, y}))
    channel_sums_cuda<MODE, T, V>(l, x, dy, y, mean, invstd, relu, out0, out1);
  else
    channel_sums_cuda<MODE, T, 1>(l, x, dy, y, mean, invstd, relu, out0, out1);
}

// Every tensor argument on x's GPU (a CPU per-channel tensor would otherwise be read through a host pointer).
void check_cuda(const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> args) {
  for (const auto& [t, name] : args)
    TORCH_CHECK(t->device() == x.device(), "segfp16 bn_relu (CUDA): ", name, " must be on ", x.device(), ", got ",
                t->device());
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x_in) {
  const launch::DeviceGuard guard(x_in.device());
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  at::Tensor mean = at::zeros({l.C}, x.options().dtype(acc));
  at::Tensor m2 = at::zeros({l.C}, x.options().dtype(acc));
  if (l.count() == 0 || l.C == 0) return {mean, m2};  // empty batch (e.g. an idle SyncBN rank): merges as nothing
  at::Tensor unused = at::empty({l.C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    channel_sums_dispatch<kSumX, scalar_t>(l, xp, nullptr, nullptr, at::Tensor(), at::Tensor(), false, mean, unused);
    channel_sums_dispatch<kSumSqDev, scalar_t>(l, xp, nullptr, nullptr, mean, at::Tensor(), false, m2, unused);
  });
  return {mean, m2};
}

at::Tensor bn_apply_cuda(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                         const at::Tensor& weight_in, const at::Tensor& bias_in,
                         const std::optional<at::Tensor>& residual_in, bool relu) {
  const launch::DeviceGuard guard(x_in.device());
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  check_cuda(x, {{&mean_in, "mean"}, {&invstd_in, "invstd"}, {&weight_in, "weight"}, {&bias_in, "bias"}});
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor scale = per_channel(invstd_in, "invstd", l.C, acc) * per_channel(weight_in, "weight", l.C, acc);
  const at::Tensor bias = per_channel(bias_in, "bias", l.C, acc);
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_cuda(x, {{&*residual_in, "residual"}});
    residual = like_x(*residual_in, x, "residual");
  }
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t *mp = mean.const_data_ptr<acc_t>(), *sp = scale.const_data_ptr<acc_t>(),
                *bp = bias.const_data_ptr<acc_t>();
    const bool packs = use_packs<scalar_t>(l, {xp, rp, yp});
    if (l.cl && packs) launch_apply<true, scalar_t, V>(l, x, xp, rp, yp, mp, sp, bp, relu);
    else if (l.cl) launch_apply<true, scalar_t, 1>(l, x, xp, rp, yp, mp, sp, bp, relu);
    else if (packs) launch_apply<false, scalar_t, V>(l, x, xp, rp, yp, mp, sp, bp, relu);
    else launch_apply<false, scalar_t, 1>(l, x, xp, rp, yp, mp, sp, bp, relu);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias,
                                                                  const std::optional<at::Tensor>& residual,
                                                                  double eps, bool relu) {
  const launch::DeviceGuard guard(x.device());
  const Layout l = layout_of(x);
  TORCH_CHECK(l.count() > 0, "segfp16 bn_relu_train: x has no values per channel, shape ", x.sizes());
  auto [mean, m2] = bn_stats_cuda(x);
  at::Tensor var = m2 / static_cast<double>(l.count());  // biased: what normalises the batch
  at::Tensor y = bn_apply_cuda(x, mean, (var + eps).rsqrt(), weight, bias, residual, relu);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(const at::Tensor& dy_in, const at::Tensor& y_in,
                                                           const at::Tensor& x_in, const at::Tensor& mean_in,
                                                           const at::Tensor& invstd_in, bool relu) {
  const launch::DeviceGuard guard(x_in.device());
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  check_cuda(x, {{&dy_in, "dy"}, {&y_in, "y"}, {&mean_in, "mean"}, {&invstd_in, "invstd"}});
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : dy;  // y only feeds the ReLU mask
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  at::Tensor sum_dz = at::zeros({l.C}, x.options().dtype(acc));
  at::Tensor sum_dz_xhat = at::zeros({l.C}, x.options().dtype(acc));
  if (x.numel() == 0) return {sum_dz, sum_dz_xhat};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_reduce_cuda", [&] {
    channel_sums_dispatch<kBackward, scalar_t>(l, x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                               y.const_data_ptr<scalar_t>(), mean, invstd, relu, sum_dz,
                                               sum_dz_xhat);
  });
  return {sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cuda(const at::Tensor& dy_in, const at::Tensor& y_in,
                                                          const at::Tensor& x_in, const at::Tensor& mean_in,
                                                          const at::Tensor& invstd_in, const at::Tensor& weight_in,
                                                          const at::Tensor& mean_dz_in,
                                                          const at::Tensor& mean_dz_xhat_in, bool relu,
                                                          bool residual_grad) {
  const launch::DeviceGuard guard(x_in.device());
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  check_cuda(x, {{&dy_in, "dy"}, {&y_in, "y"}, {&mean_in, "mean"}, {&invstd_in, "invstd"}, {&weight_in, "weight"},
                 {&mean_dz_in, "mean_dz"}, {&mean_dz_xhat_in, "mean_dz_xhat"}});
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : dy;
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  const at::Tensor k = per_channel(weight_in, "weight", l.C, acc) * invstd;
  const at::Tensor a = per_channel(mean_dz_in, "mean_dz", l.C, acc);
  const at::Tensor q = per_channel(mean_dz_xhat_in, "mean_dz_xhat", l.C, acc) * invstd;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  at::Tensor dres = residual_grad ? at::empty(x.sizes(), x.options().memory_format(format_of(x)))
                                  : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t *gp = dy.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>(),
                   *xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* drp = residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t *mp = mean.const_data_ptr<acc_t>(), *kp = k.const_data_ptr<acc_t>(), *ap = a.const_data_ptr<acc_t>(),
                *qp = q.const_data_ptr<acc_t>();
    const bool packs = use_packs<scalar_t>(l, {gp, yp, xp, dxp, drp});
    if (l.cl && packs) launch_backward_apply<true, scalar_t, V>(l, x, gp, yp, xp, dxp, drp, mp, kp, ap, qp, relu);
    else if (l.cl) launch_backward_apply<true, scalar_t, 1>(l, x, gp, yp, xp, dxp, drp, mp, kp, ap, qp, relu);
    else if (packs) launch_backward_apply<false, scalar_t, V>(l, x, gp, yp, xp, dxp, drp, mp, kp, ap, qp, relu);
    else launch_backward_apply<false, scalar_t, 1>(l, x, gp, yp, xp, dxp, drp, mp, kp, ap, qp, relu);
  });
  return {dx, dres};
}

}  // namespace
}  // namespace segfp16

namespace {
void register_bn_cuda(torch::Library& m) {
  m.impl("bn_stats", &segfp16::bn_stats_cuda);
  m.impl("bn_apply", &segfp16::bn_apply_cuda);
  m.impl("bn_relu_train", &segfp16::bn_relu_train_cuda);
  m.impl("bn_backward_reduce", &segfp16::bn_backward_reduce_cuda);
  m.impl("bn_backward_apply", &segfp16::bn_backward_apply_cuda);
}
}  // namespace

SEGFP16_REGISTER_CUDA(register_bn_cuda)
