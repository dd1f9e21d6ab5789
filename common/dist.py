"""Distributed training on PyTorch's own engine: torchrun env, process group, SyncBatchNorm, DDP.

    torchrun --nproc_per_node 8 pspnet.py ...                                   # one node, 8 GPUs x 2 images
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint HOST:29500 --rdzv_id RUN pspnet.py ...             # two nodes (run on each node)

Everything here is a no-op in a single process (no RANK in the environment), so the scripts have one code path.
The reference (ssseg, spec §7 steps 2 and 10) does: init_process_group(nccl), SyncBatchNorm layers, apex/torch AMP
initialisation, then DistributedDataParallel(device_ids=[local_rank]) with default options, plus the fp16
gradient-compression hook on the pytorch-AMP path. We do the same, with three changes:
- a bounded collective timeout (default 30 min; ssseg: 10 h), so a rank that dies or hangs ends the job with an
  error instead of holding the other GPUs forever (torchrun itself tears the job down when a process exits);
- SyncBN is our own autograd Function, because our BN modules fuse the ReLU and the residual add
  (common.layers.BatchNormAct2d) and torch's nn.SyncBatchNorm refuses CPU tensors (so gloo CI could not test it);
- evaluation is sharded exactly and the confusion matrices are all-reduced (no pickled per-rank files, spec §8).
The per-rank batch (total / world size, spec §2.3) and the exact eval shards live in common.data's train_loader and
test_loader, the all-reduce of the confusion matrix in common.metrics.ConfusionMatrix.reduce().
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from . import ops
from .layers import BatchNormAct2d

DEFAULT_TIMEOUT_S = 1800  # 30 min: longer than any step or eval we run, far shorter than ssseg's 10 h

_state = {"local_rank": 0, "timeout_s": None}  # what torch.distributed does not keep for us


# ----------------------------------------------------------------------------------------------------------------
# process group

def _env_int(name):
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (set by torchrun)") from None


def init(device=None, timeout_s=None):
    """Join the process group torchrun describes in the environment -> (rank, world_size, local_rank).

    Without RANK/WORLD_SIZE in the environment this is a no-op and returns (0, 1, 0). device: 'cuda' or 'cpu'
    (default: cuda when available); cuda uses NCCL for CUDA tensors (and gloo for CPU ones) and pins this process
    to GPU LOCAL_RANK. timeout_s (default env SEG_DIST_TIMEOUT_S, else 1800): how long any collective may wait
    for the slowest rank before the job fails.
    """
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None and world is None:
        return 0, 1, 0  # plain `python pspnet.py`
    if rank is None or world is None:
        raise RuntimeError(f"RANK={os.environ.get('RANK')} and WORLD_SIZE={os.environ.get('WORLD_SIZE')}: set both "
                           f"(launch with torchrun) or neither (single process)")
    local = rank if local is None else local
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if dist.is_initialized():  # e.g. a test that set the group up itself; trust it, but it must agree with the env
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise RuntimeError(f"process group already initialised as rank {dist.get_rank()}/{dist.get_world_size()}"
                               f", but the environment says {rank}/{world}")
    else:
        if timeout_s is None:
            timeout_s = float(os.environ.get("SEG_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        kwargs = {}
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                                   f"use --nproc_per_node <= the GPU count")
            torch.cuda.set_device(local)
            # the NCCL watchdog turns a collective stuck past `timeout` into a process abort (torchrun then stops
            # the other ranks). 3 = abort without tearing down the communicators, which can hang themselves; it is
            # torch's current default, written down so that older torch (2.11 on the GPU boxes) behaves the same.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
            backend = "cpu:gloo,cuda:nccl"  # nccl for the training tensors, gloo for the odd CPU tensor
            kwargs["device_id"] = torch.device("cuda", local)  # eager NCCL init: a bad setup fails here, not later
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise ValueError(f"dist.init: device must be 'cuda' or 'cpu', got {device}")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        _state.update(timeout_s=timeout_s)
    _state.update(local_rank=local)
    return rank, world, local


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank():
    return _state["local_rank"] if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """Rank 0 logs, writes checkpoints and prints; everybody else stays quiet."""
    return rank() == 0


def describe():
    """One log line: how this run is distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return "dist: single process"
    t = _state["timeout_s"]
    return (f"dist: {dist.get_backend()} world {world_size()} rank {rank()} local_rank {local_rank()}"
            f"{f', collective timeout {t:g} s' if t else ''}")


def barrier():
    """Wait for every rank. On gloo a monitored barrier, whose timeout error names the ranks that never arrived."""
    if not is_dist():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=_state["timeout_s"] or DEFAULT_TIMEOUT_S))
    else:
        dist.barrier(device_ids=[local_rank()] if torch.cuda.is_available() else None)


