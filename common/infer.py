"""Evaluation and prediction: the logits of one image (whole / sliding window / TTA views) at its original size,
the metrics pass over a val loader, and the pictures pass (common/visualize.py) over image files or val images.

Where the upsampling happens at test time (spec §5, §8): low-resolution logits are resized straight to the ORIGINAL
image size, then argmax (no intermediate size). Half precision only as the caller's amp asks (the reference's
test.py evaluates in fp32, spec §10.14).
"""
import math
import os
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import data, dist, errors, fold, visualize
from .report import hms
from .tta import augmented_logits, use_probs


def slide_logits(model, image, crop, stride, probs=False):
    """mmseg-style sliding window: (1, 3, H, W) -> (1, K, H, W) average of window logits upsampled to window size
    (probs: of their softmax, ssseg's use_probs_before_resize)."""
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
            out = out.softmax(1) if probs else out
            if logits is None:
                logits = image.new_zeros(1, out.shape[1], H, W)
            logits[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict_logits(model, image, size, cfg, amp=None, tta=False):
    """(1, 3, h, w) resized input -> (1, K, H, W) fp32 logits at the original size `size` (spec §8).

    tta: common/tta.py's flip + multi-scale views, averaged at the original size (the reference's test.py with
    `inference.tta` set); otherwise the one view the reference's evaluations use. With --use_probs_before_resize
    (auto: with tta) they are softmax probabilities instead, taken before any resize or average (common/tta.py)."""
    probs = use_probs(cfg, tta)

    def forward(x):
        with amp.autocast() if amp is not None else torch.autocast("cpu", enabled=False):
            if cfg.get("inference_mode", "whole") == "slide":
                return slide_logits(model, x, cfg["slide_crop"], cfg["slide_stride"], probs)
            out = model(x)["out"]  # (1, K, h/8, w/8) (h/4: DeepLabV3+)
            return out.float().softmax(1) if probs else out

    if tta:
        return augmented_logits(forward, image, size)
    # straight from the low-resolution logits to the original H x W, no stop at the resized-input size (spec §10.6)
    return F.interpolate(forward(image).float(), size=tuple(size), mode="bilinear", align_corners=False)


def precision(amp, model=None):
    """What evaluation arithmetic ran in, for the eval line: 'fp32', 'bf16 autocast', 'bf16 folded weights', ..."""
    if amp is None or amp.kind == "none":
        dtype = getattr(model, "dtype", torch.float32)  # common.fold.Folded: the copy is in its own dtype
        return {torch.float16: "fp16 folded weights", torch.bfloat16: "bf16 folded weights"}.get(dtype, "fp32")
    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}[amp.dtype]
    if amp.use_autocast or (amp.nvidia is not None and amp.cast_model is None):  # NVIDIA's O1 patches torch
        return f"{half} autocast"
    return f"{half} weights (apex {amp.opt_level})" if amp.cast_model is not None else "fp32"


PROGRESS_S = 60  # an evaluation longer than this logs its progress about this often


