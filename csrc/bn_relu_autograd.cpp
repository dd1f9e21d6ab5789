// Autograd for segfp16::bn_relu_train and segfp16::bn_apply, and segfp16::bn_relu (bn_relu_train + the running-stat
// update), in C++. Backend-agnostic: everything goes through the dispatcher, so this file serves CPU and CUDA.
//
// Why C++: at the demo's tiny maps (4x512x1x1 ... 4x48x16x16 on CPU) the kernels take ~20 us, and the Python side
// (register_autograd's Function, the backward's small tensor ops, the wrapper's lerp_s) cost several times that.
// Here the forward redispatches below autograd and the backward calls our two backward ops, with the same math as
// the Python version had (bit-identical results; common/ops.py documents what is saved and why).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace segfp16 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Typed handles of the ops (each looked up once): a call goes through the dispatcher to the CPU or CUDA kernel.
using T = const Tensor&;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

auto& train_op() {
  static auto op = handle<Tensor3(T, T, T, const OptTensor&, double, bool)>("segfp16::bn_relu_train");
  return op;
}

auto& apply_op() {
  static auto op = handle<Tensor(T, T, T, T, T, const OptTensor&, bool)>("segfp16::bn_apply");
  return op;
}

auto& reduce_op() {
  static auto op = handle<Tensor2(T, T, T, T, T, bool)>("segfp16::bn_backward_reduce");
  return op;
}

auto& backward_apply_op() {
  static auto op = handle<Tensor2(T, T, T, T, T, T, T, T, bool, bool)>("segfp16::bn_backward_apply");
  return op;
}

bool any_requires_grad(std::initializer_list<Tensor> ts, const OptTensor& residual) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor& t : ts)
    if (t.requires_grad()) return true;
  return residual.has_value() && residual->requires_grad();
}

// The shared backward: bn_backward_reduce gives dbias = sum(dz) and dweight = sum(dz * xhat); bn_backward_apply
// gives dx (and dres = dz). Training passes the batch means of both sums (the statistics' terms of dx); eval
// passes zeros (running stats are constants). Returns (dx, dweight, dbias, dres), undefined where not needed.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward(const Tensor& dy, const variable_list& saved, bool relu,
                                                       bool training, bool need_x, bool need_w, bool need_b,
                                                       bool need_res) {
  const Tensor& x = saved[0];
  const Tensor& y = relu ? saved[1] : dy;  // the kernels ignore y when relu is false
  const Tensor& mean = saved[2];
  const Tensor& invstd = saved[3];
  const Tensor& weight = saved[4];
  auto [sum_dz, sum_dz_xhat] = reduce_op().call(dy, y, x, mean, invstd, relu);
  Tensor mean_dz, mean_dz_xhat;
  if (training) {
    const c10::Scalar count = x.sym_numel() / x.sym_size(1);  // values per channel (symbolic under torch.compile)
    mean_dz = sum_dz.div(count);
    mean_dz_xhat = sum_dz_xhat.div(count);
  } else {
    mean_dz = mean_dz_xhat = at::zeros_like(sum_dz);
  }
  auto [dx, dres] = backward_apply_op().call(dy, y, x, mean, invstd, weight, mean_dz, mean_dz_xhat, relu, need_res);
  const auto wdt = weight.scalar_type();
  return {need_x ? dx : Tensor(), need_w ? sum_dz_xhat.to(wdt) : Tensor(), need_b ? sum_dz.to(wdt) : Tensor(),
          need_res ? dres : Tensor()};
}

