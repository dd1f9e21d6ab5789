"""--tta against a brute-force composition, the precision named in the eval line, --predict skipping bad images."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, config, data, infer, train, tta
from common.amp import Amp
from common.errors import UserError


class ContextNet(nn.Module):
    """A 3x3 conv (not mirror-symmetric, so flipping changes the logits) at stride 4: low-resolution logits."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 3, padding=1)
        self.aux = nn.Conv2d(3, k, 1)

    def forward(self, x):
        out = self.conv(F.avg_pool2d(x, 4, ceil_mode=True))
        return {'out': out} if not self.training else {'out': out, 'aux': self.aux(x)}


def ssseg_scores(net, image, size, mode, probs, crop=None, stride=None, scales=tta.SCALES, flip=True):
    """ssseg's test.py around BaseSegmentor.auginference / inference (HEAD eb1878c), written out from reading it:
    for each ratio the resized input is rescaled (bilinear, scale_factor, align_corners False); `inference` runs on
    it and, with flip, on its numpy mirror, whose result is mirrored back. `inference`, whole: the net's low-res
    logits, softmaxed over the classes when use_probs_before_resize; slide: windows on a grid of
    max(H - crop + stride - 1, 0) // stride + 1 rows (cols alike), the last one pushed back inside the image, each
    window's logits bilinearly resized to the window and softmaxed when use_probs_before_resize, summed into a canvas
    that is divided by the per-pixel window count. test.py then resizes every view's map to the original size and
    takes the plain mean, whose argmax is the prediction."""
    def inference(x):
        if mode == 'whole':
            out = net(x)['out']
            return torch.softmax(out, dim=1) if probs else out
        (ch, cw), (sh, sw), (H, W) = crop, stride, x.shape[-2:]
        canvas, count = None, torch.zeros(1, 1, H, W)
        for i in range(max(H - ch + sh - 1, 0) // sh + 1):
            for j in range(max(W - cw + sw - 1, 0) // sw + 1):
                y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
                y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
                out = F.interpolate(net(x[:, :, y1:y2, x1:x2])['out'], size=(y2 - y1, x2 - x1), mode='bilinear',
                                    align_corners=False)
                if probs:
                    out = torch.softmax(out, dim=1)
                if canvas is None:
                    canvas = torch.zeros(1, out.shape[1], H, W)
                canvas[:, :, y1:y2, x1:x2] += out
                count[:, :, y1:y2, x1:x2] += 1
        assert (count > 0).all()
        return canvas / count

    def np_mirror(t):
        return torch.from_numpy(np.flip(t.numpy(), axis=3).copy())

    views = []
    for r in scales:
        x = F.interpolate(image, scale_factor=r, mode='bilinear', align_corners=False)
        views.append(inference(x))
        if flip:
            views.append(np_mirror(inference(np_mirror(x))))
    return sum(F.interpolate(v, size=size, mode='bilinear', align_corners=False) for v in views) / len(views)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
@pytest.mark.parametrize('setting', ['auto', 'true', 'false'])
def test_tta_and_one_view_match_a_transcription_of_ssseg(mode, setting):
    net = ContextNet().eval()
    image, size = torch.randn(1, 3, 30, 44), (57, 83)  # the resized input and the original (label) size
    cfg = dict(inference_mode=mode, slide_crop=(16, 20), slide_stride=(10, 13), use_probs_before_resize=setting)
    window = dict(mode=mode, crop=(16, 20), stride=(10, 13))
    with torch.no_grad():
        for tta_on in (True, False):
            probs = setting == 'true' or (setting == 'auto' and tta_on)  # auto: as ssseg's TTA configs / its base
            got = infer.predict_logits(net, image, size, cfg, tta=tta_on)
            ref = ssseg_scores(net, image, size, probs=probs, **window, **({} if tta_on else dict(scales=(1.0,),
                                                                                                   flip=False)))
            assert got.shape == (1, 3, *size) and got.dtype == torch.float32
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            if probs:  # bilinear resizes and means of probability maps stay probability maps
                torch.testing.assert_close(got.sum(1), torch.ones(1, *size), rtol=1e-5, atol=1e-5)
        # the test can fail: the views change the answer, and where the softmax sits matters (not just a rescale)
        probs = setting != 'false'
        got = infer.predict_logits(net, image, size, cfg, tta=True)
        one = ssseg_scores(net, image, size, probs=probs, **window, scales=(1.0,), flip=False)
        assert (got - one).abs().max() > 1e-2
        assert not torch.allclose(got, ssseg_scores(net, image, size, probs=not probs, **window), atol=1e-3)
        softmax_after = ssseg_scores(net, image, size, probs=False, **window).softmax(1)
        assert (ssseg_scores(net, image, size, probs=True, **window) - softmax_after).abs().max() > 1e-3


def test_one_view_is_plain_inference():
    # the reference's default inference.tta (multiscale [1], flip False) is exactly the single view
    net, image = ContextNet().eval(), torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        def forward(x):
            return net(x)['out']
        one = tta.augmented_logits(forward, image, (50, 70), scales=(1,), flip=False)
        plain = infer.predict_logits(net, image, (50, 70), dict(inference_mode='whole'))
    assert torch.equal(one, plain)


def _loader(k=3):
    torch.manual_seed(1)
    return [(torch.randn(1, 3, 24, 32), torch.randint(0, k, (1, 47, 61))) for _ in range(2)]


def test_a_long_evaluation_logs_its_progress(monkeypatch):
    monkeypatch.setattr(infer, "PROGRESS_S", -1)  # every image counts as long
    lines = []
    infer.evaluate(ContextNet(), _loader() * 2, 3, log=lines.append, classes=['a', 'b', 'c'])
    assert [line.split(' in ')[0] for line in lines[:3]] == ['eval: 1/4 images/rank', 'eval: 2/4 images/rank',
                                                             'eval: 3/4 images/rank']
    assert lines[0].endswith(' to go') and lines[3].startswith('eval: 4 images/rank in ')  # then the result


def test_eval_line_names_precision_and_tta():
    net, lines = ContextNet(), []
    res = infer.evaluate(net, _loader(), 3, log=lines.append, classes=['a', 'b', 'c'], tta=True)
    assert '| fp32 | whole | tta flip + 6 scales | probs resized |' in lines[0] and res['precision'] == 'fp32'
    assert lines[1].split()[:3] == ['class', 'IoU', 'Acc'] and 0 <= res['mAcc'] <= 1 and len(res['Acc']) == 3
    amp = Amp('torch', dtype=torch.bfloat16, device='cpu')
    lines.clear()
    res = infer.evaluate(net, _loader(), 3, amp=amp, log=lines.append, classes=['a', 'b', 'c'])
    assert '| bf16 autocast | whole | tta off | logits resized |' in lines[0] and res['precision'] == 'bf16 autocast'
    res = infer.evaluate(net, _loader(), 3, log=lines.append, classes=['a', 'b', 'c'], pictures=1)
    pic = res['pictures'][0]  # image | truth | prediction at the label's size (47 x 61), titled, with a legend
    assert len(res['pictures']) == 1 and pic.shape[0] >= 26 + 47 and pic.shape[1] > 3 * 61 and pic.dtype == np.uint8
    assert infer.precision(Amp('none', device='cpu')) == 'fp32'
    assert infer.precision(Amp('apex', opt_level='O0', dtype=torch.float16, device='cpu')) == 'fp32'


# --------------------------------------------------------------------------------------------------------------
# --predict with an unreadable image


def _images(folder, n_good=2):
    import cv2
    os.makedirs(folder, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n_good):
        cv2.imwrite(os.path.join(folder, f'good{i}.jpg'), g.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    with open(os.path.join(folder, 'bad.jpg'), 'wb') as f:
        f.write(b'not a jpeg at all')


def _build(cfg=None, num_classes=150):
    return ContextNet(num_classes)


def test_predict_skips_unreadable_image_and_exits_nonzero(tmp_path, capsys):
    _images(tmp_path / 'in')
    ckpt = str(tmp_path / 'net.pth')
    checkpoint.save(ckpt, {'model': _build().state_dict()})
    argv = ['--predict', str(tmp_path / 'in'), '--ckpt', ckpt, '--work_dir', str(tmp_path / 'w'), '--device', 'cpu',
            '--kernels', 'torch', '--scale', '(64, 32)', '--data', 'demo']
    seg = config.segmentor_cfg(num_classes=150)
    with pytest.raises(SystemExit) as e:
        train.main(seg, _build, argv, name='tiny')
    assert e.value.code == 1
    out = capsys.readouterr()
    log = out.out  # --predict writes no log file (nothing but its pictures)
    assert not os.path.exists(tmp_path / 'w' / 'log.txt')
    assert 'WARNING: predict: skipping' in log and 'bad.jpg' in log and 'wrote 2, skipped 1' in log
    assert 'has seen only 8 of ADE20k' in log  # a demo model says so
    (first,) = (tmp_path / 'w' / 'pred').iterdir()  # without --out: a folder of its own, as a training run's
    assert sorted(os.listdir(first)) == ['good0.png', 'good0_overlay.png', 'good1.png', 'good1_overlay.png']
    assert f'PNGs in {first})' in log
    assert 'Traceback' not in out.err
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    os.remove(tmp_path / 'in' / 'bad.jpg')
    assert train.main(seg, _build, argv + ['--tta'], name='tiny') is None  # all readable: a normal return
    second = sorted(set((tmp_path / 'w' / 'pred').iterdir()) - {first})
    assert len(second) == 1 and sorted(os.listdir(second[0])) == sorted(before)  # the first run's pictures stay
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_predict_never_overwrites_an_input_or_another_inputs_pictures(tmp_path, capsys):
    import cv2
    folder = tmp_path / 'in'
    _images(folder)
    os.remove(folder / 'bad.jpg')
    cv2.imwrite(str(folder / 'good0.png'), np.zeros((20, 30, 3), np.uint8))  # shares good0.jpg's name
    cv2.imwrite(str(folder / 'solo.png'), np.zeros((20, 30, 3), np.uint8))  # its mask would be solo.png
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ckpt = str(tmp_path / 'net.pth')
    checkpoint.save(ckpt, {'model': _build().state_dict()})
    argv = ['--predict', str(folder), '--ckpt', ckpt, '--device', 'cpu', '--kernels', 'torch', '--scale', '(64, 32)']
    seg = config.segmentor_cfg(num_classes=150)
    with pytest.raises(SystemExit) as e:  # into the inputs' own folder
        train.main(seg, _build, argv + ['--out', str(folder)], name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'this folder holds the input image' in err, err
    assert train.main(seg, _build, argv + ['--out', str(tmp_path / 'out')], name='tiny') is None
    assert sorted(os.listdir(tmp_path / 'out')) == ['good0_jpg.png', 'good0_jpg_overlay.png', 'good0_png.png',
                                                    'good0_png_overlay.png', 'good1.png', 'good1_overlay.png',
                                                    'solo.png', 'solo_overlay.png']
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'out').iterdir()}
    with pytest.raises(SystemExit) as e:  # the same --out again: the earlier pictures would be replaced
        train.main(seg, _build, argv + ['--out', str(tmp_path / 'out')], name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'good0_jpg.png is there already' in err, err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'out').iterdir()} == written
    with pytest.raises(UserError, match=r"a\.jpg and .*a_jpg\.png would both write .*a_jpg\.png"):
        infer.output_names(['x/a.jpg', 'x/a.png', 'y/a_jpg.png'], str(tmp_path / 'o'))
    assert infer.output_names(['x/a.jpg', 'y/b.jpg'], str(tmp_path / 'o')) == ['a', 'b']


def test_tta_views_are_ssseg_s_six_scales_each_with_its_mirror():
    # ssseg's ADE20k TTA set: ratios 0.5 ... 1.75 of the test scale, each view also mirrored (12 views)
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :1]
    tta.augmented_logits(forward, torch.zeros(1, 3, 32, 48), (32, 48))
    assert seen == [hw for hw in ((16, 24), (24, 36), (32, 48), (40, 60), (48, 72), (56, 84)) for _ in range(2)]


