"""Python wrappers of the csrc kernels (torch.ops.segfp16.*): typed entry points, fake kernels, autograd.

These always run our kernels. The choice between them and the plain PyTorch composition is made in
common/layers.py (`--kernels fused|torch`); nothing here falls back silently.
"""
import torch

from . import BUILD_COMMAND, _C_ERROR


def require(*names):
    """Raise a clear error when the extension (or one of the named ops) is not built."""
    lib = getattr(torch.ops, "segfp16")
    missing = [n for n in names or ("build_info",) if not hasattr(lib, n)]
    if missing:
        what = f"which does not load ({_C_ERROR})" if _C_ERROR is not None else f"which lacks {missing}"
        raise RuntimeError(f"--kernels fused needs the compiled extension common._C, {what}. "
                           f"Build it with `{BUILD_COMMAND}`, or run with --kernels torch.")


# ---- bn_relu family (Kernels I)
# y = act(batch_norm(x) + residual), act = ReLU (or identity with relu=False), forward and backward fused
# (csrc/bn_relu.cpp, bn_relu_cuda.cu; schemas in csrc/ops_schema.h). Their autograd is C++
# (csrc/bn_relu_autograd.cpp), the fake kernels for torch.compile are below.
#
# Saved for backward (bn_relu_train and bn_apply): x (BN needs xhat everywhere, also where the ReLU zeroed y), y (the
# ReLU mask is y > 0; not saved when relu=False), and per-channel mean, var or invstd and weight. That is the same
# two full tensors the ATen composition keeps (x for BN, y for ReLU), and y is the next conv's saved input anyway;
# no mask or pre-activation tensor is kept, and the residual is not saved (d(residual) = dz needs only dy and y).
#
# Autocast: batch_norm is in neither autocast list, and neither is this op: it runs in the dtype of x. fp16/bf16 x
# with fp32 weight, bias and running stats (what BN sees under autocast) is supported; statistics and arithmetic are
# float (double for fp64), y and dx have x's dtype, dweight/dbias have weight's dtype, and the residual must have x's
# dtype (we raise instead of guessing a promotion). No register_autocast: casting to fp32 would double the traffic.
#
# Running statistics: updated in place by segfp16::bn_relu (C++, ATen ops on the device, no host sync; in Python
# the update's few small ops were ~15% of a call at the 1x1 pyramid bins), with PyTorch's semantics:
# running = (1 - momentum) * running + momentum * batch, the variance unbiased (n / (n - 1)). momentum=None (cumulative
# average) is resolved by the caller (BatchNormAct2d passes 1 / num_batches_tracked and increments the counter).
#
# SyncBN (common/dist.py) uses the halves, with one on-device all-reduce between them each way (no host sync):
#   forward:  mean, m2 = bn_stats(x) (local); all-reduce the packed (n * mean, m2 + n * mean^2, n) in float64;
#             y = bn_apply(x, global mean, global invstd, weight, bias, residual, relu)
#   backward: s_dz, s_dz_xhat = bn_backward_reduce(dy, y, x, mean, invstd, relu); dweight = s_dz_xhat and
#             dbias = s_dz are these LOCAL sums (DDP averages them like any other grad, as torch's SyncBatchNorm);
#             all-reduce a copy of both (sum: S_dz, S_dz_xhat over the global batch of n values per channel), then
#             dx, dres = bn_backward_apply(dy, y, x, mean, invstd, weight, S_dz / n, S_dz_xhat / n, relu, residual?).
def _bn_acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bn_like(x):
    # the kernels write outputs in x's layout: channels_last when a 4-D x suggests it, NCHW-contiguous otherwise
    fmt = torch._prims_common.suggest_memory_format(x) if x.dim() == 4 else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def bn_stats(x):
    """Per-channel batch mean and M2 = sum((x - mean)^2) of x [N, C, ...]; float32 (float64 for float64 x)."""
    return torch.ops.segfp16.bn_stats(x)


def bn_apply(x, mean, invstd, weight, bias, residual=None, relu=True):
    """act((x - mean) * invstd * weight + bias + residual); differentiable in x, weight, bias, residual (not stats)."""
    return torch.ops.segfp16.bn_apply(x, mean, invstd, weight, bias, residual, relu)


def bn_backward_reduce(dy, y, x, mean, invstd, relu=True):
    """(sum(dz), sum(dz * xhat)) per channel, dz = dy * (y > 0) (dy if not relu): dbias and dweight, local sums."""
    return torch.ops.segfp16.bn_backward_reduce(dy, y, x, mean, invstd, relu)


