"""The CUDA kernels (csrc/*_cuda.cu) executed on the CPU through the host runner (csrc/cuda_host/, built by
tests/cuda_host_build.py as torch.ops.segfp16_cudahost.*), against the CPU twins (torch.ops.segfp16.* on CPU), the
ATen compositions and exact sums.

What runs here is the kernels' own code: indexing, bounds and tails, the 16-byte vector paths and their fallbacks,
the shared-memory reductions and their barriers, the grid-stride loops, dtype conversions; and the ops' host code
(allocation, layouts, launch configurations). Every launch is checked against CUDA's limits by the runner.

Tolerances (elementwise ops are bitwise equal to the twin: same formula, same operation order, no contraction):
  reductions (bn statistics and backward sums, the upsample gathers, the loss): the kernels sum in another order
  than the twins; relative to the sum of |terms|, fp32 2e-6, fp64 1e-13 (both ~100x the worst case seen), and for
  fp16 / bf16 outputs one rounding of the output on top (2^-11 / 2^-8 relative).
  fp64 vs an exact sum (numpy longdouble): every op within 1e-14 relative to the sum of |terms| (test_fp64_accuracy).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import cuda_host_build
from common import ops

HERE = os.path.dirname(os.path.abspath(__file__))
CL = torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS_OUT = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


@pytest.fixture(scope="session")
def H():
    ops.require("bn_stats", "upsample_concat")  # the CPU twins (common._C)
    # ieee; the sanitizer runs at the end of this file rerun it in a process of their own with their flavour
    ns = cuda_host_build.load(os.environ.get("SEGFP16_CUDAHOST_FLAVOUR", "ieee"))
    ns.set_schedule("in_order", False, False, 0, 132, False)
    return ns


class schedule:
    """with schedule(H, blocks=..., serial=..., permute=..., seed=..., sms=..., dry=...): set, then restore the default."""

    def __init__(self, ns, blocks="in_order", serial=False, permute=False, seed=0, sms=132, dry=False):
        self.ns, self.args = ns, (blocks, serial, permute, seed, sms, dry)

    def __enter__(self):
        self.ns.set_schedule(*self.args)
        self.ns.launch_log(True)

    def __exit__(self, *exc):
        self.ns.set_schedule("in_order", False, False, 0, 132, False)


def launches(ns):
    """The launches since the last call: [(kernel, grid, block, smem)]."""
    out = []
    for line in ns.launch_log(True).splitlines():
        k, g, b, s, _ran = line.split("|")
        out.append((k, tuple(map(int, g.split())), tuple(map(int, b.split())), int(s)))
    return out


def rnd(shape, dtype, seed, mean=0.0, std=1.0, layout="contig"):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "cl":
        return t.contiguous(memory_format=CL)
    if layout == "offset":  # one element past a 16-byte boundary: every vector path must fall back
        buf = torch.empty(t.numel() + 1, dtype=dtype)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(shape)
    return t


def meta(t):
    return (t.dtype, tuple(t.shape), tuple(t.stride()))


def fake_meta(op, *args):
    """dtype, shape and strides of op's outputs under FakeTensorMode (the registered fake kernels of common/ops.py)."""
    with FakeTensorMode() as mode:
        fargs = tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, args)
        out = op(*fargs)
    return tree_map(meta, out)


def check_meta(op_name, H, args):
    """The host-run CUDA op, the CPU twin and the fake kernel give the same dtypes, shapes and strides."""
    T = torch.ops.segfp16
    real = getattr(H, op_name)(*args)
    twin = getattr(T, op_name)(*args)
    assert tree_map(meta, real) == tree_map(meta, twin), op_name
    assert tree_map(meta, real) == fake_meta(getattr(T, op_name), *args), op_name
    return real, twin


def bits(t):
    t = t.detach().contiguous().view(-1)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a, b, what=""):
    if isinstance(a, (tuple, list)):
        for i, (u, v) in enumerate(zip(a, b)):
            assert_bitwise(u, v, f"{what}[{i}]")
        return
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(bits(a), bits(b)), f"{what}: max diff {(a.double() - b.double()).abs().max().item()}"


def assert_sum_close(got, want, scale, dtype, what=""):
    """A reduction's result within EPS_OUT[dtype] of the reference, relative to `scale` (the sum of |terms|)."""
    err = ((got.double() - want.double()).abs() / scale.double().clamp_min(1e-300)).max().item()
    assert err <= EPS_OUT[dtype], f"{what}: {err:.3g} > {EPS_OUT[dtype]:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# bn_relu family

# (shape, layout): channels_last with several grid.y chunks (3200 rows), C not a multiple of the fp16 vector width
# (12), NCHW with S not a multiple of any width (49), NCHW with several grid.y chunks (2 to 5 with V = 8 to 2; C = 1
# keeps it cheap), 1x1 maps, N = 1, 3-D, an input offset by one element (vector paths fall back to V = 1)
BN_CASES = [((2, 16, 40, 40), "cl"), ((2, 12, 7, 9), "cl"), ((3, 5, 7, 7), "contig"), ((2, 1, 128, 136), "contig"),
            ((4, 6, 1, 1), "contig"), ((4, 6, 1, 1), "cl"), ((1, 8, 5, 5), "cl"), ((3, 7, 6), "contig"),
            ((2, 8, 6, 10), "offset")]


def bn_inputs(shape, layout, dtype):
    C = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = rnd(shape, dtype, 0, mean=0.5, std=2.0, layout=layout)
    r = rnd(shape, dtype, 1, layout=layout)
    dy = rnd(shape, dtype, 2, layout=layout)
    g = torch.Generator().manual_seed(3)
    w, b = (torch.rand(C, generator=g, dtype=acc) + 0.5), torch.randn(C, generator=g, dtype=acc) * 0.5
    return x, r, dy, w, b


