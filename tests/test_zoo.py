"""ssseg:NAME checkpoints (common/zoo.py) with a local file:// URL standing in for ssseg's release: downloaded once
into torch's hub cache, a broken download rejected and not cached, unknown names and no network as one line."""
import os
import socket

import pytest
import torch
import torch.nn as nn

from common import checkpoint, config, train, zoo
from common.errors import BadFileError, UserError


class Tiny(nn.Module):
    """Low-resolution logits from a 1x1 conv: a stand-in with its own key set (the real PSPNet file is 200 MB)."""

    def __init__(self, num_classes=150):
        super().__init__()
        self.backbone_net = nn.Conv2d(3, 4, 1)
        self.decoder = nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        return {'out': self.decoder(self.backbone_net(nn.functional.avg_pool2d(x, 8, ceil_mode=True)))}


def _build(cfg=None, num_classes=150):
    torch.manual_seed(0)
    return Tiny(num_classes)


@pytest.fixture
def release(tmp_path, monkeypatch):
    """ssseg's published {'model': sd} of the tiny net at a file:// URL; the hub cache in tmp_path/hub."""
    src = tmp_path / 'release' / 'pspnet_resnet50os8_apexfp16_ade20k.pth'
    src.parent.mkdir()
    torch.save({'model': _build().state_dict()}, src)  # what clean_ckpts_for_publish.py leaves
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))  # hub dir: tmp_path/hub
    tensors = len(_build().state_dict())  # what fetch() checks the download against
    monkeypatch.setitem(zoo.MODELS, 'pspnet', ('pspnet_resnet50os8_apexfp16_ade20k', 'PSPNet', tensors))
    monkeypatch.setitem(zoo.URLS, 'pspnet', src.as_uri())
    return src


def _cache(tmp_path):
    folder = tmp_path / 'hub' / 'checkpoints'
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_downloads_once_then_uses_the_cache(release, tmp_path):
    lines = []
    path = zoo.fetch('ssseg:pspnet', '--eval', lines.append)
    assert path == str(tmp_path / 'hub' / 'checkpoints' / release.name) == zoo.cache_path('pspnet')
    assert 'downloading file://' in lines[0] and lines[-1].endswith('checked)')
    assert _cache(tmp_path) == [release.name]  # no temp file left beside it
    assert open(path, 'rb').read() == release.read_bytes()
    release.unlink()  # the second call must not need the release
    lines.clear()
    assert zoo.fetch('ssseg:pspnet_resnet50os8_apexfp16_ade20k', '--init', lines.append) == path  # ssseg's name too
    assert lines == [f'--init ssseg:pspnet_resnet50os8_apexfp16_ade20k: {path} (cached)']
    # checkpoint.resolve (--eval / --ckpt) and weights_path (--init) go through the zoo; paths pass unchanged
    assert checkpoint.resolve('ssseg:pspnet', str(tmp_path), '--eval', log=lines.append) == path
    assert checkpoint.weights_path(str(release), '--init') == str(release)


