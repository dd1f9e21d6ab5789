"""ADE20k (SceneParsing-150) read and augmented exactly as the reference recipe does (ssseg_spec.md §2-3), a seeded
DataLoader pair (§2.3), and a procedural demo dataset in the same folder layout (`--data demo`).

Decisions worth knowing:
* Decoding is cv2 (libjpeg-turbo, straight to RGB). bench/data.py times cv2.imdecode, torchvision.io.decode_jpeg and
  PIL on the demo JPEGs (683x512 and friends): cv2 is as fast as torchvision or a little faster (1.4 ms each on an idle
  core, bit-identical pixels) and PIL is ~45% slower. cv2 also does every resize/colour step of the reference, so the
  pixels are the reference's own (it reads with cv2.imread), and one library is one dependency.
* We hand RGB around (dataset[i] with transform=None is RGB), the reference hands BGR around. Where that matters, the
  photometric distortion, the reference calls COLOR_RGB2HSV/HSV2RGB on BGR data (spec §10.4: hue and saturation act
  on swapped R/B). On RGB data the same numbers come from COLOR_BGR2HSV/HSV2BGR: both treat the true blue channel
  as red (the reference's channel 0, our channel 2). tests/test_data.py checks this against a BGR re-implementation
  of the reference's step.
* Every per-pixel step of the reference (brightness, contrast, saturation scale, hue shift, and the normalisation)
  maps a uint8 value to a value through float32 math, so it is a 256-entry table: cv2.LUT gives the same numbers
  ~4x faster, neighbouring tables compose into one, and the last ones fold into the normalisation table, which
  writes straight into the padded CHW canvas. The cat-max-ratio crop counts classes with cv2.calcHist on the window
  in place, not np.unique (~90x). bench/data.py has the end-to-end numbers.
* Randomness comes from one numpy Generator per transform object. train_loader reseeds it before every sample from
  (seed, epoch, rank, position in the epoch), so order and augmentation do not depend on the workers and a resume
  mid-epoch is exact; seed_worker() seeds the other generators of a worker from torch's per-worker seed.
"""
import math
import os
import random
import shutil
import tempfile

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dist
from .errors import BadFileError, MissingFile, UserError, make_folder

IGNORE_INDEX = 255
MEAN = (123.675, 116.28, 103.53)  # ImageNet mean/std, RGB order, 0-255 scale (spec §2.1 step 5)
STD = (58.395, 57.12, 57.375)

# the standard SceneParsing-150 names (objectInfo150 order, as ssseg lists them); index = mapped label
CLASSES = (
    'wall', 'building, edifice', 'sky', 'floor, flooring', 'tree', 'ceiling', 'road, route', 'bed',
    'windowpane, window', 'grass', 'cabinet', 'sidewalk, pavement',
    'person, individual, someone, somebody, mortal, soul', 'earth, ground', 'door, double door', 'table',
    'mountain, mount', 'plant, flora, plant life', 'curtain, drape, drapery, mantle, pall', 'chair',
    'car, auto, automobile, machine, motorcar', 'water', 'painting, picture', 'sofa, couch, lounge', 'shelf', 'house',
    'sea', 'mirror', 'rug, carpet, carpeting', 'field', 'armchair', 'seat', 'fence, fencing', 'desk', 'rock, stone',
    'wardrobe, closet, press', 'lamp', 'bathtub, bathing tub, bath, tub', 'railing, rail', 'cushion',
    'base, pedestal, stand', 'box', 'column, pillar', 'signboard, sign', 'chest of drawers, chest, bureau, dresser',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace, hearth, open fireplace', 'refrigerator, icebox',
    'grandstand, covered stand', 'path', 'stairs, steps', 'runway', 'case, display case, showcase, vitrine',
    'pool table, billiard table, snooker table', 'pillow', 'screen door, screen', 'stairway, staircase', 'river',
    'bridge, span', 'bookcase', 'blind, screen', 'coffee table, cocktail table',
    'toilet, can, commode, crapper, pot, potty, stool, throne', 'flower', 'book', 'hill', 'bench', 'countertop',
    'stove, kitchen stove, range, kitchen range, cooking stove', 'palm, palm tree', 'kitchen island',
    'computer, computing machine, computing device, data processor, electronic computer, information processing system',
    'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel, hut, hutch, shack, shanty',
    'bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle',
    'towel', 'light, light source', 'truck, motortruck', 'tower', 'chandelier, pendant, pendent',
    'awning, sunshade, sunblind', 'streetlight, street lamp', 'booth, cubicle, stall, kiosk',
    'television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box',
    'airplane, aeroplane, plane', 'dirt track', 'apparel, wearing apparel, dress, clothes', 'pole',
    'land, ground, soil', 'bannister, banister, balustrade, balusters, handrail',
    'escalator, moving staircase, moving stairway', 'ottoman, pouf, pouffe, puff, hassock', 'bottle',
    'buffet, counter, sideboard', 'poster, posting, placard, notice, bill, card', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt, conveyor belt, conveyer, conveyor, transporter', 'canopy',
    'washer, automatic washer, washing machine', 'plaything, toy', 'swimming pool, swimming bath, natatorium',
    'stool', 'barrel, cask', 'basket, handbasket', 'waterfall, falls', 'tent, collapsible shelter', 'bag',
    'minibike, motorbike', 'cradle', 'oven', 'ball', 'food, solid food', 'step, stair', 'tank, storage tank',
    'trade name, brand name, brand, marque', 'microwave, microwave oven', 'pot, flowerpot',
    'animal, animate being, beast, brute, creature, fauna', 'bicycle, bike, wheel, cycle', 'lake',
    'dishwasher, dish washer, dishwashing machine', 'screen, silver screen, projection screen', 'blanket, cover',
    'sculpture', 'hood, exhaust hood', 'sconce', 'vase', 'traffic light, traffic signal, stoplight', 'tray',
    'ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin', 'fan',
    'pier, wharf, wharfage, dock', 'crt screen', 'plate', 'monitor, monitoring device',
    'bulletin board, notice board', 'shower', 'radiator', 'glass, drinking glass', 'clock', 'flag')

