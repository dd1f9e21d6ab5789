"""Evaluation throughput (images/s, batch 1, whole inference) of the four segmentors: unfolded, folded, compiled folded.

One row = (model, input size, precision, variant, memory format). Variants, side by side in one run with their
repetitions interleaved (so load drift hits all alike):
  unfolded  the trained module in eval mode (conv, then BatchNormAct2d), half precision via torch.autocast, as the
            trainer's evaluation ran before common/fold.py;
  folded    common.fold.Folded: each conv-BN(-add)-ReLU unit one conv with bias + ReLU (+ residual) epilogue, the
            copy cast to the precision (no autocast); with --kernels fused on CUDA, one cuDNN call per unit;
  folded_plain  the same copy with the epilogue as conv + in-place add / ReLU, whatever --kernels says: beside
            `folded` under --kernels fused it measures the cuDNN call (layers.AUTO's cudnn_conv_relu entry);
  compiled  the folded copy under torch.compile (--compile mode, dynamic=True as the trainer's eval); its first call
            (trace + compile + one run) is reported separately as compile s.
Each timed call is model(x)['out'] on a random (1, 3, H, W) image under torch.inference_mode, median of --reps after
--warmup untimed calls; the upsampling to the label size and the argmax (the same for every variant) are not timed.
Weights are random (speed does not depend on their values). "half" is fp16 on CUDA, bf16 on the CPU.

The roofline columns say how much any variant could still gain: GMACs are the conv and linear multiply-accumulates
of one eval forward (common.summary.count_macs, main head only), TFLOP/s = 2 x GMACs / the median call, and "of mm"
divides that by the matmul rate measured on the same device in the same dtype (best of 5 square matmuls, size in the
header): a variant at ~90% of it is bound by its convolutions, and folding can only remove the rest.

    python bench/eval.py --out bench/results/x                 # 4 models x 512x683, 512x512 x fp32, half x 4 variants
    python bench/eval.py --models pspnet --sizes 512x512 --dtypes fp32 --reps 3
    python bench/eval.py --quick                               # tiny sizes: proves the script runs (CI)
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

from train import (MODELS, card_name, construct, csv, error_line, fmt, md_table, run_head, sync,  # noqa: E402 (bench/train.py)
                   write_tables)

VARIANTS = ("unfolded", "folded", "folded_plain", "compiled")
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def half_dtype(device):
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def eval_macs(model, h, w):
    """Conv + linear MACs of one batch-1 eval forward: count_macs counts the training forward, less the aux head."""
    from common.summary import count_macs
    return sum(v for k, v in count_macs(model, (1, 3, h, w)).items() if not k.startswith("auxiliary"))


def matmul_flops(dtype, device):
    """FLOP/s of the best of 5 (n x n) @ (n x n) matmuls in dtype: the practical peak the convolutions approach."""
    # CPU bf16 without AVX-512 BF16 runs a scalar fallback (~1 GFLOP/s on our AVX2 box): a smaller matmul there
    n = 8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best, n


def build_variants(model, variants, dtype, memory_format, device, compile_mode, log):
    """{variant: callable(x) -> logits}; plus {variant: compile seconds} filled by the first call of 'compiled'."""
    import contextlib

    from common import fold, layers
    from common.compile import compile_module
    model = model.to(device, memory_format=memory_format).eval()
    half = dtype != torch.float32
    fns = {}
    if "unfolded" in variants:
        def unfolded(x):
            ctx = torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return model(x)["out"]
        fns["unfolded"] = unfolded
    if "folded" in variants or "folded_plain" in variants:
        folded = fold.Folded(model, dtype, memory_format)
    if "folded" in variants:
        fns["folded"] = lambda x: folded(x)["out"]
    if "folded_plain" in variants:
        def folded_plain(x):
            kept = layers.KEEP_ATEN
            layers.KEEP_ATEN = kept | {"cudnn_conv_relu"}  # per call: the variants' repetitions interleave
            try:
                return folded(x)["out"]
            finally:
                layers.KEEP_ATEN = kept
        fns["folded_plain"] = folded_plain
    if "compiled" in variants:
        compiled = fold.Folded(model, dtype, memory_format)
        compile_module(compiled.net, compile_mode, log, what="eval", dynamic=True)
        fns["compiled"] = lambda x: compiled(x)["out"]
    return fns


def time_variants(fns, x, reps, warmup, device):
    """{variant: (median ms, min ms, max ms, first-call s)}; repetitions interleaved over the variants."""
    first = {}
    for k, fn in fns.items():
        sync(device)  # the previous variant's warm-up calls are not this one's first call
        t0 = time.perf_counter()
        fn(x)
        sync(device)
        first[k] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn(x)
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v), max(v), first[k]) for k, v in times.items()}


def error_row(rows, what, e, **row):
    """Log the exception being handled and add a row saying so (the run goes on, main exits non-zero)."""
    row.update(error=error_line(e, 160))
    rows.append(row)
    print(f"{what}: {row['error']}", flush=True)


def run_model(name, args, device, rows, peaks, done=lambda: None):
    """Rows of one model; a failing (dtype, format) or size is logged and shown as an error row. done() after each
    size's rows (main writes the tables then: a run cut short by its time limit keeps what it finished)."""
    from common.layers import set_kernels
    set_kernels(args.kernels)
    shapes_only = construct(name)  # count_macs runs a meta copy: one construction serves every size
    macs = {hw: eval_macs(shapes_only, *hw) for hw in args.sizes}
    for dtname in args.dtypes:
        dtype = torch.float32 if dtname == "fp32" else half_dtype(device)
        peak = peaks[str(dtype)[6:]][0]
        for fmt_ in args.formats:
            try:
                model = construct(name)
                fns = build_variants(model, args.variants, dtype, FORMATS[fmt_], device, args.compile, log=print)
            except Exception as e:
                error_row(rows, name, e, model=name, size="all", dtype=str(dtype)[6:], variant="all", format=fmt_)
                continue
            for h, w in args.sizes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(1, 3, h, w, generator=g).to(device, memory_format=FORMATS[fmt_])
                try:
                    res = time_variants(fns, x, args.reps, args.warmup, device)
                except Exception as e:
                    error_row(rows, name, e, model=name, size=f"{h}x{w}", dtype=str(dtype)[6:], variant="all",
                              format=fmt_)
                    continue
                base = res.get("unfolded")
                for v, (ms, lo, hi, first) in res.items():
                    row = dict(model=name, size=f"{h}x{w}", dtype=str(dtype)[6:], variant=v, format=fmt_,
                               kernels=args.kernels, ms=ms, ms_min=lo, ms_max=hi, img_per_s=1e3 / ms,
                               compile_s=first - ms / 1e3 if v == "compiled" else None,
                               vs_unfolded=base[0] / ms if base else None, gmacs=macs[(h, w)] / 1e9,
                               tflops=2 * macs[(h, w)] / ms / 1e9)
                    row["of_mm"] = row["tflops"] * 1e12 / peak
                    rows.append(row)
                    comp = "" if row["compile_s"] is None else f"compile {row['compile_s']:.0f} s"
                    print(f"{name:>14} {row['size']:>8} {row['dtype']:>8} {fmt_} {v:>9} {ms:9.1f} ms "
                          f"{row['img_per_s']:7.2f} img/s  x{fmt(row['vs_unfolded'], '.2f')} "
                          f"{row['of_mm']:4.0%} of mm {comp}", flush=True)
                done()
            fns = model = None
            torch._dynamo.reset()