def bn_backward_apply(dy, y, x, mean, invstd, weight, mean_dz, mean_dz_xhat, relu=True, residual_grad=False):
    """(dx, dres): dx = weight * invstd * (dz - mean_dz - xhat * mean_dz_xhat); dres = dz (empty unless asked)."""
    return torch.ops.segfp16.bn_backward_apply(dy, y, x, mean, invstd, weight, mean_dz, mean_dz_xhat, relu,
                                               residual_grad)


def bn_relu(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5, residual=None, relu=True):
    """relu(batch_norm(x) + residual), F.batch_norm's arguments; updates the running stats in place when training."""
    if not _BN_REGISTERED:  # the ops are registered (and this is set) at import when common._C holds them
        require(*_BN_OPS)
        register_bn_relu()
    C = x.shape[1]
    if weight is None:  # affine=False
        weight = torch.ones(C, dtype=_bn_acc(x), device=x.device)
    if bias is None:
        bias = torch.zeros(C, dtype=_bn_acc(x), device=x.device)
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"common.ops.bn_relu: residual dtype {residual.dtype} != x dtype {x.dtype}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("common.ops.bn_relu: eval mode needs running_mean and running_var")
        invstd = torch.rsqrt(running_var.to(_bn_acc(x)) + eps)
        return torch.ops.segfp16.bn_apply(x, running_mean, invstd, weight, bias, residual, relu)
    count = x.numel() // C  # values per channel, known on the host from the shape
    if count <= 1:  # the same check (and message) as F.batch_norm: the unbiased variance needs two values
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    if running_mean is not None and momentum is None:
        raise ValueError("common.ops.bn_relu: momentum=None (cumulative average) must be resolved by the caller "
                         "(BatchNormAct2d passes 1 / num_batches_tracked)")
    # bn_relu_train plus the running-stat update (a C++ composite, csrc/bn_relu_autograd.cpp)
    return torch.ops.segfp16.bn_relu(x, weight, bias, running_mean, running_var, residual,
                                     0.0 if momentum is None else momentum, eps, relu)


_BN_REGISTERED = False
_BN_OPS = ("bn_stats", "bn_apply", "bn_relu_train", "bn_relu", "bn_backward_reduce", "bn_backward_apply")


def register_bn_relu():
    """Attach fake kernels to torch.ops.segfp16.bn_* (idempotent; runs at import when _C is loaded).

    Their autograd is C++ (csrc/bn_relu_autograd.cpp): the Python version's fixed cost was most of a call at 1x1."""
    global _BN_REGISTERED
    if _BN_REGISTERED:
        return
    lib = torch.library

    def per_channel(x):
        return x.new_empty((x.shape[1],), dtype=_bn_acc(x))

    lib.register_fake("segfp16::bn_stats")(lambda x: (per_channel(x), per_channel(x)))
    lib.register_fake("segfp16::bn_apply")(lambda x, mean, invstd, weight, bias, residual, relu: _bn_like(x))
    lib.register_fake("segfp16::bn_relu_train")(
        lambda x, weight, bias, residual, eps, relu: (_bn_like(x), per_channel(x), per_channel(x)))
    lib.register_fake("segfp16::bn_backward_reduce")(
        lambda dy, y, x, mean, invstd, relu: (per_channel(x), per_channel(x)))
    lib.register_fake("segfp16::bn_backward_apply")(
        lambda dy, y, x, mean, invstd, weight, mean_dz, mean_dz_xhat, relu, residual_grad:
        (_bn_like(x), _bn_like(x) if residual_grad else x.new_empty((0,))))
    _BN_REGISTERED = True


if hasattr(torch.ops.segfp16, "bn_relu_train"):
    register_bn_relu()


# ---- upsample family (Kernels II)
# Bilinear upsampling fused into its two consumers (csrc/upsample.{h,cpp}, upsample_cuda.cu; csrc/ops_schema.h):
#   upsample_concat: PPM / ASPP / DeepLabV3+ decoder concats; every input is interpolated straight into its channel
#     slice of one output (no per-branch upsampled tensor, no torch.cat copy); the backward is a gather (each source
#     pixel sums the output pixels that read it), so no fp16 atomics and bit-identical runs.
#   upsample_cross_entropy: the loss of both heads; no full-resolution logits or log-probabilities exist at any time.
#     Saved for backward: the low-res logits (which the caller keeps anyway), the target and the per-pixel
#     log-sum-exp (N, H, W) fp32 = 4 bytes per pixel, ~17 MB at batch 16 (vs ~2.5 GB of fp32 log-probs per head).
#     A target without any valid pixel gives loss 0.0 and a zero gradient (F.cross_entropy's mean gives NaN there).
#
# Autocast: bilinear interpolation is in neither autocast list and runs in its input dtype; so do we. Both ops take
# fp16/bf16/fp32/fp64 and compute in float (double for fp64). upsample_concat outputs the input dtype; mixed input
# dtypes are promoted first, as torch.cat does under autocast. upsample_cross_entropy returns an fp32 loss (fp64 for
# fp64 logits), which is what cross_entropy's autocast-to-fp32 rule gives, without making an fp32 copy of the logits;
# its gradient has the logits' dtype. Hence no register_autocast for either op.
#
# Layout: outputs (and gradients) are channels_last iff inputs[0] (logits / grad_output) is unambiguously
# channels_last (csrc/upsample.h layout_of); any other strides are accepted and read through a contiguous copy.


