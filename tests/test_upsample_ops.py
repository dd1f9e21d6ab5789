"""segfp16 upsample family (csrc/upsample.{cpp,cu}, common/ops.py) against the ATen compositions it replaces.

Uses the built extension common._C; when that is not built (a dev checkout), JIT-builds ops.cpp + upsample.cpp
into a temp dir (~2 min the first time). If neither works the module errors: these tests never skip on CPU.
"""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import common
import jit_build
from common import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_ops():
    if common.extension_loaded() or hasattr(torch.ops.segfp16, "upsample_concat"):
        ops.require("upsample_concat", "upsample_concat_backward", "upsample_cross_entropy",
                    "upsample_cross_entropy_backward")
        ops.register_upsample()
        return
    build = os.path.join(tempfile.gettempdir(), "segfp16_dev_up_test")
    jit_build.load(build, name="segfp16_dev_up",
                   sources=[os.path.join(ROOT, "csrc", f) for f in ("ops.cpp", "build_info.cpp", "upsample.cpp")],
                   extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
    ops.register_upsample()


_load_ops()

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5),
       torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CL = torch.channels_last


def ref_concat(inputs, size, align_corners=False):
    """The ATen composition, in fp32 for half inputs (our kernels compute in fp32 and round once)."""
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners)  # noqa: E731
    return torch.cat([up(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t) for t in inputs], 1)


def ref_ce(logits, target, ignore_index=255):
    up = F.interpolate(logits.float() if logits.dtype != torch.float64 else logits, size=target.shape[-2:],
                       mode="bilinear", align_corners=False)
    return F.cross_entropy(up, target, ignore_index=ignore_index)


# (list of (C, h, w) sources, output size): odd sizes, non-integer scales, 1x1 sources (PPM / ASPP image pool),
# output smaller than the input, an input already at size (copied), a single input
CONCAT_CASES = [
    ([(4, 9, 9), (3, 1, 1), (2, 2, 2), (2, 3, 3), (3, 6, 6)], (9, 9)),  # PPM at a tiny feature size
    ([(5, 7, 7), (3, 7, 7), (2, 1, 1)], (7, 7)),                        # ASPP: same-size branches + image pool
    ([(3, 5, 7), (2, 13, 11)], (13, 11)),                               # decoder-like x2.6 / x1.6 + a copy
    ([(3, 17, 19), (2, 4, 5)], (6, 7)),                                 # downsampling and odd ratios
    ([(1, 2, 3)], (1, 1)),                                              # single input to 1x1
    ([(2, 3, 4), (6, 1, 2)], (20, 3)),                                  # mixed up/down per axis
]


