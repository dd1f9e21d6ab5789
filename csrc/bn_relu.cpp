// segfp16 bn_relu family, CPU kernels: y = act(batch_norm(x) + residual), act = ReLU or identity, and its backward.
// Schemas and the forward/backward split are documented in csrc/ops.cpp; the Python side is common/ops.py.
//
// This file is also the readable spec of the CUDA kernels (csrc/bn_relu_cuda.cu): same passes, same formulas.
//   forward (training): pass 1 sum(x) -> mean, pass 2 sum((x - mean)^2) -> M2 (two-pass: exact for fp16 inputs
//                       with a large mean), pass 3 y = act((x - mean) * invstd * w + b + r).
//   backward:           pass 1 sum(dz), sum(dz * (x - mean)) with dz = dy * (y > 0), pass 2 dx (and dres = dz).
// The ATen composition (F.batch_norm + add + relu, fwd+bwd) makes 2 more full passes (the add and the ReLU, each
// way) and keeps the same two tensors (x for BN, y for ReLU).
// Measured (bench/kernels.py --only bn_relu; 2-core x86 CPU shared with other jobs, so +-30% noise; fp32 NCHW,
// batch 2, training with the running-stat update; 1 thread / 2 threads): fwd+bwd 1.19-1.53x / 1.01-1.53x faster
// than the composition at R50-D8's maps (64x128x128, 256..2048 channels at 32x32..64x64), forward alone
// 0.67-2.57x / 1.20-2.40x. At the demo's tiny maps (batch 4, 2 threads; bench/results/2026-11-27-cpu-2core.md)
// fwd+bwd is 1.5-2.2x the composition's time (fwd alone 0.8-1.6x for fp32/bf16 at 6x6..16x16, ~1.1-1.3x at 1x1):
// what is left at 1x1 is mostly the Python/autograd side (register_autograd, the backward's small ops); the
// 1x1 row view (cpu_layout_of), the [C] loops instead of per-channel tensor ops and the vectorised bf16 store (st)
// took the kernels' share from ~0.1 ms to ~0.02 ms there.
//
// Layouts: see bn_relu.h. Accumulation is float (double for fp64 inputs) within a chunk (one [S] plane in NCHW,
// kRowsPerChunk rows in channels_last), and the chunk sums are merged in double, in a fixed order (reproducible).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bn_relu.h"

namespace segfp16 {
namespace {

using namespace bnr;

constexpr int64_t kRowsPerChunk = 256;  // channels_last: rows per partial sum (float sums over <= 256 values)

// ---- the two loop shapes every op is made of

// A map with one value per channel and image (the 1x1 pyramid bins, image pooling) is [N, C] in memory in either
// layout; viewed as channels_last rows, the loops run over C (vectorised) instead of over N * C one-element planes,
// each with its own loop set-up (that per-plane cost made these maps ~2x slower than ATen).
Layout cpu_layout_of(const at::Tensor& x) {
  Layout l = layout_of(x);
  if (l.S == 1) l.cl = true;
  return l;
}

// parallel_for grain (in tasks) for tasks of `work` elements each: at least at::internal::GRAIN_SIZE (32768) elements
// per thread, as ATen's kernels do, so that small tensors (the pyramid bins) run inline instead of waking the pool.
int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
}

// Per-channel sums out0[c], out1[c]. The caller gives the inner loops, so that they are plain vectorisable loops
// with their per-channel constants in registers:
//   run(c, base, n, a0, a1): NCHW, sets a0, a1 to the sums over the contiguous run [base, base + n) of channel c;
//   row(base, p0, p1):       channels_last, adds the row [base, base + C) into the [C] partials p0, p1.
// NCHW: one channel per task, the run sums (float) merged in double. channels_last: chunks of kRowsPerChunk rows
// each fill a private [C] partial, merged per channel in double. The chunking does not depend on the thread count,
// so results are bitwise reproducible.
template <typename acc_t, typename Run, typename Row>
void channel_sums(const Layout& l, acc_t* out0, acc_t* out1, const Run& run, const Row& row) {
  const int64_t C = l.C;
  if (!l.cl) {
    at::parallel_for(0, C, grain_for(l.count()), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double t0 = 0, t1 = 0;
        for (int64_t n = 0; n < l.N; ++n) {
          acc_t a0 = 0, a1 = 0;
          run(c, (n * C + c) * l.S, l.S, a0, a1);
          t0 += a0;
          t1 += a1;
        }
        out0[c] = static_cast<acc_t>(t0);
        out1[c] = static_cast<acc_t>(t1);
      }
    });
    return;
  }
  const int64_t R = l.N * l.S, chunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<acc_t> part(static_cast<size_t>(2 * chunks * C), acc_t(0));
  at::parallel_for(0, chunks, grain_for(kRowsPerChunk * C), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* p0 = part.data() + (2 * k) * C;
      for (int64_t r = k * kRowsPerChunk; r < std::min(R, (k + 1) * kRowsPerChunk); ++r) row(r * C, p0, p0 + C);
    }
  });
  at::parallel_for(0, C, grain_for(chunks), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double t0 = 0, t1 = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        t0 += part[(2 * k) * C + c];
        t1 += part[(2 * k + 1) * C + c];
      }
      out0[c] = static_cast<acc_t>(t0);
      out1[c] = static_cast<acc_t>(t1);
    }
  });
}