def test_tta_leaves_out_the_views_a_thin_image_has_no_pixel_row_for():
    # a 3000x4 image at the test scale is 1 pixel high: its 0.5 and 0.75 views would be 0 pixels high
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :1]
    out = tta.augmented_logits(forward, torch.ones(1, 3, 1, 512), (4, 3000))
    assert out.shape == (1, 1, 4, 3000) and torch.allclose(out, torch.ones_like(out))
    assert sorted(set(seen)) == [(1, 512), (1, 640), (1, 768), (1, 896)]


def test_predict_pictures_show_the_test_pipelines_prediction_and_the_mapped_annotation(tmp_path, monkeypatch):
    # the pictures' prediction is the evaluation's (test resize to --scale, no augmentation); their ground truth
    # (--save_predictions) is the reduce-zero-label mapped annotation
    import cv2
    from common import data
    raw = np.zeros((20, 30), np.uint8)
    raw[:, 10:], raw[:, 20:] = 1, 3
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'a.png'), image[..., ::-1])  # lossless, BGR on disk
    cv2.imwrite(str(tmp_path / 'a_label.png'), raw)
    got = {}
    monkeypatch.setattr(infer.visualize, 'write', lambda out_dir, name, image, pred, label: got.update(pred=pred,
                                                                                                       label=label))
    net, cfg = ContextNet().eval(), dict(scale=(64, 32))
    infer.predict(net, [(str(tmp_path / 'a.png'), str(tmp_path / 'a_label.png'))], str(tmp_path / 'o'), cfg, 'cpu',
                  log=lambda m: None)
    x, _ = data.test_transform(scale=(64, 32))(image, raw)
    with torch.no_grad():
        expect = infer.predict_logits(net, x[None], (20, 30), cfg).argmax(1)[0].numpy()
    assert np.array_equal(got['pred'], expect)
    assert np.array_equal(got['label'], np.where(raw == 0, 255, raw - 1))