@contextlib.contextmanager
def local_main_first():
    """Run the body on each machine's local rank 0 first, then on the other ranks: what the body puts in a per-machine
    cache (a download, the generated demo dataset) is made once per machine and found there by the rest. Every rank
    must enter it, so the body decides whether to do the work, never the caller. A body that fails on local rank 0
    still lets the others go: they try themselves (and fail with the same message, or succeed). The others wait at
    most the collective timeout (SEG_DIST_TIMEOUT_S): raise it for a download slower than 30 min."""
    if not is_dist():
        yield
        return
    if local_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if local_rank() == 0:
            barrier()


def collective_device():
    """Where a tensor must be for a collective: this rank's GPU when the group has NCCL, else the CPU. On GPUs our
    group is "cpu:gloo,cuda:nccl", which routes each call by the tensor's device, so ranks that pass tensors on
    different devices enter different backends and wait for each other until the timeout."""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def all_reduce(t):
    """In-place sum of tensor t over all ranks; returns t. No-op single process."""
    if is_dist():
        dist.all_reduce(t)
    return t


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (pickled, host side; for small things like RNG states)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown():
    """Leave the process group (end of main; also on the way out of an exception)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(local_rank=0, timeout_s=None)


# ----------------------------------------------------------------------------------------------------------------
# SyncBatchNorm: batch statistics over the whole process group (spec §1 norm_cfg SyncBatchNorm)
#
# Forward:  local (mean, M2) per channel -> ONE all-reduce of a packed [2C + 1] float64 tensor
#           [n_r * mean_r, M2_r + n_r * mean_r^2, n_r] -> global mean and biased var -> normalise (+ residual, ReLU).
#           Packing per-rank means and M2s (not raw sums of squares) in float64 keeps fp16/fp32 inputs with a large
#           mean accurate: the fp32 rounding of each mean_r enters Q and mean^2 alike and cancels in
#           var = Q/n - mean^2, which raw fp32 sums of x^2 would lose to cancellation. No host synchronisation:
#           counts travel inside the tensor (torch's SyncBN all-gathers and masks empty ranks on the host every
#           layer, ../shared/reference/kernels.md §1.3).
# Backward: local sum(dz), sum(dz * xhat) per channel (dz = dy through the ReLU mask) -> ONE all-reduce of [2C] ->
#           dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)) with the means over the global batch.
#           dweight and dbias stay local sums: DDP averages parameter gradients like any other (as torch's SyncBN).
# With --kernels fused the four steps are KERNELS-I's split ops (common/ops.py, csrc/bn_relu.*), otherwise the
# float32 torch compositions below. Both give the same numbers as a single process with the whole batch.

def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # statistics always in fp32 (or fp64)


def _view(t, x):
    return t.view(1, -1, *([1] * (x.dim() - 2)))  # (C,) -> (1, C, 1, 1) to broadcast against (B, C, H, W)


class _TorchBN:
    """The four split steps in plain PyTorch, in float32 (float64 for float64 x): the fused kernels' readable twin."""

    @staticmethod
    def stats(x):
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(_acc(x))
        mean = xf.mean(dims)  # (C,)
        return mean, (xf - _view(mean, x)).square().sum(dims)

    @staticmethod
    def apply(x, mean, invstd, weight, bias, residual, relu):
        y = (x.to(mean.dtype) - _view(mean, x)) * _view(invstd * weight, x) + _view(bias, x)  # (B, C, H, W)
        if residual is not None:
            y = y + residual.to(y.dtype)
        return (y.relu_() if relu else y).to(x.dtype)

    @staticmethod
    def backward_reduce(dy, y, x, mean, invstd, relu):
        dims = [0] + list(range(2, x.dim()))
        dz = dy.to(mean.dtype)
        if relu:
            dz = dz * (y > 0)  # the mask from the saved output, as the kernel does (relu'(0) = 0 like torch)
        xhat = (x.to(mean.dtype) - _view(mean, x)) * _view(invstd, x)
        return dz.sum(dims), (dz * xhat).sum(dims)

    @staticmethod
    def backward_apply(dy, y, x, mean, invstd, weight, mean_dz, mean_dz_xhat, relu, residual_grad):
        dz = dy.to(mean.dtype)
        if relu:
            dz = dz * (y > 0)
        xhat = (x.to(mean.dtype) - _view(mean, x)) * _view(invstd, x)
        dx = (dz - _view(mean_dz, x) - xhat * _view(mean_dz_xhat, x)) * _view(weight * invstd, x)
        return dx.to(x.dtype), (dz.to(dy.dtype) if residual_grad else dy.new_empty(0))