// Elementwise pass: plane(c, base, n) over the contiguous runs of one channel (NCHW, parallel over planes) or
// row(base) over rows [C] (channels_last, parallel over rows).
template <typename Plane, typename Row>
void for_each_element(const Layout& l, const Plane& plane, const Row& row) {
  if (!l.cl) {
    at::parallel_for(0, l.N * l.C, grain_for(l.S), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) plane(p % l.C, p * l.S, l.S);
    });
    return;
  }
  at::parallel_for(0, l.N * l.S, grain_for(l.C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(r * l.C);
  });
}

// (The inner loops below sit inside AT_DISPATCH's macro argument, where only the _Pragma operator form works.)
// Calls f(std::true_type) or f(std::false_type): a runtime flag as a compile-time one, so that the inner loops
// carry no branch on it (GCC vectorises them only without).
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

template <typename acc_t, typename T>
inline acc_t ld(T v) {
  return static_cast<acc_t>(v);
}

// Store: static_cast, except float -> bfloat16, where c10's conversion branches on NaN and GCC leaves the loop
// scalar (bf16 bn_apply / bn_backward_apply ran 10-20x slower than fp32). Same bits: round to nearest even, and
// NaN -> 0x7FC0, as c10::detail::round_to_nearest_even; written as a select so that the loop vectorises.
template <typename T, typename acc_t>
inline T st(acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// ---- ops

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = cpu_layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  // empty, not zeros: channel_sums writes every channel (per-channel tensor ops cost ~us each at the pyramid bins)
  at::Tensor mean = at::empty({l.C}, x.options().dtype(acc));
  at::Tensor m2 = at::empty({l.C}, x.options().dtype(acc));
  if (l.count() == 0) {  // empty batch (e.g. an idle SyncBN rank): count 0 merges as nothing
    mean.zero_();
    m2.zero_();
    return {mean, m2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ xp = x.const_data_ptr<scalar_t>();
    acc_t* __restrict__ mp = mean.mutable_data_ptr<acc_t>();
    std::vector<acc_t> unused(l.C);
    const int64_t C = l.C;
    // pass 1: sum(x) -> mean
    channel_sums<acc_t>(
        l, mp, unused.data(),
        [&](int64_t, int64_t base, int64_t n, acc_t& a0, acc_t&) {
          acc_t s = 0;
          _Pragma("omp simd reduction(+ : s)")
          for (int64_t i = base; i < base + n; ++i) s += ld<acc_t>(xp[i]);
          a0 = s;
        },
        [&](int64_t base, acc_t* __restrict__ p0, acc_t*) {
          _Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) p0[c] += ld<acc_t>(xp[base + c]);
        });
    for (int64_t c = 0; c < C; ++c) mp[c] /= static_cast<acc_t>(l.count());
    // pass 2: sum((x - mean)^2) -> M2
    channel_sums<acc_t>(
        l, m2.mutable_data_ptr<acc_t>(), unused.data(),
        [&](int64_t c, int64_t base, int64_t n, acc_t& a0, acc_t&) {
          const acc_t m = mp[c];
          acc_t s = 0;
          _Pragma("omp simd reduction(+ : s)")
          for (int64_t i = base; i < base + n; ++i) s += (ld<acc_t>(xp[i]) - m) * (ld<acc_t>(xp[i]) - m);
          a0 = s;
        },
        [&](int64_t base, acc_t* __restrict__ p0, acc_t*) {
          _Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = ld<acc_t>(xp[base + c]) - mp[c];
            p0[c] += d * d;
          }
        });
  });
  return {mean, m2};
}

