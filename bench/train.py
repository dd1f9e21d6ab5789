"""Training-step throughput (images/s) and peak memory of the four segmentors, side by side with torchvision's.

One row = one (model, precision mode, kernels, memory format, batch) at one crop: a fresh model, SGD (lr 0.01,
momentum 0.9, wd 5e-4) and Amp, fed one synthetic device-resident batch (random images, random labels with ~10% ignore
pixels; no data loading), `--warmup` untimed steps (at least one), then the median of `--steps` timed steps (CUDA
events on the GPU, time.perf_counter on the CPU). Peak memory is torch.cuda.max_memory_allocated over the timed steps
(mmseg's "Mem" convention: below what nvidia-smi shows). The step is the trainer's own function,
common.train.train_step (forward under amp.autocast(), the loss seg_cross_entropy(out) + 0.4 * seg_cross_entropy(aux)
at crop size, amp.backward, the BN-buffer check, amp.step).

Also in every run, per batch:
  * our fp32 row (kernels torch, NCHW, TF32 off: the reference's setting, spec §7.3), the "vs fp32" base;
  * the peers: torchvision fcn_resnet50 / deeplabv3_resnet50 (random init, 150 classes, aux head, output stride 8)
    in their best configuration: torch.autocast fp16 (bf16 on CPU) + GradScaler + channels_last, with torchvision's
    own loss (CE on the input-size logits its model returns, aux weight 0.5). "vs tv" compares fcn with tv_fcn and
    every other segmentor with tv_deeplabv3 (the issue's goal is stated against deeplabv3_resnet50).
TF32 stays off for every row and cudnn.benchmark on (both as in the reference trainer).
MFU = img/s x training FLOPs per image / the card's dense fp16 tensor peak, with training FLOPs = 3 x 2 x the conv and
linear MACs of one training-mode forward (main + aux head, common.summary.count_macs): forward, backward-data and
backward-weight cost one forward each. BN, ReLU, interpolation and the loss are not counted.

    python bench/train.py --models pspnet,deeplabv3 --modes fp32,fp16,apex-O2 --batch 16 --out bench/results/x
    python bench/train.py                  # the whole grid: 4 x 5 x 2 x 2 x 2 rows + peers (hours; pick a subset)
    python bench/train.py --quick          # tiny sizes on the CPU: proves the script runs (CI), times nothing useful
    python bench/train.py --models pspnet --modes fp32 --compile none,default   # eager and compiled rows
With --compile, the model's forward is compiled in place as the trainer's --compile does (the loss and amp's scaler
stay eager) and the peers by torch.compile(model); the first step's extra time is the compile s column.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the four scripts and common/ live at the repo root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODELS = ("fcn", "pspnet", "deeplabv3", "deeplabv3plus")
PEERS = {"tv_fcn": "fcn_resnet50", "tv_deeplabv3": "deeplabv3_resnet50"}  # name -> torchvision constructor
# mode -> common.amp.Amp arguments (device added per run); apex-O1/O2 are our handwritten apex emulation
MODES = {
    "fp32": dict(kind="none"),
    "fp16": dict(kind="torch", dtype=torch.float16),
    "bf16": dict(kind="torch", dtype=torch.bfloat16),
    "apex-O1": dict(kind="apex", opt_level="O1"),
    "apex-O2": dict(kind="apex", opt_level="O2"),
}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def error_line(e, width=None):
    """Print the traceback of the exception being handled; return 'Type: its first line' for a row or a log line
    (every bench logs a failing row this way and goes on, exiting non-zero at the end)."""
    traceback.print_exc()
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:width]}"


# dense (no 2:4 sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, perf_anchors.md §5.1; first match on the device
# name wins. H100/H200 NVL and anything else not listed gets no MFU rather than a guessed one.
PEAK_FP16_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*(SXM|HBM3)", 989.4),  # the SXM5 card calls itself "NVIDIA H100 80GB HBM3"
    (r"H200(?!.*NVL)", 989.4),
    (r"A100", 312.0),
    (r"V100.*SXM", 125.0),
)


# ---- the peers' step (ours is the trainer's own, common.train.train_step: see build_ours)

def peer_step(model, images, labels, autocast, scaler, optimizer):
    """torchvision's reference step (references/segmentation/train.py): its outputs are already at input size."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        outputs = model(images)
        loss = F.cross_entropy(outputs['out'], labels, ignore_index=255) + \
            0.5 * F.cross_entropy(outputs['aux'], labels, ignore_index=255)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


