"""DeepBench-style kernel table: our fused ops against the ATen compositions they replace, on the real shapes of
R50-D8 at 512x512, plus the convolution table. Every ratio is measured side by side in the same run.

    python bench/kernels.py                   # all sections, on CUDA if present, else CPU
    python bench/kernels.py --quick           # tiny shapes: proves the script runs (CI)
    python bench/kernels.py --only bn_relu    # one section: bn_relu | bn_relu_demo | upsample | conv
    python bench/kernels.py --out DIR         # also write DIR/kernels.md and DIR/kernels.json
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # bench/train.py as `train`, also when imported by a test

SECTIONS = {}  # name -> fn(args, device) returning (markdown table str, list of row dicts)
# every row or section that raised, as one line each: its traceback is printed where it happened, the run goes on
# (a failing shape must not cost the rest of the table) and main() exits non-zero at the end
FAILED = []


def failed(what, e):
    """Log the exception being handled (traceback), remember it, return the one line the table shows."""
    from train import error_line  # bench/train.py
    msg = error_line(e, 120)
    FAILED.append(f"{what}: {msg}")
    return f"error: {msg}"

# ---- section: bn_relu (Kernels I)
# common.ops.bn_relu (fused BN [+ residual] + ReLU) against F.batch_norm [+ add] + F.relu, training mode with the
# running-stat update, forward and forward+backward (torch.autograd.grad of x, weight, bias [, residual]),
# interleaved A/B repetitions, median. CUDA: CUDA events around `inner` calls (no L2 flush: in fp16 most batch-16
# tensors are 25-268 MB against a 50 MB L2; the PPM bins' and most batch-2 rows are partly or wholly L2-resident).
# CPU: perf_counter, all torch threads.
# GB/s = the bytes the op must move / time: fwd reads x (+ residual) and writes y; bwd reads dy, y, x and writes dx
# (+ d residual); the statistics passes' extra reads are not counted.
# Shapes: the distinct BN tensors of R50-D8 (v1c stem, OS 8) + PSP / ASPP / aux heads + the DeepLabV3+ decoder at
# 512x512, as (C, H, W, residual?), per-GPU batch 16 and 2 on CUDA (fp16, channels_last). CPU: fp32 NCHW at batch 2,
# a subset (BN_CPU_SHAPES: the full list at batch 2 is minutes per row pair on 2 cores). --quick: tiny shapes.
BN_SHAPES = [  # (C, H, W, residual): where in the network
    (32, 256, 256, False), (64, 256, 256, False),  # stem (three 3x3 convs at 1/2)
    (64, 128, 128, False), (256, 128, 128, True), (256, 128, 128, False),  # layer1 (bn1/bn2, bn3 + add, downsample)
    (128, 128, 128, False), (128, 64, 64, False), (512, 64, 64, True),  # layer2 (first bn1 at 1/4)
    (256, 64, 64, False), (1024, 64, 64, True),  # layer3 (dilation 2)
    (512, 64, 64, False), (2048, 64, 64, True),  # layer4 (dilation 4), also the heads' 512-channel convs
    (512, 1, 1, False), (512, 2, 2, False), (512, 3, 3, False), (512, 6, 6, False),  # PPM bins / ASPP image pool
    (48, 128, 128, False), (512, 128, 128, False),  # DeepLabV3+ decoder (shortcut, fuse convs at 1/4)
]
BN_CPU_SHAPES = [(64, 128, 128, False), (256, 64, 64, False), (512, 64, 64, True), (2048, 32, 32, True),
                 (1024, 64, 64, True), (512, 6, 6, False), (512, 1, 1, False)]
BN_QUICK_SHAPES = [(16, 8, 8, False), (24, 4, 4, True), (8, 1, 1, False)]


def _bn_time(fns, device, reps, inner):
    """fns: {name: zero-arg callable}; median seconds per call of each, the names interleaved each repetition."""
    import statistics
    import time

    import torch
    cuda = device.type == "cuda"
    for fn in fns.values():  # warm-up: allocator, OpenMP pool, lazy CUDA init
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_bn_relu(args, device):
    import torch
    cuda = device.type == "cuda"
    dtype, fmt = (torch.float16, torch.channels_last) if cuda else (torch.float32, torch.contiguous_format)
    shapes = BN_QUICK_SHAPES if args.quick else (BN_SHAPES if cuda else BN_CPU_SHAPES)
    batches = [2] if args.quick or not cuda else [16, 2]
    reps, inner = (3, 2) if args.quick else ((10, 3) if cuda else (5, 1))
    return _bn_table(device, [dtype], fmt, shapes, batches, reps, inner, "training; R50-D8's BN shapes at 512x512")


# The demo's shapes (`--data demo`: crop 64, batch 4, so features at 8x8, layer1 at 16x16, the stem at 32x32): the
# maps where the CPU goal of Kernels I ("no slower than 1.5x the ATen composition") is judged, in fp32 (--amp none)
# and bf16 (what --amp torch hands BN on a CPU). (C, H, W, residual): stem, layer1-4, PPM bins, heads, decoder.
BN_DEMO_SHAPES = [(32, 32, 32, False), (64, 32, 32, False), (64, 16, 16, False), (256, 16, 16, True),
                  (128, 16, 16, False), (512, 8, 8, True), (1024, 8, 8, True), (2048, 8, 8, True), (512, 8, 8, False),
                  (512, 1, 1, False), (512, 2, 2, False), (512, 3, 3, False), (512, 6, 6, False),
                  (48, 16, 16, False), (512, 16, 16, False)]


def bench_bn_relu_demo(args, device):
    import torch
    cuda = device.type == "cuda"
    dtypes = [torch.float16] if cuda else [torch.float32, torch.bfloat16]
    fmt = torch.channels_last if cuda else torch.contiguous_format
    shapes = BN_QUICK_SHAPES if args.quick else BN_DEMO_SHAPES
    reps, inner = (3, 2) if args.quick else (7, 20)
    return _bn_table(device, dtypes, fmt, shapes, [4], reps, inner, "training; the demo's shapes (crop 64, batch 4)")


def _bn_table(device, dtypes, fmt, shapes, batches, reps, inner, what):
    import torch
    import torch.nn.functional as F

    from common import ops
    ops.require("bn_stats", "bn_apply", "bn_relu_train", "bn_backward_reduce", "bn_backward_apply")
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)

    def aten(x, w, b, rm, rv, r):
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        return F.relu(y + r if r is not None else y)

    def fused(x, w, b, rm, rv, r):
        return ops.bn_relu(x, w, b, rm, rv, True, 0.1, 1e-5, residual=r)

    rows = []
    for dtype, batch, (C, H, W, res) in ((d, n, s) for d in dtypes for n in batches for s in shapes):
        row = dict(batch=batch, C=C, H=H, W=W, residual=res, dtype=str(dtype)[6:],
                   layout="channels_last" if cuda else "NCHW")
        try:
            row.update(_bn_row(device, batch, C, H, W, res, reps, inner, rand, aten, fused))
        except Exception as e:
            row["error"] = failed(f"bn_relu {row['dtype']} {batch}x{C}x{H}x{W}", e)
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    return _bn_markdown(rows, device, what)


def _bn_row(device, batch, C, H, W, res, reps, inner, rand, aten, fused):
    """The timings of one bn_relu shape (dict of the row's measured columns)."""
    import torch
    x, grad = rand(batch, C, H, W).requires_grad_(), rand(batch, C, H, W)
    r = rand(batch, C, H, W).requires_grad_() if res else None
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    inputs = [x, w, b] + ([r] if res else [])
    fwd, fb = {}, {}
    for name, f in (("aten", aten), ("fused", fused)):
        fwd[name] = lambda f=f: f(x.detach(), w.detach(), b.detach(), rm, rv, None if r is None else r.detach())
        fb[name] = lambda f=f: torch.autograd.grad(f(x, w, b, rm, rv, r), inputs, grad)
    t_fwd = _bn_time(fwd, device, reps, inner)
    t_fb = _bn_time(fb, device, reps, inner)
    n = x.numel() * x.element_size()
    moved = (2 + res) * n + (4 + res) * n
    return dict(aten_fwd_ms=t_fwd["aten"] * 1e3, fused_fwd_ms=t_fwd["fused"] * 1e3,
                aten_fb_ms=t_fb["aten"] * 1e3, fused_fb_ms=t_fb["fused"] * 1e3,
                fused_fb_gbs=moved / t_fb["fused"] / 1e9, aten_fb_gbs=moved / t_fb["aten"] / 1e9)


def _bn_markdown(rows, device, what):
    import torch
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads, loops " + \
        torch.ops.segfp16.bn_cpu_isa()
    lines = [f"### bn_relu family, {what} ({where}; {rows[0]['layout'] if rows else '-'})", "",
             "| dtype | batch | C | HxW | +res | ATen fwd ms | fused fwd ms | fwd speed-up | ATen f+b ms | fused f+b ms | "
             "f+b speed-up | fused f+b GB/s | ATen f+b GB/s |",
             "|---|---:|---:|---|:-:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for q in rows:
        if "error" in q:
            lines.append(f"| {q['dtype']} | {q['batch']} | {q['C']} | {q['H']}x{q['W']} | "
                         f"{'y' if q['residual'] else ''} | {q['error'].replace('|', '/')} |" + " |" * 7)
            continue
        lines.append(f"| {q['dtype']} | {q['batch']} | {q['C']} | {q['H']}x{q['W']} | {'y' if q['residual'] else ''} | "
                     f"{q['aten_fwd_ms']:.3f} | {q['fused_fwd_ms']:.3f} | {q['aten_fwd_ms'] / q['fused_fwd_ms']:.2f}x | "
                     f"{q['aten_fb_ms']:.3f} | {q['fused_fb_ms']:.3f} | {q['aten_fb_ms'] / q['fused_fb_ms']:.2f}x | "
                     f"{q['fused_fb_gbs']:.1f} | {q['aten_fb_gbs']:.1f} |")
    ok = [q for q in rows if "error" not in q]
    if not ok:
        return "\n".join(lines), rows
    worst = max(ok, key=lambda q: q["fused_fb_ms"] / q["aten_fb_ms"])
    lines += ["", f"Slowest row relative to ATen (f+b): {worst['dtype']} {worst['batch']}x{worst['C']}x{worst['H']}x"
                  f"{worst['W']}, fused takes {worst['fused_fb_ms'] / worst['aten_fb_ms']:.2f}x ATen's time."]
    return "\n".join(lines), rows


SECTIONS["bn_relu"] = bench_bn_relu
SECTIONS["bn_relu_demo"] = bench_bn_relu_demo

# ---- section: upsample (Kernels II)
# upsample_concat (PSPNet PPM, DeepLabV3 ASPP) and upsample_cross_entropy (the loss of one head) against the ATen
# compositions, fwd+bwd, interleaved A/B repetitions, median. Peak memory is the most bytes allocated above the
# starting point during one fwd+bwd (inputs excluded, gradients included): CUDA allocator statistics on a GPU; on
# CPU the running sum of the allocation / free events that torch.profiler(profile_memory=True) records.
# Shapes (R50-D8 at 512x512, features at 64x64): PPM = (B, 2048, 64, 64) + 4 x (B, 512, s, s), s in 1, 2, 3, 6;
# ASPP = 4 x (B, 512, 64, 64) + (B, 512, 1, 1); loss = (B, 150, 64, 64) logits vs a (B, 512, 512) target.
# GPU: fp16 channels_last, batch 16 and 2. CPU: fp32, batch 2 only (batch 16 of the ATen loss needs ~10 GB), NCHW
# and channels_last. --quick: tiny shapes (CI).


def _up_peak_cpu(fn):
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    run = peak = 0
    for _, b in events:
        run += b
        peak = max(peak, run)
    return peak


def _up_measure(fns, device, reps):
    """fns: {name: zero-arg fwd+bwd callable}. Returns {name: (median seconds, peak bytes)}, A/B interleaved."""
    import statistics
    import time

    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warm-up (allocator caches, OpenMP pools, lazy init)
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    peaks = {}
    for k, fn in fns.items():
        fn.clear()  # drop the previous gradients first: their free would hide as much new allocation
        if device.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            peaks[k] = torch.cuda.max_memory_allocated() - base
        else:
            peaks[k] = _up_peak_cpu(fn)
    return {k: (statistics.median(times[k]), peaks[k]) for k in fns}


def bench_upsample(args, device):
    import torch
    import torch.nn.functional as F

    from common import ops
    ops.require("upsample_concat", "upsample_concat_backward", "upsample_cross_entropy",
                "upsample_cross_entropy_backward")
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    if args.quick:
        feat, ch, hw, big, classes, batches = 64, 16, 16, 128, 19, [2]
    else:
        feat, ch, hw, big, classes, batches = 2048, 512, 64, 512, 150, [16, 2] if cuda else [2]
    layouts = ["channels_last"] if cuda else ["contiguous", "channels_last"]
    reps = (3 if args.quick else 20) if cuda else (2 if args.quick else 5)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, fmt):
        t = torch.randn(*shape, device=device, dtype=dtype, generator=g)
        return t.contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)

    def aten_concat(xs):
        return torch.cat([t if t.shape[-2:] == (hw, hw) else
                          F.interpolate(t, size=(hw, hw), mode="bilinear", align_corners=False) for t in xs], 1)

    def aten_ce(logits, target):
        up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up.float(), target, ignore_index=255)  # autocast runs CE in fp32

    def step(make, xs, grad=None):
        def clear():
            for x in xs:
                x.grad = None

        def run():
            clear()
            make().backward(grad)
        run.clear = clear
        return run

    rows = []
    for batch in batches:
        for fmt in layouts:
            def concat_case(name):  # the closures below run within this iteration: batch, fmt are this case's
                if name == "ppm":
                    xs = [rand(batch, feat, hw, hw, fmt=fmt)] + [rand(batch, ch, s, s, fmt=fmt) for s in (1, 2, 3, 6)]
                else:  # aspp
                    xs = [rand(batch, ch, hw, hw, fmt=fmt) for _ in range(4)] + [rand(batch, ch, 1, 1, fmt=fmt)]
                xs = [x.requires_grad_() for x in xs]
                grad = rand(batch, sum(x.shape[1] for x in xs), hw, hw, fmt=fmt)
                return _up_measure({"aten": step(lambda: aten_concat(xs), xs, grad),
                                    "fused": step(lambda: ops.upsample_concat(xs, (hw, hw)), xs, grad)}, device, reps)

            def ce_case():
                logits = rand(batch, classes, hw, hw, fmt=fmt).requires_grad_()
                target = torch.randint(0, classes, (batch, big, big), device=device, generator=g)
                target[:, :, : big // 16] = 255  # a band of ignored pixels, as padded crops have
                return _up_measure({"aten": step(lambda: aten_ce(logits, target), [logits]),
                                    "fused": step(lambda: ops.upsample_cross_entropy(logits, target), [logits])},
                                   device, reps)

            cases = [(f"upsample_concat {name}", lambda name=name: concat_case(name)) for name in ("ppm", "aspp")]
            cases.append((f"upsample_cross_entropy {classes}x{hw}^2->{big}^2", ce_case))
            for op, case in cases:  # one failing case is logged and shown; the others still run
                row = dict(op=op, batch=batch, layout=fmt, dtype=str(dtype)[6:])
                try:
                    res = case()
                    row.update(aten_ms=res["aten"][0] * 1e3, fused_ms=res["fused"][0] * 1e3,
                               aten_peak_mb=res["aten"][1] / 2**20, fused_peak_mb=res["fused"][1] / 2**20)
                except Exception as e:
                    row["error"] = failed(f"upsample {op} batch {batch} {fmt}", e)
                rows.append(row)
                if cuda:
                    torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"### upsample family, fwd+bwd ({where}; peak = {'CUDA allocator' if cuda else 'torch.profiler CPU allocations'})",
             "", "| op | batch | layout | dtype | ATen ms | fused ms | speed-up | ATen peak MB | fused peak MB | memory ratio |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['batch']} | {r['layout']} | {r['dtype']} | {r['error'].replace('|', '/')} |"
                         + " |" * 5)
            continue
        lines.append(f"| {r['op']} | {r['batch']} | {r['layout']} | {r['dtype']} | {r['aten_ms']:.2f} | {r['fused_ms']:.2f} | "
                     f"{r['aten_ms'] / r['fused_ms']:.2f}x | {r['aten_peak_mb']:.1f} | {r['fused_peak_mb']:.1f} | "
                     f"{r['aten_peak_mb'] / max(r['fused_peak_mb'], 1e-9):.1f}x |")
    return "\n".join(lines), rows


