"""Numerics of the precision modes: one segmentor trained on the demo data from the same seed in fp32, torch fp16,
apex O1, apex O2 and bf16 (and fp32 from seed + 1, the yardstick), the loss curves side by side, the checks, and the
evaluation mIoU of each. Each mode is one ordinary training run (common.train.main with the script's config and
`--data demo`), so what is checked is the trainer itself, not a copy of its loop.

    python bench/numerics.py --out DIR                 # the card: PSPNet, 200 iterations per mode (~1.5 min on a GPU)
    python bench/numerics.py --jobs 6 --out DIR        # the same, every mode a process of its own, all at once
    python bench/numerics.py --device cpu --modes fp32,bf16 --iters 2 --crop 32 --batch 2 --val_images 1 --out DIR
                                                       # a smoke run (the dry run's): every part runs; a handful of
                                                       # iterations is too few for the band to mean anything

Writes DIR/numerics.md (the table and the verdict), DIR/numerics.jsonl (one record per mode: its per-iteration
losses, loss scale and skipped steps, mIoU) and DIR/numerics.png (the curves), after every mode, so that a run cut
short keeps the modes it finished. The run folders go to --work_dir (keep it out of DIR). Exit status 1 when a mode
failed to run or a check failed. --jobs N trains N modes at once, each in a process of its own (a GPU has room for
six demo runs, and nothing checked here depends on timing; with N = 1 every mode runs in this process).

The checks, against the fp32 run from the same seed (same initial weights, same batches in the same order):
  first loss  the loss of iteration 1 (same weights, same batch: only the arithmetic differs) within FIRST_TOL of
              fp32's: 1% for the fp16 modes (11-bit mantissa, fp32 accumulation in convs and the loss), 3% for bf16
              (8-bit mantissa: 8x coarser rounding, and bf16 autocast keeps more ops in half on the CPU);
  curve band  the mean loss over the last quarter of the iterations within the band of fp32's. Training is chaotic:
              two runs that differ in rounding decorrelate within tens of steps, so step-by-step losses cannot be
              compared, but the level a run trains to can. The band is 2x what another seed does to fp32 (the
              yardstick run, fp32-seed1: "no further from fp32 than seed noise, with margin") and at least
              BAND_FLOOR = 10%;
  skipped     no step skipped after the loss scale's warm-up (the skips before the first clean step, while a dynamic
              scale halves from 65536 to its level); modes without a dynamic scale (fp32, bf16) skip none at all;
  finite      every logged loss and the mIoU are finite.
"""
import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# mode -> the script flags that select it; the fp16 modes name their dtype, so a CPU run is fp16 too (not bf16)
MODES = {
    "fp32": ["--amp", "none"],
    "fp16": ["--amp", "torch", "--amp_dtype", "float16"],
    "apex-O1": ["--amp", "apex", "--opt_level", "O1", "--amp_dtype", "float16"],
    "apex-O2": ["--amp", "apex", "--opt_level", "O2", "--amp_dtype", "float16"],
    "bf16": ["--amp", "torch", "--amp_dtype", "bfloat16"],
    "fp32-seed1": ["--amp", "none"],  # the yardstick: its seed is --seed + 1
}
SCALED = ("fp16", "apex-O1", "apex-O2")  # the modes with a dynamic loss scale (and its warm-up)
FIRST_TOL = {"fp16": 0.01, "apex-O1": 0.01, "apex-O2": 0.01, "bf16": 0.03}
BAND_FLOOR = 0.10
YARDSTICK = "fp32-seed1"


def run_argv(mode, args):
    """The training flags of one mode's run."""
    seed = args.seed + (1 if mode == YARDSTICK else 0)
    argv = ["--data", "demo", "--device", args.device, "--max_iters", str(args.iters), "--log_interval", "1",
            "--seed", str(seed), "--kernels", args.kernels, "--save_interval_epochs", "0", "--save_predictions", "0",
            "--work_dir", os.path.join(args.work_dir, mode)] + MODES[mode]
    if args.crop:
        argv += ["--crop_size", f"{args.crop},{args.crop}"]
    if args.batch:
        argv += ["--batch_size", str(args.batch)]
    if args.val_images:
        argv += ["--num_val_images", str(args.val_images)]
    if args.num_workers is not None:
        argv += ["--num_workers", str(args.num_workers)]
    return argv


