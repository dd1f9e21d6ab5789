"""The training loop and the run set-up every script shares: `main(SEGMENTOR_CFG, build_model, argv)`.

The recipe is ssseg's (spec §7): SGD lr 0.01 / momentum 0.9 / wd 5e-4 on every parameter, poly lr (power 0.9, floor
1e-4) set before each step from the number of finished iterations, 130 epochs x len(loader) iterations at a total
batch of 16, loss = CE(out) + 0.4 CE(aux). Where the upsampling happens (spec §5, §8):
  train: the model returns low-resolution logits; seg_cross_entropy upsamples both to the crop size before the CE;
  eval:  common/infer.py resizes low-resolution logits straight to the ORIGINAL image size, then argmax.
One step code path for every AMP mode (`with amp.autocast()`, `amp.backward`, `amp.step`): the loop never asks
which kind it has. A non-finite gradient never reaches the weights (amp.step skips), a skipped step puts the BN
running stats back (common/guard.py), and a run that keeps overflowing stops with a message instead of silently
training nothing. Each training run writes into its own locked folder under the work dir (common/runs.py).
"""
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
import traceback

import numpy as np
import torch

from . import checkpoint, config, data, dist, errors, fold, infer, layers, report, runs
from .amp import Amp, AmpStateError
from .amp_report import AmpReport
from .errors import UserError
from .guard import BufferGuard

# ----------------------------------------------------------------------------------------------------------------
# schedule


def poly_lr(iteration, max_iters, base_lr=0.01, power=0.9, min_lr=1e-4):
    """ssseg's PolyScheduler (spec §7): (1 - it / max)^power x (base - min) + min; it = finished iterations."""
    return (1 - iteration / max_iters) ** power * (base_lr - min_lr) + min_lr


# ----------------------------------------------------------------------------------------------------------------
# one iteration (bench/train.py and bench/step_profile.py time this very function)


def seg_loss(out, targets, aux_weight):
    """(total, cls, aux) of spec §6; aux as the reference logs it, x aux_weight (0.4), so that total = cls + aux."""
    loss_cls = layers.seg_cross_entropy(out["out"], targets, data.IGNORE_INDEX)  # upsampled to the crop inside
    loss_aux = aux_weight * layers.seg_cross_entropy(out["aux"], targets, data.IGNORE_INDEX)
    return loss_cls + loss_aux, loss_cls, loss_aux


def train_step(model, images, targets, criterion, amp, optimizer, guard):
    """Forward under autocast, the loss, backward, and the step unless a gradient or a BatchNorm buffer came out
    non-finite (then the buffers are put back: guard is a common.guard.BufferGuard of the model).
    Returns (loss, loss_cls, loss_aux, skipped)."""
    optimizer.zero_grad(set_to_none=True)
    guard.snapshot()
    with amp.autocast():
        out = model(images)  # {'out': (B, K, H/8, W/8) (H/4: DeepLabV3+), 'aux': (B, K, H/8, W/8)}
        loss, loss_cls, loss_aux = criterion(out, targets)
    amp.backward(loss, optimizer)
    bad_buffers = not guard.finite()  # BN saw an inf/NaN (or overflowed its variance) in this forward
    skipped = amp.step(optimizer, skip=bad_buffers)
    if skipped:
        guard.restore()
    return loss, loss_cls, loss_aux, skipped


# ----------------------------------------------------------------------------------------------------------------
# logging: rank 0 prints, appends to the run folder's log.txt (every line time-stamped), and writes one JSON object
# per record to its metrics.jsonl