def _broken(release, how):
    data = release.read_bytes()
    if how == 'short':  # a download cut off half way
        release.write_bytes(data[:len(data) // 2])
    elif how == 'html':  # an error page served with status 200
        release.write_bytes(b'<html><body>rate limited</body></html>')
    elif how == 'other model':  # a complete checkpoint of another net
        torch.save({'model': {'w': torch.zeros(3)}}, release)
    elif how == 'one tensor more':  # the right net plus a stray key
        torch.save({'model': {**_build().state_dict(), 'extra': torch.zeros(1)}}, release)


@pytest.mark.parametrize('how', ['short', 'html', 'other model', 'one tensor more'])
def test_broken_download_is_rejected_and_not_cached(release, tmp_path, how):
    _broken(release, how)
    with pytest.raises(BadFileError) as e:
        zoo.fetch('ssseg:pspnet', '--eval', lambda line: None)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('--eval ssseg:pspnet: the download of file://')
    assert "not ssseg's PSPNet checkpoint" in msg and 'not cached' in msg and '--eval PATH' in msg
    assert _cache(tmp_path) == []  # neither the file nor a temp file


def test_recorded_size_and_hash_are_checked(release, tmp_path, monkeypatch):
    import hashlib
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    monkeypatch.setitem(zoo.SIZES, 'pspnet', release.stat().st_size + 1)
    with pytest.raises(BadFileError, match=r'bytes, the release file has'):
        zoo.fetch('ssseg:pspnet', '--eval', lambda line: None)
    monkeypatch.setitem(zoo.SIZES, 'pspnet', release.stat().st_size)
    monkeypatch.setitem(zoo.SHA256, 'pspnet', ('0' if digest[0] != '0' else '1') + digest[1:10])
    with pytest.raises(BadFileError, match=r'sha256'):
        zoo.fetch('ssseg:pspnet', '--eval', lambda line: None)
    assert _cache(tmp_path) == []
    monkeypatch.setitem(zoo.SHA256, 'pspnet', digest[:10])
    assert os.path.isfile(zoo.fetch('ssseg:pspnet', '--eval', lambda line: None))


def _closed_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: a connection is refused at once, as without a network
    return port


def test_no_network_is_one_line_naming_url_and_local_file(release, tmp_path, monkeypatch):
    url = f'http://127.0.0.1:{_closed_port()}/ssseg_fp16/pspnet_resnet50os8_apexfp16_ade20k.pth'
    monkeypatch.setitem(zoo.URLS, 'pspnet', url)
    with pytest.raises(UserError) as e:
        zoo.fetch('ssseg:pspnet', '--ckpt', lambda line: None)
    msg = str(e.value)
    assert '\n' not in msg and f'could not download {url}' in msg
    assert '--ckpt PATH/pspnet_resnet50os8_apexfp16_ade20k.pth' in msg and zoo.cache_path('pspnet') in msg
    assert _cache(tmp_path) == []


def test_unknown_name_lists_known_ones_and_wrong_script_or_resume_fail_up_front():
    with pytest.raises(UserError, match=r'--eval ssseg:psp: no such model .* known: ssseg:fcn, ssseg:pspnet, '
                                        r'ssseg:deeplabv3, ssseg:deeplabv3plus$'):
        zoo.lookup('ssseg:psp', '--eval')
    with pytest.raises(UserError, match=r"ssseg's PSPNet checkpoint does not fit this script's model \(FCN\); run "
                                        r"it with pspnet.py"):
        zoo.check_flags(dict(eval='ssseg:pspnet'), 'FCN')
    with pytest.raises(UserError, match=r'--resume ssseg:fcn: a published model, .* use --init ssseg:fcn'):
        zoo.check_flags(dict(resume='ssseg:fcn'), 'FCN')
    zoo.check_flags(dict(init='ssseg:deeplabv3plus', eval='', ckpt='x.pth'), 'Deeplabv3Plus')  # fine


def _argv(tmp_path, *flags):
    return ['--data', 'demo', '--device', 'cpu', '--kernels', 'torch', '--scale', '(64, 32)', '--num_workers', '0',
            '--num_val_images', '2', '--save_predictions', '0', '--work_dir', str(tmp_path / 'w'), *flags]


def test_eval_by_name_end_to_end(release, tmp_path, capsys):
    seg = config.segmentor_cfg(type='PSPNet')
    res = train.main(seg, _build, _argv(tmp_path, '--eval', 'ssseg:pspnet'), name='pspnet')
    out = capsys.readouterr().out
    assert 'downloading file://' in out and f'loaded weights: {zoo.cache_path("pspnet")}' in out
    assert 0 <= res['mIoU'] <= 1
    release.unlink()  # the second run reads the cache
    train.main(seg, _build, _argv(tmp_path, '--eval', 'ssseg:pspnet'), name='pspnet')
    assert '(cached)' in capsys.readouterr().out


@pytest.mark.parametrize('flags, line', [
    (('--eval', 'ssseg:nope'), 'pspnet: error: --eval ssseg:nope: no such model in ssseg\'s FP16 zoo; known: '),
    (('--eval', 'ssseg:fcn'), "pspnet: error: --eval ssseg:fcn: ssseg's FCN checkpoint does not fit this script's "),
    (('--init', 'ssseg:pspnet', '--max_iters', '1', '--crop_size', '32'),
     'pspnet: error: --init ssseg:pspnet: could not download http'),
])
def test_cli_errors_are_one_line_exit_2(release, tmp_path, monkeypatch, capsys, flags, line):
    monkeypatch.setitem(zoo.URLS, 'pspnet', f'http://127.0.0.1:{_closed_port()}/pspnet.pth')
    with pytest.raises(SystemExit) as e:
        train.main(config.segmentor_cfg(type='PSPNet'), _build, _argv(tmp_path, *flags), name='pspnet')
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err


def test_the_release_table_matches_our_models_and_the_spec():
    """The fixture above replaces PSPNet's entry; the real table: ssseg's release URL and each model's key count
    (spec §5: FCN 352, PSPNet 370, DeepLabV3 376, DeepLabV3+ 424), which fetch() checks every download against."""
    import importlib
    assert zoo.URLS['pspnet'] == ('https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_fp16/'
                                  'pspnet_resnet50os8_apexfp16_ade20k.pth')
    assert {n: m[2] for n, m in zoo.MODELS.items()} == dict(fcn=352, pspnet=370, deeplabv3=376, deeplabv3plus=424)
    for name, (stem, _, tensors) in zoo.MODELS.items():
        assert stem == f'{name}_resnet50os8_apexfp16_ade20k'
        assert len(importlib.import_module(name).build_model(num_classes=150).state_dict()) == tensors, name