# ---- building one row's model + step

def synthetic_batch(batch, crop, device, memory_format, num_classes=150):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g)  # normalised images are ~N(0, 1) per channel
    labels = torch.randint(0, num_classes, (batch, crop, crop), generator=g)
    labels[torch.rand(batch, crop, crop, generator=g) < 0.1] = 255  # ~10% ignore pixels, as ADE20k's "other"
    return images.to(device, memory_format=memory_format), labels.to(device)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)  # spec §1


def construct(name):
    """A fresh fp32 model on the CPU, random init: ours (the script's build_model) or a torchvision peer."""
    torch.manual_seed(0)
    if name in PEERS:
        from torchvision.models import segmentation
        # torchvision's backbone already uses replace_stride_with_dilation=[False, True, True]: output stride 8
        return getattr(segmentation, PEERS[name])(weights=None, weights_backbone=None, num_classes=150,
                                                  aux_loss=True)
    import importlib
    return importlib.import_module(name).build_model(num_classes=150)


def build_ours(model, mode, kernels, fmt, device, compile_mode="none"):
    """(step closure, model, amp description) for one of our segmentors, fresh from construct()."""
    from common.amp import Amp
    from common.compile import compile_module
    from common.config import DEFAULTS
    from common.guard import BufferGuard
    from common.layers import set_kernels
    from common.train import seg_loss, train_step
    set_kernels(kernels)  # raises (naming the build command) when fused kernels are not built
    model = model.to(device, memory_format=FORMATS[fmt]).train()
    optimizer = sgd(model)
    amp = Amp(device=device.type, **MODES[mode])
    model, optimizer = amp.initialize(model, optimizer)
    compile_module(model, compile_mode, log=lambda m: None)  # the trainer's --compile: the forward, in place
    guard = BufferGuard(model)

    def criterion(out, labels):
        return seg_loss(out, labels, DEFAULTS["aux_weight"])  # 0.4, the scripts' own

    def step(images, labels):  # the trainer's own step, BN-buffer guard included: a row times what a run does
        return train_step(model, images, labels, criterion, amp, optimizer, guard)[0]
    return step, model, amp.describe()


def build_peer(name, model, device, compile_mode="none"):
    model = model.to(device, memory_format=torch.channels_last).train()
    if compile_mode != "none":  # the fairest peer: torchvision + autocast + channels_last + torch.compile
        model.compile(mode=None if compile_mode == "default" else compile_mode)
    optimizer = sgd(model)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # CPU fp16 convs are a slow path
    autocast = torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 needs no loss scaling
    desc = f"torchvision {PEERS[name]}, torch.autocast {str(dtype)[6:]}, GradScaler {scaler.is_enabled()}"
    return (lambda images, labels: peer_step(model, images, labels, autocast, scaler, optimizer)), model, desc