class Logger:
    """work_dir None: print only, keeping the lines until attach(run folder) writes them (--eval etc. never do)."""

    def __init__(self, work_dir=None):
        self.work_dir, self.main, self._held = None, dist.is_main(), []
        self.tb = None  # a common.tboard.Writer with --tensorboard
        if work_dir:
            self.attach(work_dir)

    def attach(self, folder):
        self.work_dir = folder
        if self.main:
            os.makedirs(folder, exist_ok=True)
            if os.path.exists(os.path.join(folder, "log.txt")):  # a resumed run: mark where its lines begin
                self.to_file(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: a new process in "
                             f"this run folder ====")
            held, self._held = self._held, []
            for name, line in held:
                self.to_file(line, name)

    def __call__(self, msg, echo=True):
        if self.main:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            msg = "\n".join(f"{stamp} {line}" for line in str(msg).split("\n"))
            if echo:
                print(msg, flush=True)
            self.to_file(msg)

    def to_file(self, line, name="log.txt"):
        if not self.main:
            return
        if self.work_dir is None:
            self._held.append((name, line))
            return
        with open(os.path.join(self.work_dir, name), "a") as f:
            f.write(line + "\n")

    def record(self, **kv):
        self.to_file(json.dumps(kv), "metrics.jsonl")
        if self.main and self.tb is not None:
            self.tb.record(kv)