// bn_apply with invstd given directly (from_var false) or as the biased variance, invstd = rsqrt(var + eps) (bn_relu_train).
// The per-channel folding runs as plain [C] loops, not tensor ops: at the pyramid bins (a few KB per tensor) each
// extra ATen op was a visible share of the call (see the "Measured" note at the top).
at::Tensor bn_apply_impl(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in, bool from_var, double eps,
                         const at::Tensor& weight_in, const at::Tensor& bias_in,
                         const std::optional<at::Tensor>& residual_in, bool relu) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = cpu_layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd_or_var = per_channel(invstd_in, from_var ? "var" : "invstd", l.C, acc);
  const at::Tensor weight = per_channel(weight_in, "weight", l.C, acc);
  const at::Tensor bias = per_channel(bias_in, "bias", l.C, acc);
  at::Tensor residual;
  if (residual_in.has_value()) residual = like_x(*residual_in, x, "residual");
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ xp = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* __restrict__ yp = y.mutable_data_ptr<scalar_t>();
    const acc_t* __restrict__ mp = mean.const_data_ptr<acc_t>();
    const acc_t* __restrict__ bp = bias.const_data_ptr<acc_t>();
    const int64_t C = l.C;
    // scale = invstd * weight, folded once per channel; shift stays (x - mean) so large means cancel exactly first.
    // rsqrt as 1 / sqrt(var + eps) in acc_t: the same IEEE ops as torch.rsqrt(var + eps), which the backward uses.
    std::vector<acc_t> scale(static_cast<size_t>(C));
    {
      const acc_t* iv = invstd_or_var.const_data_ptr<acc_t>();
      const acc_t* wp = weight.const_data_ptr<acc_t>();
      const acc_t e = static_cast<acc_t>(eps);
      for (int64_t c = 0; c < C; ++c)
        scale[c] = (from_var ? acc_t(1) / std::sqrt(iv[c] + e) : iv[c]) * wp[c];
    }
    const acc_t* __restrict__ sp = scale.data();
    with_flag(relu, [&](auto relu_t) {
      with_flag(rp != nullptr, [&](auto res_t) {
        constexpr bool RELU = decltype(relu_t)::value, RES = decltype(res_t)::value;
        // act(o): written so that NaN passes through, as torch.relu does
        auto out = [](acc_t o) { return RELU ? (o < acc_t(0) ? acc_t(0) : o) : o; };
        for_each_element(
            l,
            [&](int64_t c, int64_t base, int64_t n) {
              const acc_t m = mp[c], k = sp[c], b = bp[c];
              _Pragma("omp simd")
              for (int64_t i = base; i < base + n; ++i)
                yp[i] = st<scalar_t>(
                    out((ld<acc_t>(xp[i]) - m) * k + b + (RES ? ld<acc_t>(rp[i]) : acc_t(0))));
            },
            [&](int64_t base) {
              _Pragma("omp simd")
              for (int64_t c = 0; c < C; ++c) {
                const int64_t i = base + c;
                yp[i] = st<scalar_t>(
                    out((ld<acc_t>(xp[i]) - mp[c]) * sp[c] + bp[c] + (RES ? ld<acc_t>(rp[i]) : acc_t(0))));
              }
            });
      });
    });
  });
  return y;
}

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                        const at::Tensor& bias, const std::optional<at::Tensor>& residual, bool relu) {
  return bn_apply_impl(x, mean, invstd, false, 0.0, weight, bias, residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& bias,
                                                                 const std::optional<at::Tensor>& residual, double eps,
                                                                 bool relu) {
  const Layout l = layout_of(x);
  TORCH_CHECK(l.count() > 0, "segfp16 bn_relu_train: x has no values per channel, shape ", x.sizes());
  auto [mean, var] = bn_stats_cpu(x);
  // var = M2 / count in place (biased: what normalises the batch); a [C] loop instead of a tensor op
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "bn_relu_train_cpu", [&] {
    scalar_t* vp = var.mutable_data_ptr<scalar_t>();
    const scalar_t n = static_cast<scalar_t>(l.count());
    for (int64_t c = 0; c < l.C; ++c) vp[c] /= n;
  });
  at::Tensor y = bn_apply_impl(x, mean, var, true, eps, weight, bias, residual, relu);
  return {y, mean, var};
}