# ---- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, images, labels, warmup, steps, device):
    """Median, min, max of `steps` step times in ms after `warmup` untimed ones; peak memory (bytes); first step s."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(images, labels)
        if i == 0:
            sync(device)
            first = time.perf_counter() - t0  # with --compile: tracing + compiling forward and backward + one step
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # after warm-up: no cudnn.benchmark trials in the peak
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step(images, labels)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step(images, labels)
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None  # no allocator statistics on the CPU
    return statistics.median(times), min(times), max(times), peak, first


_FLOPS = {}


def train_flops(name, crop, model):
    """Training FLOPs per image: 3 (fwd, bwd-data, bwd-weight) x 2 (FLOPs per MAC) x MACs of one training forward.

    Counted on the fresh fp32 CPU model, before the kernels switch and Amp touch it (count_macs runs a meta copy),
    so it is the same number for every mode, kernel and format of a model."""
    if (name, crop) not in _FLOPS:
        from common.summary import count_macs
        _FLOPS[name, crop] = 6 * sum(count_macs(model, (1, 3, crop, crop)).values())
    return _FLOPS[name, crop]


def run_row(row, args, device):
    """Fill row (a dict naming model/mode/kernels/format/batch) with timings; 'OOM' or the error otherwise."""
    fmt = row["format"]
    try:
        model = construct(row["model"])
        row["gflop_per_img"] = train_flops(row["model"], args.crop, model) / 1e9
        if row["model"] in PEERS:
            step, model, row["amp"] = build_peer(row["model"], model, device, row["compile"])
        else:
            step, model, row["amp"] = build_ours(model, row["mode"], row["kernels"], fmt, device, row["compile"])
        images, labels = synthetic_batch(row["batch"], args.crop, device, FORMATS[fmt])
        ms, ms_min, ms_max, peak, first = time_steps(step, images, labels, max(args.warmup, 1), args.steps, device)
        row.update(status="ok", step_ms=ms, step_ms_min=ms_min, step_ms_max=ms_max,
                   compile_s=first - ms / 1e3 if row["compile"] != "none" else None,
                   img_per_s=row["batch"] / ms * 1e3, peak_gib=None if peak is None else peak / 2**30)
        row["tflop_per_s"] = row["img_per_s"] * row["gflop_per_img"] / 1e3
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # recorded and shown; the run goes on and exits non-zero at the end
        row["status"] = "error: " + error_line(e)
    finally:
        from common.layers import set_kernels
        set_kernels("torch")
        torch._dynamo.reset()  # a compiled row's graphs and guards go with it
    # the traceback (and with it the model) is gone once the except block has exited: now the memory comes back
    step = model = images = labels = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---- ratios, header, output

def peer_of(model):
    return "tv_fcn" if model == "fcn" else "tv_deeplabv3"


def add_ratios(rows, peak_tflops):
    ok = {(r["model"], r["mode"], r["kernels"], r["format"], r["batch"], r["compile"]): r
          for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["mfu"] = r["tflop_per_s"] / peak_tflops if peak_tflops else None
        if r["model"] in PEERS:
            continue
        base = ok.get((r["model"], "fp32", "torch", "nchw", r["batch"], "none"))
        peers = [p for k, p in ok.items() if k[0] == peer_of(r["model"]) and k[4] == r["batch"]]
        # against the peer compiled the same way when there is one (a compiled row vs the compiled peer)
        peer = next((p for p in peers if p["compile"] == r["compile"]), peers[0] if peers else None)
        r["vs_fp32"] = r["img_per_s"] / base["img_per_s"] if base else None
        r["mem_vs_fp32"] = r["peak_gib"] / base["peak_gib"] if base and base["peak_gib"] else None
        r["vs_peer"] = r["img_per_s"] / peer["img_per_s"] if peer else None


def git_commit():
    """The commit the tables were measured at: DEVICE_CHECK_COMMIT where the tree came without its .git (the device
    check's copy), else git's short sha (+dirty)."""
    if os.environ.get("DEVICE_CHECK_COMMIT"):
        return os.environ["DEVICE_CHECK_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_head(card):
    """What ties a table to its run, in every bench's header: the card (or CPU), torch, commit, our extension's build
    and the UTC date."""
    import common
    return dict(card=card, torch=torch.__version__, commit=git_commit(), extension=common.build_info(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def card_name(device, threads=True):
    """The card, or the CPU by name with its cores and torch threads (threads=False where this process's threads do
    not describe the runs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}" + (f" ({os.cpu_count()} cores, {torch.get_num_threads()} threads)" if threads else "")


def card_peak(device_name):
    for pattern, tflops in PEAK_FP16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def header(args, device):
    card = card_name(device)
    if device.type == "cuda":
        card += f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    peak = args.peak_tflops or (card_peak(card) if device.type == "cuda" else None)
    return dict(run_head(card), peak_fp16_tflops=peak, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                crop=args.crop, warmup=args.warmup, steps=args.steps,
                settings="TF32 off, cudnn.benchmark on, synthetic device-resident batch, SGD momentum 0.9 wd 5e-4")


# The GPU goals the README states for training, all of PSPNet fp16 at batch 16 on 512x512 crops: (what, the row's
# key, bound, ">=" or "<="). "vs tv" is against torchvision's deeplabv3_resnet50 under autocast + channels_last.
GOALS = (("img/s", "img_per_s", 300.0, ">="), ("vs tv", "vs_peer", 1.3, ">="), ("vs fp32", "vs_fp32", 4.0, ">="),
         ("mem vs fp32", "mem_vs_fp32", 0.5, "<="))


def judge_goals(head, rows):
    """(why not judged, None) or (the fastest eager PSPNet fp16 row at batch 16, [(what, value, bound, op, verdict)]);
    judged only on a card at crop 512."""
    if head["card"].startswith("CPU") or head["crop"] != 512:
        return (f"not judged here (they are for a card at crop 512; this is {head['card'].split(' (')[0]}, "
                f"crop {head['crop']})"), None
    cands = [r for r in rows if r["status"] == "ok" and (r["model"], r["mode"], r["batch"], r["compile"])
             == ("pspnet", "fp16", 16, "none")]
    if not cands:
        return "not judged (no PSPNet fp16 row at batch 16, eager, ran ok)", None
    r = max(cands, key=lambda r: r["img_per_s"])
    judged = []
    for what, key, bound, op in GOALS:
        v = r.get(key)
        ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
        judged.append((what, v, bound, op, {None: "not measured", True: "met", False: "MISSED"}[ok]))
    return r, judged


def goal_lines(head, rows):
    """The goals' lines for train.md."""
    r, judged = judge_goals(head, rows)
    if judged is None:
        return [f"Goals: {r}"]
    return [f"Goals, judged on the fastest PSPNet fp16 row at batch 16 ({r['kernels']} kernels, {r['format']}):"] + \
        [f"- {what} {fmt(v, '.2f')} (goal {op} {bound:g}): {verdict}" for what, v, bound, op, verdict in judged]


def goals_verdict(head, rows):
    """The goals in a few words, for the VERDICT line (the device check's summary)."""
    r, judged = judge_goals(head, rows)
    if judged is None:
        return "goals not judged"
    missed = [what for what, *_, verdict in judged if verdict != "met"]
    return "goals all met" if not missed else "goals not met: " + ", ".join(missed)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


COLUMNS = ("model", "mode", "kernels", "format", "compile", "batch", "img/s", "step ms", "compile s", "peak GiB",
           "TFLOP/s", "MFU", "vs fp32", "mem vs fp32", "vs tv", "note")


def markdown(head, rows):
    lines = [f"# Training-step throughput: {head['card']}", "",
             f"torch {head['torch']}, CUDA {head['cuda']}, cuDNN {head['cudnn']}, commit {head['commit']}, "
             f"{head['date']}  ",
             f"{head['extension']}  ",
             f"crop {head['crop']}x{head['crop']}, median of {head['steps']} steps after {head['warmup']} warm-up; "
             f"{head['settings']}  ",
             f"MFU against {fmt(head['peak_fp16_tflops'], '.1f')} TFLOP/s dense fp16 (n/a for an unknown card or the "
             "CPU); FLOPs = 3 x 2 x conv/linear MACs of a training forward (main + aux head)  ",
             "vs fp32 / mem vs fp32: against our fp32 row (kernels torch, NCHW, TF32 off, not compiled) at the same "
             "batch; vs tv: against tv_fcn for fcn, tv_deeplabv3 otherwise (compiled the same way when present)  ",
             "compile s: first step - median step (tracing + compiling forward and backward), not in img/s", ""]

    def cells(r):
        note = r.get("amp", "") if r["status"] == "ok" else r["status"][:160]  # the whole message is in the JSON
        return [r["model"], r["mode"], r["kernels"], r["format"], r["compile"], str(r["batch"]),
                fmt(r.get("img_per_s"), ".1f"), fmt(r.get("step_ms"), ".1f"), fmt(r.get("compile_s"), ".0f"),
                fmt(r.get("peak_gib"), ".2f"),
                fmt(r.get("tflop_per_s"), ".3g"), fmt(r.get("mfu"), ".1%"), fmt(r.get("vs_fp32"), ".2f"),
                fmt(r.get("mem_vs_fp32"), ".2f"), fmt(r.get("vs_peer"), ".2f"), note.replace("|", "/")]
    return "\n".join(lines + md_table(COLUMNS, map(cells, rows)) + [""] + goal_lines(head, rows)) + "\n"


def md_table(columns, cell_rows):
    """A markdown table's lines: the header, the rule, one line per list of cells (bench/eval.py uses it too)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(cells) + " |" for cells in cell_rows]


# ---- the grid

def plan(args):
    rows = []
    for batch in args.batch:
        for model in args.models:
            grid = [(m, k, f, c) for c in args.compile for m in args.modes for k in args.kernels for f in args.formats]
            if args.baseline and ("fp32", "torch", "nchw", "none") not in grid:
                grid.insert(0, ("fp32", "torch", "nchw", "none"))  # the reference's setting, the base of "vs fp32"
            for mode, kernels, fmt_, comp in grid:
                rows.append(dict(model=model, mode=mode, kernels=kernels, format=fmt_, batch=batch, compile=comp))
        for peer in args.peers:
            for comp in args.compile:
                rows.append(dict(model=peer, mode="autocast", kernels="torch", format="nhwc", batch=batch,
                                 compile=comp))
    return rows


def csv(choices):
    def parse(s):
        items = [x for x in s.split(",") if x]
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=csv(MODELS), default=list(MODELS))
    p.add_argument("--modes", type=csv(MODES), default=list(MODES))
    p.add_argument("--kernels", type=csv(("torch", "fused")), default=["torch", "fused"])
    p.add_argument("--formats", type=csv(FORMATS), default=list(FORMATS), help="nchw, nhwc (channels_last)")
    p.add_argument("--peers", type=lambda s: [] if s == "none" else csv(PEERS)(s), default=list(PEERS),
                   help="torchvision peers, or none")
    p.add_argument("--compile", type=csv(("none", "default", "max-autotune")), default=["none"],
                   help="torch.compile modes: none, default, max-autotune (rows for each)")
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[16, 2], help="per-GPU batch")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn.benchmark search, allocator)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="add our fp32/torch/nchw row per model and batch when the grid lacks it")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense fp16 peak for MFU, for a card not listed")
    p.add_argument("--out", default=None, help="folder for train.md and train.json")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: fcn fp32+bf16 and tv_fcn, crop 32, batch 2, NCHW, 1 warm-up + 1 timed step")
    args = p.parse_args(argv)
    if args.quick:  # new defaults; flags given explicitly still win
        # the smallest segmentor and peer; bf16, not fp16: CPU fp16 training is a slow path (10x+ here)
        p.set_defaults(models=["fcn"], modes=["fp32", "bf16"], kernels=["torch"], formats=["nchw"], peers=["tv_fcn"],
                       batch=[2], crop=32, steps=1, warmup=1)
        args = p.parse_args(argv)
    return args


def write_tables(out, stem, md, head, columns, rows):
    """OUT/<stem>.md (the table) and OUT/<stem>.json (header, columns, rows), as bench/eval.py writes them too."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"header": head, "columns": columns, "rows": rows}, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the reference trainer's global settings (spec §7): TF32 off for matmul and cuDNN, cudnn.benchmark on
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    head = header(args, device)
    print(f"# {head['card']} | torch {head['torch']} CUDA {head['cuda']} | commit {head['commit']}", flush=True)
    rows = []
    for row in plan(args):
        run_row(row, args, device)
        rows.append(row)
        print(f"{row['model']:>14} {row['mode']:>13} {row['kernels']:>5} {row['format']} {row['compile']:>7} "
              f"b{row['batch']:<3} "
              f"{fmt(row.get('img_per_s'), '8.1f')} img/s  {fmt(row.get('peak_gib'), '6.2f')} GiB  "
              f"{row['status'] if row['status'] != 'ok' else row.get('amp', '')}", flush=True)
        add_ratios(rows, head["peak_fp16_tflops"])
        md = markdown(head, rows)
        if args.out:  # after every row: a run cut short by a time limit keeps the rows it finished
            write_tables(args.out, "train", md, head, COLUMNS, rows)
    print("\n" + md)
    errors = [r for r in rows if r["status"].startswith("error")]
    ok = [r for r in rows if r["status"] == "ok"]
    best = max((r for r in ok if r["model"] not in PEERS), key=lambda r: r["img_per_s"], default=None)
    print(f"VERDICT: {len(ok)}/{len(rows)} rows ok, {len(errors)} failed, "
          f"{sum(r['status'] == 'OOM' for r in rows)} OOM" + ("" if best is None else
          f"; fastest ours: {best['model']} {best['mode']} {best['kernels']} {best['format']} b{best['batch']} "
          f"{best['img_per_s']:.1f} img/s (vs fp32 {fmt(best.get('vs_fp32'), '.2f')}, vs tv "
          f"{fmt(best.get('vs_peer'), '.2f')}, MFU {fmt(best.get('mfu'), '.1%')})") +
          f"; {goals_verdict(head, rows)}", flush=True)
    if errors:
        sys.exit(f"{len(errors)} row(s) failed (see the tracebacks above); OOM rows are not failures")


if __name__ == "__main__":
    main()