def peak_memory_gb(device):
    """The log's `mem`: on CUDA the peak allocated since the last call, i.e. over the log window (as mmengine's; the
    first window's includes cudnn.benchmark's trials), on the CPU the process's peak RSS so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host max RSS (KiB on Linux)


def _progress(it, total, width=20):
    done = int(width * it / total)
    return "[" + "#" * done + "." * (width - done) + "]"


# ----------------------------------------------------------------------------------------------------------------
# training


class TooManySkippedSteps(UserError, RuntimeError):
    pass


def fit(cfg, model, optimizer, amp, loader, val_loader=None, start_iter=0, device="cpu", log=print):
    """Train from iteration start_iter to the end of the schedule; evaluate and checkpoint on the configured epochs.

    loader.sampler must be a data.ResumableSampler (set_epoch(epoch, start_batch)); returns the last eval.
    """
    device = torch.device(device)
    raw = dist.unwrap(model)
    ipe = loader.sampler.batches_per_epoch()  # iterations per epoch (spec §2.3)
    max_iters = cfg["max_iters"] or cfg["max_epochs"] * ipe
    max_epochs = math.ceil(max_iters / ipe)
    stop = min(cfg.get("stop_iters") or max_iters, max_iters)
    epochs = f"{max_epochs} epoch{'s' if max_epochs > 1 else ''}"
    how = (f"{epochs} x {ipe}" if max_iters == max_epochs * ipe else
           f"--max_iters, within {epochs} of {ipe}")  # a --max_iters that ends mid-epoch
    log(f"schedule: {max_iters} iterations = {how} iterations/epoch at {loader.batch_size} images/rank x "
        f"{dist.world_size()} rank(s){f'; this run stops at {stop}' if stop < max_iters else ''}")
    it, metrics = start_iter, None
    # cfg['run_dir'] (set by _run): this run's folder under the work dir; each save there also points the work dir's
    # `latest` (root) at the new checkpoint
    folder, root = (cfg["run_dir"], cfg["work_dir"]) if cfg.get("run_dir") else (cfg["work_dir"], None)
    skipped_total = skipped_run = empty_total = 0
    guard = BufferGuard(raw)  # a skipped step puts the BN running stats back (common/guard.py)
    # --max_skipped_steps counts consecutive skips, except the dynamic loss scale's warm-up: until the first clean
    # step, a skip that halves the scale and leaves it >= 1 is the scale looking for its level (fp16: 65536 -> ~4096)
    settled = start_iter > 0
    window = dict(sums=0.0, n=0, images=0, t=time.time())
    model.train()

    def criterion(out, targets):  # common/amp_report.py replays it on a batch it diagnoses
        return seg_loss(out, targets, cfg["aux_weight"])
    reporter = AmpReport(cfg, model, amp, optimizer, folder, log, criterion)  # --amp_report, skipped-step diagnosis
    kept = report.best_kept(report.evaluations(folder))  # a resumed run's best so far
    best = kept["mIoU"] if kept else -math.inf

    def save(tag):
        rng = dist.all_gather_object(checkpoint.rng_state())  # every rank's generators (rank r resumes from rng[r])
        if dist.is_main():
            state = dict(model=raw.state_dict(),  # fp32; for apex O2 the masters (Amp's state-dict hooks)
                         optimizer=optimizer.state_dict(), amp=amp.state_dict(), iteration=it, epoch=it // ipe,
                         max_iters=max_iters, rng=rng, config=_jsonable(cfg))
            path = os.path.join(folder, f"checkpoint-{tag}.pth")
            try:
                log(f"saved {checkpoint.save(path, state, root)}")
            except checkpoint.NonFiniteState as e:  # never written, never pointed to
                log(f"WARNING: not saving {path}: {e}; latest stays {checkpoint.latest(folder) or 'unset'}")
                path = None
            else:
                # ssseg keeps every epoch's file (130 x ~0.4 GB for PSPNet); we keep the newest few (and the best)
                for old in checkpoint.older_than_newest(folder, cfg.get("keep_checkpoints", 0)):
                    os.remove(old)
        dist.barrier()
        return path if dist.is_main() else None

    while it < stop:
        epoch = it // ipe
        loader.sampler.set_epoch(epoch, it % ipe)  # mid-epoch resume: skip the batches this epoch already used
        for images, targets in loader:
            # lr from the number of finished iterations (spec §7 step 1): the first step uses the base lr
            lr = poly_lr(it, max_iters, cfg["lr"], cfg["power"], cfg["min_lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            if cfg.get("channels_last"):
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)  # (B, H, W) int64, 255 = ignore
            scale_before = None if settled else amp.loss_scale  # (a host sync: only until the scale settles)
            with reporter.step(it, images, targets) as watch:  # hooks only on --amp_report steps
                loss, loss_cls, loss_aux, skipped = train_step(model, images, targets, criterion, amp, optimizer,
                                                               guard)
                if not skipped:
                    settled, skipped_run = True, 0
                elif settled or not 1.0 <= amp.loss_scale < scale_before:
                    skipped_run += 1
                watch.outcome(skipped, stop=skipped_run >= cfg["max_skipped_steps"])  # diagnosed on exit
            it += 1
            # bookkeeping, summed on the device and read at the log interval: no host sync per step. An empty
            # batch (no labelled pixel): the reference's mean CE would be NaN here; ours is 0 (spec §6 edge case)
            empty = (targets == data.IGNORE_INDEX).all()
            window["sums"] = window["sums"] + torch.stack([loss.detach().double(), loss_cls.detach().double(),
                                                           loss_aux.detach().double(), empty.double()])
            skipped_total += int(skipped)
            window["n"] += 1
            window["images"] += images.shape[0]
            if it % cfg["log_interval"] == 0 or it == stop:
                empty_total = _log_progress(log, window, it, max_iters, epoch, max_epochs, lr, amp, skipped_total,
                                            skipped_run, empty_total, device)
            if skipped_run >= cfg["max_skipped_steps"]:
                last_ckpt = checkpoint.latest(folder)
                msg = (f"stopping at iteration {it}: the last {skipped_run} steps were all skipped for non-finite "
                       f"gradients or BatchNorm statistics (loss {loss.item():.4g}, loss scale {amp.loss_scale:g}; "
                       f"--max_skipped_steps {cfg['max_skipped_steps']}). The model was not touched by them; the "
                       f"last good checkpoint is {last_ckpt or 'none (none written yet in this run)'}.")
                log(msg)
                raise TooManySkippedSteps(msg)
            if it >= stop or it % ipe == 0:
                break
        # end of an epoch (or of this run's share of one)
        end_of_epoch, last = it % ipe == 0, it == max_iters
        ep = math.ceil(it / ipe)  # 1-based number of the epoch just finished
        saved = None  # the checkpoint of this iteration (rank 0), which an evaluation now may make the best
        if _due(cfg["save_interval_epochs"], ep, end_of_epoch, last):
            saved = save("final" if last else f"epoch-{ep}")
        elif it == stop < max_iters:
            saved = save(f"iter-{it}")  # a planned stop mid-schedule: checkpoint so that --resume continues from here
        if val_loader is not None and _due(cfg["eval_interval_epochs"], ep, end_of_epoch, last):
            tb = getattr(log, "tb", None)
            from .tboard import NUM_PICTURES
            net, eval_amp = fold.for_eval(model, cfg, amp, log)  # a folded copy: the training model is untouched
            metrics = infer.evaluate(net, val_loader, cfg["num_classes"], device, cfg, eval_amp, log,
                                     pictures=NUM_PICTURES if tb is not None else 0)
            if saved is not None and metrics["mIoU"] > best:  # --keep_checkpoints' pruning never takes it
                best = metrics["mIoU"]
                log(f"best mIoU so far: {os.path.basename(saved)} is also {checkpoint.keep_as_best(saved)}")
            if hasattr(log, "record"):
                ckpt = {"checkpoint": os.path.basename(saved)} if saved else {}  # written at this iteration
                log.record(kind="eval", iteration=it, epoch=ep, **ckpt, **{k: metrics[k] for k in (
                    "mIoU", "mAcc", "aAcc", "precision", "IoU", "Acc")})
            if tb is not None:
                tb.pictures(it, metrics.pop("pictures"))
            model.train()
    return metrics


def _due(every, ep, end_of_epoch, last):
    """Whether a checkpoint / evaluation every `every` epochs (0 = never: smoke tests) falls here: at the end of epoch
    ep (1-based) when ep is a multiple of `every`, and always at the schedule's end."""
    return bool(every) and (last or (end_of_epoch and ep % every == 0))


