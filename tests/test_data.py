"""common.data against independent references: the reference's own steps re-written here in BGR (photometric
distortion, normalisation), F.pad for the centred padding, hand-computed resize sizes, and images whose pixels
encode their own coordinates for alignment. Everything is tiny: the whole file runs in seconds."""
import os
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common.data as D
from common.errors import UserError


def write_split(root, split, items, list_file=False):
    """items: [(stem, RGB uint8 image, raw uint8 label)] written in the ADE layout under root."""
    base = os.path.join(root, 'ADEChallengeData2016')
    folder = D.ADE20k.SPLITS[split]
    os.makedirs(os.path.join(base, 'images', folder), exist_ok=True)
    os.makedirs(os.path.join(base, 'annotations', folder), exist_ok=True)
    for stem, image, label in items:
        cv2.imwrite(os.path.join(base, 'images', folder, stem + '.jpg'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(os.path.join(base, 'annotations', folder, stem + '.png'), label)
    if list_file:
        with open(os.path.join(base, f'{split}.txt'), 'w') as f:
            f.write(''.join(stem + '\n' for stem, _, _ in items))
    return base


def rand_item(stem, h=20, w=27, seed=0):
    rng = np.random.default_rng(seed)
    return stem, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 151, (h, w), dtype=np.uint8)


def unnormalise(x):  # (3, H, W) float -> (H, W, 3) float in 0..255
    return (x * torch.tensor(D.STD).view(3, 1, 1) + torch.tensor(D.MEAN).view(3, 1, 1)).permute(1, 2, 0).numpy()


# -----------------------------------------------------------------------------
# constants, reading, label mapping

def test_classes_and_palette():
    assert len(D.CLASSES) == len(D.PALETTE) == 150 and D.IGNORE_INDEX == 255
    assert D.CLASSES[0] == 'wall' and D.CLASSES[2] == 'sky' and D.CLASSES[12].startswith('person')
    assert D.CLASSES[-2:] == ('clock', 'flag')
    assert D.PALETTE[0] == (120, 120, 120) and D.PALETTE[4] == (4, 200, 3) and D.PALETTE[-1] == (92, 0, 255)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in D.PALETTE)


def test_reduce_zero_label_mapping(tmp_path):
    raw = np.arange(151, dtype=np.uint8).repeat(2).reshape(2, 151)  # every raw value 0..150
    write_split(tmp_path, 'train', [('a', np.zeros((2, 151, 3), np.uint8), raw)])
    image, label = D.ADE20k(tmp_path, 'train')[0]
    assert image.dtype == np.uint8 and image.shape == (2, 151, 3) and label.dtype == np.uint8
    expect = np.where(raw == 0, 255, raw.astype(int) - 1)
    np.testing.assert_array_equal(label, expect)


def test_transform_none_returns_rgb_at_original_size(tmp_path):
    stem, img, lab = rand_item('x', 23, 31)
    img[:, :, 0], img[:, :, 2] = 250, 5  # strongly red: catches a BGR/RGB swap despite the JPEG loss
    base = write_split(tmp_path, 'val', [(stem, img, lab)])
    image, label = D.ADE20k(tmp_path, 'val')[0]
    ref = cv2.imread(os.path.join(base, 'images', 'validation', 'x.jpg'))[:, :, ::-1]  # the reference reads BGR
    np.testing.assert_array_equal(image, ref)
    assert image.shape == (23, 31, 3) and image[..., 0].mean() > 200 and image[..., 2].mean() < 50
    assert label.shape == (23, 31)


def test_split_list_is_used_when_present(tmp_path):
    items = [rand_item(s, seed=i) for i, s in enumerate(['c', 'a', 'b'])]
    write_split(tmp_path, 'train', items)
    assert D.ADE20k(tmp_path, 'train').ids == ['a', 'b', 'c']  # no list: sorted folder listing
    base = os.path.join(tmp_path, 'ADEChallengeData2016')
    with open(os.path.join(base, 'train.txt'), 'w') as f:
        f.write('c\nb\n')
    assert D.ADE20k(tmp_path, 'train').ids == ['c', 'b']  # the list decides which and in what order
    assert D.ADE20k(base, 'train').ids == ['c', 'b']  # root may also be ADEChallengeData2016 itself


def test_split_list_ids_lose_surrounding_blanks_and_windows_line_ends(tmp_path):
    write_split(tmp_path, 'train', [rand_item(s, seed=i) for i, s in enumerate(['a', 'b'])])
    with open(os.path.join(tmp_path, 'ADEChallengeData2016', 'train.txt'), 'wb') as f:
        f.write(b'b \r\n\ta\r\n\r\n')
    assert D.ADE20k(tmp_path, 'train').ids == ['b', 'a']


# -----------------------------------------------------------------------------
# bad input: each raises and names the file

def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*ADEChallengeData2016.*--data demo"):
        D.ADE20k(tmp_path / 'nowhere', 'train')