@torch.no_grad()
def evaluate(model, loader, num_classes=150, device="cpu", cfg=None, amp=None, log=print, classes=None, tta=False,
             pictures=0):
    """Whole-split confusion matrix (all ranks) -> {'aAcc', 'mIoU', 'mAcc', 'IoU', 'Acc', 'precision'}; logs mmseg's
    per-class table. pictures=N adds 'pictures': image | ground truth | prediction of this rank's first N images."""
    from .metrics import ConfusionMatrix
    cfg = cfg or {}
    model = dist.unwrap(model)  # DDP's forward would broadcast buffers: ranks run different image counts here
    was_training = model.training
    model.eval()
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, ignore_index=data.IGNORE_INDEX)
    classes = classes or data.CLASSES
    shown = []
    t0 = last = time.time()
    for i, (image, label) in enumerate(loader, 1):  # batch 1 (spec §2.3): images keep their own sizes
        image = image.to(device, non_blocking=True)
        if cfg.get("channels_last"):
            image = image.contiguous(memory_format=torch.channels_last)
        label = label.to(device, non_blocking=True)  # (1, H, W) original resolution, 255 = ignore
        pred = predict_logits(model, image, label.shape[-2:], cfg, amp, tta).argmax(1)
        cm.update(pred, label)
        if len(shown) < pictures:  # the input at the original size (the loader only holds the resized one)
            y = label[0].cpu().numpy()
            rgb = cv2.resize(visualize.denormalize(image), y.shape[::-1], interpolation=cv2.INTER_LINEAR)
            shown.append(visualize.compare_picture(rgb, y, pred[0].cpu().numpy(), classes))
        if time.time() - last > PROGRESS_S and i < len(loader):  # a long evaluation (--tta, a CPU) says where it is
            last, spent = time.time(), time.time() - t0
            log(f"eval: {i}/{len(loader)} images/rank in {spent:.0f} s, about {hms(spent * (len(loader) - i) / i)} "
                f"to go")
    cm.reduce()
    res = cm.compute()
    model.train(was_training)
    mode = cfg.get("inference_mode", "whole")
    scores = "probs" if use_probs(cfg, tta) else "logits"  # what was resized and averaged (common/tta.py)
    log(f"eval: {len(loader)} images/rank in {time.time() - t0:.1f} s | {precision(amp, model)} | {mode} | "
        f"tta {'flip + 6 scales' if tta else 'off'} | {scores} resized | mIoU {100 * res['mIoU']:.2f} | "
        f"mAcc {100 * res['mAcc']:.2f} | "
        f"aAcc {100 * res['aAcc']:.2f} | {sum(not math.isnan(v) for v in res['IoU'])} of {num_classes} classes "
        "present (the others are absent from prediction and label: not counted)")
    for line in cm.format(classes, res=res).splitlines()[:-1]:  # the last line would repeat the numbers above
        log("  " + line)
    out = {k: res[k] for k in ("aAcc", "mIoU", "mAcc", "IoU", "Acc")}
    out["precision"] = precision(amp, model)
    if pictures:
        out["pictures"] = shown
    return out


DEMO_NOTE = (f"note: a model trained on the demo dataset has seen only {len(data.DEMO_CLASSES)} of ADE20k's 150 "
             f"classes ({', '.join(data.DEMO_CLASSES)}); any other class in its pictures is noise")


@torch.no_grad()
def predict(model, items, out_dir, cfg, device, amp=None, log=print, tta=False, names=None):
    """For each image path (or (image, annotation) pair) in items: common/visualize.py's pictures in out_dir, named
    names[i] (default: the image's file name without its extension).

    An image that cannot be read is reported and skipped; returns (written, skipped)."""
    model = dist.unwrap(model).eval()
    transform = data.test_transform(scale=tuple(cfg["scale"]))
    if cfg.get("data") == "demo":
        log(DEMO_NOTE)
    written = skipped = 0
    for i, item in enumerate(items):
        path, ann = item if isinstance(item, tuple) else (item, None)
        try:
            image = data.read_image(path)  # (H, W, 3) RGB uint8
            label = cv2.LUT(data.read_label(ann), data.REDUCE_ZERO_LABEL) if ann else None
        except (OSError, ValueError) as e:  # read_image/read_label name the file and the problem
            log(f"WARNING: predict: skipping {path}: {e}")
            skipped += 1
            continue
        x, _ = transform(image, np.zeros(image.shape[:2], np.uint8))  # the label slot is unused here
        pred = predict_logits(model, x[None].to(device), image.shape[:2], cfg, amp, tta).argmax(1)[0].cpu().numpy()
        visualize.write(out_dir, names[i] if names else _stem(path), image, pred, label)
        written += 1
    kinds = "mask, _overlay" + (", _compare" if any(isinstance(i, tuple) for i in items) else "")
    log(f"predict: wrote {written}, skipped {skipped}" + (f" ({kinds} PNGs in {out_dir})" if written else ""))
    return written, skipped