def _log_progress(log, w, it, max_iters, epoch, max_epochs, lr, amp, skipped_total, skipped_run, empty_total,
                  device):
    """The window's line and record; returns the run's empty batches so far (this window's counted over all ranks)."""
    # losses averaged over the window and over ranks (spec §6: logged losses are all-reduced)
    where = dist.collective_device()
    t = torch.cat([w["sums"].to(where), torch.tensor([w["n"], w["images"]], dtype=torch.float64, device=where)])
    loss, cls, aux, new_empty, n, images = dist.all_reduce(t).tolist()
    empty_total += int(new_empty)
    elapsed = time.time() - w["t"]
    ips = images / max(elapsed, 1e-9)
    eta = (max_iters - it) * elapsed / max(w["n"], 1)
    mem = peak_memory_gb(device)
    log(f"{_progress(it, max_iters)} it {it}/{max_iters} ep {epoch + 1}/{max_epochs} | loss {loss / n:.4f} "
        f"(cls {cls / n:.4f} aux {aux / n:.4f}) | lr {lr:.3e} | scale {amp.loss_scale:g} | skipped {skipped_total} "
        f"(run {skipped_run}) | empty batches {empty_total} | {ips:.1f} img/s | mem {mem:.2f} GB | "
        f"eta {report.hms(eta)}")
    if hasattr(log, "record"):
        log.record(kind="train", iteration=it, epoch=epoch + 1, loss=loss / n, loss_cls=cls / n, loss_aux=aux / n,
                   lr=lr, loss_scale=float(amp.loss_scale), skipped=skipped_total, empty_batches=empty_total,
                   img_s=ips, mem_gb=mem)
    w.update(sums=0.0, n=0, images=0, t=time.time())
    return empty_total