def make_inputs(specs, n, dtype, layout, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, h, w in specs:
        t = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
        if layout == "cl":
            t = t.contiguous(memory_format=CL)
        elif layout == "strided":  # a non-contiguous view: every other column of a wider tensor
            t = torch.randn(n, c, h, 2 * w, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
        out.append(t.requires_grad_(requires_grad))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl", "strided"])
@pytest.mark.parametrize("case", range(len(CONCAT_CASES)))
def test_concat_matches_aten(case, layout, dtype):
    specs, size = CONCAT_CASES[case]
    n = 1 if case % 2 else 2
    xs = make_inputs(specs, n, dtype, layout, requires_grad=True)
    ref_xs = [x.detach().clone().requires_grad_() for x in xs]
    out = ops.upsample_concat(xs, size)
    ref = ref_concat(ref_xs, size)
    assert out.dtype == dtype and out.shape == ref.shape
    if layout == "cl" and not xs[0].is_contiguous():
        assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out.to(ref.dtype), ref, **TOL[dtype])
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(g)
    ref.backward(g.to(ref.dtype))
    for x, rx in zip(xs, ref_xs):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        tol = TOL[dtype] if dtype in (torch.float64, torch.float32) else dict(atol=4 * TOL[dtype]["atol"] * max(1, out.shape[-1] * out.shape[-2] / x.shape[-1] / x.shape[-2]) ** 0.5, rtol=TOL[dtype]["rtol"])
        torch.testing.assert_close(x.grad.to(rx.grad.dtype), rx.grad, **tol)


def test_concat_random_sizes_float64():
    # many (in, out) pairs per axis, up and down, both align_corners: checks the analytic footprint ranges (up_range)
    g = torch.Generator().manual_seed(3)
    for k in range(40):
        h, w, H, W = (int(v) for v in torch.randint(1, 24, (4,), generator=g))
        ac = bool(k % 2)
        x = torch.randn(1, 2, h, w, dtype=torch.float64, generator=g, requires_grad=True)
        rx = x.detach().clone().requires_grad_()
        out = ops.upsample_concat([x], (H, W), align_corners=ac)
        ref = F.interpolate(rx, size=(H, W), mode="bilinear", align_corners=ac)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
        gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
        out.backward(gy)
        ref.backward(gy)
        torch.testing.assert_close(x.grad, rx.grad, **TOL[torch.float64], msg=lambda m: f"{(h, w, H, W, ac)}: {m}")


@pytest.mark.parametrize("align_corners", [True, False])
def test_concat_align_corners_and_promotion(align_corners):
    xs = [torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 2, 1, 1, dtype=torch.float64),
          torch.randn(2, 2, 3, 7, dtype=torch.float32)]
    out = ops.upsample_concat(xs, (11, 6), align_corners=align_corners)
    assert out.dtype == torch.float64  # promoted like torch.cat under autocast
    torch.testing.assert_close(out, ref_concat([x.double() for x in xs], (11, 6), align_corners), **TOL[torch.float64])


def test_concat_promotes_to_the_widest_input_wherever_it_is():
    """The wrapper promotes like torch.cat whichever input is widest (the test above has it first): a bf16
    map then an fp32 one give fp32, the fp32 one not rounded to bf16."""
    xs = [torch.randn(2, 3, 5, 4).to(torch.bfloat16), torch.randn(2, 2, 3, 7) * 1000 + 0.1]
    out = ops.upsample_concat(xs, (11, 6))
    assert out.dtype == torch.float32
    # values ~1000: bf16 would round them by up to 4; fp32 interpolation is good to ~1e-4 there
    torch.testing.assert_close(out, ref_concat([x.float() for x in xs], (11, 6)), rtol=1e-5, atol=1e-2)


def test_concat_errors():
    with pytest.raises(RuntimeError, match="batch"):
        ops.upsample_concat([torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)], (8, 8))
    with pytest.raises(RuntimeError, match="4-D"):
        ops.upsample_concat([torch.randn(2, 3, 4)], (8, 8))


CE_CASES = [  # (N, K, h, w, H, W)
    (2, 5, 4, 4, 32, 32),    # x8, the real ratio
    (1, 3, 5, 7, 19, 23),    # odd sizes, non-integer scales, batch 1
    (2, 4, 9, 6, 5, 4),      # target smaller than the logits
    (2, 6, 1, 1, 3, 5),      # 1x1 logits
    (1, 150, 3, 3, 12, 10),  # 150 classes
]


def make_ce(case, dtype, layout, ignore_frac=0.2, seed=0, ignore_index=255):
    n, k, h, w, H, W = case
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, k, h, w, generator=g, dtype=torch.float64)).to(dtype)
    if layout == "cl":
        logits = logits.contiguous(memory_format=CL)
    elif layout == "strided":
        logits = logits.transpose(2, 3).contiguous().transpose(2, 3)
    target = torch.randint(0, k, (n, H, W), generator=g)
    target[torch.rand(n, H, W, generator=g) < ignore_frac] = ignore_index
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl", "strided"])
@pytest.mark.parametrize("case", CE_CASES)
def test_ce_matches_aten(case, layout, dtype):
    logits, target = make_ce(case, dtype, layout)
    x = logits.detach().clone().requires_grad_()
    rx = logits.detach().clone().requires_grad_()
    loss = ops.upsample_cross_entropy(x, target)
    ref = ref_ce(rx, target)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, ref.to(loss.dtype), **(TOL[dtype] if dtype == torch.float64 else TOL[torch.float32]))
    loss.backward()
    ref.backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    scale = ref.new_tensor(rx.grad.abs().max().item())
    tol = TOL[dtype] if dtype in (torch.float64, torch.float32) else dict(atol=TOL[dtype]["atol"] * scale.item(), rtol=TOL[dtype]["rtol"])
    torch.testing.assert_close(x.grad.to(rx.grad.dtype), rx.grad, **tol)


