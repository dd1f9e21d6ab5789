"""cudnn.benchmark at evaluation: what a new image size costs with it on and off.

Val images keep their own sizes (ADE20k: short side 512, the long side follows each photo), and cudnn.benchmark
times every convolution algorithm at each new input shape. The reference evaluates with it on (spec §7); whether that
pays depends on how often a size comes back. Both sides, on the trainer's evaluation path (the folded copy in the
run's dtype, NCHW, --kernels):
  new     ms of the first call at a size this process has not seen (the algorithm search or plan build included),
          mean over --sizes sizes;
  repeat  ms of a later call at one of those sizes (the median of a second pass).
The two settings get disjoint sizes from the same range (a shape tuned by one would be cached for the other). With
k images per distinct size, benchmark pays when new_on + (k - 1) repeat_on < new_off + (k - 1) repeat_off.

    python bench/eval_sizes.py --out DIR            # PSPNet, fp16 on CUDA (bf16 on the CPU), 6 sizes per setting
    python bench/eval_sizes.py --quick              # tiny sizes, CPU: proves the script runs (CI)
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

from train import MODELS, construct, error_line, git_commit, md_table, sync, write_tables  # noqa: E402


def widths(n, base, step, offset):
    """n widths base + offset, base + offset + 2 step, ...: the two settings interleave (offset 0 and step)."""
    return [base + offset + 2 * step * i for i in range(n)]


def measure(net, height, ws, device):
    """(new ms per size, repeat ms): the first call at each size, then the median of a second pass."""
    new, again = [], []
    for calls in (new, again):
        for w in ws:
            x = torch.randn(1, 3, height, w, device=device)
            sync(device)
            t0 = time.perf_counter()
            net(x)
            sync(device)
            calls.append((time.perf_counter() - t0) * 1e3)
    return statistics.mean(new), statistics.median(again)


def verdict_line(on, off):
    """When benchmark on pays: the per-size cost difference on - off is d(k) = (new_on - new_off) + (k - 1) *
    (repeat_on - repeat_off) for a size seen k times; its sign change (if any) is the break-even k."""
    (new_on, rep_on), (new_off, rep_off) = on, off
    d_new, d_rep = new_on - new_off, rep_on - rep_off
    if d_rep == 0 or (d_new < 0) == (d_rep < 0):  # no sign change for k >= 1
        return "benchmark on is faster at any images per size" if d_new + d_rep < 0 else "benchmark on is never faster"
    k = 1 - d_new / d_rep  # d(k) = 0
    return (f"benchmark on is faster from {k:.1f} images per size" if d_rep < 0
            else f"benchmark on is faster up to {k:.1f} images per size")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="pspnet")
    p.add_argument("--sizes", type=int, default=6, help="distinct sizes per setting")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=640, help="the smallest width; sizes step by 8 px (one feature px)")
    p.add_argument("--kernels", choices=("torch", "fused"), default="fused")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for eval_sizes.md and eval_sizes.json")
    p.add_argument("--quick", action="store_true", help="CI: fcn, 2 sizes of 32 x 40+, torch kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.sizes, args.height, args.width, args.kernels = "fcn", 2, 32, 40, "torch"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from common import fold
    from common.layers import set_kernels
    set_kernels(args.kernels)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    torch.backends.cudnn.allow_tf32 = False  # the trainer's settings (spec §7)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = dict(card=card, torch=torch.__version__, commit=git_commit(), model=args.model, dtype=str(dtype)[6:],
                kernels=args.kernels, height=args.height, sizes=args.sizes)
    print(f"# {card} | torch {head['torch']} | commit {head['commit']} | {args.model} folded {head['dtype']} NCHW "
          f"| kernels {args.kernels}", flush=True)
    net = fold.Folded(construct(args.model).to(device).eval(), dtype)
    net(torch.randn(1, 3, args.height, args.width - 16, device=device))  # cuDNN's own start-up: neither setting's cost
    rows, res = [], {}
    for i, (name, on) in enumerate((("off", False), ("on", True))):  # off first: on's tuning cannot help it
        torch.backends.cudnn.benchmark = on
        ws = widths(args.sizes, args.width, 8, 8 * i)
        try:
            res[name] = measure(net, args.height, ws, device)
            rows.append(dict(benchmark=name, widths=f"{ws[0]}-{ws[-1]}", new_ms=res[name][0],
                             repeat_ms=res[name][1]))
        except Exception as e:  # e.g. out of memory: the other setting still runs
            rows.append(dict(benchmark=name, widths=f"{ws[0]}-{ws[-1]}", error=error_line(e, 160)))
        print(rows[-1], flush=True)
    columns = ("cudnn.benchmark", f"sizes ({args.height} x)", "new size ms", "repeat ms")
    cells = [[r["benchmark"], r["widths"], f"{r['new_ms']:.1f}", f"{r['repeat_ms']:.2f}"] if "error" not in r
             else [r["benchmark"], r["widths"], "error: " + r["error"].replace("|", "/"), "-"] for r in rows]
    md = "\n".join([f"# cudnn.benchmark at evaluation: {card}", "",
                    f"torch {head['torch']}, commit {head['commit']}, {args.model} folded {head['dtype']} NCHW, "
                    f"kernels {args.kernels}, batch 1, {args.sizes} new sizes per setting", ""]
                   + md_table(columns, cells)) + "\n"
    if len(res) == 2:
        verdict = verdict_line(res["on"], res["off"])
        if device.type != "cuda":
            verdict += " (CPU: cudnn.benchmark has no effect here; a dry run)"
        md += f"\n{verdict}\n"
    print("\n" + md, flush=True)
    if args.out:
        write_tables(args.out, "eval_sizes", md, head, columns, rows)
    if len(res) < 2:
        sys.exit("a setting failed (see above)")
    print(f"VERDICT: new size on {res['on'][0]:.1f} / off {res['off'][0]:.1f} ms, repeat on {res['on'][1]:.2f} / "
          f"off {res['off'][1]:.2f} ms; {verdict}", flush=True)


if __name__ == "__main__":
    main()
