"""The building blocks every segmentor is made of, each with two implementations behind one switch.

`--kernels torch` runs the plain ATen composition; `--kernels fused` runs our csrc kernels (common/ops.py). The
switch changes no parameter and no state-dict key: a checkpoint trained with one loads into the other.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = "torch"  # 'torch' | 'fused'; set once at start-up by set_kernels(), logged by the trainer


def set_kernels(kind):
    """Select the implementation of every block below; 'fused' needs the compiled extension (fails loudly if absent)."""
    global KERNELS
    if kind not in ("torch", "fused"):
        raise ValueError(f"kernels must be 'torch' or 'fused', got {kind!r}")
    if kind == "fused":
        from . import ops
        ops.require()  # raises with the build command when common._C (or an op in it) is missing
    KERNELS = kind
