// segfp16 bn_relu family, CPU kernels: y = act(batch_norm(x) + residual), act = ReLU or identity, and its backward.
// Schemas and the forward/backward split are documented in csrc/ops.cpp; the Python side is common/ops.py.
//
// This file is also the readable spec of the CUDA kernels (csrc/bn_relu.cu): same passes, same formulas.
//   forward (training): pass 1 sum(x) -> mean, pass 2 sum((x - mean)^2) -> M2 (two-pass: exact for fp16 inputs
//                       with a large mean), pass 3 y = act((x - mean) * invstd * w + b + r).
//   backward:           pass 1 sum(dz), sum(dz * (x - mean)) with dz = dy * (y > 0), pass 2 dx (and dres = dz).
// The ATen composition (F.batch_norm + add + relu, fwd+bwd) makes 2 more full passes (the add and the ReLU, each
// way) and keeps the same two tensors (x for BN, y for ReLU).
//
// Layouts: see bn_relu.h. Accumulation is float (double for fp64 inputs) within a chunk (one [S] plane in NCHW,
// kRowsPerChunk rows in channels_last), and the chunk sums are merged in double, in a fixed order (reproducible).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bn_relu.h"

namespace segfp16 {
namespace {

using namespace bnr;

constexpr int64_t kRowsPerChunk = 256;  // channels_last: rows per partial sum (float sums over <= 256 values)

// ---- the per-channel reduction both directions use

// out0[c] = sum f0, out1[c] = sum f1 over the values of channel c, where contrib(i, c, a0, a1) adds the contribution
// of element i (flat index into the layout's storage) to the accumulators a0, a1.
template <typename acc_t, typename F>
void channel_sums(const Layout& l, acc_t* out0, acc_t* out1, const F& contrib) {
  const int64_t C = l.C;
  if (!l.cl) {
    // NCHW: one channel per task; a plane [S] is a contiguous run (vectorised float sum), merged in double.
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double t0 = 0, t1 = 0;
        for (int64_t n = 0; n < l.N; ++n) {
          const int64_t base = (n * C + c) * l.S;
          acc_t a0 = 0, a1 = 0;
#pragma omp simd reduction(+ : a0, a1)
          for (int64_t s = 0; s < l.S; ++s) contrib(base + s, c, a0, a1);
          t0 += a0;
          t1 += a1;
        }
        out0[c] = static_cast<acc_t>(t0);
        out1[c] = static_cast<acc_t>(t1);
      }
    });
    return;
  }
  // channels_last: rows [C] are contiguous; chunks of kRowsPerChunk rows each fill a private [C] partial (the inner
  // loop over C vectorises), then the partials are merged per channel. The chunking does not depend on the thread
  // count, so results are bitwise reproducible.
  const int64_t R = l.N * l.S, chunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<acc_t> part(static_cast<size_t>(2 * chunks * C), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* p0 = part.data() + (2 * k) * C;
      acc_t* p1 = p0 + C;
      const int64_t r1 = std::min(R, (k + 1) * kRowsPerChunk);
      for (int64_t r = k * kRowsPerChunk; r < r1; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) contrib(r * C + c, c, p0[c], p1[c]);
      }
    }
  });
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
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

// Elementwise pass: f(i, c) for every element i of channel c, parallel over planes (NCHW) or rows (channels_last).
template <typename F>
void for_each_element(const Layout& l, const F& f) {
  if (!l.cl) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(l.S, 1));
    at::parallel_for(0, l.N * l.C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % l.C, base = p * l.S;
#pragma omp simd
        for (int64_t s = 0; s < l.S; ++s) f(base + s, c);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(l.C, 1));
  at::parallel_for(0, l.N * l.S, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < l.C; ++c) f(r * l.C + c, c);
    }
  });
}

// ---- ops

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  at::Tensor mean = at::zeros({l.C}, x.options().dtype(acc));
  at::Tensor m2 = at::zeros({l.C}, x.options().dtype(acc));
  if (l.count() == 0) return {mean, m2};  // empty batch (e.g. an idle SyncBN rank): count 0 merges as nothing
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* qp = m2.mutable_data_ptr<acc_t>();
    std::vector<acc_t> unused(l.C);
    channel_sums<acc_t>(l, mp, unused.data(), [&](int64_t i, int64_t, acc_t& a0, acc_t&) {
      a0 += static_cast<acc_t>(xp[i]);
    });
    for (int64_t c = 0; c < l.C; ++c) mp[c] /= static_cast<acc_t>(l.count());
    channel_sums<acc_t>(l, qp, unused.data(), [&](int64_t i, int64_t c, acc_t& a0, acc_t&) {
      const acc_t d = static_cast<acc_t>(xp[i]) - mp[c];
      a0 += d * d;
    });
  });
  return {mean, m2};
}