def test_image_without_annotation(tmp_path):
    base = write_split(tmp_path, 'train', [rand_item('a'), rand_item('b')])
    os.remove(os.path.join(base, 'annotations', 'training', 'b.png'))
    with pytest.raises(FileNotFoundError, match=r"b\.jpg has no annotation"):
        D.ADE20k(tmp_path, 'train')
    os.remove(os.path.join(base, 'images', 'training', 'b.jpg'))
    os.remove(os.path.join(base, 'images', 'training', 'a.jpg'))
    with pytest.raises(FileNotFoundError, match=r"a\.png has no image"):
        D.ADE20k(tmp_path, 'train')


def test_a_misnamed_image_is_named_with_its_new_name(tmp_path):
    # a camera's .JPG, a .jpeg or a .png image is no stray file: "move it out" would lose the sample
    base = write_split(tmp_path, 'train', [rand_item('a')])
    images = os.path.join(base, 'images', 'training')
    for name in ('a.JPG', 'a.jpeg', 'a.png'):
        os.rename(os.path.join(images, os.listdir(images)[0]), os.path.join(images, name))
        with pytest.raises(UserError, match=rf"{re.escape(name)}: .*rename it to a\.jpg") as e:
            D.ADE20k(tmp_path, 'train')
        assert 'move it out' not in str(e.value)
    os.rename(os.path.join(images, 'a.png'), os.path.join(images, 'a.jpg'))
    assert D.ADE20k(tmp_path, 'train').ids == ['a']


def test_list_names_missing_file(tmp_path):
    base = write_split(tmp_path, 'val', [rand_item('a')], list_file=True)
    with open(os.path.join(base, 'val.txt'), 'a') as f:
        f.write('ghost\n')
    with pytest.raises(FileNotFoundError, match=r"val\.txt lists 'ghost'.*ghost\.jpg"):
        D.ADE20k(tmp_path, 'val')


def test_stray_file_is_not_skipped(tmp_path):
    base = write_split(tmp_path, 'train', [rand_item('a')])
    open(os.path.join(base, 'images', 'training', 'notes.txt'), 'w').close()
    open(os.path.join(base, 'images', 'training', '.DS_Store'), 'w').close()  # hidden files are the OS's: skipped
    with pytest.raises(UserError, match=r"unexpected file .*notes\.txt.*move it out"):  # one line, not a traceback
        D.ADE20k(tmp_path, 'train')
    os.remove(os.path.join(base, 'images', 'training', 'notes.txt'))
    assert D.ADE20k(tmp_path, 'train').ids == ['a']


def test_unreadable_paths_and_list_encodings_are_one_line(tmp_path):
    base = write_split(tmp_path, 'val', [rand_item('a'), rand_item('b')])  # no list: the folders are listed
    img_dir = os.path.join(base, 'images', 'validation')
    os.remove(os.path.join(img_dir, 'b.jpg'))
    os.symlink(os.path.join(tmp_path, 'gone.jpg'), os.path.join(img_dir, 'b.jpg'))  # a dangling link
    with pytest.raises(UserError, match=r"cannot read image .*b\.jpg: No such file"):
        D.ADE20k(tmp_path, 'val')[1]
    os.remove(os.path.join(img_dir, 'b.jpg'))
    os.mkdir(os.path.join(img_dir, 'b.jpg'))  # a folder named like an image
    with pytest.raises(UserError, match=r"cannot read image .*b\.jpg: Is a directory"):
        D.ADE20k(tmp_path, 'val')[1]
    list_file = os.path.join(base, 'val.txt')  # the reference's lists
    with open(list_file, 'w', encoding='utf-8-sig') as f:  # a byte-order mark (Windows editors)
        f.write('a\n')
    assert D.ADE20k(tmp_path, 'val').ids == ['a']
    with open(list_file, 'w', encoding='utf-16') as f:  # Notepad's "Unicode"
        f.write('a\n')
    with pytest.raises(UserError, match=r"val\.txt is not UTF-8 text"):
        D.ADE20k(tmp_path, 'val')


def test_demo_generation_on_a_full_disk_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(D.cv2, 'imwrite', lambda *a, **k: False)  # what OpenCV returns when the write fails
    with pytest.raises(UserError, match=r"could not write .*ADE_train_00000001\.jpg .*disk full"):
        D.demo_root(str(tmp_path), num_train=2, num_val=1)
    assert os.listdir(tmp_path) == []  # neither a half-written root nor its temp folder


@pytest.mark.parametrize('cut', [0.5, 0.98])
def test_unreadable_or_truncated_image(tmp_path, cut):
    base = write_split(tmp_path, 'train', [rand_item('a', 64, 80)])
    path = os.path.join(base, 'images', 'training', 'a.jpg')
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"a\.jpg"):
        D.ADE20k(tmp_path, 'train')[0]
    open(path, 'wb').write(b'not an image at all')
    with pytest.raises(ValueError, match=r"unreadable image .*a\.jpg"):
        D.ADE20k(tmp_path, 'train')[0]