// dz = dy where y > 0 (ATen's threshold_backward: zero where y <= 0, so a NaN y lets the gradient through)
template <bool RELU, typename acc_t, typename T>
inline acc_t masked(T dy, T y) {
  const acc_t g = ld<acc_t>(dy);  // both loads unconditional, so that the select vectorises
  if (!RELU) return g;
  return ld<acc_t>(y) <= acc_t(0) ? acc_t(0) : g;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& dy_in, const at::Tensor& y_in,
                                                          const at::Tensor& x_in, const at::Tensor& mean_in,
                                                          const at::Tensor& invstd_in, bool relu) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = cpu_layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : dy;  // y only feeds the ReLU mask
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  at::Tensor sum_dz = at::empty({l.C}, x.options().dtype(acc));  // channel_sums writes every channel
  at::Tensor sum_dz_xhat = at::empty({l.C}, x.options().dtype(acc));
  if (x.numel() == 0) {
    sum_dz.zero_();
    sum_dz_xhat.zero_();
    return {sum_dz, sum_dz_xhat};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ xp = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ yp = y.const_data_ptr<scalar_t>();
    const acc_t* __restrict__ mp = mean.const_data_ptr<acc_t>();
    acc_t* s0 = sum_dz.mutable_data_ptr<acc_t>();
    acc_t* s1 = sum_dz_xhat.mutable_data_ptr<acc_t>();
    const int64_t C = l.C;
    with_flag(relu, [&](auto relu_t) {
      constexpr bool RELU = decltype(relu_t)::value;
      channel_sums<acc_t>(
          l, s0, s1,
          [&](int64_t c, int64_t base, int64_t n, acc_t& a0, acc_t& a1) {
            // GCC does not vectorise the masked select feeding a reduction, so mask a block into dz[], then reduce
            constexpr int64_t B = 256;
            acc_t dz[B];
            const acc_t m = mp[c];
            acc_t u = 0, v = 0;
            for (int64_t i0 = base; i0 < base + n; i0 += B) {
              const int64_t len = std::min(B, base + n - i0);
              _Pragma("omp simd")
              for (int64_t j = 0; j < len; ++j) dz[j] = masked<RELU, acc_t>(gp[i0 + j], yp[i0 + j]);
              _Pragma("omp simd reduction(+ : u, v)")
              for (int64_t j = 0; j < len; ++j) {
                u += dz[j];
                v += dz[j] * (ld<acc_t>(xp[i0 + j]) - m);
              }
            }
            a0 = u;
            a1 = v;
          },
          [&](int64_t base, acc_t* __restrict__ p0, acc_t* __restrict__ p1) {
            _Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c) {
              const acc_t dz = masked<RELU, acc_t>(gp[base + c], yp[base + c]);
              p0[c] += dz;
              p1[c] += dz * (ld<acc_t>(xp[base + c]) - mp[c]);
            }
          });
    });
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) s1[c] *= ip[c];  // sum(dz * (x - mean)) * invstd = sum(dz * xhat)
  });
  return {sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cpu(const at::Tensor& dy_in, const at::Tensor& y_in,
                                                         const at::Tensor& x_in, const at::Tensor& mean_in,
                                                         const at::Tensor& invstd_in, const at::Tensor& weight_in,
                                                         const at::Tensor& mean_dz_in,
                                                         const at::Tensor& mean_dz_xhat_in, bool relu,
                                                         bool residual_grad) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = cpu_layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : dy;
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  const at::Tensor weight = per_channel(weight_in, "weight", l.C, acc);
  const at::Tensor a = per_channel(mean_dz_in, "mean_dz", l.C, acc);
  const at::Tensor mean_dz_xhat = per_channel(mean_dz_xhat_in, "mean_dz_xhat", l.C, acc);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  at::Tensor dres = residual_grad ? at::empty(x.sizes(), x.options().memory_format(format_of(x)))
                                  : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ xp = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ yp = y.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* __restrict__ drp = residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* __restrict__ mp = mean.const_data_ptr<acc_t>();
    const acc_t* __restrict__ ap = a.const_data_ptr<acc_t>();
    const int64_t C = l.C;
    // dx = k * (dz - mean_dz - (x - mean) * q) with k = weight * invstd and q = invstd * mean_dz_xhat, per channel
    // ([C] loops, not tensor ops: see bn_apply_impl)
    std::vector<acc_t> k(static_cast<size_t>(C)), q(static_cast<size_t>(C));
    {
      const acc_t* wp = weight.const_data_ptr<acc_t>();
      const acc_t* ip = invstd.const_data_ptr<acc_t>();
      const acc_t* hp = mean_dz_xhat.const_data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        k[c] = wp[c] * ip[c];
        q[c] = hp[c] * ip[c];
      }
    }
    const acc_t* __restrict__ kp = k.data();
    const acc_t* __restrict__ qp = q.data();
    with_flag(relu, [&](auto relu_t) {
      with_flag(residual_grad, [&](auto dres_t) {
        constexpr bool RELU = decltype(relu_t)::value, DRES = decltype(dres_t)::value;
        for_each_element(
            l,
            [&](int64_t c, int64_t base, int64_t n) {
              const acc_t m = mp[c], kk = kp[c], aa = ap[c], qq = qp[c];
              _Pragma("omp simd")
              for (int64_t i = base; i < base + n; ++i) {
                const acc_t dz = masked<RELU, acc_t>(gp[i], yp[i]);
                dxp[i] = st<scalar_t>(kk * (dz - aa - (ld<acc_t>(xp[i]) - m) * qq));
                if (DRES) drp[i] = st<scalar_t>(dz);
              }
            },
            [&](int64_t base) {
              _Pragma("omp simd")
              for (int64_t c = 0; c < C; ++c) {
                const int64_t i = base + c;
                const acc_t dz = masked<RELU, acc_t>(gp[i], yp[i]);
                dxp[i] = st<scalar_t>(kp[c] * (dz - ap[c] - (ld<acc_t>(xp[i]) - mp[c]) * qp[c]));
                if (DRES) drp[i] = st<scalar_t>(dz);
              }
            });
      });
    });
  });
  return {dx, dres};
}

}  // namespace
}  // namespace segfp16

TORCH_LIBRARY_IMPL(segfp16, CPU, m) {
  m.impl("bn_stats", &segfp16::bn_stats_cpu);
  m.impl("bn_apply", &segfp16::bn_apply_cpu);
  m.impl("bn_relu_train", &segfp16::bn_relu_train_cpu);
  m.impl("bn_backward_reduce", &segfp16::bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &segfp16::bn_backward_apply_cpu);
}