SECTIONS["upsample"] = bench_upsample

# ---- section: conv (benchmarks issue)
# DeepBench's convolution table (baidu-research/DeepBench, kernels.md §5) on our own problem list: every distinct
# Conv2d of the four segmentors' training forward at 512x512 (taken from the real models by forward hooks on a meta
# copy, so dilated ASPP branches, PPM bins and the depthwise convs of DeepLabV3+ are all in), timed forward,
# backward-data and backward-weight in fp32 (TF32 off), TF32, fp16 and bf16, NCHW against NHWC. TFLOP/s counts
# 2 x N x K x P x Q x C/groups x R x S for each of the three passes (DeepBench uses the forward count for all three).
# Knobs, by environment variable (the driver's flags are shared): CONV_MODELS (default fcn,pspnet,deeplabv3,
# deeplabv3plus), CONV_BATCH (16), CONV_CROP (512), CONV_DTYPES (fp32,tf32,fp16,bf16), CONV_BUDGET_MS (20),
# CONV_TOP (all: the first N problems by step time, so that a time-boxed run still ends with its table).

CONV_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # name -> torch dtype


def conv_problems(models, crop, batch):
    """Distinct Conv2d problems of one training forward: [(problem dict, {model: count})], in first-use order."""
    import importlib

    import torch
    import torch.nn as nn
    found = {}
    for name in models:
        model = importlib.import_module(name).build_model().to("meta").train()  # training: the aux head runs too

        def hook(m, inputs, output, name=name):
            x = inputs[0]
            key = (m.in_channels, x.shape[2], x.shape[3], m.out_channels, m.kernel_size, m.stride, m.padding,
                   m.dilation, m.groups)
            found.setdefault(key, {}).setdefault(name, 0)
            found[key][name] += 1
        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():  # 2 images on meta: BN in training refuses the 1x1 pooled maps of a single image
            model(torch.empty(2, 3, crop, crop, device="meta"))
        for h in hooks:
            h.remove()
    problems = []
    for (c, h, w, k, (r, s), stride, pad, dil, groups), users in found.items():
        p = dict(N=batch, C=c, H=h, W=w, K=k, R=r, S=s, stride=stride[0], pad=pad[0], dilation=dil[0], groups=groups)
        assert stride[0] == stride[1] and pad[0] == pad[1] and dil[0] == dil[1], f"non-square conv {p}"
        P = (h + 2 * p["pad"] - p["dilation"] * (r - 1) - 1) // p["stride"] + 1
        Q = (w + 2 * p["pad"] - p["dilation"] * (s - 1) - 1) // p["stride"] + 1
        p["flops"] = 2 * batch * k * P * Q * (c // groups) * r * s
        problems.append((p, users))
    return problems


def _conv_time_ms(fn, device, budget_ms, quick):
    """Median ms of fn() after one warm-up call (cudnn.benchmark's algorithm search happens in it)."""
    import statistics
    import time

    import torch
    fn()
    if device.type != "cuda":
        times = []
        for _ in range(1 if quick else 3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(3, min(100, int(budget_ms / max(start.elapsed_time(end), 1e-3))))  # ~budget_ms per measurement
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in events)


def conv_passes(p, dtype, memory_format, device):
    """The three closures (fwd, bwd-data, bwd-weight) of one problem, on random tensors in dtype and layout."""
    import torch
    import torch.nn.functional as F
    dtype = getattr(torch, CONV_DTYPES[dtype])
    x = torch.randn(p["N"], p["C"], p["H"], p["W"], device=device, dtype=dtype).to(memory_format=memory_format)
    w = torch.randn(p["K"], p["C"] // p["groups"], p["R"], p["S"], device=device, dtype=dtype)
    w = w.to(memory_format=memory_format)
    conv = dict(stride=[p["stride"]] * 2, padding=[p["pad"]] * 2, dilation=[p["dilation"]] * 2, groups=p["groups"])
    y = F.conv2d(x, w, None, **conv)
    dy = torch.randn_like(y)  # keeps y's layout

    def bwd(mask):  # the ATen op autograd calls for a conv's backward; mask picks grad-input / grad-weight
        return lambda: torch.ops.aten.convolution_backward(dy, x, w, None, conv["stride"], conv["padding"],
                                                          conv["dilation"], False, [0, 0], conv["groups"], mask)
    return {"fwd": lambda: F.conv2d(x, w, None, **conv), "dgrad": bwd([True, False, False]),
            "wgrad": bwd([False, True, False])}


def conv_section(args, device):
    import torch
    env = os.environ.get
    quick = args.quick
    models = env("CONV_MODELS", "pspnet" if quick else "fcn,pspnet,deeplabv3,deeplabv3plus").split(",")
    batch, crop = int(env("CONV_BATCH", 1 if quick else 16)), int(env("CONV_CROP", 32 if quick else 512))
    dtypes = env("CONV_DTYPES", "fp32,tf32,fp16,bf16").split(",")
    budget_ms = float(env("CONV_BUDGET_MS", 20))
    bad = [d for d in dtypes if d not in CONV_DTYPES]
    if bad:
        raise ValueError(f"CONV_DTYPES: unknown {bad}; choose from {', '.join(CONV_DTYPES)}")
    from common.layers import KERNELS
    assert KERNELS == "torch", "the problem list is taken with the plain ATen blocks"
    problems = conv_problems(models, crop, batch)
    if quick:  # CI: one problem per (kernel size, dilation, depthwise) kind, so every code path still runs
        kinds = {}
        for p, users in problems:
            kinds.setdefault((p["R"], p["dilation"], p["groups"] > 1), (p, users))
        problems = list(kinds.values())
    # the most step time first (FLOPs x uses): a run cut short by its time limit loses the least important rows
    problems.sort(key=lambda pu: -pu[0]["flops"] * sum(pu[1].values()))
    distinct = len(problems)
    if env("CONV_TOP"):
        problems = problems[:int(env("CONV_TOP"))]
    skip = {}  # dtype -> why it is not measured here
    if device.type == "cpu":
        skip["tf32"] = "TF32 is a tensor-core mode (CUDA only)"
        skip["fp16"] = "no fp16 conv fast path on this CPU build (bf16 stands for half precision here)"
    before = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as the trainer (spec §1): every pass gets cuDNN's fastest algorithm
    rows = []
    try:
        for i, (p, users) in enumerate(problems):
            for dname in dtypes:
                row = dict(p, id=i, dtype=dname, count=sum(users.values()), models=users)
                if dname in skip:
                    row["note"] = f"skipped: {skip[dname]}"
                    rows.append(row)
                    continue
                torch.backends.cudnn.allow_tf32 = dname == "tf32"
                for fname, mf in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
                    passes = fn = None
                    try:
                        passes = conv_passes(p, dname, mf, device)
                        for pname, fn in passes.items():
                            ms = _conv_time_ms(fn, device, budget_ms, quick)
                            row[f"{pname}_{fname}_ms"] = ms
                            row[f"{pname}_{fname}_tflops"] = p["flops"] / ms / 1e9
                    except torch.OutOfMemoryError:
                        row["note"] = f"{fname}: OOM"
                    except Exception as e:  # e.g. a dtype/layout without a kernel on this device: shown, counted
                        row["note"] = f"{fname}: {failed(f'conv #{i} {dname} {fname}', e)[:90]}"
                    passes = fn = None  # the closures hold this problem's tensors
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                # each row as it ends: the table is written at the section's end, and a run cut short keeps these
                ms = lambda pn, fn: f"{row[f'{pn}_{fn}_ms']:.3f}" if f"{pn}_{fn}_ms" in row else "-"  # noqa: E731
                times = " ".join(f"{pn} {ms(pn, 'nchw')}/{ms(pn, 'nhwc')}" for pn in ("fwd", "dgrad", "wgrad"))
                print(f"conv #{i} {p['C']}x{p['H']}x{p['W']}->{p['K']} {p['R']}x{p['S']} d{p['dilation']} "
                      f"g{p['groups']} {dname}: {times} ms (nchw/nhwc) {row.get('note', '')}", flush=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before
    md = conv_markdown(rows, device, models, batch, crop)
    if quick:
        md += "\n(--quick: one problem per kind only, so the step totals above cover that subset)\n"
    if len(problems) < distinct:
        md += (f"\n(CONV_TOP={len(problems)}: the {len(problems)} of {distinct} distinct convolutions with the most "
               "FLOPs x uses, so the step totals above cover that subset only)\n")
    return md, rows


def _best_ms(r, fname=None):
    """fwd + dgrad + wgrad ms, each pass in the faster layout (or in `fname`); None when a pass is missing."""
    total = 0.0
    for pname in ("fwd", "dgrad", "wgrad"):
        ts = [r.get(f"{pname}_{f}_ms") for f in ((fname,) if fname else ("nchw", "nhwc"))]
        ts = [t for t in ts if t is not None]
        if not ts:
            return None
        total += min(ts)
    return total


def conv_markdown(rows, device, models, batch, crop):
    import torch
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    short = {"fcn": "F", "pspnet": "P", "deeplabv3": "D", "deeplabv3plus": "D+"}
    fp32_ms = {r["id"]: _best_ms(r) for r in rows if r["dtype"] == "fp32"}
    lines = [f"### conv: distinct convolutions of {', '.join(models)} at {crop}x{crop}, batch {batch} ({dev}, "
             f"torch {torch.__version__})", "",
             "TFLOP/s per pass (fwd / bwd-data / bwd-weight) in each layout; ms = the three passes, each in its faster "
             "layout; vs fp32 = fp32 ms / this ms. count = uses per forward, summed over the models "
             "(F fcn, P pspnet, D deeplabv3, D+ deeplabv3plus).", "",
             "| # | C x H x W -> K | RxS /s pad dil g | count | models | GFLOP | dtype | fwd NCHW | fwd NHWC | "
             "dgrad NCHW | dgrad NHWC | wgrad NCHW | wgrad NHWC | ms | vs fp32 | note |",
             "|" + "---|" * 16]
    for r in rows:
        ms = _best_ms(r)
        base = fp32_ms.get(r["id"])
        cells = [str(r["id"]), f"{r['C']}x{r['H']}x{r['W']} -> {r['K']}",
                 f"{r['R']}x{r['S']} /{r['stride']} p{r['pad']} d{r['dilation']} g{r['groups']}", str(r["count"]),
                 " ".join(f"{short.get(m, m)}{'' if n == 1 else 'x%d' % n}" for m, n in r["models"].items()),
                 f(r["flops"] / 1e9, ".2f"), r["dtype"]]
        cells += [f(r.get(f"{pn}_{fn}_tflops"), ".3g") for pn in ("fwd", "dgrad", "wgrad") for fn in ("nchw", "nhwc")]
        cells += [f(ms, ".3f"), f(base / ms if base and ms else None, ".2f"), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    # the conv time of one training step (every use counted), per dtype and layout: where half precision pays
    lines += ["", "Conv time of one training step of each model (fwd + bwd-data + bwd-weight, every use counted), ms:",
              "", "| model | dtype | NCHW | NHWC | best of each |", "|---|---|---|---|---|"]
    for m in models:
        for dname in dict.fromkeys(r["dtype"] for r in rows):
            sub = [r for r in rows if r["dtype"] == dname and m in r["models"]]
            tot = {k: [(_best_ms(r, k) if k else _best_ms(r)) for r in sub] for k in ("nchw", "nhwc", None)}
            cell = {k: None if any(t is None for t in v) else sum(t * r["models"][m] for t, r in zip(v, sub))
                    for k, v in tot.items()}
            lines.append(f"| {m} | {dname} | {f(cell['nchw'], '.2f')} | {f(cell['nhwc'], '.2f')} | "
                         f"{f(cell[None], '.2f')} |")
    return "\n".join(lines) + "\n"


SECTIONS["conv"] = conv_section


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (CI)")
    p.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for kernels.md / kernels.json")
    args = p.parse_args()
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.only.split(",") if args.only else list(SECTIONS)
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        p.error(f"--only: unknown {bad}; choose from {', '.join(SECTIONS)}")
    # the header ties the tables to a card, a torch and a commit, as every other bench's does
    from train import card_name, run_head  # bench/train.py
    head = run_head(card_name(device, threads=False))  # the CPU rows name their threads
    md, rows = ["# bench/kernels.py: " + " | ".join(f"{k} {v}" for k, v in head.items())], {"head": head}
    print(md[0], flush=True)
    for name in names:
        try:
            table, section_rows = SECTIONS[name](args, device)
        except Exception as e:  # a section that cannot run at all (e.g. an op missing): the next one still runs
            table, section_rows = f"### {name}: {failed(f'section {name}', e)}", []
        print(table, flush=True)
        md.append(table)
        rows[name] = section_rows
        if args.out:  # after every section: a run cut short by a time limit keeps what it finished
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "kernels.md"), "w") as f:
                f.write("\n\n".join(md) + "\n")
            with open(os.path.join(args.out, "kernels.json"), "w") as f:
                json.dump(rows, f, indent=1)
    if FAILED:
        print(f"\n{len(FAILED)} row(s) or section(s) failed:\n  " + "\n  ".join(FAILED), flush=True)
        sys.exit(1)
    print(f"VERDICT: {', '.join(f'{n} {len(rows[n])} rows' for n in names)}, none failed", flush=True)


if __name__ == "__main__":
    main()
