"""Inference with every conv-BN(-add)-ReLU unit folded into one convolution with bias and a ReLU (+ residual) epilogue.

In eval mode BatchNorm is a per-channel affine map, so conv -> BN folds into one conv:
  s = gamma / sqrt(running_var + eps),  W' = W * s (per output channel),  b' = (b_conv - running_mean) * s + beta,
computed in float64 from the fp32 reference values, then cast to the inference dtype. Dilation, padding, stride and
groups are the conv's own. Training never uses this: batch statistics depend on the whole conv output, so the training
path keeps cuDNN convolutions plus the fused BN(+add)+ReLU kernel (common/layers.py).

The training model is never modified: `for_eval(model, cfg, amp)` returns a folded *copy* (cached per training model,
re-folded in place from the current weights at every call, so a compiled copy is not recompiled per evaluation).
Checkpoints are written from the training model, so they always hold the reference's unfolded keys.

Epilogue (behind --kernels): with `fused` on CUDA one cuDNN call per unit, torch.cudnn_convolution_relu /
torch.cudnn_convolution_add_relu (cuDNN's fused conv-bias-activation), except under torch.compile and where cuDNN
refuses a configuration (the log names it); everywhere else conv2d with bias, then an in-place add and ReLU on its
output. On our CPU (AMD EPYC, AVX2, 2 cores) oneDNN's fused conv+ReLU
(torch.ops.mkldnn._convolution_pointwise, NCHW or channels_last) was not consistently faster than conv2d + relu_ on
R50-D8's conv shapes (0.7x-1.2x, single-conv timings side by side), and has no bf16 path on AVX2, so the CPU runs the
plain form under both kernel sets.
"""
import copy
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist, layers


def bare(model):
    """The plain module inside DDP (common.dist.unwrap) and torch.compile's OptimizedModule wrappers."""
    while True:
        model = dist.unwrap(model)
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _cudnn_epilogue(x, relu):
    return layers.fused("cudnn_conv_relu") and x.is_cuda and relu and x.dtype in (torch.float16, torch.float32)


REFUSED = {}  # conv configuration -> cuDNN's error, for each one its fused call refused (Folded logs them)


def folded_conv(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True):
    """relu(conv2d(x, weight, bias) + residual) (no relu with relu=False): one cuDNN call (--kernels fused, CUDA,
    with the ReLU), else conv2d + in place.

    Under torch.compile the plain form: the cuDNN ops have no fake kernel, so dynamo would break the graph at every
    unit, and inductor fuses the epilogue itself. A configuration cuDNN has no fused engine for (pytorch#62926) runs
    the plain form too, and Folded.forward logs it."""
    if _cudnn_epilogue(x, relu) and not torch.compiler.is_compiling():
        # what cuDNN's support depends on (not the image size: one refusal, not one per val image)
        key = (tuple(weight.shape), str(x.dtype)[6:], "NCHW" if x.is_contiguous() else "NHWC", tuple(stride),
               tuple(dilation), groups, residual is not None)
        if key not in REFUSED:
            try:
                if residual is None:
                    return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
                return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation,
                                                        groups)
            except RuntimeError as e:
                REFUSED[key] = str(e).strip().splitlines()[0][:200]
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y.add_(residual)  # y is fresh and nothing saves it: in place is safe (no autograd at inference)
    return y.relu_() if relu else y


class FoldedConvBNReLU(nn.Module):
    """A conv-BN(-add)(-ReLU) unit as one conv with bias; forward(x, residual=None), like BatchNormAct2d's."""

    def __init__(self, conv, bn, dtype):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.relu = bool(getattr(bn, "relu", False))  # plain nn.BatchNorm2d: no activation
        self.eps = bn.eps
        self.register_buffer("weight", torch.empty(conv.weight.shape, dtype=dtype, device=conv.weight.device))
        self.register_buffer("bias", torch.empty(conv.out_channels, dtype=dtype, device=conv.weight.device))

    def extra_repr(self):
        return (f"{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, relu={self.relu}")

    @torch.no_grad()
    def load(self, conv_weight, conv_bias, bn_weight, bn_bias, mean, var):
        """Fold in float64, then cast into this unit's (dtype, memory format) buffers in place."""
        d = torch.float64
        scale = torch.rsqrt(var.to(d) + self.eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(d)
        shift = -mean.to(d) if conv_bias is None else conv_bias.to(d) - mean.to(d)
        bias = shift * scale + (bn_bias.to(d) if bn_bias is not None else 0.0)
        self.weight.copy_(conv_weight.to(d) * scale.view(-1, 1, 1, 1))
        self.bias.copy_(bias)

    def forward(self, x, residual=None):
        return folded_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                           residual, self.relu)


def _pair_name(parent, names, i):
    """The conv feeding BN child names[i] of parent: the previous child of a Sequential, else by name."""
    if isinstance(parent, nn.Sequential):
        return names[i - 1] if i > 0 else None
    name = names[i]
    for bn, conv in (("bn", "conv"), ("_bn", "_conv")):  # Bottleneck bn1 <- conv1; depthwise_bn <- depthwise_conv
        if bn in name:
            cand = name.replace(bn, conv)
            if cand in names:
                return cand
    return None


def _find_units(root):
    """[(parent, conv name, bn name, qualified bn name)] for every BatchNorm2d of root; raises on one it cannot pair."""
    units = []
    for pname, parent in root.named_modules():
        names = [n for n, _ in parent.named_children()]
        for i, name in enumerate(names):
            bn = getattr(parent, name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            where = f"{pname}.{name}" if pname else name
            conv_name = _pair_name(parent, names, i)
            conv = getattr(parent, conv_name, None) if conv_name else None
            if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d):
                raise TypeError(f"common/fold.py: cannot fold {where} ({type(bn).__name__}): no Conv2d feeding it "
                                f"(found {type(conv).__name__ if conv is not None else 'nothing'}); run with "
                                f"--fold false")
            if conv.out_channels != bn.num_features or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise TypeError(f"common/fold.py: cannot fold {where} into {conv_name}: channels or padding differ")
            if bn.running_mean is None or bn.running_var is None:
                raise TypeError(f"common/fold.py: {where} has no running statistics (eval uses batch statistics); "
                                f"run with --fold false")
            units.append((parent, conv_name, name, where))
    return units


