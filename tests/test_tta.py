"""--tta against a brute-force composition, the precision named in the eval line, --predict skipping bad images."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, config, infer, train, tta
from common.amp import Amp


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


def brute_force(net, image, size, cfg):
    """Every view written out: scale the resized input by each ratio as ssseg does (F.interpolate, scale_factor),
    mirror it with numpy, run the net (whole or the slide windows), mirror the logits back, resize each to the
    original size, and take the plain mean of the 12 maps."""
    maps = []
    for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75):
        x = F.interpolate(image, scale_factor=r, mode='bilinear', align_corners=False)
        for mirror in (False, True):
            v = torch.from_numpy(np.ascontiguousarray(x.numpy()[..., ::-1])) if mirror else x
            if cfg['inference_mode'] == 'slide':
                out = infer.slide_logits(net, v, cfg['slide_crop'], cfg['slide_stride'])
            else:
                out = net(v)['out']
            if mirror:
                out = torch.from_numpy(np.ascontiguousarray(out.numpy()[..., ::-1]))
            maps.append(F.interpolate(out, size=size, mode='bilinear', align_corners=False))
    return torch.stack(maps).mean(0)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_tta_matches_brute_force(mode):
    net = ContextNet().eval()
    image, size = torch.randn(1, 3, 30, 44), (57, 83)  # the resized input and the original (label) size
    cfg = dict(inference_mode=mode, slide_crop=(16, 20), slide_stride=(10, 13))
    with torch.no_grad():
        got = infer.predict_logits(net, image, size, cfg, tta=True)
        ref = brute_force(net, image, size, cfg)
        plain = infer.predict_logits(net, image, size, cfg)
    assert got.shape == (1, 3, *size) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the views do change the answer: the test can fail


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


def test_eval_line_names_precision_and_tta():
    net, lines = ContextNet(), []
    res = infer.evaluate(net, _loader(), 3, log=lines.append, classes=['a', 'b', 'c'], tta=True)
    assert '| fp32 | whole | tta flip + 6 scales |' in lines[0] and res['precision'] == 'fp32'
    assert lines[1].split()[:3] == ['class', 'IoU', 'Acc'] and 0 <= res['mAcc'] <= 1 and len(res['Acc']) == 3
    amp = Amp('torch', dtype=torch.bfloat16, device='cpu')
    lines.clear()
    res = infer.evaluate(net, _loader(), 3, amp=amp, log=lines.append, classes=['a', 'b', 'c'])
    assert '| bf16 autocast | whole | tta off |' in lines[0] and res['precision'] == 'bf16 autocast'
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
    assert sorted(os.listdir(tmp_path / 'w' / 'pred')) == ['good0.png', 'good0_overlay.png', 'good1.png',
                                                           'good1_overlay.png']
    assert 'Traceback' not in out.err
    os.remove(tmp_path / 'in' / 'bad.jpg')
    assert train.main(seg, _build, argv + ['--tta'], name='tiny') is None  # all readable: a normal return