# the usual mmseg ADE20k palette (RGB), one triple per class above
PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
    (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255),
    (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0),
    (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194),
    (102, 255, 0), (92, 0, 255))

assert len(CLASSES) == len(PALETTE) == 150

# reduce-zero-label (spec §3): raw 0 (unlabelled) -> ignore, raw k -> k-1. Values > 150 are rejected before the lookup.
REDUCE_ZERO_LABEL = np.array([IGNORE_INDEX] + list(range(255)), dtype=np.uint8)

# decode straight to RGB where this OpenCV has it (4.10+), else decode BGR and swap: same pixels either way
_IMREAD_RGB = getattr(cv2, 'IMREAD_COLOR_RGB', None)

# -----------------------------------------------------------------------------
# reading


def _read_bytes(path, what):
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:  # a dangling link, a folder named like an image, no permission
        raise BadFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if buf.size == 0:  # cv2.imdecode would fail its `!buf.empty()` assertion without naming the file
        raise BadFileError(f"{what} {path} is an empty file (0 bytes): replace it (or remove the sample)")
    return buf


def read_image(path):
    """The RGB uint8 (H, W, 3) image at path; raises naming the file if it is unreadable or truncated."""
    buf = _read_bytes(path, "image")
    img = cv2.imdecode(buf, _IMREAD_RGB if _IMREAD_RGB is not None else cv2.IMREAD_COLOR)
    if img is None:
        raise BadFileError(f"unreadable image {path} ({buf.size} bytes): not a decodable JPEG/PNG, or truncated")
    # OpenCV < 5 decodes a JPEG cut short into a grey-padded image with only a warning on stderr. A complete JPEG
    # has its end-of-image marker after its last scan header (neither pair can occur inside entropy-coded data).
    b = buf.tobytes()
    sos = b.rfind(b'\xff\xda')
    if b[:2] == b'\xff\xd8' and (sos < 0 or b.rfind(b'\xff\xd9') < sos):
        raise BadFileError(f"truncated image {path}: the JPEG ends inside its image data (no end-of-image marker)")
    if _IMREAD_RGB is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_label(path):
    """The raw uint8 (H, W) ADE annotation (values 0..150) at path, unmapped; raises naming the file otherwise."""
    buf = _read_bytes(path, "annotation")
    lab = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise BadFileError(f"unreadable annotation {path} ({buf.size} bytes): not a decodable PNG, or truncated")
    # the reference reads with IMREAD_GRAYSCALE, which would quietly turn a colour PNG into luminance: refuse instead
    if lab.dtype != np.uint8 or lab.ndim != 2:
        raise BadFileError(f"annotation {path} is {lab.dtype} with shape {lab.shape}: expected a single-channel 8-bit "
                         "PNG of class ids (0 = unlabelled, 1..150)")
    hi = int(lab.max())
    if hi > len(CLASSES):
        bad = np.unique(lab[lab > len(CLASSES)])[:10].tolist()
        raise BadFileError(f"annotation {path} has values {bad} outside 0..{len(CLASSES)} (ADE20k has 150 classes, "
                         "0 = unlabelled)" + ("; 255 is not 'ignore' in ADE's raw labels, 0 is: map 255 to 0"
                                              if hi == IGNORE_INDEX else ""))
    return lab