def test_ce_all_ignored_is_zero_with_zero_grad():
    logits, target = make_ce(CE_CASES[0], torch.float32, "contig", ignore_frac=1.0)
    assert (target == 255).all()
    x = logits.requires_grad_()
    loss = ops.upsample_cross_entropy(x, target)
    assert loss.item() == 0.0  # ATen's mean gives NaN here; we give 0 (documented in common/ops.py)
    loss.backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_ce_other_ignore_index_and_target_dtype():
    logits, target = make_ce(CE_CASES[1], torch.float64, "contig", ignore_index=-100)
    loss = ops.upsample_cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(loss, ref_ce(logits, target, -100), **TOL[torch.float64])
    # an in-range ignore_index drops that class, as in F.cross_entropy; a uint8 target is widened by the wrapper
    logits, target = make_ce(CE_CASES[0], torch.float64, "contig", ignore_frac=0.0)
    loss = ops.upsample_cross_entropy(logits, target.to(torch.uint8), ignore_index=0)
    torch.testing.assert_close(loss, ref_ce(logits, target, 0), **TOL[torch.float64])


def test_ce_target_out_of_range_raises():
    logits, target = make_ce(CE_CASES[0], torch.float32, "contig")
    target[0, 0, 0] = 7
    with pytest.raises(RuntimeError, match="out of range"):
        ops.upsample_cross_entropy(logits, target)


def test_ce_large_logits():
    """Logits of a few hundred (a diverging fp32 run): the log-sum-exp must shift by the max, or exp overflows."""
    logits, target = make_ce(CE_CASES[1], torch.float32, "cl")
    x = (logits * 40).requires_grad_()
    rx = x.detach().clone().requires_grad_()
    loss, ref = ops.upsample_cross_entropy(x, target), ref_ce(rx, target)
    assert ref.isfinite() and x.detach().abs().max() > 200  # exp(89) overflows float
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, rx.grad, **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_concat_more_than_64_channels(layout):
    """channels_last's backward (a channels_last grad_output) works in blocks of 64 channels (gather_from): 130
    channels span three blocks, the last one partial, behind a first input (a channel offset). The pyramid's bins
    have 512; the other tests have at most 8 channels."""
    xs = make_inputs([(3, 4, 4), (130, 3, 3)], 2, torch.float32, layout, requires_grad=True)
    rxs = [x.detach().clone().requires_grad_() for x in xs]
    out, ref = ops.upsample_concat(xs, (7, 6)), ref_concat(rxs, (7, 6))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    g = g.contiguous(memory_format=CL) if layout == "cl" else g  # the layout picks the backward's loop, not out's
    out.backward(g)
    ref.backward(g)
    for x, rx in zip(xs, rxs):
        torch.testing.assert_close(x.grad, rx.grad, **TOL[torch.float32])


def test_ops_check_their_arguments():
    """The ops' own checks, behind the Python wrappers (which widen the target and promote dtypes): what the
    kernels would otherwise misread."""
    T = torch.ops.segfp16
    logits, target = make_ce(CE_CASES[1], torch.float32, "contig")
    with pytest.raises(RuntimeError, match="target must be int64"):
        T.upsample_cross_entropy(logits, target.int(), 255)
    with pytest.raises(RuntimeError, match="target must be"):
        T.upsample_cross_entropy(logits, torch.cat([target, target]), 255)
    with pytest.raises(RuntimeError, match="Python wrapper promotes"):
        T.upsample_concat([torch.randn(1, 2, 3, 3), torch.randn(1, 2, 2, 2, dtype=torch.float64)], [5, 5], False)