def _jsonable(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


# ----------------------------------------------------------------------------------------------------------------
# main: set-up once, then one of --summary / --eval / --predict / train


def _device(name):  # checked by config.parse (common.cli.check_device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _kernels(kind, device, log):
    import common
    if kind == "auto":
        if common.extension_loaded():
            keep, why = layers.AUTO[device.type]
            try:
                layers.set_kernels("fused", keep)
                return f"{layers.describe()} (auto for {device.type}: {why}; {common.build_info()})"
            except Exception as e:  # built, but without an op we need: say so, then run the torch composition
                log(f"kernels: fused unavailable ({e})")
        layers.set_kernels("torch")
        return "torch (auto: common._C not built; `pip install --no-build-isolation -e .` for fused)"
    try:
        layers.set_kernels(kind)
    except RuntimeError as e:  # --kernels fused without a built extension: ops.require names the build command
        raise errors.UserError(str(e)) from None
    return f"fused ({common.build_info()})" if kind == "fused" else kind


def _amp(cfg, device, log, **kw):
    """The run's Amp: fp16 on GPUs (the reference); on CPU bf16, in fp32 arithmetic where the CPU has no native bf16
    (common/cpu.py says which, and why, in the amp line or a warning)."""
    from .cpu import amp_plan
    dtype, fp32_math, note = amp_plan(cfg["amp_dtype"], device.type, cfg["amp"], kw.get("opt_level", "O1"))
    if note:
        log(note)
    return Amp(cfg["amp"], dtype=dtype, device=device.type, fp32_math=fp32_math, **kw)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(segmentor_cfg, build_model, argv=None, name=None):
    """A user's mistake (common.errors.UserError) ends as one line `<name>: error: ...` and exit status 2, also in
    log.txt once the run has one; any other exception is a bug and keeps its traceback (also written to log.txt)."""
    import __main__
    t0 = time.time()
    name = name or os.path.splitext(os.path.basename(getattr(__main__, "__file__", "run")))[0]
    notes = []
    cfg = config.parse(segmentor_cfg, argv, name, notes)  # flag mistakes exit here, before any folder is made
    rank, world, local_rank = dist.init(None if cfg["device"] == "auto" else torch.device(cfg["device"]).type)
    log = Logger()  # files only once training has its run folder (common/runs.py)
    try:
        device = _device(cfg["device"])
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
        if device.index is not None:  # --device cuda:N: the current GPU is the run's (pinned memory, cuDNN handles)
            torch.cuda.set_device(device)
        for note in notes:
            log(note)
        with contextlib.ExitStack() as stack:
            metrics = _run(cfg, segmentor_cfg, build_model, device, log, stack)
            if cfg.get("run_dir") and not (cfg["eval"] or cfg["predict"] or cfg["summary"]):
                log(report.final_summary(cfg["run_dir"], time.time() - t0,
                                         os.path.join(cfg["run_dir"], "pred") if cfg["save_predictions"] else None,
                                         _no_eval_reason(cfg)))
        return metrics
    except UserError as e:  # a user mistake or a bad file: one line, no traceback
        msg = f"{name}: error: {errors.one_line(e)}" + (f" (rank {dist.rank()})" if world > 1 else "")
        log(msg, echo=False)
        print(msg, file=sys.stderr, flush=True)
        raise errors.Exit(msg) from None
    except KeyboardInterrupt:  # Ctrl-C: not a bug, so no traceback; what was saved stays (writes are atomic)
        newest = checkpoint.latest(cfg["run_dir"]) if cfg.get("run_dir") else None
        msg = f"{name}: interrupted" + (f"; --resume {newest} continues from its newest checkpoint" if newest else
                                        "; this run had written no checkpoint" if cfg.get("run_dir") else "")
        log(msg, echo=False)
        print(msg, file=sys.stderr, flush=True)
        raise SystemExit(130) from None  # the shell's code for SIGINT
    except Exception:
        log(traceback.format_exc().rstrip(), echo=False)  # the traceback itself still goes to stderr
        raise
    finally:
        if log.tb is not None:
            log.tb.close()
        dist.shutdown()


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_pooled_bn_batch(model, batch):
    """A BatchNorm after global pooling (PSPNet's 1x1 bin, the ASPP image branch) sees one value per channel at batch
    1, which training refuses; without SyncBN over several ranks to pool the batch, say so before any work."""
    if batch == 1 and any(isinstance(m, torch.nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
                          for m in model.modules()):
        raise UserError("--batch_size 1: this model's global-pooling branch has a BatchNorm over 1x1 maps, which "
                        "cannot train on one image; use --batch_size 2 or more (the reference: 16)")


def _run(cfg, segmentor_cfg, build_model, device, log, stack):
    # system set-up (spec §7 steps 3-4): TF32 off unless asked, cudnn.benchmark on
    torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
    torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    torch.backends.cudnn.benchmark = True
    seed_everything(cfg["seed"])
    log("config:\n" + "\n".join(config.format_config(cfg)))
    log(f"kernels: {_kernels(cfg['kernels'], device, log)} | {dist.describe()} | device {device} | tf32 {cfg['tf32']}")

    # the data first: a wrong --data_root fails before the model is built (--predict and --summary need none)
    root = None if cfg["predict"] or cfg["summary"] else data.dataset_root(cfg["data"], cfg["data_root"], log)
    model = build_model(segmentor_cfg, num_classes=cfg["num_classes"])
    torch.manual_seed(cfg["seed"] + dist.rank())  # dropout streams differ per rank; the init above did not
    if cfg["summary"]:
        from .summary import summarize
        log(summarize(model, (1, 3, *cfg["crop_size"])))
        return None
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format

    if cfg["tensorboard"]:
        from .tboard import require
        require()  # a missing package stops here, before any work
    if cfg["eval"] or cfg["predict"]:
        return _infer(cfg, model, root, device, memory_format, log)
    return _train(cfg, model, root, device, memory_format, log, stack)


def _infer(cfg, model, root, device, memory_format, log):
    """--eval (its metrics) or --predict (None) with the checkpoint's weights."""
    pred_dir = cfg["out"] or os.path.join(cfg["work_dir"], "pred")  # --eval / --predict: beside the run folders
    if cfg["eval"] and cfg["save_predictions"] and _inside(pred_dir, root):
        raise UserError(f"--out {pred_dir}: inside the dataset {root}; the pictures would be written among (and could "
                        "replace) its files: pass a folder outside it")
    if cfg["predict"] or (cfg["eval"] and cfg["save_predictions"]):
        errors.make_folder(pred_dir, "--out")  # before any work: a file in the way is one line, not a traceback
        if not cfg["out"]:  # each --eval / --predict its own folder, as each training run: none replaces another's
            pred_dir = _on_main(lambda: runs.new_run_dir(pred_dir))
    if cfg["predict"]:
        images = infer.image_paths(cfg["predict"], log)
        names = infer.output_names(images, pred_dir)  # refused before any work: pictures never overwrite files
    # fp32 inference, as the reference's test.py (spec §10.14); half: --eval_amp
    flag = "--eval" if cfg["eval"] else "--ckpt"
    checkpoint.load_weights(model, checkpoint.resolve(cfg["eval"] or cfg["ckpt"] or "auto", cfg["work_dir"], flag,
                                                      log), log)
    model.to(device, memory_format=memory_format).eval()
    half = _amp(cfg, device, log) if cfg["eval_amp"] and cfg["amp"] != "none" else None  # autocast or a half copy
    if cfg["eval_amp"] and cfg["amp"] == "none":
        log("eval_amp: --amp none has no half type, so this runs in fp32 (--amp torch or apex picks one)")
    if half is not None and half.fp32_math:
        log(f"eval_amp: {half.describe()}")  # --eval_amp asked for the half type: say why it is fp32
    net, eval_amp = fold.for_eval(model, cfg, half, log)
    if cfg["predict"]:
        skipped = infer.predict_paths(net, images, names, pred_dir, cfg, device, eval_amp, log=log, tta=cfg["tta"])
        if skipped:
            raise SystemExit(1)  # the warnings above name each file; the rest were written
        return None
    val_loader = _val_loader(cfg, root, device)
    if cfg["save_predictions"]:  # an --out holding an earlier evaluation's pictures: refused before the work
        images = [image for image, _ in infer.prediction_inputs(cfg, val_loader)]
        infer.output_names(images, pred_dir, compare=True)
    metrics = infer.evaluate(net, val_loader, cfg["num_classes"], device, cfg, eval_amp, log, tta=cfg["tta"])
    infer.save_predictions(model, cfg, val_loader, pred_dir, device, half, log, cfg["tta"])
    return metrics


def _train(cfg, model, root, device, memory_format, log, stack):
    """Train, or --resume, to the schedule's end: the last evaluation's metrics (None without one)."""
    from .compile import compile_module
    if cfg["tta"]:
        log("tta: --tta applies to --eval and --predict (the reference's test.py); evaluations during training run "
            "one view, as the reference's")
    if cfg["eval_amp"]:
        log("eval_amp: --eval_amp applies to --eval and --predict; evaluations during training run in the training's "
            "precision")

    if dist.world_size() == 1:
        _check_pooled_bn_batch(model, cfg["batch_size"])

    ckpt, path = _starting_weights(cfg, model, log)
    if dist.world_size() > 1:
        dist.convert_sync_bn(model)
    model.to(device, memory_format=memory_format)
    # SGD over every parameter in one group: weight decay on BN and bias too (spec §1, §10.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    amp = _amp(cfg, device, log, opt_level=cfg["opt_level"])
    model, optimizer = amp.initialize(model, optimizer)  # before DDP, as apex requires
    compile_module(model, cfg["compile"], log)  # in place: same module, keys and parameters (common/compile.py)
    start_iter = 0 if ckpt is None else _restore(ckpt, path, optimizer, amp, cfg, log)
    log(f"amp: {amp.describe()}")
    # (DIST) fp16 gradient all-reduce: auto = the reference's choice (on for --amp torch fp16)
    model = dist.wrap_ddp(model, device, cfg["amp"], cfg["ddp_fp16_compress"], amp_dtype=amp.dtype)

    train_set = data.ADE20k(root, "train", data.train_transform(crop_size=tuple(cfg["crop_size"]),
                                                                scale=tuple(cfg["scale"])), cfg["num_classes"])
    # pinned batches only for a GPU run: the pin thread opens a context on the current GPU, whatever the run's device
    loader = data.train_loader(train_set, cfg["batch_size"], cfg["num_workers"], cfg["seed"],
                               cfg["num_train_images"], pin_memory=device.type == "cuda")
    val_loader = _val_loader(cfg, root, device)
    if ckpt is not None and _finished(ckpt, path, cfg, loader, log):
        return None  # nothing to do, nothing written
    # this run's own folder (common/runs.py): new, or the resumed checkpoint's; locked until the end
    cfg["run_dir"] = _open_run(cfg, path, log, stack)
    log.attach(cfg["run_dir"])
    if ckpt is not None:
        log(f"resume: {path} at iteration {ckpt['iteration']}")
        if os.path.basename(path) == "checkpoint-final.pth" and os.path.dirname(os.path.abspath(path)) == \
                os.path.abspath(cfg["run_dir"]) and dist.is_main():  # in place: another folder is not ours to touch
            _keep_final(path, ckpt["iteration"], log)
    if dist.is_main():
        name = os.path.join(cfg["run_dir"], "config.json" if ckpt is None else
                            f"config-resume-{ckpt['iteration']}.json")
        try:
            with open(name, "w") as f:
                json.dump(_jsonable(cfg), f, indent=1)
        except OSError as e:  # the first file a run writes: a full disk or quota shows here
            raise UserError(f"--work_dir: could not write {name} ({e.strerror or e}): is the disk full?") from None
    if cfg["tensorboard"] and dist.is_main():
        from .tboard import Writer
        log.tb = Writer(cfg["run_dir"])  # a missing package is a UserError: one line, nothing trained
        log(f"tensorboard: {log.tb.logdir}")
    log(f"data: {root} | train {loader.sampler.n} images, val {len(val_loader.dataset)} images")
    try:
        metrics = fit(cfg, model, optimizer, amp, loader, val_loader, start_iter, device, log)
    finally:  # also after a stop for skipped steps: the loss-scale curve is then the thing to look at
        if dist.is_main():
            from .plot import write_curves
            write_curves(cfg["run_dir"], log)
    infer.save_predictions(model, cfg, val_loader, os.path.join(cfg["run_dir"], "pred"), device, amp, log)
    return metrics


def _starting_weights(cfg, model, log):
    """Load what training starts from into `model`: the --resume checkpoint (returned with its path, for the rest of
    its state), else --init's weights, else the backbone's ImageNet weights (--pretrained), else PyTorch's init."""
    if cfg["resume"]:
        path = checkpoint.resolve(cfg["resume"], cfg["work_dir"])
        ckpt = checkpoint.load_training(path)
        sd = checkpoint.model_state(ckpt, path)
        checkpoint.check_matches(model, sd, path)
        model.load_state_dict(sd)  # fp32, before amp.initialize (O2 masters copy these)
        return ckpt, path
    if cfg["init"]:
        # weights only: the schedule starts at iteration 0 (ssseg:NAME: the published file, common/zoo.py)
        checkpoint.load_weights(model, checkpoint.resolve(cfg["init"], cfg["work_dir"], "--init", log), log,
                                fine_tune=True)
    elif cfg["pretrained"] != "none":
        from .backbone import load_pretrained
        load_pretrained(model.backbone_net, cfg["pretrained"], log=log)
    else:
        log("pretrained: none (training the backbone from scratch; the reference starts from ImageNet weights)")
    return None, None


def _restore(ckpt, path, optimizer, amp, cfg, log):
    """The --resume checkpoint's optimizer, AMP and RNG state (after amp.initialize); returns its iteration."""
    optimizer.load_state_dict(ckpt["optimizer"])
    try:
        amp.load_state_dict(ckpt["amp"])
    except AmpStateError as e:
        raise AmpStateError(f"--resume {path}: {e}") from None
    rng = ckpt["rng"]
    checkpoint.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])
    note = dist.resume_warning(len(rng), cfg["batch_size"])  # (DIST) saved by another world size: say so
    if note:
        log(f"WARNING: {note}")
    return ckpt["iteration"]


