"""(Not named profile.py: bench/ is first on sys.path when a bench script runs, and a profile.py there would
shadow the standard library's, which torch._dynamo imports.)

Where a training step's time goes: torch.profiler over a few steps of one segmentor with each kernel set, the top
kernels by device time (CUDA; on the CPU the top operators by self CPU time) as markdown tables, and the time per
kind of work (convolutions, BatchNorm, elementwise, ...), so that speed work can be planned without a card.

The step is bench/train.py's, i.e. the trainer's own common.train.train_step (forward under amp.autocast,
seg_cross_entropy of both heads, amp.backward, the BN-buffer check, amp.step) on one synthetic device-resident
batch, after --warmup untimed steps (cudnn.benchmark's search, the allocator); --steps steps are profiled and every
number is per step.

    python bench/step_profile.py --out DIR       # the card: PSPNet fp16 channels_last, batch 16 at 512x512, both sets
    python bench/step_profile.py --device cpu --mode bf16 --batch 2 --crop 32 --warmup 1 --steps 1 --out DIR  # CPU

Writes DIR/profile.md and DIR/profile.json (and with --trace, DIR/trace-<kernels>.json.gz for chrome://tracing or
Perfetto). Exit status 1 when a kernel set failed (the others are still profiled and written).
"""
import argparse
import gzip
import json
import os
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

import train as bench_train  # noqa: E402  (bench/train.py: the step, the batch, the models, the header helpers)

# kinds of work, by kernel / operator name; the first match wins (cuDNN's and CUTLASS's conv kernels are GEMMs)
KINDS = (
    ("ours (segfp16)", r"segfp16|bn_(apply|reduce|finalize|backward)|upsample_(ce|concat)|block_sum"),
    ("layout (NCHW<->NHWC)", r"nchwToNhwc|nhwcToNchw|nchw_to_nhwc|nhwc_to_nchw"),
    ("batch norm", r"batch_norm|batchnorm|bn_"),  # before conv: cuDNN's BN kernels are cudnn::bn_*
    ("conv / GEMM", r"conv|cudnn|cutlass|xmma|gemm|wgrad|dgrad|fprop|mkldnn|addmm|aten::mm"),
    ("loss (softmax, NLL)", r"softmax|nll|cross_entropy"),
    ("upsample / concat", r"upsample|interp|aten::cat|CatArray|bilinear"),
    ("optimizer", r"[Oo]ptimizer|multi_tensor|foreach|sgd|_amp_|non_finite"),
    ("copy / fill", r"[Mm]emcpy|[Mm]emset|copy|fill|aten::to\b|aten::zero"),
    ("elementwise", r"elementwise|vectorized|unrolled|relu|threshold|aten::add|aten::mul|aten::div"),
    ("reduction", r"reduce|aten::sum|aten::mean"),
)


def kind_of(name):
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def self_time_us(evt, cuda):
    return evt.self_device_time_total if cuda else evt.self_cpu_time_total  # (the former self_cuda_time_total)