def test_gradcheck_float64():
    xs = [t.requires_grad_() for t in make_inputs([(2, 3, 4), (1, 1, 1), (2, 5, 3)], 2, torch.float64, "contig")]
    assert torch.autograd.gradcheck(lambda *a: ops.upsample_concat(list(a), (5, 3)), xs)
    xs_cl = [t.detach().contiguous(memory_format=CL).requires_grad_() for t in xs]
    assert torch.autograd.gradcheck(lambda *a: ops.upsample_concat(list(a), (7, 4), True), xs_cl)
    logits, target = make_ce((2, 4, 3, 4, 7, 9), torch.float64, "contig")
    assert torch.autograd.gradcheck(lambda x: ops.upsample_cross_entropy(x, target), (logits.requires_grad_(),))


def test_backward_returns_one_gradient_per_argument_passed():
    # The dispatcher drops a trailing argument equal to its schema default (align_corners=False, ignore_index=255)
    # before autograd sees the call, so each op arrives with 2 or 3 arguments. torch 2.11 rejects a backward that
    # returns a gradient for the dropped one (torch 2.14 trims it, so the count is checked directly below as well).
    xs = [t.requires_grad_() for t in make_inputs([(2, 3, 4), (1, 1, 1)], 2, torch.float64, "contig")]
    concat = torch.ops.segfp16.upsample_concat
    for call in (lambda *a: concat(list(a), [5, 3]), lambda *a: concat(list(a), [5, 3], False),
                 lambda *a: concat(list(a), [5, 3], True)):
        assert torch.autograd.gradcheck(call, xs)
    logits, target = make_ce((2, 4, 3, 4, 7, 9), torch.float64, "contig")
    ce = torch.ops.segfp16.upsample_cross_entropy
    other = target.clamp(max=3)  # labels 0..3, and 1 is the ignored one
    for call in (lambda x: ce(x, target)[0], lambda x: ce(x, target, 255)[0], lambda x: ce(x, other, 1)[0]):
        assert torch.autograd.gradcheck(call, (logits.requires_grad_(),))

    class Ctx:  # what autograd hands the backward: one needs_input_grad entry per argument passed
        shapes, align_corners, ignore_index = ([2, 1], [3, 1], [4, 1]), False, 255
        saved_tensors = (logits, target, torch.zeros(2, 7, 9, dtype=torch.float64))

    for passed in (2, 3):
        Ctx.needs_input_grad = (True,) + (False,) * (passed - 1)
        assert len(ops._uc_backward(Ctx, torch.randn(2, 3, 5, 3, dtype=torch.float64))) == passed
        assert len(ops._ce_backward(Ctx, torch.tensor(1.0, dtype=torch.float64), None)) == passed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(dtype):
    # half: what autocast hands the ops (half outputs and gradients; the loss and lse in fp32)
    for layout in ("contig", "cl"):
        for rg in (False, True):
            xs = make_inputs([(2, 3, 4), (1, 1, 1), (3, 5, 3)], 2, dtype, layout, requires_grad=rg)
            torch.library.opcheck(torch.ops.segfp16.upsample_concat.default, (xs, [5, 3], False))
            logits, target = make_ce((2, 4, 3, 4, 7, 9), dtype, layout)
            torch.library.opcheck(torch.ops.segfp16.upsample_cross_entropy.default,
                                  (logits.requires_grad_(rg), target, 255))
    g = torch.randn(2, 6, 5, 3).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.segfp16.upsample_concat_backward.default, (g, [2, 1, 3], [3, 1, 5], [4, 1, 3], False))


