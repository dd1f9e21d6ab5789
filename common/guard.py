"""A skipped step leaves every tensor of the model as it was, BatchNorm's running statistics included.

The forward pass updates BN's running_mean / running_var / num_batches_tracked in place before anyone knows whether
the step will be taken (the gradients are checked after backward). One inf activation in a BN input makes those
buffers NaN while training goes on normally (training normalises with batch statistics), and every later checkpoint
then evaluates to garbage. So the loop snapshots the buffers (a few MB for an R50-D8) before each forward and puts
them back when the step is skipped; a forward that leaves a non-finite buffer is itself a reason to skip, in every
AMP mode (a huge but finite input can give a finite loss and an inf running_var in fp32 and bf16).
"""
import torch

from . import dist
from .amp import unscale_flags


class BufferGuard:
    def __init__(self, model):
        # the module's own buffer tensors: BN (fused kernels, torch, SyncBN) updates these very tensors in place
        self.buffers = [b for b in model.buffers() if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]
        self.floating = [b for b in self.buffers if b.is_floating_point()]

    # fused multi-tensor kernels: a few launches per step instead of one or three per buffer (an R50-D8 has ~200)
    def snapshot(self):
        if self.buffers:  # (foreach ops refuse empty lists: a model without BN)
            with torch.no_grad():
                torch._foreach_copy_(self.saved, self.buffers)

    def restore(self):
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)

    def finite(self):
        """True if every floating buffer is finite on every rank (the ranks must agree on skipping)."""
        if not self.floating:
            return True
        with torch.no_grad():  # a single device-to-host sync
            bad = sum(f.to(self.floating[0].device) for f in unscale_flags(self.floating, 1.0).values())
        if dist.world_size() > 1:
            bad = dist.all_reduce(bad.to(dist.collective_device()))
        return not bool(bad.item())


def non_finite_tensors(tree, prefix=""):
    """Names of the floating tensors in nested dicts/lists that hold an inf or NaN (for the checkpoint check)."""
    out = []
    if torch.is_tensor(tree):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            out.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out += non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += non_finite_tensors(v, f"{prefix}[{i}]")
    return out