class Folded(nn.Module):
    """The folded eval copy of a segmentor: casts the input to its dtype / memory format, runs in inference_mode."""

    def __init__(self, model, dtype=torch.float32, memory_format=torch.contiguous_format, log=print):
        super().__init__()
        src = bare(model)
        net = copy.deepcopy(src)
        for m in net.modules():  # apex O2's cast hooks, DDP/compile leftovers: the copy is a plain module
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()
            m._state_dict_hooks.clear()
            m._load_state_dict_pre_hooks.clear()
            m._load_state_dict_post_hooks.clear()
            if "_compiled_call_impl" in m.__dict__:
                m._compiled_call_impl = None  # a deep copy would still call the source's compiled forward
            # NVIDIA apex O2/O3 patches the instance's forward with a closure over the source model's: a deep copy
            # keeps the closure, so the copy would run the training model (in train mode)
            m.__dict__.pop("forward", None)
        net.float()
        self.units = []  # (FoldedConvBNReLU, conv key prefix, bn key prefix) in the source's state-dict names
        for parent, conv_name, bn_name, where in _find_units(net):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            unit = FoldedConvBNReLU(conv, bn, dtype)
            setattr(parent, bn_name, unit)  # the BN's slot runs the whole unit (it is called with the residual)
            setattr(parent, conv_name, nn.Identity())  # and the conv's slot passes its input through
            prefix = where.rsplit(".", 1)[0] + "." if "." in where else ""
            self.units.append((unit, prefix + conv_name + ".", where + "."))
        self.net = net.to(dtype=dtype).eval().requires_grad_(False)
        self.net.to(memory_format=memory_format)
        self.dtype, self.memory_format = dtype, memory_format
        self.source = weakref.ref(src)
        self.log, self.refusals_logged = log, 0  # log: where the refused cuDNN configurations are named
        self.refresh()

    @torch.no_grad()
    def refresh(self):
        """Re-fold from the source model's current weights, in place (the same tensors: no recompilation)."""
        sd = self.source().state_dict()  # fp32 reference values (for apex O2, the fp32 masters via its hooks)
        folded = set()
        for unit, conv, bn in self.units:
            unit.load(sd[conv + "weight"], sd.get(conv + "bias"), sd.get(bn + "weight"), sd.get(bn + "bias"),
                      sd[bn + "running_mean"], sd[bn + "running_var"])
            folded |= {k for k in sd if k.startswith((conv, bn))}
        own = self.net.state_dict()
        for k, v in sd.items():  # everything outside a unit (the classifiers) is copied as is
            if k not in folded:
                own[k].copy_(v)

    def train(self, mode=True):
        self.training = mode  # evaluate() restores the caller's mode; the folded copy itself is always in eval
        return self

    def forward(self, x):
        with torch.inference_mode():
            out = self.net(x.to(dtype=self.dtype, memory_format=self.memory_format))
        while len(REFUSED) > self.refusals_logged:  # rare: a line per configuration, once per folded copy
            (weight, dtype, layout, stride, dilation, groups, add), err = list(REFUSED.items())[self.refusals_logged]
            self.log(f"fold: cuDNN's fused conv+bias{'+add' if add else ''}+ReLU refused weight {weight} {dtype} "
                     f"{layout} stride {stride} dilation {dilation} groups {groups} ({err}): those units run "
                     f"conv2d + {'add + ' if add else ''}relu")
            self.refusals_logged += 1
        return out


_CACHE = weakref.WeakKeyDictionary()  # training model -> its Folded copy


def for_eval(model, cfg, amp=None, log=print):
    """(module to evaluate, amp to evaluate it under): the one call evaluate() / predict() callers make.

    cfg['fold'] false: the model itself, unfolded (compiled in place per cfg['compile'] if it is not yet), and `amp`
    (autocast). Otherwise the folded copy, in `amp`'s half type when it has one (fp16 CUDA, bf16 CPU), channels_last
    if cfg says so, compiled per cfg['compile'], and no amp (the copy is already in its dtype: autocast would re-cast
    every weight at every call).
    """
    src = bare(model)
    if not cfg.get("fold", True):
        if src._compiled_call_impl is None:  # --eval of an uncompiled model; a trained one is compiled already
            from .compile import compile_module
            compile_module(src, cfg.get("compile", "none"), log, what="eval", dynamic=True)
        return model, amp
    half = amp.dtype if amp is not None and (amp.use_autocast or amp.cast_model is not None) else None
    dtype = half or torch.float32
    fmt = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    key = (dtype, fmt, cfg.get("compile", "none"), layers.describe())
    hit = _CACHE.get(src)
    if hit is not None and hit[0] == key:
        hit[1].refresh()
        return hit[1], None
    t0 = time.time()
    net = Folded(src, dtype, fmt, log)
    log(f"fold: {len(net.units)} conv-BN units folded into single convs ({str(dtype)[6:]}, "
        f"{'channels_last' if fmt is torch.channels_last else 'NCHW'}, kernels {layers.describe()}) in "
        f"{time.time() - t0:.1f} s")
    from .compile import compile_module
    compile_module(net.net, cfg.get("compile", "none"), log, what="eval", dynamic=True)
    _CACHE[src] = (key, net)
    return net, None
