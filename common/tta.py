"""Test-time augmentation as ssseg's `auginference` does it (spec §8; BASE config `inference.tta`).

Each view is the already resized test image (the test scale) bilinearly rescaled by a ratio, and optionally
mirrored; the net's logits of a mirrored view are mirrored back; every view's logits are resized straight to the
original image size and averaged there. Logits, not probabilities: the reference's `use_probs_before_resize` is False.
`--tta` = mmseg's / ssseg's usual multi-scale set with flip.
"""
import torch.nn.functional as F

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # ratios of the test scale


def augmented_logits(forward, image, size, scales=SCALES, flip=True):
    """forward: (1, 3, h, w) -> (1, K, h', w') logits at any resolution (whole: 1/8, slide: the input's).

    Returns (1, K, H, W) fp32, the mean over len(scales) x (2 if flip else 1) views at the original size `size`.
    """
    total, n = None, 0
    for r in scales:
        # ssseg rescales the resized tensor with scale_factor (not a size): the same interpolation grid as theirs
        x = image if r == 1 else F.interpolate(image, scale_factor=r, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            out = forward(x.flip(-1) if mirrored else x).float()
            if mirrored:
                out = out.flip(-1)  # back to the unmirrored layout (ADE20k has no left/right class pairs to swap)
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
            total, n = (out if total is None else total + out), n + 1
    return total / n
