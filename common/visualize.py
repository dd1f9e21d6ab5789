"""Prediction pictures: the colour mask, an overlay with a legend, and image | ground truth | prediction.

Everything is drawn with cv2 (already a dependency, fast enough to run inside an evaluation): the legend lists the
classes present with their ADE palette colour, their first ADE name and their share of the pixels, largest first.
"""
import os

import cv2
import numpy as np

from . import data
from .errors import UserError

ALPHA = 0.5  # overlay = (1 - ALPHA) x image + ALPHA x mask, as ssseg's and mmseg's demos blend
IGNORE_COLOUR = (0, 0, 0)  # ground-truth pixels without a label (255)
_FONT, _ROW, _SWATCH, _PAD = cv2.FONT_HERSHEY_SIMPLEX, 22, 16, 8
_COLUMN = 215  # a legend column: swatch + the longest ADE name ('television receiver') + ' 100.0%'


def colorize(pred, palette=data.PALETTE):
    """(H, W) class ids -> (H, W, 3) uint8 RGB; ignore (255) is black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = palette
    lut[data.IGNORE_INDEX] = IGNORE_COLOUR
    return lut[np.asarray(pred, dtype=np.intp)]


def overlay(image, pred, alpha=ALPHA):
    """The RGB uint8 image blended with the colour mask of pred (same H x W)."""
    return cv2.addWeighted(image, 1 - alpha, colorize(pred), alpha, 0)


def legend_entries(pred, classes=data.CLASSES):
    """[(class id, short name, % of the labelled pixels)] of the classes in pred, largest share first."""
    pred = np.asarray(pred).ravel()
    pred = pred[pred != data.IGNORE_INDEX]
    counts = np.bincount(pred, minlength=len(classes))
    order = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    return [(int(c), classes[c].split(",")[0], 100.0 * counts[c] / pred.size) for c in order]


def _text(canvas, s, x, y, scale=0.5, colour=(20, 20, 20)):
    cv2.putText(canvas, s, (x, y), _FONT, scale, colour, 1, cv2.LINE_AA)


def legend(columns, height, palette=data.PALETTE):
    """A white panel: for each (title, entries) column, a title and one row per entry (swatch, name, %)."""
    rows = max(len(e) for _, e in columns) + 1
    height = max(height, _PAD + rows * _ROW + _PAD)
    width = _PAD + _COLUMN * len(columns)
    panel = np.full((height, width, 3), 255, np.uint8)
    for k, (title, entries) in enumerate(columns):
        x = _PAD + _COLUMN * k
        _text(panel, title, x, _PAD + 15, 0.55)
        for i, (c, name, pct) in enumerate(entries):
            y = _PAD + (i + 1) * _ROW
            cv2.rectangle(panel, (x, y + 3), (x + _SWATCH, y + 3 + _SWATCH), tuple(int(v) for v in palette[c]), -1)
            cv2.rectangle(panel, (x, y + 3), (x + _SWATCH, y + 3 + _SWATCH), (90, 90, 90), 1)
            _text(panel, f"{name} {pct:5.1f}%", x + _SWATCH + 6, y + 16)
    return panel


def _titled(image, title):
    """image with a white strip above it holding title."""
    strip = np.full((26, image.shape[1], 3), 255, np.uint8)
    _text(strip, title, 6, 18, 0.6)
    return np.concatenate([strip, image], 0)


def _hstack(panels, gap=6):
    h = max(p.shape[0] for p in panels)
    out = []
    for p in panels:
        out += [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255),
                np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(out[:-1], 1)


def overlay_picture(image, pred, classes=data.CLASSES):
    """Overlay with a legend of the predicted classes on its right."""
    entries = legend_entries(pred, classes)
    return _hstack([_titled(overlay(image, pred), "prediction"), legend([("predicted", entries)], image.shape[0])])


def compare_picture(image, label, pred, classes=data.CLASSES):
    """image | ground truth | prediction (the last two: the image blended with their mask), and a legend of both."""
    panels = [_titled(image, "image"), _titled(overlay(image, label), "ground truth"),
              _titled(overlay(image, pred), "prediction")]
    cols = [("ground truth", legend_entries(label, classes)), ("predicted", legend_entries(pred, classes))]
    return _hstack(panels + [legend(cols, panels[0].shape[0])])


def write(out_dir, stem, image, pred, label=None, classes=data.CLASSES):
    """<stem>.png (colour mask), <stem>_overlay.png and, with a label, <stem>_compare.png; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    pictures = {"": colorize(pred), "_overlay": overlay_picture(image, pred, classes)}
    if label is not None:
        pictures["_compare"] = compare_picture(image, label, pred, classes)
    paths = []
    for suffix, rgb in pictures.items():
        paths.append(os.path.join(out_dir, f"{stem}{suffix}.png"))
        if not cv2.imwrite(paths[-1], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise UserError(f"could not write {paths[-1]} (is the folder writable, the disk full?)")
    return paths


def denormalize(x):
    """A normalised (3, h, w) or (1, 3, h, w) input tensor back to (h, w, 3) RGB uint8."""
    x = x.detach().float().cpu().reshape(3, *x.shape[-2:]).permute(1, 2, 0).numpy()
    x = x * np.array(data.STD, np.float32) + np.array(data.MEAN, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)  # rint: a cast truncates 99.99998 to 99