def test_predict_inputs_upper_case_extensions_and_empty_folders(tmp_path):
    import cv2
    (tmp_path / 'none').mkdir()
    with pytest.raises(UserError, match='no image file'):  # an empty folder is one line, not "wrote 0"
        infer.image_paths(str(tmp_path / 'none'))
    (tmp_path / 'in').mkdir()
    for name in ('A.JPG', 'b.png', 'c.webp', 'd.TIF'):  # cameras write .JPG
        cv2.imwrite(str(tmp_path / 'in' / name), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'in' / 'notes.txt').write_text('not an image')
    (tmp_path / 'in' / 'sub').mkdir()  # a folder is not a file left out
    lines = []
    assert infer.image_paths(str(tmp_path / 'in'), lines.append) == [
        str(tmp_path / 'in' / n) for n in ('A.JPG', 'b.png', 'c.webp', 'd.TIF')]
    assert lines == [f"predict: left out 1 file(s) of {tmp_path / 'in'} not named as images "
                     "(.jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff): notes.txt"]  # not silently
    assert data.read_image(str(tmp_path / 'in' / 'c.webp')).shape == (4, 4, 3)


def test_output_names_see_the_input_folder_in_any_spelling_and_overlay_clashes(tmp_path):
    folder = str(tmp_path / 'in')
    os.makedirs(folder)
    paths = [os.path.join(folder, 'a.jpg')]
    for out in (folder + os.sep, os.path.join(folder, '.'), os.path.relpath(folder)):
        with pytest.raises(UserError, match='this folder holds the input image'):
            infer.output_names(paths, out)
    # a's overlay a_overlay.png is also the mask of the input a_overlay.jpg
    with pytest.raises(UserError, match=r'a\.jpg and .*a_overlay\.jpg would both write .*a_overlay\.png'):
        infer.output_names(['x/a.jpg', 'x/a_overlay.jpg'], str(tmp_path / 'o'))


