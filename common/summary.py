"""`--summary`: parameters and multiply-accumulates (MACs) per module group, counted with forward hooks.

What is counted is what torchvision counts for its published "GFLOPS" (test/common_extended_utils.py there):
multiplications of convolutions (batch x prod(weight.shape) x output pixels, so groups and dilation come out right)
and of matmuls / linear layers (batch x in x out). Biases, BatchNorm, ReLU, pooling and interpolation are not
counted (they are memory-bound elementwise work). tests/test_summary.py checks this against torchvision's
fcn_resnet50 / deeplabv3_resnet50 figures.
"""
import copy
from collections import defaultdict

import torch
import torch.nn as nn


def _conv_macs(m, inputs, output):
    # weight (C_out, C_in / groups, *k): every output pixel of every output channel does C_in/groups * prod(k) MACs;
    # a transposed conv scatters from every *input* pixel instead
    x = inputs[0]
    pixels = (x if m.transposed else output).shape[2:].numel()
    return x.shape[0] * m.weight.shape.numel() * pixels


def _linear_macs(m, inputs, output):
    return output.numel() * m.in_features  # (*, out) outputs, in MACs each


def count_macs(model, input_shape):
    """{module name: MACs} for one training-mode forward of a (meta) input of `input_shape`."""
    meta = copy.deepcopy(model).to("meta")  # shapes only: no memory, no compute, real weights untouched
    meta.train()  # training runs every head (the aux one too)
    B = input_shape[0]
    # BN in training refuses 1 value per channel (image pooling on 1x1 maps at batch 1): count 2 images, scale back
    run_b = max(B, 2)
    macs = defaultdict(int)
    hooks = []
    for name, m in meta.named_modules():
        fn = _conv_macs if isinstance(m, nn.modules.conv._ConvNd) else _linear_macs if isinstance(m, nn.Linear) \
            else None
        if fn is not None:
            hooks.append(m.register_forward_hook(
                lambda m, i, o, name=name, fn=fn: macs.__setitem__(name, macs[name] + fn(m, i, o) * B // run_b)))
    try:
        with torch.no_grad():
            meta(torch.empty((run_b,) + tuple(input_shape[1:]), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return dict(macs)


def group_of(name):
    """backbone / auxiliary / head, from a module name (ours: backbone_net, auxiliary_decoder; torchvision's too)."""
    top = name.split(".")[0]
    return "backbone" if "backbone" in top else "auxiliary" if "aux" in top else "head"


def summarize(model, input_shape=(1, 3, 512, 512)):
    """A table of parameters and GMACs per group (backbone / head / auxiliary) and per child module."""
    macs = count_macs(model, input_shape)
    params = {name: p.numel() for name, p in model.named_parameters()}
    rows = defaultdict(lambda: [0, 0])  # (group, child; "" = the group's total) -> [params, MACs]

    def add(name, column, n):  # column 0: params, 1: MACs
        group, parts = group_of(name), name.split(".")
        child = ".".join(parts[:2]) if group == "backbone" and len(parts) >= 2 else parts[0]  # backbone: a level down
        rows[(group, "")][column] += n
        rows[(group, child)][column] += n

    for name, n in params.items():
        add(name.rsplit(".", 1)[0], 0, n)  # a parameter belongs to its module
    for name, n in macs.items():
        add(name, 1, n)
    lines = [f"{'module':<34}{'params (M)':>12}{'GMACs':>10}   input {tuple(input_shape)}"]
    for group in ("backbone", "head", "auxiliary"):
        if (group, "") not in rows:
            continue
        p, m = rows[(group, "")]
        lines.append(f"{group:<34}{p / 1e6:>12.3f}{m / 1e9:>10.2f}")
        for (g, child), (p, m) in rows.items():
            if g == group and child:
                lines.append(f"  {child:<32}{p / 1e6:>12.3f}{m / 1e9:>10.2f}")
    total_p, total_m = sum(params.values()), sum(macs.values())
    lines.append(f"{'total':<34}{total_p / 1e6:>12.3f}{total_m / 1e9:>10.2f}")
    return "\n".join(lines)