# the schedule keys whose change on --resume changes the lr curve (poly over max_iters) or the data order
_SCHEDULE = ("max_iters", "max_epochs", "batch_size", "num_train_images", "lr", "power", "min_lr")


def _finished(ckpt, path, cfg, loader, log):
    """--resume of a finished run: say so (True: nothing to do). A changed schedule: warn that the lr curve changes.
    A --stop_iters the run has already reached is a mistake (it would train nothing)."""
    it, max_iters = ckpt["iteration"], cfg["max_iters"] or cfg["max_epochs"] * loader.sampler.batches_per_epoch()
    saved = ckpt.get("max_iters")  # the schedule length it was trained with (older checkpoints lack it)
    if 0 < cfg.get("stop_iters", 0) <= it < max_iters:
        raise UserError(f"--stop_iters {cfg['stop_iters']}: {path} is already at iteration {it}; give a larger "
                        "value (it counts from the schedule's start), or leave it out to train to the end")
    if it >= max_iters:
        if saved in (None, max_iters):
            log(f"resume: {path} already finished at iteration {it}; nothing to do")
        else:
            log(f"resume: {path} is at iteration {it}, the end of this schedule is {max_iters}; nothing to do "
                f"(raise --max_iters / --max_epochs to train further)")
        return True
    old = ckpt.get("config") or {}
    changed = [f"--{k} {old[k]} -> {cfg[k]}" for k in _SCHEDULE if k in old and old[k] != cfg[k]]
    if changed or (saved is not None and saved != max_iters):
        log(f"WARNING: resuming {path} with another schedule ({', '.join(changed) or 'another iteration count'}; "
            f"{saved or '?'} -> {max_iters} iterations): the lr curve changes from iteration {it} on, so this run "
            f"will not match an uninterrupted one")
    return False


