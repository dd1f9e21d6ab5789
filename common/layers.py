"""The building blocks every segmentor is made of, each with two implementations behind one switch.

`--kernels torch` runs the plain ATen composition; `--kernels fused` runs our csrc kernels (common/ops.py). The
switch changes no parameter and no state-dict key: a checkpoint trained with one loads into the other.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

KERNELS = "torch"  # 'torch' | 'fused'; set once at start-up by set_kernels(), logged by the trainer
# the blocks with a fused kernel: the conv-BN-ReLU unit's BN (SyncBN's split ops too), the two upsample ops, and the
# folded eval copy's cuDNN conv+bias(+add)+ReLU call (common/fold.py: ATen's cuDNN op, not ours, chosen the same way)
OPS = ("bn_act", "upsample_concat", "upsample_ce", "cudnn_conv_relu")
KEEP_ATEN = frozenset()  # ops that stay on ATen under 'fused': where --kernels auto measured ATen faster

# --kernels auto, per device type: (ops kept on ATen, why). Change it only with a measurement beside it.
AUTO = {
    "cpu": (frozenset(), "fused 0.95-1.09x torch's step time end to end on two CPUs, "
                         "bench/results/*cpu-2core*train.md"),
    "cuda": (frozenset(), "not yet measured on a card (issue #19), so all fused"),
}


def set_kernels(kind, keep_aten=()):
    """Select the implementation of every block below; 'fused' needs the compiled extension (fails loudly if absent).

    keep_aten: ops of OPS that run the ATen composition even under 'fused' (how --kernels auto applies AUTO)."""
    global KERNELS, KEEP_ATEN
    if kind not in ("torch", "fused"):
        raise ValueError(f"kernels must be 'torch' or 'fused', got {kind!r}")
    unknown = sorted(set(keep_aten) - set(OPS))
    if unknown:
        raise ValueError(f"keep_aten: unknown ops {unknown}; the ops are {list(OPS)}")
    if kind == "fused":
        from . import ops
        ops.require()  # raises with the build command when common._C (or an op in it) is missing
    KERNELS, KEEP_ATEN = kind, frozenset(keep_aten)


def fused(op):
    """Whether block `op` (one of OPS) runs our kernel."""
    return KERNELS == "fused" and op not in KEEP_ATEN


def describe():
    """KERNELS as the log and the eval copy's cache key name it: 'torch', 'fused', 'fused (ATen: upsample_ce)'."""
    kept = [op for op in OPS if op in KEEP_ATEN]
    return f"fused (ATen: {', '.join(kept)})" if KERNELS == "fused" and kept else KERNELS


# ---- conv-BN-ReLU: the unit every backbone stage and head is built from