class ADE20k(Dataset):
    """ADEChallengeData2016 under root. dataset[i] = transform(image RGB uint8 HxWx3, label uint8 HxW, 255 ignore).
    num_classes: the model's; a label it cannot predict is a one-line error naming --num_classes and the file."""
    SPLITS = {'train': 'training', 'val': 'validation'}

    def __init__(self, root, split, transform=None, num_classes=len(CLASSES)):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {list(self.SPLITS)}, got {split!r}")
        base = _find_base(root)
        folder = self.SPLITS[split]
        self.image_dir = os.path.join(base, 'images', folder)
        self.ann_dir = os.path.join(base, 'annotations', folder)
        self.split, self.transform, self.num_classes = split, transform, num_classes
        list_file = os.path.join(base, f'{split}.txt')
        if os.path.isfile(list_file):  # the reference's prepared tarball has these lists (spec §3)
            self.ids = _ids_from_list(list_file, self.image_dir, self.ann_dir)
        else:  # the official release has none: pair the folders up, and refuse anything that does not pair
            self.ids = _ids_from_folders(self.image_dir, self.ann_dir)
        if not self.ids:
            raise MissingFile(f"no images for split {split!r} in {self.image_dir}")

    def __len__(self):
        return len(self.ids)

    def paths(self, i):
        return (os.path.join(self.image_dir, self.ids[i] + '.jpg'), os.path.join(self.ann_dir, self.ids[i] + '.png'))

    def __getitem__(self, i):
        image_path, ann_path = self.paths(i)
        image, raw = read_image(image_path), read_label(ann_path)
        if image.shape[:2] != raw.shape:
            raise BadFileError(f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but "
                             f"annotation {ann_path} is {raw.shape[1]}x{raw.shape[0]}")
        top = int(raw.max()) if self.num_classes < len(CLASSES) else 0  # raw k is class k - 1
        if top > self.num_classes:
            raise UserError(f"--num_classes {self.num_classes}: annotation {ann_path} has class {top - 1} (raw value "
                            f"{top}); the model must have more classes than the largest label: --num_classes "
                            f"{len(CLASSES)} for ADE20k")
        label = cv2.LUT(raw, REDUCE_ZERO_LABEL)  # (H, W) uint8, 0..149 or 255
        if self.transform is None:
            return image, label
        return self.transform(image, label)


def _find_base(root):
    root = os.path.expanduser(str(root))
    for base in (os.path.join(root, 'ADEChallengeData2016'), root):  # root may also be the folder itself
        if os.path.isdir(os.path.join(base, 'images')) and os.path.isdir(os.path.join(base, 'annotations')):
            return base
    raise MissingFile(
        f"ADE20k not found under {root!r}: expected {os.path.join(root, 'ADEChallengeData2016')}/images/"
        "{training,validation}/*.jpg and .../annotations/{training,validation}/*.png (unzip ADEChallengeData2016.zip "
        "from the MIT SceneParsing release into that folder; train.txt/val.txt lists are optional). "
        "Or run with `--data demo` to train on the generated demo dataset.")


def _ids_from_list(list_file, image_dir, ann_dir):
    try:
        with open(list_file, encoding='utf-8-sig') as f:  # -sig: a byte-order mark is not part of the first id
            ids = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise BadFileError(f"{list_file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, one "
                           "image id per line") from None
    for i in ids:
        for path in (os.path.join(image_dir, i + '.jpg'), os.path.join(ann_dir, i + '.png')):
            if not os.path.isfile(path):
                raise MissingFile(f"{list_file} lists {i!r} but {path} does not exist")
    return ids


def _ids_from_folders(image_dir, ann_dir):
    for d in (image_dir, ann_dir):
        if not os.path.isdir(d):
            raise MissingFile(f"missing folder {d} (expected ADEChallengeData2016/{{images,annotations}}/"
                              "{training,validation}): an incomplete extraction of ADEChallengeData2016.zip?")
    images, anns = _stems(image_dir, '.jpg'), _stems(ann_dir, '.png')
    for i in sorted(images):
        if i not in anns:
            raise MissingFile(f"image {os.path.join(image_dir, i + '.jpg')} has no annotation "
                              f"{os.path.join(ann_dir, i + '.png')}")
    for i in sorted(anns):
        if i not in images:
            raise MissingFile(f"annotation {os.path.join(ann_dir, i + '.png')} has no image "
                              f"{os.path.join(image_dir, i + '.jpg')}")
    return sorted(images)