def matmul_line(peaks):
    return ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s (n={n})" for k, (v, n) in peaks.items())


COLUMNS = ("model", "size", "dtype", "format", "variant", "img/s", "ms (median)", "min-max ms", "vs unfolded",
           "compile s", "GMACs", "TFLOP/s", "of mm")


def markdown(head, rows):
    lines = [f"# Evaluation throughput (batch 1, whole inference): {head['card']}", "",
             f"torch {head['torch']}, commit {head['commit']}, {head['date']}, kernels {head['kernels']}, "
             f"--compile {head['compile']}  ",
             f"load average at start {head['load_start']}, at end {head['load_end']} (1/5/15 min)  ",
             f"median of {head['reps']} calls after {head['warmup']} warm-up, repetitions interleaved over the "
             "variants; compile s = first call - median call (trace + compile)  ",
             f"matmul rate ({matmul_line(head['matmul'])}): the \"of mm\" base; GMACs: conv + linear of one eval "
             "forward", ""]
    cells = [[r["model"], r["size"], r["dtype"], r["format"], r["variant"], fmt(r["img_per_s"], ".3g"),
              fmt(r["ms"], ".0f"), f"{r['ms_min']:.0f}-{r['ms_max']:.0f}", fmt(r["vs_unfolded"], ".2f"),
              fmt(r["compile_s"], ".0f"), f"{r['gmacs']:.1f}", f"{r['tflops']:.3g}", f"{r['of_mm']:.0%}"]
             if "error" not in r else
             [r["model"], r["size"], r["dtype"], r["format"], r["variant"], "error: " + r["error"].replace("|", "/")]
             + ["-"] * (len(COLUMNS) - 6) for r in rows]
    return "\n".join(lines + md_table(COLUMNS, cells)) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=csv(MODELS), default=list(MODELS))
    p.add_argument("--sizes", type=lambda s: [tuple(int(v) for v in hw.split("x")) for hw in s.split(",")],
                   default=[(512, 683), (512, 512)], help="HxW,HxW (ADE20k val images resized to short side 512)")
    p.add_argument("--dtypes", type=csv(("fp32", "half")), default=["fp32", "half"])
    p.add_argument("--variants", type=csv(VARIANTS), default=list(VARIANTS))
    p.add_argument("--formats", type=csv(FORMATS), default=None, help="nchw, nhwc (default nchw on CPU, nhwc on GPU)")
    p.add_argument("--kernels", choices=("torch", "fused"), default="torch")
    p.add_argument("--compile", choices=("default", "max-autotune"), default="default")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for eval.md and eval.json")
    p.add_argument("--quick", action="store_true", help="CI smoke run: fcn, 32x48, fp32, 1 warm-up + 1 timed call")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(models=["fcn"], sizes=[(32, 48)], dtypes=["fp32"], reps=1, warmup=1)
        args = p.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.formats = args.formats or (["nhwc"] if device.type == "cuda" else ["nchw"])
    torch.backends.cuda.matmul.allow_tf32 = False  # the trainer's settings (spec §7)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    card = card_name(device)
    head = dict(run_head(card), kernels=args.kernels, compile=args.compile, reps=args.reps, warmup=args.warmup,
                load_start=" ".join(f"{v:.1f}" for v in os.getloadavg()))
    dtypes = [torch.float32 if d == "fp32" else half_dtype(device) for d in args.dtypes]
    peaks = head["matmul"] = {str(d)[6:]: matmul_flops(d, device) for d in dtypes}  # name -> (FLOP/s, n)
    print(f"# {card} | torch {head['torch']} | commit {head['commit']} | load {head['load_start']} | matmul "
          f"{matmul_line(peaks)}", flush=True)
    rows = []
    head["load_end"] = "(not reached: the run was cut short)"  # until the end overwrites it

    def done():
        if args.out:
            write_tables(args.out, "eval", markdown(head, rows), head, COLUMNS, rows)
    for name in args.models:
        try:
            run_model(name, args, device, rows, peaks, done)
        except Exception as e:  # e.g. the model cannot be built: the next model still runs
            error_row(rows, name, e, model=name, size="all", dtype="all", variant="all", format="all")
    head["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print("\n" + markdown(head, rows))
    done()
    errors = [r for r in rows if "error" in r]
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["img_per_s"], default=None)
    print(f"VERDICT: {len(ok)}/{len(rows)} rows ok" + ("" if best is None else
          f"; fastest: {best['model']} {best['size']} {best['dtype']} {best['variant']} {best['img_per_s']:.3g} img/s "
          f"(x{fmt(best['vs_unfolded'], '.2f')} unfolded)"), flush=True)
    if errors:
        sys.exit(f"{len(errors)} row(s) failed (see the tracebacks above)")


if __name__ == "__main__":
    main()