def layout_of(t):
    """The memory format our kernels give outputs derived from t (mirror of layout_of in csrc/upsample.h)."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _up_acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upsample_concat(inputs, size, align_corners=False):
    """cat([F.interpolate(t, size, mode='bilinear', align_corners) for t in inputs], 1) -> (B, sum C_i, *size)."""
    require("upsample_concat")
    inputs = list(inputs)
    size = (size, size) if isinstance(size, int) else size  # F.interpolate's int shorthand
    dtype = inputs[0].dtype
    for t in inputs[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    inputs = [t if t.dtype == dtype else t.to(dtype) for t in inputs]
    return torch.ops.segfp16.upsample_concat(inputs, list(size), bool(align_corners))


def upsample_cross_entropy(logits, target, ignore_index=255):
    """F.cross_entropy(F.interpolate(logits, target.shape[-2:], 'bilinear'), target, ignore_index), fp32 0-d loss.

    logits (B, K, h, w) any float dtype, target (B, H, W) integer; 0.0 (zero gradient) when no pixel is valid.
    """
    require("upsample_cross_entropy")
    if target.dtype != torch.long:
        target = target.long()
    loss, _lse = torch.ops.segfp16.upsample_cross_entropy(logits, target, int(ignore_index))
    return loss


# One gradient per argument the op was CALLED with, not one per schema argument: the dispatcher drops trailing
# arguments equal to their schema default (align_corners=False, ignore_index=255) before autograd sees the call, so
# the same op arrives with 2 or 3 arguments (setup_context still gets them all: torch fills the defaults back in).
# torch 2.14 trims surplus None gradients; torch 2.11 refuses them for an op with a Tensor[] argument ("Expected the
# return from backward to be of the same structure as the inputs"). ctx.needs_input_grad has one entry per argument
# passed on both.
def _per_input(ctx, *grads):
    return grads[:len(ctx.needs_input_grad)]


def _uc_setup(ctx, inputs, output):
    tensors, _size, align_corners = inputs
    ctx.shapes = ([t.shape[1] for t in tensors], [t.shape[2] for t in tensors], [t.shape[3] for t in tensors])
    ctx.align_corners = align_corners


def _uc_backward(ctx, grad):
    grads = torch.ops.segfp16.upsample_concat_backward(grad, *ctx.shapes, ctx.align_corners)
    return _per_input(ctx, list(grads), None, None)


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index = ignore_index


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = torch.ops.segfp16.upsample_cross_entropy_backward(grad_loss, logits, target, lse, ctx.ignore_index)
    return _per_input(ctx, grad, None, None)


def _uc_fake(inputs, size, align_corners=False):
    t0 = inputs[0]
    return torch.empty((t0.shape[0], sum(t.shape[1] for t in inputs), size[0], size[1]), dtype=t0.dtype,
                       device=t0.device, memory_format=layout_of(t0))


def _uc_backward_fake(grad, channels, heights, widths, align_corners):
    fmt = layout_of(grad)
    return [torch.empty((grad.shape[0], c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
            for c, h, w in zip(channels, heights, widths)]


def _ce_fake(logits, target, ignore_index=255):
    acc = _up_acc(logits)
    return logits.new_empty((), dtype=acc), logits.new_empty(tuple(target.shape), dtype=acc)


def _ce_backward_fake(grad_loss, logits, target, lse, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device, memory_format=layout_of(logits))


_UP_REGISTERED = False


def register_upsample():
    """Attach fake kernels and autograd to torch.ops.segfp16.upsample_* (idempotent; runs at import when _C is loaded)."""
    global _UP_REGISTERED
    if _UP_REGISTERED:
        return
    lib = torch.library
    lib.register_fake("segfp16::upsample_concat")(_uc_fake)
    lib.register_fake("segfp16::upsample_concat_backward")(_uc_backward_fake)
    lib.register_fake("segfp16::upsample_cross_entropy")(_ce_fake)
    lib.register_fake("segfp16::upsample_cross_entropy_backward")(_ce_backward_fake)
    lib.register_autograd("segfp16::upsample_concat", _uc_backward, setup_context=_uc_setup)
    lib.register_autograd("segfp16::upsample_cross_entropy", _ce_backward, setup_context=_ce_setup)
    _UP_REGISTERED = True


if hasattr(torch.ops.segfp16, "upsample_concat"):
    register_upsample()