def test_use_probs_before_resize_flag(capsys):
    seg = config.segmentor_cfg()
    assert config.parse(seg, [], 'tiny')['use_probs_before_resize'] == 'auto'
    assert config.parse(seg, ['--use_probs_before_resize', 'false', '--tta'], 'tiny')['use_probs_before_resize'] == \
        'false'
    assert [tta.use_probs(dict(use_probs_before_resize=v), t) for v in ('auto', 'true', 'false') for t in (1, 0)] == \
        [True, False, True, True, False, False]
    with pytest.raises(SystemExit) as e:
        config.parse(seg, ['--use_probs_before_resize', 'yes'], 'tiny')
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--use_probs_before_resize: invalid choice: 'yes'" in err[0]


@pytest.mark.parametrize('script', ['fcn', 'pspnet', 'deeplabv3', 'deeplabv3plus'])
def test_evaluation_runs_the_base_configs_inference_by_default(script):
    """spec §1/§8: whole-image inference, multiscale [1] without flip, logits resized (use_probs_before_resize False),
    fp32 for --eval (test.py), TF32 off. recipe() does not read SEGMENTOR_CFG['inference']: the flags' defaults are
    what evaluate() runs, so they must say the same as the dict (an edit to either side alone fails here)."""
    import importlib
    seg = importlib.import_module(script).SEGMENTOR_CFG
    cfg = config.parse(seg, [], script)
    ref = seg['inference']
    assert ref == {'forward': {'mode': 'whole', 'cropsize': None, 'stride': None},
                   'tta': {'multiscale': [1], 'flip': False, 'use_probs_before_resize': False},
                   'evaluate': {'metric_list': ['iou', 'miou']}}
    assert cfg['inference_mode'] == ref['forward']['mode']
    assert cfg['tta'] is ref['tta']['flip'] is False  # one view: scale 1, no mirror
    assert tta.use_probs(cfg, cfg['tta']) is ref['tta']['use_probs_before_resize']
    assert (cfg['eval_amp'], cfg['tf32']) == (False, False)