def channel_dims(x):
    return [0] + list(range(2, x.dim()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", BN_CASES)
def test_bn_family(H, shape, layout, dtype):
    """Every bn op (training forward, eval forward, the SyncBN halves, both backward passes) vs the CPU twin and ATen."""
    x, r, dy, w, b = bn_inputs(shape, layout, dtype)
    n = x.numel() // x.shape[1]
    xd = x.double()
    dims = channel_dims(x)
    (mean, m2), (tmean, tm2) = check_meta("bn_stats", H, (x,))
    assert_sum_close(mean, xd.mean(dims), xd.abs().mean(dims), dtype if dtype == torch.float64 else torch.float32)
    dev = xd - xd.mean(dims, keepdim=True)
    assert_sum_close(m2, (dev ** 2).sum(dims), (dev ** 2).sum(dims), dtype if dtype == torch.float64 else torch.float32)
    invstd = torch.rsqrt(tm2 / n + 1e-5)
    for relu in (True, False):
        for res in (r, None):
            # apply (also the eval forward with running stats): elementwise, bitwise equal to the twin
            y, ty = check_meta("bn_apply", H, (x, tmean, invstd, w, b, res, relu))
            assert_bitwise(y, ty, "bn_apply")
    ref = F.batch_norm(xd, None, None, w.double(), b.double(), True, 0.0, 1e-5) + r.double()
    ref = F.relu(ref)
    (y, bm, bv), (ty, tbm, tbv) = check_meta("bn_relu_train", H, (x, w, b, r, 1e-5, True))
    torch.testing.assert_close(y.double(), ref, atol=8 * EPS_OUT[dtype] * ref.abs().max().item() + 1e-12, rtol=0)
    assert_sum_close(bv, tbv, tbv, dtype if dtype == torch.float64 else torch.float32, "var")
    # backward: reduce (sums) then apply (elementwise: bitwise given the same sums)
    for relu in (True, False):
        (sdz, sdzx), (tsdz, tsdzx) = check_meta("bn_backward_reduce", H, (dy, ty, x, tmean, invstd, relu))
        dz = dy.double() * (ty.double() > 0) if relu else dy.double()
        xhat = (xd - tmean.double().view([-1] + [1] * (x.dim() - 2))) * invstd.double().view([-1] + [1] * (x.dim() - 2))
        acc = dtype if dtype == torch.float64 else torch.float32
        assert_sum_close(sdz, dz.sum(dims), dz.abs().sum(dims), acc, "sum_dz")
        assert_sum_close(sdzx, (dz * xhat).sum(dims), (dz * xhat).abs().sum(dims), acc, "sum_dz_xhat")
        for rg in (True, False):
            out, tout = check_meta("bn_backward_apply", H, (dy, ty, x, tmean, invstd, w, tsdz / n, tsdzx / n, relu, rg))
            assert_bitwise(out, tout, "bn_backward_apply")


def test_bn_vector_paths_taken(H):
    """The aligned cases use 16-byte packs, the offset / odd-width cases V = 1 (the launch record names V)."""
    x = rnd((2, 16, 6, 10), torch.float16, 0, layout="cl")
    H.launch_log(True)
    H.bn_stats(x)
    H.bn_stats(rnd((2, 16, 6, 10), torch.float16, 0, layout="offset"))
    names = [k for k, *_ in launches(H) if "reduce" in k]
    assert names == ["bn_reduce_nhwc_kernel<0, c10::Half, float, 8>", "bn_reduce_nhwc_kernel<1, c10::Half, float, 8>",
                     "bn_reduce_nchw_kernel<0, c10::Half, float, 1>", "bn_reduce_nchw_kernel<1, c10::Half, float, 1>"]


def test_bn_vector_paths_need_every_pointer_aligned(H):
    """V = 1 unless every operand is 16-byte aligned: one operand offset by one element among aligned ones (a
    residual, dy or y that is a view), and float64 offset by one element (8-byte aligned, not 16). A misaligned
    16-byte pack runs on the host (x86) with the right bits but faults on the card, so the launch record is what
    tells; the aligned control must take V = 8."""
    T = torch.ops.segfp16
    shape = (2, 4, 4, 8)  # NCHW, S = 32: a multiple of every V
    x, r, dy, w, b = bn_inputs(shape, "contig", torch.float16)
    r_off, dy_off = rnd(shape, torch.float16, 1, layout="offset"), rnd(shape, torch.float16, 2, layout="offset")
    mean, inv = torch.zeros(4), torch.ones(4)
    y = T.bn_apply(x, mean, inv, w, b, r, True)
    y_off = rnd(shape, torch.float16, 0, layout="offset")
    y_off.copy_(y)
    H.launch_log(True)
    calls = [("bn_apply", (x, mean, inv, w, b, r, True)),  # the control
             ("bn_apply", (x, mean, inv, w, b, r_off, True)),
             ("bn_backward_reduce", (dy_off, y, x, mean, inv, True)),
             ("bn_backward_reduce", (dy, y_off, x, mean, inv, True)),
             ("bn_backward_apply", (dy, y_off, x, mean, inv, w, mean, inv, True, True))]
    for op, args in calls:  # elementwise ops bitwise, the reduction within fp32's rounding
        got, want = getattr(H, op)(*args), getattr(T, op)(*args)
        if op == "bn_backward_reduce":
            torch.testing.assert_close(got, want)
        else:
            assert_bitwise(got, want, op)
    x64 = rnd((2, 4, 4, 8), torch.float64, 0, layout="offset")
    assert x64.data_ptr() % 16 == 8
    H.bn_stats(x64)
    names = [k for k, *_ in launches(H) if "finalize" not in k]
    assert names == ["bn_apply_kernel<false, c10::Half, float, 8>", "bn_apply_kernel<false, c10::Half, float, 1>",
                     "bn_reduce_nchw_kernel<2, c10::Half, float, 1>", "bn_reduce_nchw_kernel<2, c10::Half, float, 1>",
                     "bn_backward_apply_kernel<false, c10::Half, float, 1>",
                     "bn_reduce_nchw_kernel<0, double, double, 1>", "bn_reduce_nchw_kernel<1, double, double, 1>"]


def test_bn_relu_passes_nan(H):
    """A NaN pre-activation comes out of the ReLU as NaN (torch.relu), and a NaN y lets its gradient through the
    mask (threshold_backward), so a diverging step shows as NaN rather than as a silent 0."""
    T = torch.ops.segfp16
    x, r, dy, w, b = bn_inputs((2, 8, 4, 4), "cl", torch.float32)
    x[1, 3, 2, 1] = float("nan")
    mean, inv = torch.zeros(8), torch.ones(8)
    y = H.bn_apply(x, mean, inv, w, b, None, True)
    assert y[1, 3, 2, 1].isnan() and y.isnan().sum() == 1
    assert_bitwise(y, T.bn_apply(x, mean, inv, w, b, None, True), "bn_apply")
    _, dres = H.bn_backward_apply(dy, y, x, mean, inv, w, mean, mean, True, True)
    assert dres[1, 3, 2, 1] == dy[1, 3, 2, 1] != 0
    assert_bitwise(dres, T.bn_backward_apply(dy, y, x, mean, inv, w, mean, mean, True, True)[1], "dres")


def test_bn_partials_merged_in_double(H):
    """The per-block partials are merged in double (the file's contract): partials 2^24, 1, -2^24 (each exact in
    float) give exactly 1, where a float merge gives 0 (2^24 + 1 rounds to 2^24). The tolerance tests merge at most
    4 fp32 partials, few enough for a float merge to pass them; at R50-D8's sizes there are up to 512."""
    x = torch.zeros(1, 1, 91, 91)  # NCHW, odd S: V = 1, 8281 values in 3 partials; value g goes to (g // 256) % 3
    x.view(-1)[[0, 256, 512]] = torch.tensor([2.0 ** 24, 1.0, -(2.0 ** 24)])
    H.launch_log(True)
    s0, _ = H.bn_backward_reduce(x, x, torch.zeros_like(x), torch.zeros(1), torch.ones(1), False)
    mean, _ = H.bn_stats(x)
    assert [g for k, g, *_ in launches(H) if "nchw" in k] == [(1, 3, 1)] * 3
    assert s0.item() == 1.0 and mean.item() == np.float32(1.0 / 8281), (s0.item(), mean.item())


def test_bn_stats_of_an_empty_batch_is_zero(H):
    """An idle SyncBN rank's statistics are zeros, not uninitialised memory (the merge weights them by count 0, and
    NaN * 0 is NaN). NaN-filled blocks are freed first, so that a result left unwritten is unlikely to read 0."""
    for C in (6, 64):
        junk = [torch.full((C,), float("nan")) for _ in range(4)]
        del junk
        mean, m2 = H.bn_stats(torch.randn(0, C, 5, 5))
        assert (mean == 0).all() and (m2 == 0).all(), (mean, m2)


def test_bn_split_halves_as_syncbn(H):
    """The SyncBN composition of the halves (ranks of 3, 1 and 0 images) on the host-run CUDA ops equals the twin's."""
    x, r, dy, w, b = bn_inputs((4, 6, 5, 5), "cl", torch.float32)
    outs = []
    for L in (H, torch.ops.segfp16):
        st = [L.bn_stats(xi) for xi in x.split([3, 1, 0])]
        count = torch.tensor([xi.numel() // 6 for xi in x.split([3, 1, 0])], dtype=torch.float64)
        means, m2s, n = torch.stack([s[0] for s in st]).double(), torch.stack([s[1] for s in st]).double(), count.sum()
        mean = (count[:, None] / n * means).sum(0)
        m2 = m2s.sum(0) + (count[:, None] * (means - mean) ** 2).sum(0)
        mean, invstd = mean.float(), torch.rsqrt(m2 / n + 1e-5).float()
        ys = [L.bn_apply(xi, mean, invstd, w, b, ri, True) for xi, ri in zip(x.split([3, 1, 0]), r.split([3, 1, 0]))]
        red = [L.bn_backward_reduce(gi, yi, xi, mean, invstd, True) for gi, yi, xi in zip(dy.split([3, 1, 0]), ys,
                                                                                         x.split([3, 1, 0]))]
        s0, s1 = sum(t[0] for t in red), sum(t[1] for t in red)
        dx = [L.bn_backward_apply(gi, yi, xi, mean, invstd, w, s0 / n, s1 / n, True, True)
              for gi, yi, xi in zip(dy.split([3, 1, 0]), ys, x.split([3, 1, 0]))]
        outs.append((torch.cat(ys), s0, s1, torch.cat([d[0] for d in dx]), torch.cat([d[1] for d in dx])))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# upsample family

# (sources (C, h, w), output size): PPM bins, ASPP with an image pool, a decoder ratio, downsampling, to 1x1,
# mixed up/down; outputs of a few hundred to a few thousand elements, so several blocks per launch
CONCAT_CASES = [([(4, 9, 9), (3, 1, 1), (2, 2, 2), (2, 3, 3), (3, 6, 6)], (17, 17)),
                ([(5, 7, 7), (3, 7, 7), (2, 1, 1)], (7, 7)), ([(3, 5, 7), (2, 13, 11)], (13, 11)),
                ([(3, 17, 19), (2, 4, 5)], (6, 7)), ([(1, 2, 3)], (1, 1)), ([(2, 3, 4), (6, 1, 2)], (20, 3))]


def concat_inputs(specs, n, dtype, layout, seed=0):
    return [rnd((n, c, h, w), dtype, seed + i, layout=layout) for i, (c, h, w) in enumerate(specs)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl", "offset"])
@pytest.mark.parametrize("case", range(len(CONCAT_CASES)))
def test_upsample_concat(H, case, layout, dtype):
    specs, size = CONCAT_CASES[case]
    n = 1 if case % 2 else 2
    for ac in (False, True):
        xs = concat_inputs(specs, n, dtype, layout)
        out, tout = check_meta("upsample_concat", H, (xs, list(size), ac))
        assert_bitwise(out, tout, "upsample_concat")  # same weights, same order
        # ATen in the op-math type (float for fp32 / fp16 / bf16, as our kernels): the same bilinear weights, which are
        # computed in float and so differ from float64 ones by ~|src| * 2^-24
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        ref = torch.cat([F.interpolate(t.to(acc), size=size, mode="bilinear", align_corners=ac) for t in xs], 1)
        torch.testing.assert_close(out.to(acc), ref, atol=4 * EPS_OUT[dtype] * max(1.0, ref.abs().max().item()),
                                   rtol=0)
        g = rnd(tuple(out.shape), dtype, 9, layout="cl" if layout == "cl" else "contig")
        shapes = ([t.shape[1] for t in xs], [t.shape[2] for t in xs], [t.shape[3] for t in xs])
        grads, tgrads = check_meta("upsample_concat_backward", H, (g, *shapes, ac))
        # the reference backward (autograd of the ATen composition, op-math type), and the sums of |terms| (the same
        # gather of |g|: the bilinear weights are non-negative)
        xd = [t.detach().to(acc).clone().requires_grad_() for t in xs]
        xa = [t.detach().to(acc).clone().requires_grad_() for t in xs]
        for ts, gg in ((xd, g.to(acc)), (xa, g.to(acc).abs())):
            torch.cat([F.interpolate(t, size=size, mode="bilinear", align_corners=ac) for t in ts], 1).backward(gg)
        for gi, tgi, x, xs_abs in zip(grads, tgrads, xd, xa):
            scale = xs_abs.grad.clamp_min(1e-30)
            assert_sum_close(gi, x.grad, scale, dtype, "upsample_concat_backward")
            assert_sum_close(gi, tgi, scale, dtype, "vs twin")


# (N, K, h, w, H, W): the x8 ratio, odd sizes and batch 1, a target smaller than the logits, 1x1 logits, 150 classes
CE_CASES = [(2, 5, 4, 4, 32, 32), (1, 3, 5, 7, 19, 23), (2, 4, 9, 6, 5, 4), (2, 6, 1, 1, 3, 5), (1, 150, 3, 3, 12, 10)]


def ce_inputs(case, dtype, layout, ignore_index=255, ignore_frac=0.2, seed=0):
    n, k, h, w, Ht, Wt = case
    logits = rnd((n, k, h, w), dtype, seed, std=3.0, layout=layout)
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, k, (n, Ht, Wt), generator=g)
    target[torch.rand(n, Ht, Wt, generator=g) < ignore_frac] = ignore_index
    return logits, target


def ce_reference(logits, target, ignore_index):
    """fp64 loss and logits gradient of the ATen composition; 0 / zero grad when no pixel is valid (our rule)."""
    x = logits.double().requires_grad_()
    up = F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = (target != ignore_index).sum()
    loss = F.cross_entropy(up, target, ignore_index=ignore_index, reduction="sum") / valid.clamp_min(1)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl", "offset"])
@pytest.mark.parametrize("case", CE_CASES)
def test_upsample_cross_entropy(H, case, layout, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for ignore_index, frac in ((255, 0.2), (-100, 0.3), (1, 0.0), (255, 1.0)):  # in-range ignore, all ignored
        logits, target = ce_inputs(case, dtype, layout, ignore_index, frac)
        (loss, lse), (tloss, tlse) = check_meta("upsample_cross_entropy", H, (logits, target, ignore_index))
        assert_bitwise(lse, tlse, "lse")  # per pixel: same interpolation, max, exp-sum and log
        want, want_grad = ce_reference(logits, target, ignore_index)
        if frac == 1.0:
            assert loss.item() == 0.0
        assert_sum_close(loss, want, want.abs().clamp_min(1.0), acc, "loss")
        gl = torch.tensor(1.5, dtype=acc)
        grad, tgrad = check_meta("upsample_cross_entropy_backward", H, (gl, logits, target, tlse, ignore_index))
        if frac == 1.0:
            assert (grad == 0).all()
        # |terms| of a logit's gradient sum are at most its footprint's weight / valid: 1 is a safe scale here
        scale = torch.full_like(want_grad, 1.5 * max(1.0, (target.shape[-1] / case[3]) * (target.shape[-2] / case[2]))
                                / max(1, int((target != ignore_index).sum())))
        assert_sum_close(grad, 1.5 * want_grad, scale, dtype, "grad")
        assert_sum_close(grad, tgrad, scale, dtype, "grad vs twin")


def test_ce_target_out_of_range_is_a_device_assert(H):
    logits, target = ce_inputs(CE_CASES[0], torch.float32, "contig")
    target[1, 3, 4] = 9
    with pytest.raises(RuntimeError, match="device-side assert failed: t >= 0 && t < C"):
        H.upsample_cross_entropy(logits, target, 255)


# ---------------------------------------------------------------------------------------------------------------
# schedules, barriers, limits

def schedule_workload(ns):
    """A small run of every kernel (several blocks each), its outputs as a flat list."""
    out = []
    for dtype, layout in ((torch.float32, "cl"), (torch.float16, "contig"), (torch.float64, "cl")):
        x, r, dy, w, b = bn_inputs((2, 16, 9, 9), layout, dtype)
        mean, m2 = ns.bn_stats(x)
        inv = torch.rsqrt(m2 / 162 + 1e-5)
        y = ns.bn_apply(x, mean, inv, w, b, r, True)
        s = ns.bn_backward_reduce(dy, y, x, mean, inv, True)
        out += [mean, m2, y, *s, *ns.bn_backward_apply(dy, y, x, mean, inv, w, s[0] / 162, s[1] / 162, True, True)]
    xn = rnd((1, 1, 128, 132), torch.float32, 4)  # NCHW with grid.y = 2 (4224 packs)
    out += list(ns.bn_stats(xn))
    xs = concat_inputs([(3, 3, 3), (2, 6, 6)], 2, torch.float32, "cl")
    o = ns.upsample_concat(xs, [11, 11], False)
    out += [o, *ns.upsample_concat_backward(o, [3, 2], [3, 6], [3, 6], False)]
    logits, target = ce_inputs((2, 7, 5, 6, 21, 19), torch.float32, "cl")
    loss, lse = ns.upsample_cross_entropy(logits, target, 255)
    out += [loss, lse, ns.upsample_cross_entropy_backward(torch.tensor(1.0), logits, target, lse, 255)]
    return out


SCHEDULES = [dict(blocks="reversed"), dict(blocks="shuffled", permute=True, seed=1),
             dict(blocks="in_order", serial=True), dict(blocks="shuffled", serial=True, permute=True, seed=3)]


def test_bit_identical_across_schedules(H):
    """Blocks in order, reversed, shuffled; threads free-running or serialised between barriers, permuted: the same
    bits (a missing barrier or an order-dependent merge would show here)."""
    with schedule(H):
        want = schedule_workload(H)
    for sch in SCHEDULES:
        with schedule(H, **sch):
            got = schedule_workload(H)
        assert_bitwise(got, want, str(sch))


def test_schedules_catch_a_missing_barrier(H):
    """The harness can fail: a block tree-sum without its barrier (csrc/cuda_host/library.cpp) gives different
    results under the serial schedules, the correct one does not."""
    x = torch.arange(256, dtype=torch.float32)
    results = {}
    for sch in ({}, dict(serial=True), dict(serial=True, permute=True, seed=5)):
        with schedule(H, **sch):
            results[str(sch)] = (H.test_block_sum(x, True).item(), H.test_block_sum(x, False).item())
    assert {v[0] for v in results.values()} == {float(sum(range(256)))}
    assert results["{'serial': True}"][1] != float(sum(range(256))), results  # NaN: read before written


def test_divergent_barrier_is_an_error(H):
    with pytest.raises(RuntimeError, match="divergent"):
        H.test_block_sum(torch.ones(256), True, diverge=True)


# R50-D8 (v1c stem, output stride 8) BN maps as (channels, stride w.r.t. the input): stem, layer1, layer2 (its first
# block's 3x3 input at 1/4), layers 3-4 at 1/8, PSP / ASPP / FCN heads, DeepLabV3+ decoder, pyramid bins (1/input)
BN_MAPS = [(32, 2), (64, 2), (64, 4), (256, 4), (128, 4), (128, 8), (512, 8), (256, 8), (1024, 8), (2048, 8),
           (48, 4), (560, 4)]
BINS = [1, 2, 3, 6]
# (N, H, W): training crops at batch 2 / 8 / 16 per GPU, slide windows, whole images at the test scale (2048, 512) in
# both orientations (the largest map whole mode produces; slide crops are never larger than the crop)
SIZES = [(2, 512, 512), (8, 512, 512), (16, 512, 512), (1, 512, 2048), (1, 2048, 512)]


def test_launch_limits_at_real_sizes(H):
    """Every kernel's launch configuration at the sizes users hit, computed by the ops' own host code in a dry run
    (launches checked and recorded, not run): grid.x <= 2^31-1, grid.y/z <= 65535, <= 1024 threads, dynamic shared
    memory <= 48 KiB, no 32-bit wrap of blockIdx * blockDim, and every indexed tensor under 2^31 elements."""
    seen, biggest = [], 0
    for sms in (132, 108):  # H100 / H200, A100
        with schedule(H, sms=sms, dry=True):
            for N, Hh, Ww in SIZES:
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    acc = torch.float32
                    for C, s in BN_MAPS + [(512, -k) for k in BINS]:
                        shape = (N, C, k, k) if (s < 0 and (k := -s)) else (N, C, Hh // s, Ww // s)
                        for fmt in (CL, torch.contiguous_format):
                            x = torch.empty(shape, dtype=dtype, memory_format=fmt)
                            biggest = max(biggest, x.numel())
                            v = torch.ones(C, dtype=acc)
                            H.bn_stats(x)
                            H.bn_apply(x, v, v, v, v, x, True)
                            H.bn_backward_reduce(x, x, x, v, v, True)
                            H.bn_backward_apply(x, x, x, v, v, v, v, v, True, True)
                    f8 = (Hh // 8, Ww // 8)
                    for fmt in (CL, torch.contiguous_format):
                        # PSP bins and the DeepLabV3+ decoder's x2 (the at-size and 1x1 inputs are copies, no launch)
                        bins = [torch.empty((N, 512, k, k), dtype=dtype, memory_format=fmt) for k in (2, 3, 6)]
                        out = H.upsample_concat(bins, list(f8), False)
                        H.upsample_concat_backward(out, [512] * 3, [2, 3, 6], [2, 3, 6], False)
                        aspp = torch.empty((N, 512) + f8, dtype=dtype, memory_format=fmt)
                        f4 = (Hh // 4, Ww // 4)
                        out = H.upsample_concat([aspp], list(f4), False)
                        H.upsample_concat_backward(out, [512], [f8[0]], [f8[1]], False)
                        biggest = max(biggest, out.numel())
                        # the loss of both heads: 150 classes at 1/8 to the full size (training crops; eval has none)
                        logits = torch.empty((N, 150) + f8, dtype=dtype, memory_format=fmt)
                        target = torch.zeros((N, Hh, Ww), dtype=torch.long)
                        loss, lse = H.upsample_cross_entropy(logits, target, 255)
                        H.upsample_cross_entropy_backward(torch.tensor(1.0), logits, target, lse, 255)
            seen += launches(H)
    kernels = {k.split("<")[0] for k, *_ in seen}
    assert kernels == {"bn_reduce_nhwc_kernel", "bn_reduce_nchw_kernel", "bn_finalize_kernel", "bn_apply_kernel",
                       "bn_backward_apply_kernel", "upsample_concat_fwd_kernel", "upsample_concat_bwd_kernel",
                       "upsample_ce_fwd_kernel", "upsample_ce_bwd_kernel"}, kernels
    for k, g, b, smem in seen:
        assert 1 <= g[0] <= 2 ** 31 - 1 and 1 <= g[1] <= 65535 and 1 <= g[2] <= 65535, (k, g)
        assert math.prod(b) <= 1024 and b[2] <= 64, (k, b)
        assert smem <= 48 * 1024, (k, smem)
        assert all(gi * bi < 2 ** 32 for gi, bi in zip(g, b)), (k, g, b)
    assert biggest < 2 ** 31
    print(f"{len(seen)} launches checked; max grid.x {max(g[0] for _, g, _, _ in seen)}, "
          f"max grid.y {max(g[1] for _, g, _, _ in seen)}, max smem {max(s for *_, s in seen)} B, "
          f"largest tensor {biggest} elements")


def test_runner_enforces_limits(H):
    """The runner's own check: a launch past CUDA's limits fails on the host too (the ops cannot produce one, so
    the runner's test kernel asks for 2048 threads per block)."""
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        H.test_block_sum(torch.ones(2048), True, block=2048)


def test_runner_catches_a_write_past_the_shared_memory(H):
    """A kernel that asks for too little dynamic shared memory writes into the rest of the host's 48 KiB arena and
    reads its own values back, so every comparison passes; the canary there fails the launch (on the card it is
    memcheck's invalid __shared__ write, or garbage from another block)."""
    if H.flavour() == "asan":
        pytest.skip("asan poisons those bytes instead: test_sanitizer_asan_reports[shared_write]")
    with pytest.raises(RuntimeError, match=r"wrote byte 128 of the dynamic shared memory, past the 128 bytes"):
        H.test_out_of_bounds(torch.randn(8), "shared_write")


def test_runner_fills_static_shared_memory_before_each_block(H):
    """A static __shared__ array is one `static` array on the host, so a read before the block's own write would see
    what the last block left there (here 2.0): a plausible value that a reduction could pass with. The runner fills it
    with NaN before each block, as it fills the dynamic arena."""
    for _ in range(2):  # the first launch leaves 2.0 in the array
        out = H.test_out_of_bounds(torch.randn(8), "static_unset")
        assert math.isnan(out[0].item()), out[0].item()


# ---------------------------------------------------------------------------------------------------------------
# layouts and opcheck (the CPU twins: segfp16 on CPU)

@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_opcheck_backward_ops_both_layouts(layout):
    """torch.library.opcheck on every backward op (and its forward) in both layouts: schema, fake kernel vs real
    strides (this caught the CPU upsample_cross_entropy_backward returning NCHW for channels_last logits)."""
    T = torch.ops.segfp16
    x, r, dy, w, b = bn_inputs((2, 6, 5, 4), layout, torch.float32)
    mean, m2 = T.bn_stats(x)
    inv = torch.rsqrt(m2 / 40 + 1e-5)
    y = T.bn_apply(x, mean, inv, w, b, r, True)
    torch.library.opcheck(T.bn_backward_reduce.default, (dy, y, x, mean, inv, True))
    for rg in (True, False):
        torch.library.opcheck(T.bn_backward_apply.default, (dy, y, x, mean, inv, w, mean, inv, True, rg))
    g = rnd((2, 6, 5, 3), torch.float32, 4, layout=layout)
    torch.library.opcheck(T.upsample_concat_backward.default, (g, [2, 1, 3], [3, 1, 5], [4, 1, 3], False))
    logits, target = ce_inputs((2, 4, 3, 4, 7, 9), torch.float32, layout)
    loss, lse = T.upsample_cross_entropy(logits, target, 255)
    torch.library.opcheck(T.upsample_cross_entropy_backward.default, (torch.tensor(1.0), logits, target, lse, 255))
    torch.library.opcheck(T.upsample_cross_entropy.default, (logits.requires_grad_(), target, 255))


# ---------------------------------------------------------------------------------------------------------------
# fp64 accuracy against exact sums

def exact_sum(a, axis):
    return np.sum(np.asarray(a, dtype=np.longdouble), axis=axis)


def axis_weights(n_in, n_out):
    """(n_out, n_in) bilinear weights of one axis (align_corners=False), as ATen computes them in float64."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    w = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T
    return np.asarray(w.numpy(), dtype=np.longdouble)


def rel_err(got, exact, scale):
    return float(np.max(np.abs(np.asarray(got.double(), dtype=np.longdouble) - exact) / scale))


def test_fp64_accuracy(H):
    """Each op's float64 result vs an exact reference (numpy longdouble: 64-bit mantissa, 2^11 x double's), for the
    host-run CUDA op, the CPU twin and ATen. All are summation-order errors of a few 1e-16 relative to the sum of
    |terms| (none rounds through float, which would show as ~1e-8); the bound is 1e-14."""
    T = torch.ops.segfp16
    errs = {}
    x = rnd((4, 8, 30, 30), torch.float64, 0, mean=3.0, layout="cl")
    dy = rnd((4, 8, 30, 30), torch.float64, 1, layout="cl")
    xl = np.asarray(x.permute(1, 0, 2, 3).reshape(8, -1).numpy(), dtype=np.longdouble)
    n = xl.shape[1]
    mean_x = exact_sum(xl, 1) / n
    dev = xl - mean_x[:, None]
    m2_x = exact_sum(dev * dev, 1)
    for name, L in (("cuda", H), ("twin", T)):
        mean, m2 = L.bn_stats(x)
        errs[f"bn mean {name}"] = rel_err(mean, mean_x, exact_sum(np.abs(xl), 1) / n)
        errs[f"bn M2 {name}"] = rel_err(m2, m2_x, m2_x)
    errs["bn mean aten"] = rel_err(x.mean((0, 2, 3)), mean_x, exact_sum(np.abs(xl), 1) / n)
    errs["bn M2 aten"] = rel_err(((x - x.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3)), m2_x, m2_x)
    mean, m2 = T.bn_stats(x)
    inv = torch.rsqrt(m2 / n + 1e-5)
    y = T.bn_apply(x, mean, inv, torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), None, True)
    dz = np.asarray(dy.permute(1, 0, 2, 3).reshape(8, -1).numpy(), dtype=np.longdouble)
    dz = dz * (np.asarray(y.permute(1, 0, 2, 3).reshape(8, -1).numpy()) > 0)
    xhat = (xl - np.asarray(mean.numpy(), dtype=np.longdouble)[:, None]) * np.asarray(inv.numpy(), dtype=np.longdouble)[:, None]
    for name, L in (("cuda", H), ("twin", T)):
        s0, s1 = L.bn_backward_reduce(dy, y, x, mean, inv, True)
        errs[f"bn sum_dz {name}"] = rel_err(s0, exact_sum(dz, 1), exact_sum(np.abs(dz), 1))
        errs[f"bn sum_dz_xhat {name}"] = rel_err(s1, exact_sum(dz * xhat, 1), exact_sum(np.abs(dz * xhat), 1))
    # the loss: lse and the mean over pixels, against a longdouble evaluation of the same interpolated logits
    logits, target = ce_inputs((2, 19, 6, 7, 45, 53), torch.float64, "cl", ignore_frac=0.1)
    up = F.interpolate(logits, size=(45, 53), mode="bilinear", align_corners=False)  # exact-enough weights (fp64)
    zl = np.asarray(up.permute(0, 2, 3, 1).numpy(), dtype=np.longdouble)
    m = zl.max(-1, keepdims=True)
    lse_x = (m[..., 0] + np.log(exact_sum(np.exp(zl - m), -1)))
    t = target.numpy()
    valid = t != 255
    pick = np.take_along_axis(zl, np.where(valid, t, 0)[..., None], -1)[..., 0]
    loss_x = exact_sum(np.where(valid, lse_x - pick, 0).reshape(-1), 0) / valid.sum()
    for name, L in (("cuda", H), ("twin", T)):
        loss, lse = L.upsample_cross_entropy(logits, target, 255)
        errs[f"ce loss {name}"] = rel_err(loss, loss_x, abs(loss_x))
        errs[f"ce lse {name}"] = rel_err(lse[torch.from_numpy(valid)], lse_x[valid], np.abs(lse_x[valid]))
    errs["ce loss aten"] = rel_err(F.cross_entropy(up, target, ignore_index=255), loss_x, abs(loss_x))
    # the two gathers (concat backward, loss backward): grad = Wy^T G Wx with the bilinear weight matrices
    Wy, Wx = axis_weights(6, 45), axis_weights(7, 53)
    p = np.exp(zl - lse_x[..., None]) - (np.arange(19) == np.where(valid, t, -1)[..., None])
    p = np.where(valid[..., None], p, 0) / valid.sum()  # d loss / d z, (N, H, W, K)
    grad_x = np.einsum("oi,nopk,pj->nkij", Wy, p, Wx)
    grad_s = np.einsum("oi,nopk,pj->nkij", Wy, np.abs(p), Wx)
    xr = logits.detach().clone().requires_grad_()
    F.cross_entropy(F.interpolate(xr, size=(45, 53), mode="bilinear", align_corners=False), target,
                    ignore_index=255).backward()
    errs["ce grad aten"] = rel_err(xr.grad, grad_x, grad_s)
    for name, L in (("cuda", H), ("twin", T)):
        _, lse = L.upsample_cross_entropy(logits, target, 255)
        grad = L.upsample_cross_entropy_backward(torch.tensor(1.0, dtype=torch.float64), logits, target, lse, 255)
        errs[f"ce grad {name}"] = rel_err(grad, grad_x, grad_s)
    g = rnd((2, 3, 45, 53), torch.float64, 7)
    gl = np.asarray(g.numpy(), dtype=np.longdouble)
    cg_x = np.einsum("oi,ncop,pj->ncij", Wy, gl, Wx)
    cg_s = np.einsum("oi,ncop,pj->ncij", Wy, np.abs(gl), Wx)
    xr = torch.zeros(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    F.interpolate(xr, size=(45, 53), mode="bilinear", align_corners=False).backward(g)
    errs["concat grad aten"] = rel_err(xr.grad, cg_x, cg_s)
    for name, L in (("cuda", H), ("twin", T)):
        errs[f"concat grad {name}"] = rel_err(L.upsample_concat_backward(g, [3], [6], [7], False)[0], cg_x, cg_s)
    print("fp64 relative errors vs exact: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if v > 1e-14}
    assert not bad, bad


# ---------------------------------------------------------------------------------------------------------------
# the GPU-like flavour: FMA contraction, __expf / __logf, flush-to-zero (what nvcc --use_fast_math did)

@pytest.mark.slow
def test_fast_math_flavour_within_tolerance(H):
    """The same kernels built in the fast flavour stay within the tolerances above against the fp64 ATen
    reference (the ieee flavour is bitwise equal to the twins on elementwise ops; the fast one needn't be)."""
    Fm = cuda_host_build.load("fast")
    for dtype in DTYPES:
        for shape, layout in (((2, 16, 20, 20), "cl"), ((2, 3, 9, 9), "contig")):
            x, r, dy, w, b = bn_inputs(shape, layout, dtype)
            y, mean, var = Fm.bn_relu_train(x, w, b, r, 1e-5, True)
            xd = x.double()
            ref = F.relu(F.batch_norm(xd, None, None, w.double(), b.double(), True, 0.0, 1e-5) + r.double())
            torch.testing.assert_close(y.double(), ref, atol=8 * EPS_OUT[dtype] * ref.abs().max().item() + 1e-12,
                                       rtol=0)
        for case in CE_CASES:
            logits, target = ce_inputs(case, dtype, "cl")
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            loss, lse = Fm.upsample_cross_entropy(logits, target, 255)
            want, want_grad = ce_reference(logits, target, 255)
            # __expf / __logf: ~2^-21 relative per call; the loss is a mean of lse - z, so ~1e-6 absolute at 150
            # classes (the stated fp32 tolerance of the CUDA tests is 1e-4)
            assert abs(loss.double() - want).item() <= (1e-5 if acc == torch.float32 else 1e-13) * max(1.0, abs(want))
            grad = Fm.upsample_cross_entropy_backward(torch.tensor(1.0, dtype=acc), logits, target, lse, 255)
            torch.testing.assert_close(grad.double(), want_grad, atol=4 * EPS_OUT[dtype] * want_grad.abs().max().item()
                                       + (1e-7 if acc == torch.float32 else 1e-15), rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the sanitizer flavours, the host's memcheck (asan: AddressSanitizer + UBSan) and racecheck (tsan: ThreadSanitizer).
# A read past a tensor or past the launch's shared memory whose value the result never uses, a misaligned pack, or two
# threads touching one shared word without a barrier between them but with the same outcome, pass every comparison
# above; under these builds the first such access ends the process with its report.

def run_sanitized(flavour, args, timeout):
    env = cuda_host_build.sanitizer_env(flavour)
    if env is None:
        pytest.skip(f"GCC's {flavour} runtime (lib{flavour}.so) is not installed")
    return subprocess.run([sys.executable, *args], env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("where,report", [
    ("global", "AddressSanitizer: heap-buffer-overflow"),
    ("shared", "AddressSanitizer: use-after-poison"),  # the arena past the launch's bytes is poisoned
    ("shared_write", "AddressSanitizer: use-after-poison"),
    ("static_shared", "index 32 out of bounds for type 'float [32]'"),
    ("misaligned", "misaligned address"),
])
def test_sanitizer_asan_reports(where, report):
    """The memcheck can fail: each memory error of the test kernel (csrc/cuda_host/library.cpp) ends the process
    with its report."""
    code = f"import torch, cuda_host_build; cuda_host_build.load('asan').test_out_of_bounds(torch.randn(8), {where!r})"
    r = run_sanitized("asan", ["-c", code], 900)
    assert r.returncode != 0 and report in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_sanitizer_tsan_reports_a_missing_barrier():
    """The racecheck can fail: the block tree-sum is clean with its barriers and a data race without them."""
    code = ("import torch, cuda_host_build; H = cuda_host_build.load('tsan'); x = torch.arange(256.0)\n"
            "print('with barriers:', H.test_block_sum(x, True).item(), flush=True)\n"
            "H.test_block_sum(x, False)")
    r = run_sanitized("tsan", ["-c", code], 900)
    assert "with barriers: 32640.0" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.returncode != 0 and "ThreadSanitizer: data race" in r.stderr and "block_sum_kernel" in r.stderr, \
        r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["asan", "tsan"])
def test_kernels_clean_under_sanitizer(flavour):
    """Every test of this file but the slow ones, on the kernels built with the sanitizer: no report. Under tsan, not
    the two runner tests that launch a barrier-less block sum on purpose. (-s: a report goes to stderr, not into
    pytest's capture, which dies with the process.)"""
    deselect = ["-k", "not missing_barrier and not divergent_barrier"] if flavour == "tsan" else []
    r = run_sanitized(flavour, ["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "not slow", *deselect,
                                __file__], 1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and " passed" in out, out[-4000:]
