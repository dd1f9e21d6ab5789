"""The training loop, evaluation and prediction every script shares: `main(SEGMENTOR_CFG, build_model, argv)`.

The recipe is ssseg's (spec §7): SGD lr 0.01 / momentum 0.9 / wd 5e-4 on every parameter, poly lr (power 0.9, floor
1e-4) set before each step from the number of finished iterations, 130 epochs x len(loader) iterations at a total
batch of 16, loss = CE(out) + 0.4 CE(aux). Where the upsampling happens is decided here, once (spec §5, §8):
  train: the model returns low-resolution logits; seg_cross_entropy upsamples both to the crop size before the CE;
  eval:  low-resolution logits are resized straight to the ORIGINAL image size, then argmax (no intermediate size).
One step code path for every AMP mode (`with amp.autocast()`, `amp.backward`, `amp.step`): the loop never asks
which kind it has. A non-finite gradient never reaches the weights (amp.step skips), and a run that keeps
overflowing stops with a message instead of silently training nothing.
"""
import json
import math
import os
import random
import resource
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, config, data, dist, fold, layers

# ----------------------------------------------------------------------------------------------------------------
# schedule


def poly_lr(iteration, max_iters, base_lr=0.01, power=0.9, min_lr=1e-4):
    """ssseg's PolyScheduler (spec §7): (1 - it / max)^power x (base - min) + min; it = finished iterations."""
    return (1 - iteration / max_iters) ** power * (base_lr - min_lr) + min_lr


# ----------------------------------------------------------------------------------------------------------------
# logging: rank 0 prints, appends to work_dir/log.txt, and writes one JSON object per record to metrics.jsonl


