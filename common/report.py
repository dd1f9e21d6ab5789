"""The last lines of a training run's log: what it took, what it reached, where its files are."""
import os

from . import checkpoint
from .errors import BadFileError
from .plot import read_jsonl


def hms(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def evaluations(run_dir):
    """The evaluation records of a run folder's metrics.jsonl (a resumed run's include those before its resume)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [r for r in read_jsonl(path, "common/report.py") if r.get("kind") == "eval"]  # (a cut last line: skipped)


def best_kept(evals):
    """The best evaluation that had a checkpoint written at its iteration (the one checkpoint-best.pth names)."""
    return max((r for r in evals if r.get("checkpoint")), key=lambda r: r["mIoU"], default=None)


def final_summary(run_dir, seconds, pred_dir=None, no_eval="--eval_interval_epochs 0"):
    """Total time, best and last mIoU (from metrics.jsonl: a resumed run counts the evaluations before its resume
    too; NO_EVAL says why none ran), the newest and the best checkpoint and the prediction pictures' folder, as a few
    lines."""
    evals = evaluations(run_dir)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if evals:
        best = max(evals, key=lambda r: r["mIoU"])
        last = evals[-1]
        miou = (f"best mIoU {100 * best['mIoU']:.2f} (iteration {best['iteration']}) | last mIoU "
                f"{100 * last['mIoU']:.2f} (iteration {last['iteration']}, aAcc {100 * last['aAcc']:.2f})")
    else:
        miou = f"no evaluation ran ({no_eval})"
    try:
        ckpt = checkpoint.resolve("auto", run_dir)
    except FileNotFoundError:
        ckpt = "none written (--save_interval_epochs 0)"
    except BadFileError as e:  # a pointer edited or a checkpoint removed by hand: the run itself has finished
        ckpt = f"unknown ({e})"
    lines = [f"done in {hms(seconds)} | {miou}", f"  checkpoint: {ckpt}"]
    kept, best_path = best_kept(evals), os.path.join(run_dir, checkpoint.BEST)
    if kept is not None and os.path.isfile(best_path):
        lines.append(f"  best: {best_path} (iteration {kept['iteration']}, mIoU {100 * kept['mIoU']:.2f})")
    if pred_dir is not None and os.path.isdir(pred_dir):
        lines.append(f"  pictures: {pred_dir}{os.sep}")
    lines.append(f"  log: {os.path.join(run_dir, 'log.txt')} | metrics: {metrics_path}")
    return "\n".join(lines)