def _stems(folder, ext):
    stems = set()
    for name in os.listdir(folder):
        if name.startswith('.'):  # .DS_Store and friends
            continue
        stem, e = os.path.splitext(name)
        if e != ext:
            path = os.path.join(folder, name)
            if e.lower() in ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp'):  # an image, misnamed
                raise BadFileError(f"{path}: this folder's files are read as {stem}{ext} (ADE20k's layout); rename "
                                   f"it to {stem}{ext} (its contents are decoded whatever the format)")
            raise BadFileError(f"unexpected file {path}: this folder should hold only *{ext}; move it out")
        stems.add(stem)
    return stems

# -----------------------------------------------------------------------------
# transforms (spec §2.1, §2.2). A transform is (image RGB uint8 HxWx3, label uint8 HxW) -> (image, label) tensors.


def resize_size(h, w, target):
    """The reference's keep-ratio size (w, h): scale until the long side hits max(target) or the short min(target)."""
    f = min(max(target) / max(h, w), min(target) / min(h, w))  # independent of orientation (spec §2.1 step 1)
    return int(w * f + 0.5), int(h * f + 0.5)


def _lut(alpha=1.0, beta=0.0):
    # the reference's convert(): float32 image * alpha + beta, clip to [0, 255], truncate to uint8. Python floats stay
    # "weak" scalars, so the math is float32 exactly as there; a uint8 input has 256 values, hence a table.
    return np.clip(np.arange(256, dtype=np.float32) * float(alpha) + float(beta), 0, 255).astype(np.uint8)


class TrainTransform:
    """Spec §2.1: random keep-ratio resize, cat-max-ratio crop, flip, photometric distortion, normalise, centre pad."""

    def __init__(self, crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 seed=None):
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), scale, ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.reseed(seed)

    def reseed(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, image, label):
        rng = self.rng
        # 1. resize: s ~ U[lo, hi), target (int(2048 s), int(512 s)); image bilinear, label nearest (cv2, as reference)
        lo, hi = self.ratio_range
        s = rng.random() * (hi - lo) + lo
        size = resize_size(*label.shape, (int(self.scale[0] * s), int(self.scale[1] * s)))
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        # 2. crop: chosen on the label alone, so only the chosen window of the image is touched afterwards
        box = self.crop_box(label, rng)
        if box is not None:
            y, x, h, w = box
            image, label = image[y:y + h, x:x + w], label[y:y + h, x:x + w]  # views
        # 3. flip (p 0.5); like the reference, steps 3-4 see only the crop window (the whole image when uncropped)
        if rng.random() < 0.5:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        # 4. photometric distortion; its trailing per-value steps come back as a table, folded into step 5
        image, lut = photometric_lut(image, rng)
        # 5-7. normalise, HWC -> CHW, centred pad to the crop size (image 0 after normalising, label ignore); the
        # pending table is applied to the centred window alone: a per-value step, so the numbers are the same
        return _to_tensor(image, self.crop_size, lut), _label_to_tensor(label, self.crop_size)

    def crop_box(self, label, rng):
        """(y, x, h, w) of the crop, or None for the reference's 'return uncropped' case (spec §10.12)."""
        H, W = label.shape
        h, w = min(self.crop_size[0], H), min(self.crop_size[1], W)  # a small image shrinks the crop, no pad first
        for _ in range(10):
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            # class histogram of the window (calcHist reads the view in place: 15x faster than bincount, exact
            # in float32 below 2**24 pixels); = np.unique's counts without the ignore label
            counts = cv2.calcHist([label[y:y + h, x:x + w]], [0], None, [256], [0, 256]).ravel()[:IGNORE_INDEX]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        # all 10 tries failed: the last try stands, unless it holds no labelled pixel at all
        return None if len(counts) == 0 else (y, x, h, w)


