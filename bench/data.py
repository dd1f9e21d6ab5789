"""Train-pipeline throughput of common.data, in images/s for one worker (one process, one thread), decode included,
side by side in the same run with a plain implementation of the same steps (the reference's way: cv2.imread BGR,
float copies per step, np.unique for the crop rule, float32 converts for the distortion, F.pad at the end).

    python bench/data.py                 # 16 demo images of ADE size (683x512 and friends), 5 interleaved rounds
    python bench/data.py --quick         # 4 images, 2 rounds: proves the script runs (CI)
    python bench/data.py --out DIR       # also write DIR/data.md and DIR/data.json

It also times JPEG decoding with cv2, torchvision.io and PIL (the choice common.data's docstring explains).
Both pipelines run with torch and OpenCV limited to one thread: a DataLoader worker's share of the machine.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data as D  # noqa: E402

# ---- the plain pipeline: spec §2.1 written the obvious way, one step at a time


def plain_load(image_path, ann_path):
    image = cv2.imread(image_path)  # BGR, as the reference reads it
    raw = cv2.imread(ann_path, cv2.IMREAD_GRAYSCALE).astype(np.float32)
    label = np.where(raw == 0, 255, raw - 1).astype(np.float32)  # reduce-zero-label
    return image, label


def plain_convert(x, alpha=1, beta=0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def plain_train(image, label, crop=(512, 512), scale=(2048, 512), ratio=(0.5, 2.0), cat_max_ratio=0.75):
    # resize
    s = np.random.random_sample() * (ratio[1] - ratio[0]) + ratio[0]
    target = int(scale[0] * s), int(scale[1] * s)
    h, w = image.shape[:2]
    f = min(max(target) / max(h, w), min(target) / min(h, w))
    size = int(w * f + 0.5), int(h * f + 0.5)
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    # random crop with the category-ratio rule
    H, W = label.shape
    ch, cw = min(crop[0], H), min(crop[1], W)
    for _ in range(10):
        y, x = np.random.randint(0, H - ch + 1), np.random.randint(0, W - cw + 1)
        img_c, lab_c = image[y:y + ch, x:x + cw].copy(), label[y:y + ch, x:x + cw].copy()
        values, counts = np.unique(lab_c, return_counts=True)
        counts = counts[values != 255]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    if len(counts) > 0:
        image, label = img_c, lab_c
    # flip
    if np.random.rand() < 0.5:
        image, label = np.flip(image, 1).copy(), np.flip(label, 1).copy()
    # photometric distortion (BGR data, RGB2HSV codes: the reference's quirk)
    if np.random.randint(2):
        image = plain_convert(image, beta=np.random.uniform(-32, 32))
    mode = np.random.randint(2)
    if mode == 1 and np.random.randint(2):
        image = plain_convert(image, alpha=np.random.uniform(0.5, 1.5))
    if np.random.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = plain_convert(hsv[..., 1], alpha=np.random.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if np.random.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + np.random.randint(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and np.random.randint(2):
        image = plain_convert(image, alpha=np.random.uniform(0.5, 1.5))
    # normalise (BGR -> RGB), to tensor, centred pad
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)
    image = (image - np.array(D.MEAN, np.float32)) / np.array(D.STD, np.float32)
    image = torch.from_numpy(image.transpose(2, 0, 1).copy())
    label = torch.from_numpy(label)
    h, w = label.shape
    top, left = (crop[0] - h) // 2, (crop[1] - w) // 2
    pads = (left, crop[1] - w - left, top, crop[0] - h - top)
    return F.pad(image, pads, value=0.0), F.pad(label, pads, value=255.0).long()


# ---- timing


def time_decoders(paths, reps):
    import torchvision.io as tio
    from PIL import Image
    fns = {
        'cv2.imdecode (RGB)': lambda p: D.read_image(p),
        'torchvision.io.decode_jpeg': lambda p: tio.decode_jpeg(tio.read_file(p)),
        'PIL (convert RGB)': lambda p: np.asarray(Image.open(p).convert('RGB')),
    }
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():  # interleaved, so a load spike hits all three
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            times[k].append((time.perf_counter() - t0) / len(paths))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=16, help='demo images (ADE sizes) in the timed set')
    p.add_argument('--rounds', type=int, default=5, help='interleaved rounds over the set (median reported)')
    p.add_argument('--crop', type=int, default=512)
    p.add_argument('--quick', action='store_true', help='4 images, 2 rounds')
    p.add_argument('--out', default=None, help='folder for data.md and data.json')
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 4, 2
    torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        D.make_demo_ade20k(tmp, args.images, 0)
        ds = D.ADE20k(tmp, 'train')
        pairs = [ds.paths(i) for i in range(len(ds))]
        ours = D.train_transform(crop_size=(args.crop, args.crop), seed=0)
        np.random.seed(0)

        def run_ours():
            for i in range(len(ds)):
                image, label = D.read_image(pairs[i][0]), D.read_label(pairs[i][1])
                ours(image, cv2.LUT(label, D.REDUCE_ZERO_LABEL))  # = ds[i] with the transform, spelled out

        def run_plain():
            for ip, ap in pairs:
                plain_train(*plain_load(ip, ap), crop=(args.crop, args.crop))

        fns = {'ours (common.data)': run_ours, 'plain': run_plain}
        for fn in fns.values():  # warm-up
            fn()
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) / len(ds))
        per_image = {k: statistics.median(v) for k, v in times.items()}
        decode = time_decoders([a for a, _ in pairs], args.rounds)

    sizes = sorted({f'{w}x{h}' for h, w in D.DEMO_SIZES[:args.images]})  # W x H
    ratio = per_image['plain'] / per_image['ours (common.data)']
    lines = [f"train pipeline, crop {args.crop}, {args.images} demo images (WxH {', '.join(sizes)}), "
             f"median of {args.rounds} rounds, 1 thread, {os.cpu_count()} CPUs visible",
             '', '| pipeline | ms / image | images/s per worker |', '|---|---:|---:|']
    lines += [f'| {k} | {v * 1e3:.2f} | {1 / v:.1f} |' for k, v in per_image.items()]
    lines += ['', f'speed-up ours / plain: {ratio:.2f}x', '', '| JPEG decode | ms / image |', '|---|---:|']
    lines += [f'| {k} | {v * 1e3:.2f} |' for k, v in decode.items()]
    table = '\n'.join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'data.md'), 'w') as f:
            f.write(table + '\n')
        with open(os.path.join(args.out, 'data.json'), 'w') as f:
            json.dump({'ms_per_image': {k: v * 1e3 for k, v in per_image.items()}, 'speedup': ratio,
                       'decode_ms': {k: v * 1e3 for k, v in decode.items()}, 'images': args.images,
                       'rounds': args.rounds, 'crop': args.crop}, f, indent=1)
    return ratio


if __name__ == '__main__':
    main()
