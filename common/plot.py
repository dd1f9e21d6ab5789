"""curves.png from a run's metrics.jsonl: losses, lr, loss scale and skipped steps, and the evaluations.

Written at the end of training; on demand (also while a run is going) with

    python -m common.plot RUN_DIR        # -> RUN_DIR/curves.png (or --out PATH)
"""
import argparse
import json
import math
import os
import sys

from .errors import UserError, make_folder

SMOOTHING = 0.6  # TensorBoard's default exponential smoothing of the loss curves


def read_jsonl(path, who):
    """A .jsonl file's records in file order. A run killed mid-write leaves a partial last line: it is skipped, and
    WHO (the reading module) says so on stderr."""
    out, bad = [], []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    bad.append(n)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file of JSON lines") from None
    if bad:  # one line for them all: a log.txt passed by mistake would otherwise print one per line
        print(f"{who}: {path}: {len(bad)} line(s) not JSON, skipped (line {', '.join(map(str, bad[:5]))}"
              f"{', ...' if len(bad) > 5 else ''})", file=sys.stderr)
    return out


def cli_paths(parser, given, out, name, png, hint):
    """The run-folder CLIs (common.plot, common.amp_report): GIVEN (a run's folder, its NAME file itself, or a work
    dir: its newest run with one) -> the file and the PNG to write (OUT, else PNG beside the file). A missing file is
    a usage error naming HINT."""
    path = os.path.join(given, name) if os.path.isdir(given) else given
    if os.path.isdir(given) and not os.path.isfile(path):
        from .runs import runs
        folders = runs(given)
        newest = [r for r in folders if os.path.isfile(os.path.join(r, name))][-1:]
        if newest:  # a work dir: its newest run that has one
            path = os.path.join(newest[0], name)
        elif folders:
            parser.error(f"{given}: none of its {len(folders)} runs has {name} ({hint})")
    if not os.path.isfile(path):
        parser.error(f"{path}: no such file ({hint})")
    if out and (os.path.isdir(out) or out.endswith(os.sep)):  # a folder: the picture's usual name inside it
        out = os.path.join(out, png)
    if out and os.path.splitext(out)[1].lower() not in (".png", ".pdf", ".svg", ".jpg"):
        parser.error(f"--out {out}: give a .png (or .pdf, .svg, .jpg) file name")
    if out:  # its folder is made, as --predict's --out is (a file in the way is one line)
        try:
            make_folder(os.path.dirname(os.path.abspath(out)), "--out")
        except UserError as e:
            parser.error(str(e))
    return path, out or os.path.join(os.path.dirname(os.path.abspath(path)), png)


def read_records(path):
    """metrics.jsonl -> (train records, eval records), each sorted by iteration. A resumed run appends records for
    iterations it repeats; the later record of an iteration wins, as the resumed run is the one that continued."""
    by_kind = {"train": {}, "eval": {}}
    for rec in read_jsonl(path, "common/plot.py"):
        if rec.get("kind") in by_kind and "iteration" in rec:
            by_kind[rec["kind"]][rec["iteration"]] = rec
    return tuple([r[i] for i in sorted(r)] for r in (by_kind["train"], by_kind["eval"]))


def smooth(values, weight=SMOOTHING):
    """TensorBoard's debiased exponential moving average. As TensorBoard's, a non-finite value (a log window with an
    overflowed fp16 step) stays as it is and is left out of the average, so it does not blank the rest of the curve."""
    out, avg, k = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        k += 1
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** k))
    return out