def photometric_lut(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                    hue_delta=18):
    """The reference's PhotoMetricDistortion on an RGB uint8 image, same draws in the same order, same numbers.

    Returns (image, lut): the result is cv2.LUT(image, lut) when lut is not None. Per-value steps are only composed
    into a pending table (lut2[lut1]) and applied when an HSV step needs the pixels, so the caller can fold the
    last ones into its own table (the normalisation)."""
    lut = None
    if rng.integers(2):  # brightness, p 0.5
        lut = _lut(beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):  # contrast first, p 0.5
        c = _lut(alpha=rng.uniform(*contrast_range))
        lut = c if lut is None else c[lut]
    # saturation then hue, each a full HSV round trip as in the reference (uint8 HSV is lossy: no merging them).
    # The reference runs RGB2HSV on BGR data; BGR2HSV on our RGB data is the same computation (module docstring).
    for step in ('saturation', 'hue'):
        if not rng.integers(2):  # p 0.5 each
            continue
        if lut is not None:
            image, lut = cv2.LUT(image, lut), None
        h, s, v = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
        if step == 'saturation':  # scale S
            s = cv2.LUT(s, _lut(alpha=rng.uniform(*saturation_range)))
        else:  # H += an integer in [-18, 17] (spec §2.1 step 4), mod 180 (OpenCV's 8-bit hue is 0..179)
            shift = np.arange(256) + int(rng.integers(-hue_delta, hue_delta))
            h = cv2.LUT(h, (shift % 180).astype(np.uint8))
        image = cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2BGR)
    if mode == 0 and rng.integers(2):  # contrast last, p 0.5
        c = _lut(alpha=rng.uniform(*contrast_range))
        lut = c if lut is None else c[lut]
    return image, lut


def photometric_distortion(image, rng, **kw):
    """photometric_lut with its pending table applied: the distorted RGB uint8 image."""
    image, lut = photometric_lut(image, rng, **kw)
    return image if lut is None else cv2.LUT(image, lut)


# normalisation as a table per channel: float32 (v - mean) * (1 / std), the reference's float32 math (spec §2.1 step 5)
_NORM = ((np.arange(256, dtype=np.float32)[:, None] - np.array(MEAN, np.float32))
         * (1.0 / np.array(STD, np.float64)).astype(np.float32)).T.copy()  # (3, 256)


def _centre(n, out):
    # centred pad along one axis (spec §2.1 step 7): (dst slice, src slice). Negative amounts (an uncropped image
    # larger than the crop) centre-crop instead, as the reference's F.pad with negative pads does.
    before = (out - n) // 2
    if before >= 0:
        return slice(before, before + n), slice(0, n)
    return slice(0, out), slice(-before, -before + out)


def _to_tensor(image, out_size=None, lut=None):
    """uint8 (h, w, 3) -> normalised float32 (3, H, W), centred in out_size (pad 0), lut applied first if given."""
    h, w = image.shape[:2]
    H, W = out_size or (h, w)
    (dy, sy), (dx, sx) = _centre(h, H), _centre(w, W)
    out = np.zeros((3, H, W), np.float32)  # calloc'd: the pad costs nothing where the LUT writes over it
    for c, plane in enumerate(cv2.split(image[sy, sx])):
        table = _NORM[c] if lut is None else _NORM[c][lut]
        cv2.LUT(plane, table, dst=out[c, dy, dx])  # one pass: uint8 HW plane -> its place in the padded CHW canvas
    return torch.from_numpy(out)