class _FusedBN:
    """The same four steps as KERNELS-I's csrc ops, through their wrappers (common/ops.py; csrc/ops_schema.h)."""
    stats = staticmethod(ops.bn_stats)
    apply = staticmethod(ops.bn_apply)
    backward_reduce = staticmethod(ops.bn_backward_reduce)
    backward_apply = staticmethod(ops.bn_backward_apply)


class _SyncBNAct(torch.autograd.Function):
    """y = act(batch_norm(x; statistics of the global batch) + residual), one all-reduce each way."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, group, impl):
        with torch.autocast(x.device.type, enabled=False):  # statistics and the affine stay fp32 under autocast
            C = x.shape[1]
            n = x.numel() // C if C else 0  # (python int: known from the shape, no sync)
            if n:
                mean, m2 = impl.stats(x)  # local, (C,) each
            else:  # an empty rank (e.g. the last images of a split) contributes count 0 and nothing else
                mean = m2 = torch.zeros(C, dtype=_acc(x), device=x.device)
            m64 = mean.double()
            packed = torch.cat([m64 * n, m2.double() + m64.square() * n, m64.new_full((1,), n)])  # (2C + 1,)
            dist.all_reduce(packed, group=group)
            total = packed[2 * C:]  # (1,) global element count per channel
            g_mean = packed[:C] / total
            g_var = (packed[C:2 * C] / total - g_mean.square()).clamp_(min=0)  # biased, used to normalise
            acc = mean.dtype
            invstd = torch.rsqrt(g_var + eps).to(acc)
            g_mean = g_mean.to(acc)
            if running_mean is not None and momentum:  # running stats see the unbiased global variance
                with torch.no_grad():
                    running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
                    unbiased = g_var * total / (total - 1).clamp_(min=1)
                    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
            w = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=x.device)
            b = bias.to(acc) if bias is not None else torch.zeros(C, dtype=acc, device=x.device)
            y = impl.apply(x, g_mean, invstd, w, b, residual, relu)
        ctx.save_for_backward(x, y, g_mean, invstd, w, total.to(acc))
        ctx.relu, ctx.group, ctx.impl = relu, group, impl
        ctx.weight_dtype = weight.dtype if weight is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, mean, invstd, w, total = ctx.saved_tensors
        impl, relu = ctx.impl, ctx.relu
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        with torch.autocast(dy.device.type, enabled=False):
            sum_dz, sum_dz_xhat = impl.backward_reduce(dy, y, x, mean, invstd, relu)  # local, (C,) each
            dx = dres = None
            if need_x or need_r:
                C = x.shape[1]
                packed = torch.cat([sum_dz, sum_dz_xhat])  # (2C,): a copy, the local sums stay for dweight/dbias
                if need_x:  # every rank has the same graph, so every rank takes (or skips) this collective
                    dist.all_reduce(packed, group=ctx.group)
                packed = packed / total
                dx, dres = impl.backward_apply(dy, y, x, mean, invstd, w, packed[:C], packed[C:], relu, need_r)
                dx = dx if need_x else None
                dres = dres if need_r else None
        dw = sum_dz_xhat.to(ctx.weight_dtype) if need_w else None
        db = sum_dz.to(ctx.weight_dtype) if need_b else None
        return dx, dw, db, dres, None, None, None, None, None, None, None


def _synced(module):
    return module.training and is_dist()


def _sync_forward(module, x, residual, relu):
    """The shared training forward of both synced classes (running-stat bookkeeping exactly as nn.BatchNorm2d)."""
    module._check_input_dim(x)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # cumulative average (reads one scalar: only in this rarely used mode)
            factor = 1.0 / float(module.num_batches_tracked)
    track = module.track_running_stats
    from . import layers
    impl = _FusedBN if layers.fused("bn_act") else _TorchBN
    if impl is _FusedBN:
        ops.require("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply")
    return _SyncBNAct.apply(x, module.weight, module.bias, residual, module.running_mean if track else None,
                            module.running_var if track else None, factor, module.eps, relu,
                            module.process_group, impl)


class SyncBatchNormAct2d(BatchNormAct2d):
    """BatchNormAct2d with training statistics over the process group. Eval and single process: the plain unit."""
    process_group = None  # None = the whole world

    def forward(self, x, residual=None):
        if not _synced(self):
            return super().forward(x, residual)
        return _sync_forward(self, x, residual, self.relu)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """A plain nn.BatchNorm2d (no ReLU) with training statistics over the process group."""
    process_group = None

    def forward(self, x):
        if not _synced(self):
            return super().forward(x)
        return _sync_forward(self, x, None, False)


def convert_sync_bn(model, process_group=None):
    """Make every BatchNorm of `model` synchronise its batch statistics over the process group, in place.

    The reference builds SyncBatchNorm for every BN (spec §1). We swap the class of each BN module for its synced
    twin instead of replacing the module: the same object keeps its parameters, buffers and names, so state-dict
    keys, the optimizer's parameter references and any hooks are untouched (torch's convert_sync_batchnorm builds
    new modules, and would turn our BN+ReLU units into plain SyncBatchNorms, silently dropping the ReLU).
    A BN type we do not know how to sync (1d/3d, someone else's subclass) is an error, not a silent skip.
    """
    for name, m in model.named_modules():
        if type(m) in (BatchNormAct2d, SyncBatchNormAct2d):
            m.__class__ = SyncBatchNormAct2d
        elif type(m) in (nn.BatchNorm2d, SyncBatchNorm2d, nn.SyncBatchNorm):
            if isinstance(m, nn.SyncBatchNorm) and m.weight is not None and m.weight.dim() != 1:
                raise TypeError(f"convert_sync_bn: {name} is an unexpected SyncBatchNorm")
            m.__class__ = SyncBatchNorm2d
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"convert_sync_bn: don't know how to synchronise {name or 'the model'} "
                            f"({type(m).__name__}); only BatchNorm2d and common.layers.BatchNormAct2d are supported")
        else:
            continue
        m.process_group = process_group
    return model


# ----------------------------------------------------------------------------------------------------------------
# DistributedDataParallel

def wrap_ddp(model, device, amp_kind, fp16_compress=None, amp_dtype=None):
    """DDP as the reference (spec §7 step 10): after AMP initialisation, default options, broadcast_buffers on.

    amp_kind: 'none' | 'torch' | 'apex'. fp16_compress: register DDP's fp16 gradient-compression hook (gradients
    are all-reduced in fp16, then cast back): True / False (or 'true' / 'false'), or None / 'auto' = as the
    reference, on for the pytorch-AMP path only (--ddp_fp16_compress) and, beyond it, not for bf16 autocast
    (amp_dtype): without a loss scale, gradients below fp16's range would be flushed to zero. apex
    O1 keeps fp32 weights, so its gradients are reduced in fp32 as apex DDP did; O2 has fp16 weights, so DDP
    reduces their fp16 gradients (and the fp32 BN ones) before AMP unscales them into the fp32 master gradients,
    which is what apex DDP did too (we pre-divide by the world size, apex divided after the sum; either way every
    rank sees the same gradients and so takes the same skip decision and loss scale).
    Single process: returns the model unchanged. Evaluate with unwrap(model): DDP's forward broadcasts buffers,
    a collective that would hang when ranks run different numbers of eval images.
    """
    if amp_kind not in ("none", "torch", "apex"):
        raise ValueError(f"wrap_ddp: amp_kind must be none|torch|apex, got {amp_kind!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("wrap_ddp: the model is already wrapped in DistributedDataParallel")
    if not is_dist():
        return model
    device = torch.device(device)
    # buffers (BN running stats) are broadcast from rank 0 at each forward: DDP's default (broadcast_buffers=True,
    # spelled forward_sync_buffers since torch 2.14; we pass neither so that 2.11 and 2.14 both take the default)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if fp16_compress in (None, "auto"):
        fp16_compress = amp_kind == "torch" and amp_dtype in (None, torch.float16, "float16")
    elif fp16_compress in ("true", "false"):
        fp16_compress = fp16_compress == "true"
    elif not isinstance(fp16_compress, bool):
        raise ValueError(f"wrap_ddp: fp16_compress must be auto, true or false, got {fp16_compress!r}")
    if fp16_compress:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    ddp.fp16_compress = bool(fp16_compress)  # what auto resolved to (tests/test_dist.py reads it)
    return ddp


def resume_warning(saved_world, total_batch):
    """None when a checkpoint written by saved_world ranks resumes on as many; else the warning to print.

    Same world size: every rank restores its own RNG streams and sampler position, and training continues exactly.
    Another world size still resumes (weights, optimizer, AMP state, iteration; SyncBN keeps the statistics over
    the same total batch), but the per-rank batch changes (memory per GPU), and the sampler's split of the data
    and the per-rank random streams are re-dealt: the run continues, not bit-exactly.
    """
    world = world_size()
    if saved_world is None or saved_world == world:
        return None
    return (f"resume: the checkpoint was written by {saved_world} rank(s) and this run has {world}: the per-rank "
            f"batch changes from {total_batch // saved_world} to {total_batch // world} images (total {total_batch} "
            f"unchanged), and the data order and random streams are re-dealt, so training continues but not "
            f"exactly as an uninterrupted {saved_world}-rank run would")


def unwrap(model):
    """The bare model inside a DDP wrapper (for checkpoints, evaluation and the summary)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
