// segfp16 bn_relu family, CPU ops: y = act(batch_norm(x) + residual), act = ReLU or identity, and its backward.
// Schemas and the forward/backward split are documented in csrc/ops.cpp; the Python side is common/ops.py.
// This file checks arguments, allocates, folds the per-channel constants ([C] loops) and calls the loops of
// csrc/bn_relu_cpu_loops.h in the widest instruction set this CPU has (bn_relu_cpu.h: cpu_loops()). Those loops are
// also the readable spec of the CUDA kernels (csrc/bn_relu_cuda.cu): same passes, same formulas.
//
// Measured: bench/kernels.py --only bn_relu (R50-D8's maps) and --only bn_relu_demo (the CPU demo's maps, batch 4);
// numbers in bench/results/ and docs/kernels.md.
//
// Layouts: see bn_relu.h. A map with one value per channel and image (the 1x1 pyramid bins, image pooling) is [N, C]
// in memory in either layout; viewed as channels_last rows, the loops run over C (vectorised) instead of over N * C
// one-element planes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "bn_relu.h"
#include "bn_relu_cpu.h"

namespace segfp16 {
namespace bnr {

const CpuLoops& cpu_loops() {
  static const CpuLoops picked = [] {
    const CpuLoops variants[] = {
        {"base", &base::stats, &base::apply, &base::backward_reduce, &base::backward_apply},
        {"avx2", &avx2::stats, &avx2::apply, &avx2::backward_reduce, &avx2::backward_apply},
        {"avx512", &avx512::stats, &avx512::apply, &avx512::backward_reduce, &avx512::backward_apply},
    };
    bool runs[3] = {true, false, false};
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // the condition of the variants' pragmas
    __builtin_cpu_init();
    runs[1] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    runs[2] = runs[1] && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    const char* want = std::getenv("SEGFP16_CPU_ISA");
    if (want == nullptr || *want == '\0') return runs[2] ? variants[2] : runs[1] ? variants[1] : variants[0];
    for (int i = 0; i < 3; ++i) {
      if (std::strcmp(want, variants[i].isa) != 0) continue;
      TORCH_CHECK(runs[i], "SEGFP16_CPU_ISA=", want, ": this CPU (or this build) cannot run it");
      return variants[i];
    }
    TORCH_CHECK(false, "SEGFP16_CPU_ISA=", want, ": expected base, avx2 or avx512");
  }();
  return picked;
}

}  // namespace bnr

namespace {

using namespace bnr;

Layout cpu_layout_of(const at::Tensor& x) {
  Layout l = layout_of(x);
  if (l.S == 1) l.cl = true;  // [N, C] rows (see the top)
  return l;
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// ---- ops

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = cpu_layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  // empty, not zeros: the loops write every channel (each extra tensor op is a visible share at the pyramid bins)
  at::Tensor mean = at::empty({l.C}, x.options().dtype(acc));
  at::Tensor m2 = at::empty({l.C}, x.options().dtype(acc));
  if (l.count() == 0) {  // empty batch (e.g. an idle SyncBN rank): count 0 merges as nothing
    mean.zero_();
    m2.zero_();
    return {mean, m2};
  }
  cpu_loops().stats(x.scalar_type(), l, x.const_data_ptr(), mean.mutable_data_ptr(), m2.mutable_data_ptr());
  return {mean, m2};
}

// f(acc_t{}) with acc_t the C++ type of acc (float or double): for the [C] loops over per-channel tensors
template <typename F>
void with_acc(at::ScalarType acc, const F& f) {
  if (acc == at::kDouble) f(double{});
  else f(float{});
}

// bn_apply with invstd given directly (from_var false) or as the biased variance, invstd = 1 / sqrt(var + eps)
// (bn_relu_train): the same IEEE ops as torch.rsqrt(var + eps), which the backward uses. The folding
// scale = invstd * weight is a [C] loop, not a tensor op (see bn_stats_cpu).
at::Tensor bn_apply_impl(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in, bool from_var,
                         double eps, const at::Tensor& weight_in, const at::Tensor& bias_in,
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
  at::Tensor scale = at::empty({l.C}, mean.options());
  with_acc(acc, [&](auto zero) {
    using acc_t = decltype(zero);
    const acc_t *iv = invstd_or_var.const_data_ptr<acc_t>(), *w = weight.const_data_ptr<acc_t>();
    acc_t* sc = scale.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.C; ++c)
      sc[c] = (from_var ? acc_t(1) / std::sqrt(iv[c] + static_cast<acc_t>(eps)) : iv[c]) * w[c];
  });
  cpu_loops().apply(x.scalar_type(), l, x.const_data_ptr(), ptr(residual), y.mutable_data_ptr(),
                    mean.const_data_ptr(), scale.const_data_ptr(), bias.const_data_ptr(), relu);
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
  // var = M2 / count in place (biased: what normalises the batch)
  with_acc(var.scalar_type(), [&](auto zero) {
    using acc_t = decltype(zero);
    acc_t* v = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.C; ++c) v[c] /= static_cast<acc_t>(l.count());
  });
  at::Tensor y = bn_apply_impl(x, mean, var, true, eps, weight, bias, residual, relu);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& dy_in, const at::Tensor& y_in,
                                                          const at::Tensor& x_in, const at::Tensor& mean_in,
                                                          const at::Tensor& invstd_in, bool relu) {
  const at::ScalarType acc = acc_type_of(x_in);
  const Layout l = cpu_layout_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(x_in));
  const at::Tensor dy = like_x(dy_in, x, "dy");
  const at::Tensor y = relu ? like_x(y_in, x, "y") : at::Tensor();  // y only feeds the ReLU mask
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  at::Tensor sum_dz = at::empty({l.C}, x.options().dtype(acc));  // the loops write every channel
  at::Tensor sum_dz_xhat = at::empty({l.C}, x.options().dtype(acc));
  if (x.numel() == 0) {
    sum_dz.zero_();
    sum_dz_xhat.zero_();
    return {sum_dz, sum_dz_xhat};
  }
  cpu_loops().backward_reduce(x.scalar_type(), l, dy.const_data_ptr(), ptr(y), x.const_data_ptr(),
                              mean.const_data_ptr(), sum_dz.mutable_data_ptr(), sum_dz_xhat.mutable_data_ptr(), relu);
  with_acc(acc, [&](auto zero) {  // sum(dz * (x - mean)) * invstd = sum(dz * xhat)
    using acc_t = decltype(zero);
    acc_t* s = sum_dz_xhat.mutable_data_ptr<acc_t>();
    const acc_t* iv = invstd.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.C; ++c) s[c] *= iv[c];
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
  const at::Tensor y = relu ? like_x(y_in, x, "y") : at::Tensor();
  const at::Tensor mean = per_channel(mean_in, "mean", l.C, acc);
  const at::Tensor invstd = per_channel(invstd_in, "invstd", l.C, acc);
  const at::Tensor weight = per_channel(weight_in, "weight", l.C, acc);
  const at::Tensor a = per_channel(mean_dz_in, "mean_dz", l.C, acc);
  const at::Tensor mean_dz_xhat = per_channel(mean_dz_xhat_in, "mean_dz_xhat", l.C, acc);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(format_of(x)));
  at::Tensor dres = residual_grad ? at::empty(x.sizes(), x.options().memory_format(format_of(x)))
                                  : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  // dx = k * (dz - mean_dz - (x - mean) * q) with k = weight * invstd and q = invstd * mean_dz_xhat, per channel
  at::Tensor k = at::empty({l.C}, mean.options()), q = at::empty({l.C}, mean.options());
  with_acc(acc, [&](auto zero) {
    using acc_t = decltype(zero);
    const acc_t *iv = invstd.const_data_ptr<acc_t>(), *w = weight.const_data_ptr<acc_t>();
    const acc_t* h = mean_dz_xhat.const_data_ptr<acc_t>();
    acc_t *kp = k.mutable_data_ptr<acc_t>(), *qp = q.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.C; ++c) {
      kp[c] = w[c] * iv[c];
      qp[c] = h[c] * iv[c];
    }
  });
  cpu_loops().backward_apply(x.scalar_type(), l, dy.const_data_ptr(), ptr(y), x.const_data_ptr(),
                             dx.mutable_data_ptr(), residual_grad ? dres.mutable_data_ptr() : nullptr,
                             mean.const_data_ptr(), k.const_data_ptr(), a.const_data_ptr(), q.const_data_ptr(), relu);
  return {dx, dres};
}

// Which loop variant runs (common.build_info() shows it)
std::string bn_cpu_isa() { return cpu_loops().isa; }

}  // namespace
}  // namespace segfp16

TORCH_LIBRARY_IMPL(segfp16, CPU, m) {
  m.impl("bn_stats", &segfp16::bn_stats_cpu);
  m.impl("bn_apply", &segfp16::bn_apply_cpu);
  m.impl("bn_relu_train", &segfp16::bn_relu_train_cpu);
  m.impl("bn_backward_reduce", &segfp16::bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &segfp16::bn_backward_apply_cpu);
}

TORCH_LIBRARY_IMPL(segfp16, CatchAll, m) { m.impl("bn_cpu_isa", &segfp16::bn_cpu_isa); }