def _label_to_tensor(label, out_size):
    h, w = label.shape
    (dy, sy), (dx, sx) = _centre(h, out_size[0]), _centre(w, out_size[1])
    label = label[sy, sx]
    pads = (dy.start, out_size[0] - dy.stop, dx.start, out_size[1] - dx.stop)  # top, bottom, left, right
    if any(pads):
        label = cv2.copyMakeBorder(label, *pads, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
    return torch.from_numpy(np.ascontiguousarray(label)).long()  # (H, W) int64


class TestTransform:
    """Spec §2.2: keep-ratio resize to (2048, 512) and normalise; the label stays at its original size."""

    def __init__(self, scale=(2048, 512)):
        self.scale = scale

    def __call__(self, image, label):
        image = cv2.resize(image, resize_size(*image.shape[:2], self.scale), interpolation=cv2.INTER_LINEAR)
        return _to_tensor(image), torch.from_numpy(np.ascontiguousarray(label)).long()


def train_transform(crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, seed=None):
    return TrainTransform(crop_size, scale, ratio_range, cat_max_ratio, seed)


def test_transform(scale=(2048, 512)):
    return TestTransform(scale)


test_transform.__test__ = False  # pytest would otherwise collect this name from `from common.data import *`
TestTransform.__test__ = False

# -----------------------------------------------------------------------------
# loaders (spec §2.3)


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def seed_worker(worker_id):
    """DataLoader worker_init_fn: seed this worker's `random` and numpy global generators (and the transform stream of
    a dataset that has one, e.g. a bare ADE20k) from torch's per-worker seed. train_loader's SeededSamples has no
    transform attribute: its augmentation stream is reseeded per sample instead."""
    seed = torch.initial_seed()  # = the loader's base seed (drawn from its seeded generator) + worker_id
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # no cv2.setNumThreads here: called in a forked worker after the parent has used OpenCV's thread pool, it
    # deadlocks (seen with OpenCV 5.0). OpenCV's pool itself survives the fork.
    dataset = torch.utils.data.get_worker_info().dataset
    if hasattr(getattr(dataset, 'transform', None), 'reseed'):
        dataset.transform.reseed(seed)


class ResumableSampler(Sampler):
    """Per-rank shuffled indices of an epoch, as DistributedSampler(shuffle=True) + drop_last batches (spec §2.3),
    but the permutation is seeded by (seed, epoch) and the epoch can start at any batch. Yields (index, tag) pairs,
    tag = (epoch, rank, position), which SeededSamples turns into that sample's augmentation seed."""

    def __init__(self, n, batch_per_rank, seed=0, rank=0, world=1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_per_rank, seed, rank, world
        self.per_rank = math.ceil(n / world)  # DistributedSampler pads the permutation to a multiple of world
        self.epoch, self.start = 0, 0
        if self.per_rank < self.batch:
            raise UserError(f"--batch_size: {n} training images over {world} rank(s) do not fill one batch of "
                            f"{self.batch} per rank: lower --batch_size, or train on more images")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def batches_per_epoch(self):
        return self.per_rank // self.batch  # drop_last

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)  # own generator: global RNG untouched
        perm = torch.randperm(self.n, generator=g).tolist()
        perm += perm[:self.per_rank * self.world - self.n]  # pad by wrapping around, like DistributedSampler
        mine = perm[self.rank::self.world]
        end = self.batches_per_epoch() * self.batch
        for pos in range(self.start * self.batch, end):
            yield mine[pos], (self.epoch, self.rank, pos)

    def __len__(self):
        return (self.batches_per_epoch() - self.start) * self.batch


class SeededSamples(Dataset):
    """dataset[(index, tag)]: reseed the dataset's augmentation stream from (seed, tag), then dataset[index].

    A dataset without a transform has no randomness to seed; a transform without reseed() is an error."""

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed = dataset, seed
        transform = getattr(dataset, "transform", None)
        if transform is not None and not hasattr(transform, "reseed"):
            raise TypeError("SeededSamples: the dataset's transform has no reseed(seed) (common.data.TrainTransform)")
        self.reseed = transform is not None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, (epoch, rank, pos) = key
        if self.reseed:
            self.dataset.transform.reseed(np.random.SeedSequence([self.seed, epoch, rank, pos]))
        return self.dataset[index]


def train_loader(dataset, total_batch, num_workers=2, seed=0, num_items=0, pin_memory=False):
    """Shuffled, drop_last batches of total_batch // world_size per rank (spec §2.3), exactly resumable:
    loader.sampler.set_epoch(epoch, start_batch). num_items > 0 trains on the first num_items images only."""
    rank, world = _rank_world()
    if total_batch % world:
        raise ValueError(f"total batch {total_batch} does not split evenly over {world} ranks")
    n = min(num_items, len(dataset)) if num_items > 0 else len(dataset)
    sampler = ResumableSampler(n, total_batch // world, seed, rank, world)
    return DataLoader(SeededSamples(dataset, seed), batch_size=total_batch // world, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


class ShardSampler(Sampler):
    """Rank r of w gets indices r, r+w, r+2w, ...: every image exactly once over all ranks, no padding duplicates."""

    def __init__(self, n, rank, world):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))


def test_loader(dataset, num_workers=2, pin_memory=False):
    """Batch 1, in order; each rank gets an exact, non-padded shard."""
    rank, world = _rank_world()
    return DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), rank, world), num_workers=num_workers,
                      pin_memory=pin_memory, worker_init_fn=seed_worker,
                      persistent_workers=num_workers > 0)


test_loader.__test__ = False

# -----------------------------------------------------------------------------
# the demo dataset: procedural scenes a small net learns quickly (large regions, strong colour + texture per class)

# raw ADE ids of the demo classes (mapped labels are one less)
DEMO_CLASSES = {'wall': 1, 'building': 2, 'sky': 3, 'floor': 4, 'tree': 5, 'road': 7, 'person': 13, 'car': 21}
DEMO_SIZES = ((512, 683), (683, 512), (512, 683), (457, 601), (512, 683), (512, 512), (683, 512), (384, 577))  # (H, W)
DEMO_VERSION = 1  # bump when the generator changes, so stale caches are not reused