class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d, then an optional residual add, then an optional ReLU: y = relu(bn(x) + residual).

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d (a reference checkpoint loads unchanged), same
    running-stat rules (momentum None = cumulative average). Folding the ReLU (and the bottleneck's add) in here is
    what lets --kernels fused run them as one kernel. Note: torch.nn.SyncBatchNorm.convert_sync_batchnorm would turn
    this into a plain SyncBatchNorm and silently drop the ReLU; convert with common.dist.convert_sync_bn instead.
    """

    def __init__(self, num_features, relu=True, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.relu = relu

    def extra_repr(self):
        return super().extra_repr() + f", relu={self.relu}"

    def _running_stat_factor(self):
        # nn.BatchNorm2d's bookkeeping, verbatim in behaviour: count the batch, pick the running-average factor
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def _use_batch_stats(self):
        return self.training or (self.running_mean is None and self.running_var is None)

    def normalize(self, x, factor):
        """The statistics step alone: (B, C, H, W) -> bn(x); a synced variant (common.dist) can override just this."""
        track = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, self._use_batch_stats(), factor, self.eps)

    def forward(self, x, residual=None):
        self._check_input_dim(x)
        factor = self._running_stat_factor()
        # the fused kernel computes local statistics, with or without the ReLU (relu=False: the downsample BN), so it
        # serves every unit of this class; a subclass with its own normalize() (SyncBN) keeps the composition
        if fused("bn_act") and type(self).normalize is BatchNormAct2d.normalize:
            from . import ops
            if self._use_batch_stats() and x.numel() == x.shape[1]:
                # same refusal as F.batch_norm (1 value per channel, e.g. BN on 1x1 pooled maps at batch 1)
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{tuple(x.shape)}")
            return ops.bn_relu(x, self.weight, self.bias, self.running_mean, self.running_var,
                               self._use_batch_stats(), momentum=factor, eps=self.eps, residual=residual,
                               relu=self.relu)
        y = self.normalize(x, factor)
        if residual is not None:
            y = y + residual  # bottleneck: bn3(conv3(x)) + identity, before the ReLU (spec §4)
        # in place is safe: y is a fresh tensor and neither batch_norm nor add needs it for backward
        return F.relu(y, inplace=True) if self.relu else y


def conv_bn_relu(cin, cout, k, stride=1, dilation=1, groups=1, relu=True):
    """[Conv2d (no bias), BatchNormAct2d, Identity]: the reference's [conv, BN, ReLU] with the ReLU folded into the BN.

    The Identity sits where the reference has its ReLU, so nn.Sequential indices (and so state-dict keys) match.
    padding = dilation * (k // 2) keeps the spatial size at stride 1 (spec §4: padding = dilation for 3x3).
    """
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                     bias=False)
    return [conv, BatchNormAct2d(cout, relu=relu), nn.Identity()]


# ---- adaptive average pooling (PSPNet's pyramid, the ASPP image branch), opaque to torch.compile

def _pool_out(x, output_size):
    """The output buffer: channels_last iff x unambiguously is (our kernels' layout rule, which is ATen pooling's
    too, so a channels_last PSPNet's pyramid maps stay channels_last and torch.cat keeps the format); fake and real
    alike."""
    from .ops import layout_of
    return torch.empty((*x.shape[:-2], *output_size), dtype=x.dtype, device=x.device, memory_format=layout_of(x))


@torch.library.custom_op("segfp16_py::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    """F.adaptive_avg_pool2d as one opaque op, for the compiled eval copy's sake.

    Inductor's own lowering of adaptive pooling specializes on the input's height and width, so a dynamic-shape
    graph would compile again for every image size; as a custom op it stays one extern call with symbolic sizes.
    """
    return _pool_out(x, output_size).copy_(F.adaptive_avg_pool2d(x, output_size))


@adaptive_avg_pool2d.register_fake
def _(x, output_size):
    return _pool_out(x, output_size)


def _pool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _pool_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, x), None


adaptive_avg_pool2d.register_autograd(_pool_backward, setup_context=_pool_setup)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d (same repr, no state) through the opaque op above."""

    def forward(self, x):
        size = self.output_size
        size = [size, size] if isinstance(size, int) else list(size)
        return adaptive_avg_pool2d(x, size)


# ---- bilinear upsampling (align_corners=False everywhere, spec §1) and the loss

def upsample_concat(inputs, size):
    """Bilinearly resize each (B, C_i, h_i, w_i) map to `size` and concatenate on channels -> (B, sum C_i, *size)."""
    size = tuple(int(s) for s in size)
    if fused("upsample_concat"):
        from . import ops
        return ops.upsample_concat(list(inputs), size, align_corners=False)
    # a map already at `size` is taken as is (the reference does not resize it; bilinear at scale 1 would copy it).
    # Under dynamic shapes (the compiled eval copy) a plain `==` here becomes a guard on the image size: a pyramid
    # bin's (6, 6) == (h, w) guards h != 6 on torch 2.11 (on h alone) and (h, w) != (6, 6) on 2.14, and an image
    # whose feature map has that size compiled again. statically_known_true adds no guard: it is true only for a map
    # that is at `size` for every image (the decoder's own input); a map that just happens to match is interpolated,
    # which at scale 1 is a copy.
    outs = [t if all(statically_known_true(a == b) for a, b in zip(t.shape[-2:], size))
            else F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in inputs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def seg_cross_entropy(logits, target, ignore_index=255):
    """Mean softmax CE of (B, K, h, w) logits, bilinearly upsampled to the (B, H, W) int64 target, over valid pixels.

    ssseg upsamples the logits to the crop size before the loss (spec §5). A target without any valid pixel gives
    0.0 (with a graph, so backward works) where F.cross_entropy's mean would give NaN (spec §6 edge case).
    """
    if fused("upsample_ce"):
        from . import ops
        return ops.upsample_cross_entropy(logits, target, ignore_index=ignore_index)
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum().clamp(min=1)
    return total / valid


# ---- the auxiliary head all four segmentors share (spec §5, base/auxiliary.py)

def auxiliary_decoder(num_classes, in_channels=1024, out_channels=512, dropout=0.1):
    """FCN head on layer3: [conv3x3-BN-ReLU, Dropout2d, conv1x1] -> keys auxiliary_decoder.{0,1,4}.* as in ssseg."""
    return nn.Sequential(*conv_bn_relu(in_channels, out_channels, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(out_channels, num_classes, 1))