def predict_paths(model, paths, names, out_dir, cfg, device, amp=None, log=print, tta=False):
    """--predict: predict() over paths, named names (output_names'); returns how many were skipped (on every rank).
    Under torchrun rank r takes paths r, r + world, ... (each file is written once, by one rank) and rank 0 logs
    every rank's lines."""
    if dist.world_size() == 1:
        return predict(model, paths, out_dir, cfg, device, amp, log, tta, names)[1]
    lines = []
    shard = slice(dist.rank(), None, dist.world_size())
    _, skipped = predict(model, paths[shard], out_dir, cfg, device, amp, lines.append, tta, names[shard])
    gathered = dist.all_gather_object((lines, skipped))
    for r, (rank_lines, _) in enumerate(gathered):
        for line in rank_lines:
            log(f"rank {r}: {line}")
    return sum(s for _, s in gathered)


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def output_names(paths, out_dir, compare=False):
    """The name each --predict input's pictures (NAME.png, NAME_overlay.png, with compare NAME_compare.png) get in
    out_dir: the file's name without its extension, or with it (a_jpg) where two inputs share that name. Raises a
    UserError, before anything is written, for an out_dir that holds input images or any of those pictures (the
    pictures would mix with, and could replace, the user's files or an earlier run's) and where two inputs' pictures
    would have the same name."""
    stems = [_stem(p) for p in paths]
    names = [s if stems.count(s) == 1 else f"{s}_{os.path.splitext(p)[1][1:]}" for s, p in zip(stems, paths)]
    held = [p for p in paths if os.path.dirname(os.path.realpath(p)) == os.path.realpath(out_dir)]
    if held:
        raise errors.UserError(f"--out {out_dir}: this folder holds the input image {held[0]}; the pictures would be "
                               "written among (and could replace) your files there: pass another --out folder")
    written_by = {}  # picture path -> the input that writes it
    for path, name in zip(paths, names):
        for suffix in ("", "_overlay") + (("_compare",) if compare else ()):
            out = os.path.realpath(os.path.join(out_dir, name + suffix + ".png"))
            if out in written_by:
                raise errors.UserError(f"--predict: {written_by[out]} and {path} would both write {out}; rename one, "
                                       "or predict them into different --out folders")
            if os.path.lexists(out):
                raise errors.UserError(f"--out {out_dir}: {os.path.basename(out)} is there already (an earlier "
                                       "--eval / --predict?) and would be replaced: pass a new or empty --out folder, "
                                       "or leave --out out (each run then gets a folder of its own)")
            written_by[out] = path
    return names


def image_paths(path, log=print):
    """--predict's input files: the file, or the folder's images (the files of other types it holds are named)."""
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
    if os.path.isdir(path):
        listed = os.listdir(path)
        paths = sorted(os.path.join(path, f) for f in listed if f.lower().endswith(exts))
        other = sorted(f for f in listed if not f.lower().endswith(exts) and os.path.isfile(os.path.join(path, f)))
        if other:
            log(f"predict: left out {len(other)} file(s) of {path} not named as images ({'/'.join(exts)}): "
                f"{', '.join(other[:5])}{', ...' if len(other) > 5 else ''}")
    else:
        paths = [path]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise errors.MissingFile(f"--predict {path!r}: no image file (or folder of {'/'.join(exts)} files) there")
    return paths


def prediction_inputs(cfg, val_loader):
    """(image, annotation) paths of the val images save_predictions draws: the first --save_predictions."""
    return [val_loader.dataset.paths(i) for i in range(min(cfg["save_predictions"], len(val_loader.dataset)))]


def save_predictions(model, cfg, val_loader, out_dir, device, amp, log, tta=False):
    """Pictures of the first --save_predictions val images, with their ground truth beside the prediction."""
    if cfg["save_predictions"] and dist.is_main():
        net, eval_amp = fold.for_eval(model, cfg, amp, log)  # the same folded copy as the evaluation's (cached)
        predict(net, prediction_inputs(cfg, val_loader), out_dir, cfg, device, eval_amp, log, tta)