def _texture(name, ys, xs, n, h):
    # (..., 3) float RGB at pixel coordinates ys, xs (float arrays of one shape); n is unit noise of that shape.
    # Colours sit far apart in hue and brightness and each class has its own texture, so they survive the
    # photometric distortion and a small net separates them after a few hundred steps.
    def rgb(r, g, b):
        return np.array([r, g, b], np.float32)
    n3 = n[..., None]
    if name == 'sky':  # smooth blue gradient
        t = (ys / h)[..., None]
        return rgb(80, 140, 225) * (1 - t) + rgb(175, 210, 245) * t + 2 * n3
    if name == 'wall':  # pale beige, faint wide waves
        return rgb(205, 190, 165) + 6 * np.sin(xs / 23)[..., None] + 4 * n3
    if name == 'building':  # red brick with light mortar rows
        mortar = ((ys.astype(np.int64) % 10) < 2)[..., None]
        return np.where(mortar, rgb(210, 205, 200), rgb(165, 50, 35)) + 8 * n3
    if name == 'floor':  # brown planks, alternating shade, grain
        plank = ((xs.astype(np.int64) // 24) % 2)[..., None]
        return rgb(140, 85, 45) + 22 * plank + 6 * np.sin(ys / 3)[..., None] + 4 * n3
    if name == 'tree':  # green speckle
        return rgb(35, 130, 35) + n3 * np.array([12, 35, 12], np.float32)
    if name == 'road':  # dark grey asphalt grain
        return rgb(72, 72, 78) + 10 * n3
    if name == 'person':  # magenta with horizontal stripes
        return rgb(185, 45, 165) + 18 * (np.sin(ys / 5) > 0)[..., None] + 4 * n3
    if name == 'car':  # saturated yellow, darker vertical panel lines
        panel = ((xs.astype(np.int64) % 30) < 3)[..., None]
        return np.where(panel, rgb(180, 150, 15), rgb(240, 205, 25)) + 4 * n3
    raise KeyError(name)


def demo_scene(h, w, rng):
    """One procedural scene: (RGB uint8 (h, w, 3), raw label uint8 (h, w) with ADE ids, 0 = unlabelled)."""
    label = np.zeros((h, w), np.uint8)
    image = np.zeros((h, w, 3), np.float32)

    def paint(name, y0, y1, x0, x1, shape=None):
        # fill the box [y0, y1) x [x0, x1) (clipped to the image), or only where shape(ys, xs) holds inside it
        y0, y1, x0, x1 = max(int(y0), 0), min(int(y1), h), max(int(x0), 0), min(int(x1), w)
        if y0 >= y1 or x0 >= x1:
            return
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # (bh, bw) each
        tex = _texture(name, ys, xs, rng.standard_normal(ys.shape, dtype=np.float32), h)  # (bh, bw, 3)
        if shape is None:
            image[y0:y1, x0:x1], label[y0:y1, x0:x1] = tex, DEMO_CLASSES[name]
        else:
            m = shape(ys, xs)
            image[y0:y1, x0:x1][m], label[y0:y1, x0:x1][m] = tex[m], DEMO_CLASSES[name]

    def ellipse(cx, cy, rx, ry):
        inside = lambda ys, xs: ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1  # noqa: E731
        return cy - ry, cy + ry + 1, cx - rx, cx + rx + 1, inside

    indoor = rng.random() < 0.35
    horizon = int(h * rng.uniform(0.35, 0.6))
    paint('wall' if indoor else 'sky', 0, horizon, 0, w)
    paint('floor' if indoor else 'road', horizon, h, 0, w)
    if not indoor:
        for _ in range(rng.integers(1, 4)):  # buildings standing on the horizon
            x0, bw, top = rng.uniform(-0.1, 0.9) * w, rng.uniform(0.15, 0.35) * w, rng.uniform(0.05, 0.3) * h
            paint('building', top, horizon + 0.03 * h, x0, x0 + bw)
    for _ in range(rng.integers(1, 3) if not indoor else rng.integers(0, 2)):  # trees (potted plants indoors)
        cx, cy, r = rng.uniform(0, w), horizon + rng.uniform(-0.15, 0.05) * h, rng.uniform(0.07, 0.16) * min(h, w)
        paint('tree', *ellipse(cx, cy, r, 1.3 * r))
    if not indoor:
        for _ in range(rng.integers(0, 3)):  # cars on the road
            x0, cw, ch = rng.uniform(0, 0.8) * w, rng.uniform(0.18, 0.32) * w, rng.uniform(0.09, 0.15) * h
            y1 = rng.uniform(horizon + ch, h)
            paint('car', y1 - ch, y1, x0, x0 + cw)
    for _ in range(rng.integers(0, 3)):  # people standing on the ground
        cx, ry = rng.uniform(0.05, 0.95) * w, rng.uniform(0.1, 0.2) * h
        cy, rx = rng.uniform(horizon, h - 0.3 * ry), rng.uniform(0.3, 0.45) * ry
        paint('person', *ellipse(cx, cy, rx, ry))
    # ADE leaves object borders and clutter unlabelled: a 3 px seam along every boundary, a few unlabelled blobs
    edge = np.zeros((h, w), np.uint8)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    for _ in range(rng.integers(0, 3)):
        x0, y0, s = int(rng.uniform(0, w)), int(rng.uniform(0, h)), int(rng.uniform(0.03, 0.08) * min(h, w))
        image[max(y0 - s, 0):y0 + s, max(x0 - s, 0):x0 + s] = rng.uniform(0, 255, 3)
        label[max(y0 - s, 0):y0 + s, max(x0 - s, 0):x0 + s] = 0
    label[cv2.dilate(edge, np.ones((3, 3), np.uint8)) > 0] = 0
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_demo_ade20k(root, num_train, num_val, seed=0):
    """Write num_train/num_val procedural scenes as root/ADEChallengeData2016 (JPEG images, PNG raw labels)."""
    base = os.path.join(root, 'ADEChallengeData2016')
    for split, folder, n in (('train', 'training', num_train), ('val', 'validation', num_val)):
        os.makedirs(os.path.join(base, 'images', folder), exist_ok=True)
        os.makedirs(os.path.join(base, 'annotations', folder), exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, int(split == "val"), i])  # one stream per image: the set is reproducible
            h, w = DEMO_SIZES[(i + (split == 'val')) % len(DEMO_SIZES)]
            image, label = demo_scene(h, w, rng)
            stem = f'ADE_{split}_{i + 1:08d}'
            for path, pixels, params in (
                    (os.path.join(base, 'images', folder, stem + '.jpg'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                     [cv2.IMWRITE_JPEG_QUALITY, 90]),
                    (os.path.join(base, 'annotations', folder, stem + '.png'), label, [])):
                if not cv2.imwrite(path, pixels, params):  # a full disk: OpenCV only prints a warning
                    raise UserError(f"could not write {path} while generating the demo dataset (is the disk full?); "
                                    f"free some space, or set SEG_DATA_CACHE (or --data_root) to another folder")
    return root


def dataset_root(kind, data_root='', log=print):
    """The root to pass to ADE20k for `--data kind --data_root data_root`. With demo, data_root is the demo's cache
    folder, or an already generated demo root itself (the `data:` folder a demo run logs)."""
    if kind != 'demo':
        _find_base(data_root or 'ADE20k')  # a wrong root fails here, before a model is built
        return data_root or 'ADE20k'  # ssseg's default: ./ADE20k
    base = os.path.join(data_root, 'ADEChallengeData2016')
    if data_root and all(os.path.isdir(os.path.join(base, d)) for d in ('images', 'annotations')):
        return data_root
    return demo_root(data_root or None, log=log)


def demo_root(cache_dir=None, num_train=64, num_val=16, seed=0, log=None):
    """The folder holding the demo ADEChallengeData2016, generated on first use in cache_dir, else $SEG_DATA_CACHE
    or ~/.cache/segfp16. Pass it as root to ADE20k."""
    given = bool(cache_dir)
    cache_dir = cache_dir or os.environ.get('SEG_DATA_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                                                'segfp16')
    root = os.path.join(cache_dir, f'ade20k_demo_v{DEMO_VERSION}_{num_train}x{num_val}_s{seed}')
    with dist.local_main_first():  # under torchrun one rank per machine generates it; the others find it
        if os.path.isdir(root):  # it only ever appears by a rename of a finished generation
            return root
        make_folder(cache_dir, "--data_root" if given else "SEG_DATA_CACHE" if os.environ.get('SEG_DATA_CACHE')
                    else "the demo cache")
        if log is not None:
            log(f"generating the demo dataset (first use) in {root}: {num_train} train + {num_val} val images")
        # generate next to the target, then rename: a killed run leaves a *.tmp-* folder, never a half-written root,
        # and two processes racing (two jobs, or machines sharing the folder) both end up with one complete copy
        tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + '.tmp-', dir=cache_dir)
        try:
            make_demo_ade20k(tmp, num_train, num_val, seed)
            try:
                os.rename(tmp, root)
            except OSError:
                if not os.path.isdir(root):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