at::Tensor bn_apply_cpu(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                        const at::Tensor& weight_in, const at::Tensor& bias_in,
                        const std::optional<at::Tensor>& residual_in, bool relu) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  // scale = invstd * weight, folded once per channel; shift stays (x - mean) so large means cancel exactly first
  const at::Tensor scale = per_channel(invstd_in, "invstd", l.C, acc) * per_channel(weight_in, "weight", l.C, acc);
  const at::Tensor bias = per_channel(bias_in, "bias", l.C, acc);
  at::Tensor residual;
  if (residual_in.has_value()) residual = like_x(*residual_in, x, "residual");
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = bias.const_data_ptr<acc_t>();
    for_each_element(l, [&](int64_t i, int64_t c) {
      acc_t o = (static_cast<acc_t>(xp[i]) - mp[c]) * sp[c] + bp[c];
      if (rp) o += static_cast<acc_t>(rp[i]);
      if (relu) o = o < acc_t(0) ? acc_t(0) : o;  // written so that NaN passes through, as torch.relu does
      yp[i] = static_cast<scalar_t>(o);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& bias,
                                                                 const std::optional<at::Tensor>& residual, double eps,
                                                                 bool relu) {
  const Layout l = layout_of(x);
  TORCH_CHECK(l.count() > 0, "segfp16 bn_relu_train: x has no values per channel, shape ", x.sizes());
  auto [mean, m2] = bn_stats_cpu(x);
  at::Tensor var = m2 / static_cast<double>(l.count());  // biased: what normalises the batch
  at::Tensor y = bn_apply_cpu(x, mean, (var + eps).rsqrt(), weight, bias, residual, relu);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& dy_in, const at::Tensor& y_in,
                                                          const at::Tensor& x_in, const at::Tensor& mean_in,
                                                          const at::Tensor& invstd_in, bool relu) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : dy;  // y only feeds the ReLU mask
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  at::Tensor sum_dz = at::zeros({l.C}, x.options().dtype(acc));
  at::Tensor sum_dz_xhat = at::zeros({l.C}, x.options().dtype(acc));
  if (x.numel() == 0) return {sum_dz, sum_dz_xhat};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    acc_t* s0 = sum_dz.mutable_data_ptr<acc_t>();
    acc_t* s1 = sum_dz_xhat.mutable_data_ptr<acc_t>();
    channel_sums<acc_t>(l, s0, s1, [&](int64_t i, int64_t c, acc_t& a0, acc_t& a1) {
      // mask as ATen's threshold_backward: zero where y <= 0 (a NaN y lets the gradient through)
      const acc_t dz = (relu && static_cast<acc_t>(yp[i]) <= acc_t(0)) ? acc_t(0) : static_cast<acc_t>(gp[i]);
      a0 += dz;
      a1 += dz * (static_cast<acc_t>(xp[i]) - mp[c]);
    });
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.C; ++c) s1[c] *= ip[c];  // sum(dz * (x - mean)) * invstd = sum(dz * xhat)
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
  const Layout l = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : dy;
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  // dx = k * (dz - mean_dz - (x - mean) * q) with k = weight * invstd and q = invstd * mean_dz_xhat, per channel
  const at::Tensor k = per_channel(weight_in, "weight", l.C, acc) * invstd;
  const at::Tensor a = per_channel(mean_dz_in, "mean_dz", l.C, acc);
  const at::Tensor q = per_channel(mean_dz_xhat_in, "mean_dz_xhat", l.C, acc) * invstd;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  at::Tensor dres = residual_grad ? at::empty(x.sizes(), x.options().memory_format(format_of(x))) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* drp = residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* kp = k.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const acc_t* qp = q.const_data_ptr<acc_t>();
    for_each_element(l, [&](int64_t i, int64_t c) {
      const acc_t dz = (relu && static_cast<acc_t>(yp[i]) <= acc_t(0)) ? acc_t(0) : static_cast<acc_t>(gp[i]);
      dxp[i] = static_cast<scalar_t>(kp[c] * (dz - ap[c] - (static_cast<acc_t>(xp[i]) - mp[c]) * qp[c]));
      if (drp) drp[i] = static_cast<scalar_t>(dz);
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
