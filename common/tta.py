"""Test-time augmentation as ssseg's `auginference` + test.py do it (spec §8; config `inference.tta`).

Each view is the already resized test image (the test scale) bilinearly rescaled by a ratio, and optionally
mirrored; the net's output of a mirrored view is mirrored back; every view's map is resized straight to the original
image size and the maps are averaged there. `--tta` = the multi-scale set with flip of ssseg's ADE20k configs.

What is averaged is ssseg's `use_probs_before_resize` (our --use_probs_before_resize): when true, `inference`
softmaxes the net's output over the classes before anything else: the low-resolution logits in whole mode, each
window's (after its resize to the window) in slide mode, before the windows' overlaps are averaged. So the bilinear
resize to the original size and the mean over the views act on probabilities. When false, on logits. Every ssseg
ADE20k config that offers the multi-scale + flip set (12 at HEAD eb1878c, each as a commented-out alternative
`inference` block) sets it true; the base config (one view, which the published FP16 numbers used) sets it false.
Our `auto` follows them: true with --tta, false without.
"""
import torch.nn.functional as F

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # ratios of the test scale


def use_probs(cfg, tta):
    """--use_probs_before_resize auto | true | false -> bool (auto: true with --tta, as ssseg's TTA configs)."""
    value = (cfg or {}).get("use_probs_before_resize", "auto")
    return bool(tta) if value == "auto" else value == "true"


def augmented_logits(forward, image, size, scales=SCALES, flip=True):
    """forward: (1, 3, h, w) -> (1, K, h', w') scores at any resolution (whole: 1/8, slide: the input's): logits, or
    probabilities when the caller softmaxes them (use_probs_before_resize; the softmax belongs inside forward, since
    in slide mode ssseg applies it to each window).

    Returns (1, K, H, W) fp32, the mean over len(scales) x (2 if flip else 1) views at the original size `size`.
    """
    total, n = None, 0
    for r in scales:
        if min(int(d * r) for d in image.shape[-2:]) < 1:
            continue  # a view with no pixel row or column (a very thin image at ratio 0.5): the others average
        # ssseg rescales the resized tensor with scale_factor (not a size): the same interpolation grid as theirs
        x = image if r == 1 else F.interpolate(image, scale_factor=r, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            out = forward(x.flip(-1) if mirrored else x).float()
            if mirrored:
                out = out.flip(-1)  # back to the unmirrored layout (ADE20k has no left/right class pairs to swap)
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
            total, n = (out if total is None else total + out), n + 1
    return total / n