def train_one(mode, args):
    """Train one mode; returns its record (curves, skips, mIoU, what ran). Exceptions propagate."""
    from common import runs, train
    from common.plot import read_records
    script = importlib.import_module(args.model)
    t0 = time.time()
    metrics = train.main(script.SEGMENTOR_CFG, script.build_model, run_argv(mode, args), name=args.model)
    seconds = time.time() - t0
    folder = runs.runs(os.path.join(args.work_dir, mode))[-1]
    recs, _ = read_records(os.path.join(folder, "metrics.jsonl"))
    said = {}
    with open(os.path.join(folder, "log.txt")) as f:  # what actually ran, as the run's own log says it
        for line in f:
            for key in ("amp: ", "kernels: "):
                if key in line and key not in said:
                    said[key] = line.split(key, 1)[1].strip()
    return dict(mode=mode, status="ok", seconds=seconds, run_dir=folder, amp=said.get("amp: ", "?"),
                kernels=said.get("kernels: ", "?"), iteration=[r["iteration"] for r in recs],
                loss=[r["loss"] for r in recs], loss_scale=[r["loss_scale"] for r in recs],
                skipped=[r["skipped"] for r in recs], mIoU=metrics["mIoU"] if metrics else None)


def train_all(args, argv, head):
    """Every mode's record in args.modes order, --jobs at a time in processes of their own (this script with --one);
    numerics.md and the rest are rewritten after each one ends. Each process's output is printed as it ends."""
    os.makedirs(args.work_dir, exist_ok=True)
    pending, running, done = list(args.modes), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            mode = pending.pop(0)
            record, log = (os.path.join(args.work_dir, f"{mode}.{ext}") for ext in ("record.json", "log"))
            if os.path.exists(record):  # an earlier run's (the log is truncated below)
                os.remove(record)
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv +
                                        ["--one", mode, "--record", record], stdout=f, stderr=subprocess.STDOUT)
            running[mode] = (proc, record, log)
        time.sleep(0.5)
        for mode, (proc, record, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[mode]
            with open(log) as f:
                text = f.read()
            print(f"==== {mode} (its own process, exit {proc.returncode}): {' '.join(run_argv(mode, args))}\n{text}",
                  flush=True)
            if proc.returncode == 0 and os.path.exists(record):
                with open(record) as f:
                    done[mode] = json.load(f)
            else:
                last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
                done[mode] = dict(mode=mode, status=f"error: exit {proc.returncode}: {last[0][:300]}")
            md = write(args, head, [done[m] for m in args.modes if m in done])
    return [done[m] for m in args.modes], md


def train_here(args, head):
    """Every mode in this process, one after another; numerics.md and the rest are rewritten after each."""
    import gc

    import torch
    recs = []
    for mode in args.modes:
        print(f"==== {mode}: {' '.join(run_argv(mode, args))}", flush=True)
        recs.append(try_one(mode, args))
        md = write(args, head, recs)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return recs, md


def try_one(mode, args):
    try:
        return train_one(mode, args)
    except (Exception, SystemExit) as e:  # a user-error Exit is a SystemExit: still one mode's failure
        from train import error_line  # bench/train.py
        return dict(mode=mode, status="error: " + error_line(e))


# ---- the checks

def warmup_skips(skipped):
    """(skips before the first clean step, skips after it) from the cumulative skip counts of consecutive steps."""
    prev = 0
    for total in skipped:
        if total == prev:  # this step was clean: the scale has found its level
            return prev, skipped[-1] - prev
        prev = total
    return prev, 0  # never a clean step: all skips are "warm-up", and the check below fails on no clean step


def tail_mean(values):
    """Mean over the last quarter (at least one value)."""
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k


def analyse(recs):
    """Add the derived numbers and the checks to every ok record. Returns the band used."""
    for r in recs:
        if r["status"] == "ok" and not r["loss"]:
            r["checks"] = ["no training loss logged"]
    ok = {r["mode"]: r for r in recs if r["status"] == "ok" and r["loss"]}
    base = ok.get("fp32")
    for r in ok.values():
        r["first_loss"], r["tail_loss"] = r["loss"][0], tail_mean(r["loss"])
        r["warmup_skips"], r["skips_after"] = warmup_skips(r["skipped"])
        r["clean_step"] = any(b == a for a, b in zip([0] + r["skipped"], r["skipped"]))
    spread = None
    if base and YARDSTICK in ok:
        spread = abs(ok[YARDSTICK]["tail_loss"] - base["tail_loss"]) / base["tail_loss"]
    band = max(BAND_FLOOR, 2 * spread) if spread is not None else BAND_FLOOR
    for r in ok.values():
        fails = []
        if not all(math.isfinite(v) for v in r["loss"]):
            fails.append("non-finite loss")
        if r["mIoU"] is None or not math.isfinite(r["mIoU"]):
            fails.append("no finite mIoU")
        if not r["clean_step"]:
            fails.append("no clean step at all")
        if r["mode"] not in SCALED and r["skipped"][-1]:  # no scale to warm up: every skip was a non-finite grad
            fails.append(f"{r['skipped'][-1]} skipped without a loss scale")
        elif r["skips_after"]:
            fails.append(f"{r['skips_after']} skipped after warm-up")
        if base and r is not base:
            r["first_vs_fp32"] = r["first_loss"] / base["first_loss"] - 1
            r["tail_vs_fp32"] = r["tail_loss"] / base["tail_loss"] - 1
            r["miou_vs_fp32"] = None if r["mIoU"] is None or base["mIoU"] is None else r["mIoU"] - base["mIoU"]
            tol = FIRST_TOL.get(r["mode"])
            if tol is not None and abs(r["first_vs_fp32"]) > tol:
                fails.append(f"first loss {r['first_vs_fp32']:+.2%} of fp32 (tolerance {tol:.0%})")
            if r["mode"] != YARDSTICK and abs(r["tail_vs_fp32"]) > band:
                fails.append(f"tail loss {r['tail_vs_fp32']:+.1%} of fp32 (band {band:.0%})")
        r["checks"] = fails
    return band, spread


# ---- output

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(head, recs, band, spread):
    lines = [f"# Numerics of the precision modes: {head['model']} on the demo data, {head['iters']} iterations, "
             f"seed {head['seed']}", "",
             f"{head['card']} | torch {head['torch']} | commit {head['commit']} | {head['date']}  ",
             f"{head['extension']}  ",
             f"first loss: iteration 1, tolerance {', '.join(f'{m} {t:.0%}' for m, t in FIRST_TOL.items())}; tail: "
             f"mean loss of the last quarter, band +-{band:.0%} of fp32 (2 x the yardstick's "
             f"{fmt(spread, '.1%')}, floor {BAND_FLOOR:.0%}); skips: warm-up (before the first clean step) / after",
             ""]
    cols = ("mode", "first loss", "vs fp32", "tail loss", "vs fp32", "skips (warm-up / after)", "final scale",
            "mIoU %", "vs fp32 (points)", "s", "verdict", "amp")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in recs:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | " + " | ".join(["-"] * (len(cols) - 3)) + f" | {r['status'][:160]} | - |")
            continue
        verdict = "ok" if not r["checks"] else "FAIL: " + "; ".join(r["checks"])
        cells = [r["mode"], fmt(r.get("first_loss"), ".4f"), fmt(r.get("first_vs_fp32"), "+.2%"),
                 fmt(r.get("tail_loss"), ".4f"), fmt(r.get("tail_vs_fp32"), "+.1%"),
                 f"{r.get('warmup_skips', '-')} / {r.get('skips_after', '-')}",
                 fmt(r["loss_scale"][-1] if r["loss_scale"] else None, "g"),
                 fmt(None if r["mIoU"] is None else 100 * r["mIoU"], ".2f"),
                 fmt(None if r.get("miou_vs_fp32") is None else 100 * r["miou_vs_fp32"], "+.2f"),
                 f"{r['seconds']:.0f}", verdict, r["amp"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(recs, band, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import smooth
    ok = [r for r in recs if r["status"] == "ok" and r["loss"]]
    base = next((r for r in ok if r["mode"] == "fp32"), None)
    fig, (ax, rel, sc) = plt.subplots(1, 3, figsize=(16, 4.8), dpi=90)
    for i, r in enumerate(ok):
        colour, style = f"C{i}", "--" if r["mode"] == YARDSTICK else "-"
        ax.plot(r["iteration"], r["loss"], color=colour, alpha=0.15, lw=1)
        ax.plot(r["iteration"], smooth(r["loss"]), color=colour, ls=style, lw=1.6, label=r["mode"])
        if base is not None and r is not base and len(r["loss"]) == len(base["loss"]):
            diff = [100 * (a / b - 1) for a, b in zip(smooth(r["loss"]), smooth(base["loss"]))]
            rel.plot(r["iteration"], diff, color=colour, ls=style, lw=1.4, label=r["mode"])
        if r["mode"] in SCALED:
            sc.plot(r["iteration"], r["loss_scale"], color=colour, lw=1.4, label=r["mode"])
    ax.set_title("training loss (smoothed; raw faint)")
    rel.axhspan(-100 * band, 100 * band, color="0.9", label=f"band +-{band:.0%} (applies to the last quarter)")
    rel.axhline(0, color="0.5", lw=0.8)
    rel.set_title("smoothed loss vs fp32's, %")
    if base is None:
        rel.text(0.5, 0.75, "no fp32 run finished (see numerics.md)", ha="center", va="center",
                 transform=rel.transAxes, color="0.4")
    sc.set_title("dynamic loss scale (fp16 modes)")
    if any(r["mode"] in SCALED for r in ok):
        sc.set_yscale("log", base=2)
    else:  # say why the panel is empty: a CPU run has no fp16 mode, a card's may all have failed
        ran = any(r["mode"] in SCALED for r in recs)
        why = "no fp16 mode finished (see numerics.md)" if ran else "no fp16 mode was run"
        sc.text(0.5, 0.5, why, ha="center", va="center", transform=sc.transAxes, color="0.4")
    for a in (ax, rel, sc):
        a.set_xlabel("iteration")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(args, head, recs):
    band, spread = analyse(recs)
    os.makedirs(args.out, exist_ok=True)
    md = markdown(head, recs, band, spread)
    with open(os.path.join(args.out, "numerics.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "numerics.jsonl"), "w") as f:
        f.write(json.dumps(dict(kind="header", band=band, yardstick_spread=spread, **head)) + "\n")
        for r in recs:
            f.write(json.dumps(r) + "\n")
    try:
        plot(recs, band, os.path.join(args.out, "numerics.png"),
             f"{head['model']} demo, {head['iters']} iterations, {head['card']}, torch {head['torch']}")
    except ImportError:
        print("numerics.png: not written, matplotlib is not installed", flush=True)
    return md


def header(args):
    import torch

    from train import card_name, run_head  # bench/train.py
    card = card_name(torch.device(args.device), threads=False)  # each mode's run may be a process of its own
    return dict(model=args.model, iters=args.iters, seed=args.seed, **run_head(card))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pspnet", choices=("fcn", "pspnet", "deeplabv3", "deeplabv3plus"))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--kernels", default="auto", choices=("auto", "fused", "torch"))
    p.add_argument("--crop", type=int, default=0, help="train crop (0: the demo preset's 64)")
    p.add_argument("--batch", type=int, default=0, help="batch (0: the demo preset's 4)")
    p.add_argument("--val_images", type=int, default=0, help="evaluate on the first N val images (0: all 16)")
    p.add_argument("--num_workers", type=int, default=None, help="loader workers (default: the demo preset's 1)")
    p.add_argument("--work_dir", default=os.path.join("work_dirs", "numerics"), help="the runs' folders")
    p.add_argument("--jobs", type=int, default=1, help="modes trained at once, each in a process of its own")
    p.add_argument("--out", required=True, help="folder for numerics.md / .jsonl / .png")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # --jobs: a process trains this one mode ...
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)  # ... and writes its record here
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.one is not None:
        args.modes = [args.one]
    elif "fp32" not in args.modes:
        p.error("--modes: fp32 is the reference every check compares with; include it")
    # fp32 first, then its yardstick: a run cut short still has the base and the band every check needs
    first = ["fp32"] + [YARDSTICK] * (YARDSTICK in args.modes)
    args.modes = first + [m for m in args.modes if m not in first]
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    if args.one is not None:
        rec = try_one(args.one, args)
        with open(args.record + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(args.record + ".tmp", args.record)
        return
    head = header(args)
    print(f"# numerics: {head['card']} | torch {head['torch']} | commit {head['commit']} | modes "
          f"{','.join(args.modes)}", flush=True)
    recs, md = train_all(args, argv, head) if args.jobs > 1 else train_here(args, head)
    print("\n" + md)
    failed = [r["mode"] for r in recs if r["status"] != "ok" or r["checks"]]
    print(f"VERDICT: {len(recs) - len(failed)}/{len(recs)} modes pass" +
          (f"; failing: {', '.join(failed)}" if failed else ""), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
