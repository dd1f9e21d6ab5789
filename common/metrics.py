"""Segmentation metrics from one confusion matrix over the whole split (ssseg_spec §8).

torchvision's ConfusionMatrix design (bincount on the data's device, int64, one all-reduce across ranks), with the
mIoU the reference reports: IoU_c = I_c / (P_c + L_c - I_c) summed over the whole dataset, then the nan-mean over
classes, where a class absent from both prediction and label (zero union) is NaN and left out. torchvision's plain
mean would turn every ADE20k run on a val subset into a NaN mIoU (STYLE.md §2, weakness 3). Beside it, mmseg's
table: Acc_c = I_c / L_c (NaN for a class never labelled), mAcc = its nan-mean, aAcc = sum I / sum L.
"""
import math

import torch
import torch.distributed as dist

from . import dist as segdist


class ConfusionMatrix:
    """mat[t, p] = number of valid pixels with label t predicted as p (int64 [K, K], rows = target)."""

    def __init__(self, num_classes, ignore_index=255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # moves to the data's device on update

    def update(self, pred, target):
        """pred, target: same shape, any integer dtype; pixels whose target is ignore_index are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"common/metrics.py: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("common/metrics.py: pred and target must be integer class ids (argmax the logits first)")
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        n = self.num_classes
        t, p = target.reshape(-1).long(), pred.reshape(-1).to(target.device).long()
        valid = t != self.ignore_index
        t, p = t[valid], p[valid]
        # out-of-range ids are a bug upstream (a label mapping, a head with the wrong class count): say so
        bad = (t < 0) | (t >= n) | (p < 0) | (p >= n)
        if bad.any():
            raise ValueError(f"common/metrics.py: class ids outside [0, {n}) that are not ignore_index="
                             f"{self.ignore_index}: target {t[bad].unique().tolist()[:8]}, "
                             f"pred {p[bad].unique().tolist()[:8]}")
        self.mat += torch.bincount(n * t + p, minlength=n * n).reshape(n, n)  # (K*t + p) -> cell (t, p)

    def reduce(self):
        """Sum the matrix over all ranks (call once, after the last update); a no-op in a single process."""
        if dist.is_available() and dist.is_initialized():
            # a rank that saw no image still holds its CPU zeros: all ranks must reduce on the same device
            self.mat = self.mat.to(segdist.collective_device())
            dist.all_reduce(self.mat)
        return self

    def compute(self):
        """{'aAcc', 'mIoU', 'mAcc'} as fractions and per-class 'IoU', 'Acc' lists (NaN where undefined)."""
        h = self.mat.double().cpu()
        inter, label, pred = h.diag(), h.sum(1), h.sum(0)  # I_c, L_c (label area), P_c (prediction area)
        iou = inter / (label + pred - inter)  # 0/0 -> NaN for a class absent from both
        acc = inter / label  # NaN for a class absent from the labels
        total = h.sum()
        return {
            "aAcc": (inter.sum() / total).item() if total > 0 else math.nan,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }

    def format(self, classes=None, columns=3, res=None):
        """mmseg's per-class table (IoU and Acc for each class present in prediction or label), `columns` classes per
        line to keep a 150-class table short, then the means. res: a compute() result to reuse."""
        res = res or self.compute()
        classes = classes or [str(c) for c in range(self.num_classes)]
        cells = [f"{name.split(',')[0][:16]:<16s} {100 * iou:6.2f} {_pct(acc)}"
                 for name, iou, acc in zip(classes, res["IoU"], res["Acc"]) if not math.isnan(iou)]
        head = " | ".join([f"{'class':<16s} {'IoU':>6s} {'Acc':>6s}"] * min(columns, max(len(cells), 1)))
        lines = [head] + [" | ".join(cells[k:k + columns]) for k in range(0, len(cells), columns)]
        absent = sum(math.isnan(v) for v in res["IoU"])
        lines.append(f"mIoU {_pct(res['mIoU'], 0)} | mAcc {_pct(res['mAcc'], 0)} | aAcc {_pct(res['aAcc'], 0)} "
                     f"| {self.num_classes - absent} classes present, {absent} absent from prediction and label "
                     "(not counted)")
        return "\n".join(lines)


def _pct(v, width=6):
    """A fraction as a percentage; 'nan' where undefined (the Acc of a class that is only predicted)."""
    return f"{'nan':>{width}s}" if math.isnan(v) else f"{100 * v:{width}.2f}"


def _nanmean(v):
    ok = ~torch.isnan(v)
    return (v[ok].sum() / ok.sum()).item() if ok.any() else math.nan