def _bits(t):
    """The raw bits of t (equal bits, not merely equal values)."""
    t = t.detach().contiguous().view(-1)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def test_deterministic_across_runs_and_thread_counts():
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (threads, 1, threads):
            torch.set_num_threads(nt)
            xs = make_inputs([(8, 5, 5), (8, 1, 1), (8, 3, 3)], 2, torch.float16, "cl", requires_grad=True)
            out = ops.upsample_concat(xs, (17, 17))
            out.backward(torch.ones_like(out))
            logits, target = make_ce((2, 7, 5, 6, 37, 41), torch.float32, "cl")
            logits.requires_grad_()
            loss = ops.upsample_cross_entropy(logits, target)
            loss.backward()
            results.append([_bits(out)] + [_bits(x.grad) for x in xs] + [_bits(loss), _bits(logits.grad)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_under_cpu_autocast():
    # the written decision (common/ops.py): no autocast rule; half inputs run as they come, the loss is fp32
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 5, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        loss = ops.upsample_cross_entropy(logits, target)
        cat = ops.upsample_concat([logits, x], (8, 8))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert cat.dtype == torch.float32  # bf16 + fp32 promoted, as torch.cat does
    torch.testing.assert_close(loss, ref_ce(logits.detach(), target), **TOL[torch.float32])
    (loss + cat.sum()).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_layers_fused_branches_call_the_ops():
    from common import layers
    xs = make_inputs([(4, 6, 6), (3, 1, 1), (2, 2, 2)], 2, torch.float32, "cl")
    logits, target = make_ce(CE_CASES[0], torch.float32, "cl")
    old = layers.KERNELS
    try:
        layers.set_kernels("torch")
        want = (layers.upsample_concat(xs, (6, 6)), layers.seg_cross_entropy(logits, target))
        layers.set_kernels("fused")
        got = (layers.upsample_concat(xs, (6, 6)), layers.seg_cross_entropy(logits, target))
    finally:
        layers.KERNELS = old
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


# ---- CUDA twins (tools/device_check.sh runs `pytest -m cuda`): the CUDA kernels against ATen on the same GPU

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_cuda_concat_matches_aten(layout, dtype):
    for specs, size in CONCAT_CASES:
        xs = [x.cuda().requires_grad_() for x in make_inputs(specs, 2, dtype, layout)]
        ref_xs = [x.detach().clone().requires_grad_() for x in xs]
        out = ops.upsample_concat(xs, size)
        ref = ref_concat(ref_xs, size)
        torch.testing.assert_close(out.to(ref.dtype), ref, **TOL[dtype])
        g = torch.randn(ref.shape, device="cuda", dtype=torch.float64).to(dtype)
        out.backward(g)
        ref.backward(g.to(ref.dtype))
        for x, rx in zip(xs, ref_xs):
            tol = TOL[dtype] if dtype in (torch.float64, torch.float32) else dict(atol=0.05 * max(1.0, rx.grad.abs().max().item()), rtol=TOL[dtype]["rtol"])
            torch.testing.assert_close(x.grad.to(rx.grad.dtype), rx.grad, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_cuda_ce_matches_aten(layout, dtype):
    for case in CE_CASES:
        logits, target = make_ce(case, dtype, layout)
        x = logits.cuda().requires_grad_()
        rx = logits.cuda().requires_grad_()
        loss = ops.upsample_cross_entropy(x, target.cuda())
        ref = ref_ce(rx, target.cuda())
        torch.testing.assert_close(loss, ref.to(loss.dtype), **(TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)))
        loss.backward()
        ref.backward()
        scale = rx.grad.abs().max().item()
        tol = TOL[dtype] if dtype == torch.float64 else dict(atol=max(TOL[dtype]["atol"], 1e-4) * scale, rtol=TOL[dtype]["rtol"])
        torch.testing.assert_close(x.grad.to(rx.grad.dtype), rx.grad, **tol)
    logits, target = make_ce(CE_CASES[0], dtype, layout, ignore_frac=1.0)
    x = logits.cuda().requires_grad_()
    loss = ops.upsample_cross_entropy(x, target.cuda())
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.cuda
def test_cuda_deterministic_opcheck_and_memory():
    runs = []
    for _ in range(2):
        xs = [x.cuda().requires_grad_() for x in make_inputs([(16, 9, 9), (16, 1, 1), (16, 2, 2), (16, 6, 6)], 2, torch.float16, "cl")]
        out = ops.upsample_concat(xs, (33, 33))
        out.backward(torch.ones_like(out))
        logits, target = make_ce((2, 19, 9, 9, 72, 72), torch.float16, "cl")
        logits = logits.cuda().requires_grad_()
        loss = ops.upsample_cross_entropy(logits, target.cuda())
        loss.backward()
        runs.append([_bits(out)] + [_bits(x.grad) for x in xs] + [_bits(loss), _bits(logits.grad)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    xs = [x.cuda() for x in make_inputs([(2, 3, 4), (1, 1, 1), (3, 5, 3)], 2, torch.float32, "cl", requires_grad=True)]
    torch.library.opcheck(torch.ops.segfp16.upsample_concat.default, (xs, [5, 3], False))
    logits, target = make_ce((2, 4, 3, 4, 7, 9), torch.float32, "cl")
    torch.library.opcheck(torch.ops.segfp16.upsample_cross_entropy.default, (logits.cuda().requires_grad_(), target.cuda(), 255))
    # the memory claim: fwd+bwd peak of the fused loss well under the composition's at a real-ish shape
    logits = torch.randn(2, 150, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    target = torch.randint(0, 150, (2, 512, 512), device="cuda")
    peaks = []
    for fn in (lambda: ops.upsample_cross_entropy(logits, target), lambda: ref_ce(logits, target)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        logits.grad = None
    assert peaks[0] * 5 < peaks[1], peaks


def test_the_torch_composition_honours_another_ignore_index():
    """--kernels torch's loss (layers.seg_cross_entropy's ATen branch) drops the ignore_index it is given, not 255."""
    from common import layers
    logits, target = make_ce(CE_CASES[1], torch.float64, "contig", ignore_index=3)
    old = layers.KERNELS
    try:
        layers.set_kernels("torch")
        loss = layers.seg_cross_entropy(logits, target, ignore_index=3)
    finally:
        layers.KERNELS = old
    torch.testing.assert_close(loss, ref_ce(logits, target, 3), **TOL[torch.float64])


def test_opcheck_ce_backward():
    """The CE backward op's fake kernel (test_opcheck checks upsample_concat_backward only): the gradient
    has the logits' dtype and layout, channels_last included."""
    for layout in ("contig", "cl"):
        for dtype in (torch.float32, torch.bfloat16):
            logits, target = make_ce((2, 4, 3, 4, 7, 9), dtype, layout)
            _, lse = torch.ops.segfp16.upsample_cross_entropy(logits, target, 255)
            torch.library.opcheck(torch.ops.segfp16.upsample_cross_entropy_backward.default,
                                  (torch.tensor(1.0), logits, target, lse, 255))


def test_fake_layout_of_an_ambiguous_first_input_is_the_kernels():
    """a (B, C, 1, 1) or (B, 1, H, W) map is both contiguous and channels_last; the kernels (csrc/upsample.h
    layout_of) write NCHW outputs from it, and the fake kernels must say the same (test_opcheck's first inputs are
    unambiguous)."""
    for t0 in (torch.randn(2, 3, 1, 1), torch.randn(2, 1, 4, 5)):
        assert ops.layout_of(t0) == torch.contiguous_format
        xs = [t0, torch.randn(2, 2, 3, 3)]
        assert ops.upsample_concat(xs, (5, 3)).is_contiguous()
        torch.library.opcheck(torch.ops.segfp16.upsample_concat.default, (xs, [5, 3], False))


def test_require_names_the_missing_ops_and_the_build_command():
    """ops.require is the one clear error for a missing or stale common._C (test_cli fakes it)."""
    import common
    ops.require("upsample_concat", "bn_stats")  # all present: no error
    with pytest.raises(RuntimeError, match=r"lacks \['no_such_op'\]") as e:
        ops.require("upsample_concat", "no_such_op")
    assert common.BUILD_COMMAND in str(e.value) and "--kernels torch" in str(e.value)