def profile_one(kernels, args, device):
    """Profile args.steps steps with one kernel set -> dict(kernels, amp, step_ms, total_ms, rows, kinds)."""
    cuda = device.type == "cuda"
    row = dict(kernels=kernels)
    model = bench_train.construct(args.model)
    step, model, row["amp"] = bench_train.build_ours(model, args.mode, kernels, args.format, device)
    images, labels = bench_train.synthetic_batch(args.batch, args.crop, device, bench_train.FORMATS[args.format])
    for _ in range(args.warmup):
        step(images, labels)
    bench_train.sync(device)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        # timed inside the block: the profiler's start (CUPTI's set-up, on a card the first set's alone) and its stop
        # (collecting the trace) are not the steps' time; what recording each op costs still is
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(images, labels)
        bench_train.sync(device)
        row["step_ms"] = (time.perf_counter() - t0) * 1e3 / args.steps  # wall, with the profiler's overhead
    if args.trace:
        path = os.path.join(args.out, f"trace-{kernels}.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == want and self_time_us(e, cuda) > 0]
    total = sum(self_time_us(e, cuda) for e in events)
    events.sort(key=lambda e: -self_time_us(e, cuda))
    row["total_ms"] = total / 1e3 / args.steps
    row["launches"] = sum(e.count for e in events) / args.steps
    row["rows"] = [dict(name=e.key, kind=kind_of(e.key), calls=e.count / args.steps,
                        ms=self_time_us(e, cuda) / 1e3 / args.steps, share=self_time_us(e, cuda) / total)
                   for e in events]
    kinds = {}
    for r in row["rows"]:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
    row["kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return row


def markdown(head, results, args, cuda):
    what = "kernel, by device time" if cuda else "operator, by self CPU time"
    lines = [f"# Profile of a training step: {args.model}, {args.mode}, {args.format}, batch {args.batch} at "
             f"{args.crop}x{args.crop}: {head['card']}", "",
             f"torch {head['torch']}, CUDA {head['cuda']}, commit {head['commit']}, {head['date']}  ",
             f"{head['extension']}  ",
             f"torch.profiler over {args.steps} steps after {args.warmup} warm-up; per step; step ms is wall time "
             f"under the profiler; {'device' if cuda else 'CPU'} ms = the sum of every {what.split(',')[0]}'s self "
             "time", ""]
    ok = [r for r in results if "error" not in r]
    if ok:
        lines += bench_train.md_table(
            ("kernels", "step ms", f"{'device' if cuda else 'CPU'} ms", "launches" if cuda else "op calls", "amp"),
            [[r["kernels"], f"{r['step_ms']:.1f}", f"{r['total_ms']:.1f}", f"{r['launches']:.0f}",
              r["amp"].replace("|", "/")] for r in ok])
        kinds = list(dict.fromkeys(k for r in ok for k in r["kinds"]))
        lines += ["", "Time per kind of work, ms per step (share):", ""]
        lines += bench_train.md_table(["kind"] + [r["kernels"] for r in ok], [
            [k] + [f"{r['kinds'].get(k, 0):.2f} ({r['kinds'].get(k, 0) / r['total_ms']:.0%})" for r in ok]
            for k in kinds])
    for r in results:
        lines += ["", f"## kernels {r['kernels']}", ""]
        if "error" in r:
            lines.append(f"failed: {r['error']}")
            continue
        lines.append(f"Top {args.top} of {len(r['rows'])} by self time ({what}):")
        lines.append("")
        lines += bench_train.md_table(("#", "name", "kind", "calls", "ms", "share", "avg us"), [
            [str(i + 1), q["name"][:100].replace("|", "/"), q["kind"], f"{q['calls']:.0f}", f"{q['ms']:.3f}",
             f"{q['share']:.1%}", f"{1e3 * q['ms'] / max(q['calls'], 1e-9):.1f}"]
            for i, q in enumerate(r["rows"][:args.top])])
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pspnet", choices=bench_train.MODELS)
    p.add_argument("--mode", default="fp16", choices=list(bench_train.MODES))
    p.add_argument("--kernels", type=bench_train.csv(("torch", "fused")), default=["torch", "fused"])
    p.add_argument("--format", default="nhwc", choices=list(bench_train.FORMATS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="rows of each kernel set's table")
    p.add_argument("--trace", action="store_true", help="also write a chrome trace per kernel set (gzipped)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", required=True, help="folder for profile.md / profile.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False  # the trainer's settings (spec §7)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    head = bench_train.header(argparse.Namespace(peak_tflops=None, crop=args.crop, warmup=args.warmup,
                                                 steps=args.steps), device)
    print(f"# profile: {head['card']} | torch {head['torch']} | commit {head['commit']}", flush=True)
    results = []
    for kernels in args.kernels:
        try:
            results.append(profile_one(kernels, args, device))
        except Exception as e:  # logged; the other kernel set is still profiled
            results.append(dict(kernels=kernels, error=bench_train.error_line(e)))
        finally:
            from common.layers import set_kernels
            set_kernels("torch")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        md = markdown(head, results, args, device.type == "cuda")  # after each set: a timeout keeps the first
        with open(os.path.join(args.out, "profile.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(dict(header=head, args=vars(args), results=results), f, indent=1)
    print("\n" + md)
    failed = [r["kernels"] for r in results if "error" in r]
    ok = {r["kernels"]: r for r in results if "error" not in r}
    if "torch" in ok and "fused" in ok:
        print(f"VERDICT: {'device' if device.type == 'cuda' else 'CPU'} ms per step: torch "
              f"{ok['torch']['total_ms']:.1f}, fused {ok['fused']['total_ms']:.1f}"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if failed:
        sys.exit(f"kernel set(s) failed: {', '.join(failed)} (tracebacks above)")


if __name__ == "__main__":
    main()