class Logger:
    def __init__(self, work_dir):
        self.work_dir, self.main = work_dir, dist.is_main()
        if self.main:
            os.makedirs(work_dir, exist_ok=True)

    def __call__(self, msg):
        if self.main:
            print(msg, flush=True)
            with open(os.path.join(self.work_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def record(self, **kv):
        if self.main:
            with open(os.path.join(self.work_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(kv) + "\n")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host max RSS (KiB on Linux)


def _progress(it, total, width=20):
    done = int(width * it / total)
    return "[" + "#" * done + "." * (width - done) + "]"


def _hms(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------------
# evaluation and prediction


def slide_logits(model, image, crop, stride):
    """mmseg-style sliding window: (1, 3, H, W) -> (1, K, H, W) average of window logits upsampled to window size."""
    H, W = image.shape[-2:]
    (ch, cw), (sh, sw) = crop, stride
    ny, nx = max(math.ceil((H - ch) / sh), 0) + 1, max(math.ceil((W - cw) / sw), 0) + 1
    logits, count = None, image.new_zeros(1, 1, H, W)
    for i in range(ny):
        for j in range(nx):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = model(image[..., y1:y2, x1:x2])["out"].float()
            out = F.interpolate(out, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            if logits is None:
                logits = image.new_zeros(1, out.shape[1], H, W)
            logits[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict_logits(model, image, size, cfg, amp=None):
    """(1, 3, h, w) resized input -> (1, K, H, W) fp32 logits at the original size `size` (spec §8)."""
    with amp.autocast() if amp is not None else torch.autocast("cpu", enabled=False):
        if cfg.get("inference_mode", "whole") == "slide":
            logits = slide_logits(model, image, cfg["slide_crop"], cfg["slide_stride"])
        else:
            logits = model(image)["out"]  # (1, K, h/8, w/8)
    # straight from the low-resolution logits to the original H x W, no stop at the resized-input size (spec §10.6)
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model, loader, num_classes=150, device="cpu", cfg=None, amp=None, log=print, classes=None):
    """Whole-split confusion matrix (all ranks) -> {'aAcc', 'mIoU', 'IoU'}; prints the per-class IoU table."""
    from .metrics import ConfusionMatrix
    cfg = cfg or {}
    model = dist.unwrap(model)  # DDP's forward would broadcast buffers: ranks run different image counts here
    was_training = model.training
    model.eval()
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, ignore_index=data.IGNORE_INDEX)
    t0 = time.time()
    for image, label in loader:  # batch 1 (spec §2.3): images keep their own sizes
        image = image.to(device, non_blocking=True)
        if cfg.get("channels_last"):
            image = image.contiguous(memory_format=torch.channels_last)
        label = label.to(device, non_blocking=True)  # (1, H, W) original resolution, 255 = ignore
        logits = predict_logits(model, image, label.shape[-2:], cfg, amp)
        cm.update(logits.argmax(1), label)
    cm.reduce()
    res = cm.compute()
    model.train(was_training)
    iou = [float(v) for v in res["IoU"]]
    classes = classes or data.CLASSES
    present = [(c, v) for c, v in zip(classes, iou) if not math.isnan(v)]
    log(f"eval: {len(loader)} images/rank in {time.time() - t0:.1f} s | mIoU {100 * float(res['mIoU']):.2f} | "
        f"aAcc {100 * float(res['aAcc']):.2f} | {len(present)} of {num_classes} classes present "
        f"(the others are absent from prediction and label: not counted)")
    for k in range(0, len(present), 4):  # four columns of "class IoU"
        log("  " + "  ".join(f"{c.split(',')[0][:16]:>16s} {100 * v:6.2f}" for c, v in present[k:k + 4]))
    return {"aAcc": float(res["aAcc"]), "mIoU": float(res["mIoU"]), "IoU": iou}


def colorize(pred):
    """(H, W) class ids -> (H, W, 3) uint8 RGB with the ADE palette."""
    palette = np.asarray(data.PALETTE, dtype=np.uint8)
    return palette[np.asarray(pred, dtype=np.int64)]


@torch.no_grad()
def predict(model, paths, out_dir, cfg, device, amp=None, log=print):
    """Write <out_dir>/<stem>.png, the colour mask of each image in paths, at the image's own size."""
    model = dist.unwrap(model).eval()
    transform = data.test_transform(scale=tuple(cfg["scale"]))
    os.makedirs(out_dir, exist_ok=True)
    for path in paths:
        image = data.read_image(path)  # (H, W, 3) RGB uint8
        x, _ = transform(image, np.zeros(image.shape[:2], np.uint8))  # the label slot is unused here
        logits = predict_logits(model, x[None].to(device), image.shape[:2], cfg, amp)
        mask = colorize(logits.argmax(1)[0].cpu().numpy())
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        cv2.imwrite(out, cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))
    log(f"predict: wrote {len(paths)} colour masks to {out_dir}")


def image_paths(path):
    exts = (".jpg", ".jpeg", ".png", ".bmp")
    if os.path.isdir(path):
        paths = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(exts))
    else:
        paths = [path]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"--predict {path!r}: no image file (or folder of {'/'.join(exts)} files) there")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# training


class TooManySkippedSteps(RuntimeError):
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
    log(f"schedule: {max_iters} iterations = {max_epochs} epochs x {ipe} iterations/epoch at {loader.batch_size} "
        f"images/rank x {dist.world_size()} rank(s){f'; this run stops at {stop}' if stop < max_iters else ''}")
    it, metrics, last_ckpt = start_iter, None, None
    skipped_total = skipped_run = empty_total = 0
    window = dict(loss=0.0, cls=0.0, aux=0.0, n=0, images=0, t=time.time())
    model.train()

    def save(tag):
        nonlocal last_ckpt
        rng = dist.all_gather_object(checkpoint.rng_state())  # every rank's generators (rank r resumes from rng[r])
        if dist.is_main():
            state = dict(model=raw.state_dict(),  # fp32; for apex O2 the masters (Amp's state-dict hooks)
                         optimizer=optimizer.state_dict(), amp=amp.state_dict(), iteration=it, epoch=it // ipe,
                         rng=rng, config=_jsonable(cfg))
            last_ckpt = checkpoint.save(os.path.join(cfg["work_dir"], f"checkpoint-{tag}.pth"), state)
            log(f"saved {last_ckpt}")
            # ssseg keeps every epoch's file (130 x ~0.4 GB for PSPNet); we keep the newest few
            for old in checkpoint.older_than_newest(cfg["work_dir"], cfg.get("keep_checkpoints", 0)):
                os.remove(old)
        dist.barrier()

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
            optimizer.zero_grad(set_to_none=True)
            with amp.autocast():
                out = model(images)  # {'out': (B, K, H/8, W/8), 'aux': (B, K, H/8, W/8)}
                loss_cls = layers.seg_cross_entropy(out["out"], targets, data.IGNORE_INDEX)  # upsampled to crop
                loss_aux = layers.seg_cross_entropy(out["aux"], targets, data.IGNORE_INDEX)
                loss = loss_cls + cfg["aux_weight"] * loss_aux
            amp.backward(loss, optimizer)
            skipped = amp.step(optimizer)
            it += 1
            # bookkeeping
            if not bool((targets != data.IGNORE_INDEX).any()):
                empty_total += 1  # the reference's mean CE would be NaN here; ours is 0 (spec §6 edge case)
            skipped_total += int(skipped)
            skipped_run = skipped_run + 1 if skipped else 0
            window["loss"] += loss.item()
            window["cls"] += loss_cls.item()
            window["aux"] += loss_aux.item()
            window["n"] += 1
            window["images"] += images.shape[0]
            if it % cfg["log_interval"] == 0 or it == stop:
                _log_progress(log, window, it, max_iters, epoch, max_epochs, lr, amp, skipped_total, skipped_run,
                              empty_total, device)
            if skipped_run >= cfg["max_skipped_steps"]:
                msg = (f"stopping at iteration {it}: the last {skipped_run} steps were all skipped for non-finite "
                       f"gradients (loss {loss.item():.4g}, loss scale {amp.loss_scale:g}; --max_skipped_steps "
                       f"{cfg['max_skipped_steps']}). The weights were not touched by them; the last good "
                       f"checkpoint is {last_ckpt or 'none (none written yet in this run)'}.")
                log(msg)
                raise TooManySkippedSteps(msg)
            if it >= stop or it % ipe == 0:
                break
        # end of an epoch (or of this run's share of one)
        end_of_epoch, last = it % ipe == 0, it == max_iters
        ep = math.ceil(it / ipe)  # 1-based number of the epoch just finished
        every = cfg["save_interval_epochs"]  # 0 = never (smoke tests)
        if every and (last or (end_of_epoch and ep % every == 0)):
            save("final" if last else f"epoch-{ep}")
        elif it == stop < max_iters:
            save(f"iter-{it}")  # a planned stop mid-schedule: checkpoint so that --resume continues from here
        every = cfg["eval_interval_epochs"]  # 0 = never (smoke tests)
        if val_loader is not None and every and (last or (end_of_epoch and ep % every == 0)):
            net, eval_amp = fold.for_eval(model, cfg, amp, log)  # a folded copy: the training model is untouched
            metrics = evaluate(net, val_loader, cfg["num_classes"], device, cfg, eval_amp, log)
            if hasattr(log, "record"):
                log.record(kind="eval", iteration=it, epoch=ep, mIoU=metrics["mIoU"], aAcc=metrics["aAcc"],
                           IoU=metrics["IoU"])
            model.train()
    return metrics


def _log_progress(log, w, it, max_iters, epoch, max_epochs, lr, amp, skipped, skipped_run, empty, device):
    # losses averaged over the window and over ranks (spec §6: logged losses are all-reduced)
    t = torch.tensor([w["loss"], w["cls"], w["aux"], w["n"], w["images"]], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    loss, cls, aux, n, images = dist.all_reduce(t).tolist()
    elapsed = time.time() - w["t"]
    ips = images / max(elapsed, 1e-9)
    eta = (max_iters - it) * elapsed / max(w["n"], 1)
    mem = peak_memory_gb(device)
    log(f"{_progress(it, max_iters)} it {it}/{max_iters} ep {epoch + 1}/{max_epochs} | loss {loss / n:.4f} "
        f"(cls {cls / n:.4f} aux {aux / n:.4f}) | lr {lr:.3e} | scale {amp.loss_scale:g} | skipped {skipped} "
        f"(run {skipped_run}) | empty batches {empty} | {ips:.1f} img/s | mem {mem:.2f} GB | eta {_hms(eta)}")
    if hasattr(log, "record"):
        log.record(kind="train", iteration=it, epoch=epoch + 1, loss=loss / n, loss_cls=cls / n, loss_aux=aux / n,
                   lr=lr, loss_scale=float(amp.loss_scale), skipped=skipped, empty_batches=empty, img_s=ips,
                   mem_gb=mem)
    w.update(loss=0.0, cls=0.0, aux=0.0, n=0, images=0, t=time.time())


def _jsonable(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


# ----------------------------------------------------------------------------------------------------------------
# main: set-up once, then one of --summary / --eval / --predict / train


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
    return device


def _kernels(kind, log):
    import common
    if kind == "auto":
        if common.extension_loaded():
            try:
                layers.set_kernels("fused")
                return f"fused (auto; {common.build_info()})"
            except Exception as e:  # built, but without an op we need: say so, then run the torch composition
                log(f"kernels: fused unavailable ({e})")
        layers.set_kernels("torch")
        return "torch (auto: common._C not built; `pip install --no-build-isolation -e .` for fused)"
    layers.set_kernels(kind)
    return f"fused ({common.build_info()})" if kind == "fused" else kind


def _amp_dtype(cfg, device):
    if cfg["amp_dtype"] != "auto":
        return getattr(torch, cfg["amp_dtype"])
    # the reference uses fp16 on GPUs; on CPU, the half type common.amp measured to run best there
    from .amp import cpu_half_dtype
    return torch.float16 if device.type == "cuda" else cpu_half_dtype()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(segmentor_cfg, build_model, argv=None, name=None):
    import __main__
    name = name or os.path.splitext(os.path.basename(getattr(__main__, "__file__", "run")))[0]
    cfg = config.parse(segmentor_cfg, argv, name)
    rank, world, local_rank = dist.init(None if cfg["device"] == "auto" else torch.device(cfg["device"]).type)
    device = _device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    log = Logger(cfg["work_dir"])
    try:
        return _run(cfg, segmentor_cfg, build_model, device, log)
    finally:
        dist.shutdown()


def _run(cfg, segmentor_cfg, build_model, device, log):
    from .amp import Amp
    from .compile import compile_module
    # system set-up (spec §7 steps 3-4): TF32 off unless asked, cudnn.benchmark on
    torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
    torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    torch.backends.cudnn.benchmark = True
    seed_everything(cfg["seed"])
    log(f"config: {json.dumps(_jsonable(cfg))}")
    if dist.is_main():
        with open(os.path.join(cfg["work_dir"], "config.json"), "w") as f:
            json.dump(_jsonable(cfg), f, indent=1)
    log(f"kernels: {_kernels(cfg['kernels'], log)} | {dist.describe()} | device {device} | tf32 {cfg['tf32']}")

    model = build_model(segmentor_cfg, num_classes=cfg["num_classes"])
    torch.manual_seed(cfg["seed"] + dist.rank())  # dropout streams differ per rank; the init above did not
    if cfg["summary"]:
        from .summary import summarize
        log(summarize(model, (1, 3, *cfg["crop_size"])))
        return None
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    root = data.demo_root() if cfg["data"] == "demo" and not cfg["data_root"] else (cfg["data_root"] or "ADE20k")

    if cfg["eval"] or cfg["predict"]:  # fp32 inference, as the reference's test.py (spec §10.14); half: --eval_amp
        checkpoint.load_weights(model, checkpoint.resolve(cfg["eval"] or cfg["ckpt"] or "auto", cfg["work_dir"]), log)
        model.to(device, memory_format=memory_format).eval()
        half = Amp(cfg["amp"], dtype=_amp_dtype(cfg, device), device=device.type) \
            if cfg["eval_amp"] and cfg["amp"] != "none" else None  # autocast (O1) or a half folded copy
        net, eval_amp = fold.for_eval(model, cfg, half, log)
        if cfg["predict"]:
            predict(net, image_paths(cfg["predict"]), cfg["out"] or os.path.join(cfg["work_dir"], "predict"),
                    cfg, device, eval_amp, log=log)
            return None
        return evaluate(net, _val_loader(cfg, root), cfg["num_classes"], device, cfg, eval_amp, log)

    # weights: a checkpoint to resume from, else (optionally) ImageNet weights for the backbone
    ckpt = None
    if cfg["resume"]:
        path = checkpoint.resolve(cfg["resume"], cfg["work_dir"])
        ckpt = checkpoint.load(path)
        model.load_state_dict(checkpoint.model_state(ckpt))  # fp32, before amp.initialize (O2 masters copy these)
        log(f"resume: {path} at iteration {ckpt['iteration']}")
    elif cfg["init"]:
        checkpoint.load_weights(model, cfg["init"], log)  # weights only: the schedule starts at iteration 0
    elif cfg["pretrained"] != "none":
        from .backbone import load_pretrained
        load_pretrained(model.backbone_net, cfg["pretrained"], log=log)
    else:
        log("pretrained: none (training the backbone from scratch; the reference starts from ImageNet weights)")
    if dist.world_size() > 1:
        dist.convert_sync_bn(model)
    model.to(device, memory_format=memory_format)
    # SGD over every parameter in one group: weight decay on BN and bias too (spec §1, §10.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    amp = Amp(cfg["amp"], opt_level=cfg["opt_level"], dtype=_amp_dtype(cfg, device), device=device.type)
    model, optimizer = amp.initialize(model, optimizer)  # before DDP, as apex requires
    compile_module(model, cfg["compile"], log)  # in place: same module, keys and parameters (common/compile.py)
    start_iter = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        amp.load_state_dict(ckpt["amp"])
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])
        start_iter = ckpt["iteration"]
        note = dist.resume_warning(len(rng), cfg["batch_size"])  # (DIST) saved by another world size: say so
        if note:
            log(f"WARNING: {note}")
    log(f"amp: {amp.describe()}")
    # (DIST) fp16 gradient all-reduce: auto = the reference's choice (on for --amp torch fp16)
    model = dist.wrap_ddp(model, device, cfg["amp"], cfg["ddp_fp16_compress"], amp_dtype=amp.dtype)

    train_set = data.ADE20k(root, "train", data.train_transform(crop_size=tuple(cfg["crop_size"]),
                                                                scale=tuple(cfg["scale"])))
    loader = data.train_loader(train_set, cfg["batch_size"], cfg["num_workers"], cfg["seed"],
                                         cfg["num_train_images"])
    val_loader = _val_loader(cfg, root)
    log(f"data: {root} | train {loader.sampler.n} images, val {len(val_loader.dataset)} images")
    metrics = fit(cfg, model, optimizer, amp, loader, val_loader, start_iter, device, log)
    if cfg["save_predictions"] and dist.is_main():
        n = min(cfg["save_predictions"], len(val_loader.dataset))
        net, eval_amp = fold.for_eval(model, cfg, amp, log)
        predict(net, [val_loader.dataset.paths(i)[0] for i in range(n)], os.path.join(cfg["work_dir"], "pred"),
                cfg, device, eval_amp, log)
    return metrics


def _val_loader(cfg, root):
    val_set = data.ADE20k(root, "val", data.test_transform(scale=tuple(cfg["scale"])))
    if cfg["num_val_images"]:
        val_set.ids = val_set.ids[:cfg["num_val_images"]]
    return data.test_loader(val_set, num_workers=min(cfg["num_workers"], 2))