def _keep_final(path, it, log):
    """A finished run resumed for a longer schedule will write a new checkpoint-final.pth: keep the old one's content
    under its iteration."""
    kept = os.path.join(os.path.dirname(path), f"checkpoint-iter-{it}.pth")
    if not os.path.exists(kept):
        checkpoint.link_or_copy(path, kept)
    log(f"resume: the finished run's checkpoint stays as {kept} (this longer schedule writes a new final one)")


def _no_eval_reason(cfg):
    """Why a training run that logged no evaluation had none (the final summary's words)."""
    if not cfg["eval_interval_epochs"]:
        return "--eval_interval_epochs 0"
    if cfg["stop_iters"]:
        return (f"--stop_iters {cfg['stop_iters']}: stopped before the schedule's end, where it evaluates; --resume "
                "continues")
    return f"none was due: --eval_interval_epochs {cfg['eval_interval_epochs']}"


def _on_main(make):
    """make() on rank 0 (a folder it creates); every rank gets its result (or the same one-line error)."""
    result = err = None
    if dist.is_main():
        try:
            result = make()
        except UserError as e:
            err = str(e)
    result, err = dist.all_gather_object((result, err))[0]
    if err:
        raise UserError(err)
    return result


def _open_run(cfg, resume_path, log, stack):
    """Rank 0 creates/locks the run folder; every rank gets its name."""
    def make():
        folder, lock = runs.open_run(cfg["work_dir"], resume_path, log)
        stack.callback(lock.release)
        return folder
    return _on_main(make)


def _val_loader(cfg, root, device):
    val_set = data.ADE20k(root, "val", data.test_transform(scale=tuple(cfg["scale"])), cfg["num_classes"])
    if cfg["num_val_images"]:
        val_set.ids = val_set.ids[:cfg["num_val_images"]]
    return data.test_loader(val_set, num_workers=min(cfg["num_workers"], 2), pin_memory=device.type == "cuda")