def plot(metrics_path, out_path):
    """Draw curves.png; returns out_path. Needs matplotlib (a dependency, requirements.txt)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train, evals = read_records(metrics_path)
    if not train and not evals:
        raise ValueError(f"{metrics_path} has no train or eval records yet")
    it = [r["iteration"] for r in train]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), dpi=90)
    (loss_ax, lr_ax), (scale_ax, eval_ax) = ax
    mark = "o" if len(it) == 1 else None  # a run that logged once: a point, which a line alone would not show
    for key, label, colour in (("loss", "total", "C0"), ("loss_cls", "cls", "C1"),
                               ("loss_aux", "aux (weighted)", "C2")):
        v = [r[key] for r in train if key in r]
        if v and len(v) == len(it):
            loss_ax.plot(it, v, color=colour, alpha=0.25, lw=1)
            loss_ax.plot(it, smooth(v), color=colour, lw=1.8, marker=mark, label=f"{label} (smoothed)")
    loss_ax.set_title("loss (raw: faint)")
    lr_ax.plot(it, [r.get("lr", math.nan) for r in train], color="C3", marker=mark)
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    scale_ax.plot(it, [r.get("loss_scale", math.nan) for r in train], color="C4", marker=mark, label="loss scale")
    if any(r.get("loss_scale", 1) > 0 for r in train):
        scale_ax.set_yscale("log", base=2)
    skip_ax = scale_ax.twinx()
    skipped = [r.get("skipped", 0) for r in train]
    skip_ax.step(it, skipped, where="post", color="C5", label="skipped steps (total)")
    skip_ax.set_ylim(-0.05 * max(skipped + [1]), 1.1 * max(skipped + [1]))  # 0 sits just above the bottom axis
    skip_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    scale_ax.set_title("loss scale (1 = no scaling) and skipped steps")
    handles = scale_ax.get_legend_handles_labels()[0] + skip_ax.get_legend_handles_labels()[0]
    scale_ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    ev_it = [r["iteration"] for r in evals]
    for key, colour in (("mIoU", "C0"), ("mAcc", "C2"), ("aAcc", "C1")):
        v = [100 * r[key] if r.get(key) is not None else math.nan for r in evals]
        if any(not math.isnan(x) for x in v):
            eval_ax.plot(ev_it, v, "o-", color=colour, label=f"{key} (last {v[-1]:.2f})")
    eval_ax.set_title(f"evaluation ({len(evals)} so far)" if evals else "evaluation (none yet)")
    eval_ax.set_ylabel("%")
    eval_ax.set_ylim(0, 100)
    for a in (loss_ax, lr_ax, scale_ax, eval_ax):
        a.set_xlabel("iteration")
        a.grid(alpha=0.3)
    if evals:
        eval_ax.set_xlim(0, max(it + ev_it) * 1.05)
        eval_ax.legend(loc="best", fontsize=8)
    loss_ax.legend(loc="best", fontsize=8)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def write_curves(run_dir, log=print):
    """The end-of-training hook: curves.png beside metrics.jsonl, or one line saying why not (never raises)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        log("curves: none (the run stopped before its first logged iteration)")
        return
    try:
        log(f"curves: {plot(path, os.path.join(run_dir, 'curves.png'))}")
    except ImportError:
        log("curves: not written, matplotlib is not installed (pip install -r requirements.txt; then "
            f"`python -m common.plot {run_dir}`)")
    except (OSError, ValueError) as e:
        log(f"curves: not written ({e})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m common.plot", description=__doc__.split("\n")[0])
    p.add_argument("work_dir", help="a run's folder (holding metrics.jsonl), the metrics.jsonl file itself, or a "
                                    "work dir (its newest run)")
    p.add_argument("--out", default="", help="output PNG (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    path, out = cli_paths(p, args.work_dir, args.out, "metrics.jsonl", "curves.png",
                          "give a run's folder, e.g. work_dirs/pspnet_resnet50os8_apexfp16_ade20k_demo/<run>, or "
                          "its work dir")
    try:
        print(f"wrote {plot(path, out)}")
    except ImportError:
        p.exit(1, "python -m common.plot: matplotlib is not installed (pip install -r requirements.txt)\n")
    except (OSError, ValueError) as e:
        p.exit(1, f"python -m common.plot: {e}\n")


if __name__ == "__main__":
    main()