struct BnReluTrain : torch::autograd::Function<BnReluTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const OptTensor& residual, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var] = train_op().call(x, weight, bias, residual, eps, relu);
    // var, not invstd: the backward recomputes invstd = rsqrt(var + eps), one tiny op instead of a saved [C]
    ctx->save_for_backward({x, relu ? y : Tensor(), mean, var, weight});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = residual.has_value();
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    saved[3] = saved[3].add(ctx->saved_data["eps"].toDouble()).rsqrt();  // bit-identical to the forward's invstd
    // edges are numbered over tensor inputs only: x, weight, bias, then residual when it was given
    const bool need_res = ctx->saved_data["residual"].toBool() && ctx->needs_input_grad(3);
    auto [dx, dw, db, dres] = bn_backward(grads[0], saved, ctx->saved_data["relu"].toBool(), true,
                                          ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                          ctx->needs_input_grad(2), need_res);
    return {dx, dw, db, dres, Tensor(), Tensor()};
  }
};

struct BnApply : torch::autograd::Function<BnApply> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                        const Tensor& weight, const Tensor& bias, const OptTensor& residual, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = apply_op().call(x, mean, invstd, weight, bias, residual, relu);
    ctx->save_for_backward({x, relu ? y : Tensor(), mean, invstd, weight});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = residual.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(1) && !ctx->needs_input_grad(2),
                "segfp16::bn_apply does not differentiate through mean/invstd; use common.ops.bn_relu (training) or "
                "the split backward ops (SyncBN)");
    const bool need_res = ctx->saved_data["residual"].toBool() && ctx->needs_input_grad(5);
    auto [dx, dw, db, dres] = bn_backward(grads[0], ctx->get_saved_variables(), ctx->saved_data["relu"].toBool(),
                                          false, ctx->needs_input_grad(0), ctx->needs_input_grad(3),
                                          ctx->needs_input_grad(4), need_res);
    return {dx, Tensor(), Tensor(), dw, db, dres, Tensor()};
  }
};

// The Autograd kernels. Like register_autograd's, they skip the autograd node when nothing needs a gradient
// (eval, no_grad, SyncBN's own Function): straight to the backend kernel.
Tensor3 bn_relu_train_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias, const OptTensor& residual,
                               double eps, bool relu) {
  if (!any_requires_grad({x, weight, bias}, residual)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op().call(x, weight, bias, residual, eps, relu);
  }
  auto out = BnReluTrain::apply(x, weight, bias, residual, eps, relu);
  return {out[0], out[1], out[2]};
}

Tensor bn_apply_autograd(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                         const Tensor& bias, const OptTensor& residual, bool relu) {
  if (!any_requires_grad({x, mean, invstd, weight, bias}, residual)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return apply_op().call(x, mean, invstd, weight, bias, residual, relu);
  }
  return BnApply::apply(x, mean, invstd, weight, bias, residual, relu);
}

// The training forward with the running-stat update: running = (1 - momentum) * running + momentum * batch, the
// variance unbiased (n / (n - 1)); ATen ops on the stats' device, no host sync. A composite: autograd sees
// bn_relu_train (above) and the in-place updates (no grad), and torch.compile decomposes it into those.
Tensor bn_relu(const Tensor& x, const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
               const OptTensor& running_var, const OptTensor& residual, double momentum, double eps, bool relu) {
  auto [y, mean, var] = train_op().call(x, weight, bias, residual, eps, relu);
  at::NoGradGuard no_grad;  // lerp_: running + momentum * (batch - running), one op per buffer
  if (running_mean.has_value()) running_mean->lerp_(mean.to(running_mean->scalar_type()), momentum);
  if (running_var.has_value()) {
    const c10::SymInt n = x.sym_numel() / x.sym_size(1);  // values per channel
    const c10::Scalar unbias = c10::SymFloat(n) / c10::SymFloat(n - 1);
    running_var->lerp_(var.mul(unbias).to(running_var->scalar_type()), momentum);
  }
  return y;
}

}  // namespace
}  // namespace segfp16

TORCH_LIBRARY_IMPL(segfp16, Autograd, m) {
  m.impl("bn_relu_train", &segfp16::bn_relu_train_autograd);
  m.impl("bn_apply", &segfp16::bn_apply_autograd);
}

TORCH_LIBRARY_IMPL(segfp16, CompositeImplicitAutograd, m) { m.impl("bn_relu", &segfp16::bn_relu); }