def test_truncated_jpeg_caught_even_if_decoder_pads(tmp_path, monkeypatch):
    # OpenCV < 5 hands back a grey-padded image for a cut-short JPEG; our end-marker check must still refuse it
    path = str(tmp_path / 't.jpg')
    cv2.imwrite(path, rand_item('t', 32, 32)[1])
    data = open(path, 'rb').read()
    monkeypatch.setattr(D.cv2, 'imdecode', lambda buf, flags: np.zeros((32, 32, 3), np.uint8))
    D.read_image(path)  # complete: fine
    for cut in (2, 40, len(data) // 2, 300):  # 300 bytes: only the headers are left
        open(path, 'wb').write(data[:-cut] if cut != 300 else data[:300])
        with pytest.raises(ValueError, match=r"truncated image .*t\.jpg"):
            D.read_image(path)


def test_images_are_rgb_with_or_without_opencvs_rgb_decode_flag(tmp_path, monkeypatch):
    # OpenCV < 4.10 has no IMREAD_COLOR_RGB: the BGR decode is converted; both give the RGB the file holds
    path = str(tmp_path / 'c.png')  # lossless, so the pixel values are exact
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30
    cv2.imwrite(path, rgb[..., ::-1])  # imwrite takes BGR
    assert np.array_equal(D.read_image(path), rgb)
    monkeypatch.setattr(D, '_IMREAD_RGB', None)
    assert np.array_equal(D.read_image(path), rgb)


def test_size_mismatch(tmp_path):
    stem, img, _ = rand_item('a', 20, 27)
    write_split(tmp_path, 'train', [(stem, img, np.ones((20, 26), np.uint8))])
    with pytest.raises(ValueError, match=r"size mismatch.*a\.jpg.*27x20.*a\.png.*26x20"):
        D.ADE20k(tmp_path, 'train')[0]


def test_label_values_out_of_range(tmp_path):
    stem, img, lab = rand_item('a')
    lab[3, 4], lab[5, 6] = 151, 200
    write_split(tmp_path, 'train', [(stem, img, lab)])
    with pytest.raises(ValueError, match=r"a\.png has values \[151, 200\] outside 0\.\.150"):
        D.ADE20k(tmp_path, 'train')[0]
    lab[5, 6] = 150  # 151 alone, the first value past the classes, is refused too
    write_split(tmp_path, 'train', [(stem, img, lab)])
    with pytest.raises(ValueError, match=r"a\.png has values \[151\] outside 0\.\.150") as e:
        D.ADE20k(tmp_path, 'train')[0]
    assert "map 255" not in str(e.value)
    lab[3, 4] = 255  # mmseg's ignore value in a user's own labels: ADE's raw unlabelled is 0
    write_split(tmp_path, 'train', [(stem, img, lab)])
    with pytest.raises(ValueError, match=r"values \[255\] outside 0\.\.150 .*: map 255 to 0"):
        D.ADE20k(tmp_path, 'train')[0]
    lab[0, :11] = np.arange(151, 162)  # more wrong values than the message lists: the hint stays
    write_split(tmp_path, 'train', [(stem, img, lab)])
    with pytest.raises(ValueError, match=r"values \[151, .*, 160\] outside 0\.\.150 .*: map 255 to 0"):
        D.ADE20k(tmp_path, 'train')[0]


def test_colour_label_refused(tmp_path):
    stem, img, lab = rand_item('a')
    base = write_split(tmp_path, 'train', [(stem, img, lab)])
    cv2.imwrite(os.path.join(base, 'annotations', 'training', 'a.png'), np.dstack([lab] * 3))
    with pytest.raises(ValueError, match=r"a\.png is uint8 with shape \(20, 27, 3\)"):
        D.ADE20k(tmp_path, 'train')[0]


def test_16_bit_label_refused(tmp_path):
    # in range (0..150) but 16-bit: refused with one line, not a cv2.LUT error
    stem, img, lab = rand_item('a')
    base = write_split(tmp_path, 'train', [(stem, img, lab)])
    cv2.imwrite(os.path.join(base, 'annotations', 'training', 'a.png'), lab.astype(np.uint16))
    with pytest.raises(ValueError, match=r"a\.png is uint16 with shape \(20, 27\)"):
        D.ADE20k(tmp_path, 'train')[0]


# -----------------------------------------------------------------------------
# geometry: resize formula, crop rule, centred padding, alignment

@pytest.mark.parametrize('hw, expect', [  # (H, W) -> (W, H), worked by hand: f = min(2048/long, 512/short)
    ((512, 683), (683, 512)), ((683, 512), (512, 683)), ((457, 601), (673, 512)), ((300, 2000), (2048, 307)),
    ((1001, 333), (512, 1539)), ((333, 1001), (1539, 512)), ((17, 23), (693, 512))])
def test_test_resize_formula(hw, expect):
    assert D.resize_size(*hw, (2048, 512)) == expect
    h, w = hw
    if h * w < 400_000:  # run the actual transform on the smaller ones
        label = np.full((h, w), 7, np.uint8)
        x, y = D.test_transform()(np.zeros((h, w, 3), np.uint8), label)
        assert x.shape == (3, expect[1], expect[0]) and x.dtype == torch.float32
        assert y.shape == (h, w) and y.dtype == torch.int64 and (y == 7).all()  # label untouched


def test_test_transform_resizes_bilinearly_then_normalises():
    # spec §2.2: the image is resized with cv2 INTER_LINEAR (as in training), then (v - mean) / std per RGB channel
    img = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    x, _ = D.test_transform(scale=(64, 32))(img, np.zeros((90, 120), np.uint8))
    ref = (cv2.resize(img, (43, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) - D.MEAN) / D.STD
    torch.testing.assert_close(x, torch.from_numpy(ref.transpose(2, 0, 1)).float(), rtol=0, atol=1e-5)


class ScriptedRng:
    """Hands out scripted integers(lo, hi) draws, checking the bounds the crop rule asks for."""
    def __init__(self, draws):
        self.draws = list(draws)

    def integers(self, lo, hi):
        lo_, hi_, v = self.draws.pop(0)
        assert (lo, hi) == (lo_, hi_), f"drew integers({lo}, {hi}), script says ({lo_}, {hi_})"
        return v


def test_crop_rule():
    t = D.TrainTransform(crop_size=(4, 4), cat_max_ratio=0.75)
    lab = np.zeros((10, 12), np.uint8)
    lab[:, 6:] = 1  # left half class 0, right half class 1
    lab[6:, :] = 255  # bottom rows ignore
    y, x = (0, 7), (0, 9)  # bounds for (y, x): integers(0, 10-4+1), integers(0, 12-4+1)
    # try 1 at x=0: one class -> rejected; try 2 at x=4: classes 0 and 1 in 2:2 -> accepted
    assert t.crop_box(lab, ScriptedRng([(*y, 0), (*x, 0), (*y, 2), (*x, 4)])) == (2, 4, 4, 4)
    # x=3: 3 columns of 0 and 1 of 1 -> max ratio exactly 0.75, not < 0.75 -> rejected; then x=5 (1:3) also 0.75
    bad = [(*y, 0), (*x, 3)] * 9 + [(*y, 1), (*x, 5)]
    assert t.crop_box(lab, ScriptedRng(bad)) == (1, 5, 4, 4)  # 10 failures: the last try stands
    # the last try lands entirely on ignore pixels: the sample comes back uncropped
    assert t.crop_box(lab, ScriptedRng([(*y, 0), (*x, 0)] * 9 + [(*y, 6), (*x, 0)])) is None
    # ignore pixels do not count: rows 4..7 at x=4 hold 2 rows of 0|1 (4:4) and 2 rows of ignore -> accepted
    assert t.crop_box(lab, ScriptedRng([(*y, 4), (*x, 4)])) == (4, 4, 4, 4)
    # an image smaller than the crop shrinks the crop to its size (no padding before the crop)
    small = D.TrainTransform(crop_size=(16, 5))
    assert small.crop_box(lab, ScriptedRng([(0, 1, 0), (0, 8, 4)])) == (0, 4, 10, 5)


@pytest.mark.parametrize('h, w', [(5, 7), (4, 4), (9, 3), (11, 13), (6, 12)])
def test_centred_padding_matches_f_pad(h, w):
    # reference: normalise, then F.pad(left, right, top, bottom) with top = (H - h) // 2; negative = centre-crop
    H, W = 8, 9
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = np.random.default_rng(h + w).integers(0, 150, (h, w), dtype=np.uint8)
    top, left = (H - h) // 2, (W - w) // 2
    pads = (left, W - w - left, top, H - h - top)
    ref_img = F.pad(D._to_tensor(img), pads, value=0.0)
    ref_lab = F.pad(torch.from_numpy(lab).long(), pads, value=255)
    assert torch.equal(D._to_tensor(img, (H, W)), ref_img)
    assert torch.equal(D._label_to_tensor(lab, (H, W)), ref_lab)


def coordinate_sample(h=48, w=60, block=6):
    # R = 4x, G = 4y: bilinear resize of a ramp stays a ramp, so each output pixel says where it came from;
    # the label is a grid of blocks with distinct neighbouring ids, B marks the source as well
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.dstack([4 * xx, 4 * yy, np.full_like(xx, 77)]).astype(np.uint8)
    label = ((xx // block) + 7 * (yy // block)) % 150
    return image, label.astype(np.uint8)


@pytest.mark.parametrize('seed', range(12))
def test_train_transform_keeps_image_and_label_aligned(seed, monkeypatch):
    monkeypatch.setattr(D, 'photometric_lut', lambda image, rng: (image, None))  # colours must stay readable here
    image, label = coordinate_sample()
    crop = (40, 44) if seed % 3 else (90, 100)  # some crops need padding (resized image smaller than the crop)
    t = D.train_transform(crop_size=crop, scale=(64, 48), seed=seed)
    x, y = t(image, label)
    assert x.shape == (3, *crop) and y.shape == crop and y.dtype == torch.int64
    rgb = unnormalise(x)
    valid = np.abs(rgb[..., 2] - 77) < 0.5  # B == 77 exactly where the image is, 0 in the padding
    assert valid.any() and (y.numpy()[~valid] == 255).all() and np.allclose(x.numpy()[:, ~valid], 0)
    # the image region is a centred, contiguous rectangle
    rows, cols = np.where(valid.any(1))[0], np.where(valid.any(0))[0]
    assert valid[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert rows[0] == (crop[0] - len(rows)) // 2 and cols[0] == (crop[1] - len(cols)) // 2
    # every image pixel decodes to a source coordinate; away from block borders the label must be that block's id
    xs, ys = rgb[..., 0] / 4, rgb[..., 1] / 4
    fx, fy = (xs + 0.5) % 6, (ys + 0.5) % 6  # position inside the block, in source pixels
    safe = valid & (fx > 1.5) & (fx < 4.5) & (fy > 1.5) & (fy < 4.5)
    assert safe.sum() > 50
    expect = ((np.floor(xs + 0.5) // 6) + 7 * (np.floor(ys + 0.5) // 6)) % 150
    np.testing.assert_array_equal(y.numpy()[safe], expect[safe])


def test_flip_and_crop_positions_vary(monkeypatch):
    monkeypatch.setattr(D, 'photometric_lut', lambda image, rng: (image, None))
    image, label = coordinate_sample()
    flips, corners = set(), set()
    for seed in range(16):
        x, _ = D.train_transform(crop_size=(20, 20), scale=(64, 48), seed=seed)(image, label)
        r = unnormalise(x)[..., 0]
        flips.add(bool(r[10, 15] < r[10, 5]))
        corners.add(int(round(r[0, 0])))
    assert flips == {True, False} and len(corners) > 4


def test_uncropped_case_is_centre_cropped(monkeypatch):
    # an all-ignore label fails every try with no labelled pixel: returned uncropped, then Padding's negative F.pad
    monkeypatch.setattr(D, 'photometric_lut', lambda image, rng: (image, None))
    image, _ = coordinate_sample()
    label = np.full((48, 60), 255, np.uint8)
    t = D.train_transform(crop_size=(20, 24), scale=(64, 48), ratio_range=(1.0, 1.0 + 1e-9), seed=0)
    x, y = t(image, label)
    ref = F.pad(D._to_tensor(image), (-18, -18, -14, -14))  # 60 -> 24: (24 - 60) // 2 = -18; 48 -> 20: -14
    if unnormalise(x)[0, 0, 0] > unnormalise(x)[0, 1, 0]:  # flipped
        ref = ref.flip(-1)
    assert torch.allclose(x, ref, atol=1e-4) and (y == 255).all()


# -----------------------------------------------------------------------------
# photometric distortion and normalisation against a re-implementation of the reference's steps (BGR, np.random)

class Recorder:
    """Wraps a Generator and records each draw, so a second implementation can replay the same numbers."""
    def __init__(self, seed):
        self.g, self.log = np.random.default_rng(seed), []

    def integers(self, *a):
        v = self.g.integers(*a)
        self.log.append(('int', a, v))
        return v

    def uniform(self, *a):
        v = self.g.uniform(*a)
        self.log.append(('uni', a, v))
        return v

    def random(self):
        v = self.g.random()
        self.log.append(('rand', (), v))
        return v


class Replay:
    """np.random-style API (randint, uniform) that hands back a recorded stream and checks the calls match."""
    def __init__(self, log):
        self.log = list(log)

    def randint(self, *a):
        kind, args, v = self.log.pop(0)
        assert kind == 'int' and args == a, (kind, args, a)
        return v

    def uniform(self, *a):
        kind, args, v = self.log.pop(0)
        assert kind == 'uni' and args == a, (kind, args, a)
        return v

    def random_sample(self):
        kind, args, v = self.log.pop(0)
        assert kind == 'rand', kind
        return v


def reference_photometric_bgr(image, r):
    # written from spec §2.1 step 4: BGR uint8, RGB2HSV codes on BGR data, float32 convert with clip and truncation
    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    if r.randint(2):
        image = convert(image, beta=r.uniform(-32, 32))
    mode = r.randint(2)
    if mode == 1 and r.randint(2):
        image = convert(image, alpha=r.uniform(0.5, 1.5))
    if r.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=r.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if r.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + r.randint(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and r.randint(2):
        image = convert(image, alpha=r.uniform(0.5, 1.5))
    return image


def test_photometric_distortion_matches_reference():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    rgb[:10] = [250, 30, 10]  # saturated patches make a hue/saturation channel mix-up visible
    rgb[10:20] = [10, 40, 240]
    steps = set()
    for seed in range(60):
        rec = Recorder(seed)
        ours = D.photometric_distortion(rgb, rec)
        ref_bgr = reference_photometric_bgr(np.ascontiguousarray(rgb[..., ::-1]), Replay(rec.log))
        np.testing.assert_array_equal(ours, ref_bgr[..., ::-1], err_msg=f"seed {seed}: {rec.log}")
        steps.add(tuple(v for k, a, v in rec.log if k == 'int' and a == (2,))[:2])
    assert len(steps) == 4  # both branches of brightness and of the mode bit were exercised


def reference_train_bgr(image, label, r, crop, scale, ratio=(0.5, 2.0), cat_max_ratio=0.75):
    # spec §2.1 end to end, the straightforward way, on BGR data with float labels like the reference
    label = label.astype(np.float32)
    s = r.random_sample() * (ratio[1] - ratio[0]) + ratio[0]
    target = int(scale[0] * s), int(scale[1] * s)
    h, w = image.shape[:2]
    f = min(max(target) / max(h, w), min(target) / min(h, w))
    size = int(w * f + 0.5), int(h * f + 0.5)
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    H, W = label.shape
    ch, cw = min(crop[0], H), min(crop[1], W)
    for _ in range(10):
        y, x = r.randint(0, H - ch + 1), r.randint(0, W - cw + 1)
        img_c, lab_c = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        values, counts = np.unique(lab_c, return_counts=True)
        counts = counts[values != 255]
        if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
            break
    if len(counts) > 0:
        image, label = img_c, lab_c
    if r.random_sample() < 0.5:  # ours draws the flip as random() < 0.5 (the reference: rand() > 0.5 keeps it)
        image, label = np.flip(image, 1), np.flip(label, 1)
    image = reference_photometric_bgr(np.ascontiguousarray(image), r)
    x = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)
    x = torch.from_numpy(((x - np.float32(D.MEAN)) * (1 / np.float64(D.STD)).astype(np.float32)).transpose(2, 0, 1))
    h, w = label.shape
    top, left = (crop[0] - h) // 2, (crop[1] - w) // 2
    pads = (left, crop[1] - w - left, top, crop[0] - h - top)
    return F.pad(x, pads, value=0.0), F.pad(torch.from_numpy(label.copy()), pads, value=255.0).long()


def test_train_transform_matches_reference_end_to_end():
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), (5, 5), 2)
    image[:15, :20] = (240, 20, 30)
    yy, xx = np.mgrid[0:45, 0:61]
    label = np.where((xx // 20 + yy // 15) % 3 == 0, 255, (xx // 20) * 3 + yy // 15).astype(np.uint8)
    for seed in range(24):
        crop = (32, 40) if seed % 2 else (70, 90)  # cropped, or padded
        rec = Recorder(seed)
        t = D.train_transform(crop_size=crop, scale=(96, 64))
        t.rng = rec
        x, y = t(image, label)
        rx, ry = reference_train_bgr(np.ascontiguousarray(image[..., ::-1]), label, Replay(rec.log), crop, (96, 64))
        torch.testing.assert_close(x, rx, rtol=0, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        assert torch.equal(y, ry), f"seed {seed}"


def test_hue_quirk_is_not_plain_rgb():
    # guard the quirk itself: plain RGB2HSV on RGB data would rotate hue the other way
    rgb = np.array([[[250, 30, 10]]], np.uint8)
    log = [('int', (2,), 0), ('int', (2,), 0), ('int', (2,), 0), ('int', (2,), 1), ('int', (-18, 18), 17),
           ('int', (2,), 0)]
    ours = D.photometric_distortion(rgb, Replay2(log))
    plain = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    plain[..., 0] = (plain[..., 0].astype(int) + 17) % 180
    plain = cv2.cvtColor(plain, cv2.COLOR_HSV2RGB)
    assert not np.array_equal(ours, plain)


class Replay2(Replay):  # the Generator-style names photometric_distortion calls
    def integers(self, *a):
        return self.randint(*a)


def test_normalisation_matches_reference():
    rgb = np.random.default_rng(1).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    # the reference (mmcv's imnormalize): float32 BGR image, BGR->RGB, cv2.subtract(mean), cv2.multiply(1 / std)
    x = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
    cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, np.float64(np.array(D.MEAN).reshape(1, -1)), x)
    cv2.multiply(x, 1 / np.float64(np.array(D.STD).reshape(1, -1)), x)
    ref = torch.from_numpy(x.transpose(2, 0, 1).copy())
    torch.testing.assert_close(D._to_tensor(rgb), ref, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# determinism, loaders

def tiny_dataset(tmp_path, n=6, transform=None):
    write_split(tmp_path, 'train', [rand_item(f'{i:02d}', 30 + i, 40, seed=i) for i in range(n)])
    return D.ADE20k(tmp_path, 'train', transform)


def test_train_transform_determinism():
    image, label = coordinate_sample()
    a = D.train_transform(crop_size=(24, 24), scale=(64, 48), seed=5)
    b = D.train_transform(crop_size=(24, 24), scale=(64, 48), seed=5)
    c = D.train_transform(crop_size=(24, 24), scale=(64, 48), seed=6)
    outs_a = [a(image, label) for _ in range(4)]
    outs_b = [b(image, label) for _ in range(4)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0][0], outs_a[1][0])  # the stream moves on
    assert not all(torch.equal(p[0], c(image, label)[0]) for p in outs_a[:1])


@pytest.mark.parametrize('workers', [0, 2])
def test_train_loader_is_reproducible(tmp_path, workers):
    ds = tiny_dataset(tmp_path, transform=D.train_transform(crop_size=(16, 16), scale=(64, 32)))

    def batches(seed):
        loader = D.train_loader(ds, total_batch=2, num_workers=workers, seed=seed)
        assert isinstance(loader.sampler, D.ResumableSampler)
        out = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            out += [b for b in loader]
        return out
    a, b, c = batches(0), batches(0), batches(1)
    assert len(a) == 6 and a[0][0].shape == (2, 3, 16, 16) and a[0][1].shape == (2, 16, 16)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_sampler_shuffles_each_epoch_anew_and_its_length_is_what_it_yields():
    s = D.ResumableSampler(16, 2, seed=3)
    order = []
    for epoch in range(2):
        s.set_epoch(epoch)
        order.append([i for i, _ in s])
        assert sorted(order[-1]) == list(range(16))
    assert order[0] != order[1]  # DistributedSampler.set_epoch: a new permutation each epoch
    s.set_epoch(1, start_batch=3)  # a resume mid-epoch yields the rest of that epoch's order
    assert [i for i, _ in s] == order[1][6:] and len(s) == 10


def test_each_samples_augmentation_seed_holds_its_epoch_rank_and_position():
    class Draw:
        def reseed(self, seed):
            self.rng = np.random.default_rng(seed)

    class Data(torch.utils.data.Dataset):
        transform = Draw()

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.transform.rng.random()
    s = D.SeededSamples(Data(), seed=5)
    tags = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]  # (epoch, rank, position)
    draws = [s[(2, tag)] for tag in tags]
    assert len(set(draws)) == 4 and s[(2, (1, 0, 0))] == draws[1]
    assert D.SeededSamples(Data(), seed=6)[(2, (0, 0, 0))] != draws[0]


def test_num_items_trains_on_the_first_images_only(tmp_path):
    ds = tiny_dataset(tmp_path, n=7)
    loader = D.train_loader(ds, total_batch=2, num_workers=0, num_items=4)  # --num_train_images 4
    assert loader.sampler.batches_per_epoch() == 2 and sorted(i for i, _ in loader.sampler) == [0, 1, 2, 3]


def test_loader_per_rank_batch_and_shards(tmp_path, monkeypatch):
    ds = tiny_dataset(tmp_path, n=7)
    loader = D.train_loader(ds, total_batch=4, num_workers=0)
    assert loader.batch_size == 4 and loader.drop_last
    monkeypatch.setattr(D, '_rank_world', lambda: (1, 2))  # as if rank 1 of 2
    loader = D.train_loader(ds, total_batch=4, num_workers=0)
    assert loader.batch_size == 2 and loader.sampler.world == 2 and loader.sampler.rank == 1
    assert loader.sampler.batch == 2 and loader.sampler.batches_per_epoch() == 2  # ceil(7 / 2) = 4 images per rank
    with pytest.raises(ValueError, match="does not split evenly"):
        D.train_loader(ds, total_batch=5, num_workers=0)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(D, '_rank_world', lambda r=rank: (r, 3))
        seen += list(D.test_loader(ds, num_workers=0).sampler)
    assert sorted(seen) == list(range(7))  # every image exactly once, no padding duplicates


def test_test_loader_batches(tmp_path):
    ds = tiny_dataset(tmp_path, n=3, transform=D.test_transform(scale=(64, 32)))
    batches = list(D.test_loader(ds, num_workers=0))
    assert len(batches) == 3
    x, y = batches[1]
    assert x.shape == (1, 3, 32, 41) and y.shape == (1, 31, 40)  # 31x40: f = 32/31, 40 f = 41.29; label original


# -----------------------------------------------------------------------------
# the demo dataset

def test_demo_dataset_layout_and_determinism(tmp_path):
    D.make_demo_ade20k(tmp_path / 'a', 3, 2, seed=0)
    D.make_demo_ade20k(tmp_path / 'b', 3, 2, seed=0)
    train, val = D.ADE20k(tmp_path / 'a', 'train'), D.ADE20k(tmp_path / 'a', 'val')
    assert len(train) == 3 and len(val) == 2
    sizes = set()
    for split in ('training', 'validation'):
        for kind in ('images', 'annotations'):
            folder = os.path.join(tmp_path, 'a', 'ADEChallengeData2016', kind, split)
            for name in os.listdir(folder):
                twin = os.path.join(tmp_path, 'b', 'ADEChallengeData2016', kind, split, name)
                assert open(os.path.join(folder, name), 'rb').read() == open(twin, 'rb').read(), name  # same bytes
    for ds in (train, val):
        for i in range(len(ds)):
            image, label = ds[i]
            sizes.add(image.shape[:2])
            raw = D.read_label(ds.paths(i)[1])
            assert set(np.unique(raw)) <= {0} | set(D.DEMO_CLASSES.values()) and (raw == 0).any()
            assert len(np.unique(label)) >= 3  # several classes per scene
    assert (512, 683) in sizes and (683, 512) in sizes


def test_demo_root_generates_once(tmp_path, monkeypatch):
    calls = []
    make = D.make_demo_ade20k
    monkeypatch.setattr(D, 'make_demo_ade20k', lambda *a: calls.append(a) or make(*a))
    roots = [D.demo_root(str(tmp_path), num_train=2, num_val=1) for _ in range(2)]
    assert roots[0] == roots[1] and len(calls) == 1


def test_demo_root_caches_atomically(tmp_path):
    cache = tmp_path / 'cache'
    os.makedirs(cache / 'ade20k_demo_v1_2x1_s0.tmp-dead')  # what a killed generation leaves behind
    root = D.demo_root(str(cache), num_train=2, num_val=1)
    assert os.path.isdir(os.path.join(root, 'ADEChallengeData2016')) and len(D.ADE20k(root, 'train')) == 2
    stamp = os.path.getmtime(os.path.join(root, 'ADEChallengeData2016', 'images', 'training'))
    assert D.demo_root(str(cache), num_train=2, num_val=1) == root  # second call: no regeneration
    assert os.path.getmtime(os.path.join(root, 'ADEChallengeData2016', 'images', 'training')) == stamp
    assert sorted(os.listdir(cache)) == ['ade20k_demo_v1_2x1_s0', 'ade20k_demo_v1_2x1_s0.tmp-dead']


def test_the_recipe_dicts_and_the_pipelines_defaults_agree():
    # config.py writes the reference's pipeline out as data, but recipe() reads only the crop and the scale from it;
    # the rest runs as common/data.py's defaults, so an edit to one side alone must fail here, not be ignored
    import inspect

    from common import config
    train = dict(config.DATASET_CFG_ADE20k_512x512['train']['data_pipelines'])
    test = dict(config.DATASET_CFG_ADE20k_512x512['test']['data_pipelines'])
    arg = {k: p.default for k, p in inspect.signature(D.TrainTransform).parameters.items()}
    assert list(train) == ['Resize', 'RandomCrop', 'RandomFlip', 'PhotoMetricDistortion', 'Normalize', 'ToTensor',
                           'Padding'] and list(test) == ['Resize', 'Normalize', 'ToTensor']
    assert train['Resize'] == {'output_size': arg['scale'], 'keep_ratio': True, 'scale_range': arg['ratio_range']}
    assert test['Resize']['output_size'] == inspect.signature(D.TestTransform).parameters['scale'].default
    assert train['RandomCrop'] == {'crop_size': arg['crop_size'], 'one_category_max_ratio': arg['cat_max_ratio']}
    assert train['Padding']['output_size'] == arg['crop_size']
    pmd = {k: p.default for k, p in inspect.signature(D.photometric_lut).parameters.items() if k not in ('image', 'rng')}
    assert train['PhotoMetricDistortion'] == {} and pmd == {  # the reference's defaults (spec §2.1 step 4)
        'brightness_delta': 32, 'contrast_range': (0.5, 1.5), 'saturation_range': (0.5, 1.5), 'hue_delta': 18}
    for norm in (train['Normalize'], test['Normalize']):
        assert (tuple(norm['mean']), tuple(norm['std']), norm['to_rgb']) == (D.MEAN, D.STD, True)
    loader = config.DATALOADER_CFG_BS16['train']
    assert loader['num_workers_per_gpu'] == config.DEFAULTS['num_workers']
    # no code reads the losses' ignore_index either: the pipeline's label is the one the loss and metric skip
    assert {v['ignore_index'] for v in config.BASE_SEGMENTOR_CFG['losses'].values()} == {D.IGNORE_INDEX}


def test_labels_beyond_num_classes_are_one_line_naming_the_flag_and_file(tmp_path):
    from common.errors import UserError
    D.make_demo_ade20k(tmp_path, 2, 1, seed=0)
    raw_max = max(int(D.read_label(D.ADE20k(tmp_path, 'train').paths(i)[1]).max()) for i in range(2))
    ds = D.ADE20k(tmp_path, 'train', num_classes=raw_max - 1)  # the largest class id is raw_max - 1
    with pytest.raises(UserError, match=rf"--num_classes {raw_max - 1}: annotation .*ADE_train_\d+\.png has class "
                                        rf"{raw_max - 1} \(raw value {raw_max}\)"):
        [ds[i] for i in range(2)]
    ok = D.ADE20k(tmp_path, 'train', num_classes=raw_max)
    assert all(int(ok[i][1][ok[i][1] != 255].max()) < raw_max for i in range(2))


def test_every_image_extension_is_named_with_its_new_name(tmp_path):
    # the other image formats cv2 decodes (.bmp, .tif/.tiff, .webp), in any case, are misnamed samples too
    base = write_split(tmp_path, 'train', [rand_item('a')])
    images = os.path.join(base, 'images', 'training')
    for name in ('a.bmp', 'a.TIF', 'a.tiff', 'a.webp'):
        os.rename(os.path.join(images, os.listdir(images)[0]), os.path.join(images, name))
        with pytest.raises(UserError, match=rf"{re.escape(name)}: .*rename it to a\.jpg"):
            D.ADE20k(tmp_path, 'train')
    os.rename(os.path.join(images, 'a.webp'), os.path.join(images, 'a.txt'))  # not an image: a stray file
    with pytest.raises(UserError, match=r"unexpected file .*a\.txt: .*move it out"):
        D.ADE20k(tmp_path, 'train')
