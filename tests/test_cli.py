"""The command line: tuple spellings, up-front checks as one-line errors (exit 2), --help from DEFAULTS's comments,
--eval / --predict taking the checkpoint's config, user errors vs crashes in main(), the log's shape."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from common import cli, config, data, errors, report, runs, train
from common.errors import MissingFile, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _seg():
    return config.segmentor_cfg(num_classes=150)


def _error(capsys, argv, monkeypatch=None):
    """parse(argv) must exit 2 with exactly one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        config.parse(_seg(), argv, 'pspnet')
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count('\n') == 1 and err.startswith('pspnet: error: ') and 'Traceback' not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# tuples


@pytest.mark.parametrize('words', [['512'], ['512,512'], ['512x512'], ['512 512'], ['512', '512'], ['(512, 512)'],
                                   ['[512,512]'], ['512,', '512']])
def test_tuple_spellings(words):
    assert config.parse(_seg(), ['--crop_size', *words])['crop_size'] == (512, 512)
    assert config.parse(_seg(), [f'--slide_crop={" ".join(words)}'])['slide_crop'] == (512, 512)


def test_tuple_order_and_errors(capsys):
    cfg = config.parse(_seg(), ['--crop_size', '64x96', '--scale', '(256, 64)'])
    assert cfg['crop_size'] == (64, 96) and cfg['scale'] == (256, 64)
    for bad, what in (('64,64,3', 'got 3'), ('a,b', "'a,b'"), ('0', 'positive'), ('64.5', '64.5'),
                      ('64x', "'64x'"), ('x64', "'x64'"), ('64,', "'64,'"), ('64,,64', "'64,,64'")):  # a lost number
        assert '--crop_size' in _error(capsys, ['--crop_size', bad]) and what in _error(capsys, ['--crop_size', bad])


# ----------------------------------------------------------------------------------------------------------------
# checks before anything runs


@pytest.mark.parametrize('argv,expect', [
    (['--batch_size', '0'], '--batch_size 0: must be at least 1'),
    (['--lr', '-1'], '--lr -1.0: must be > 0'),
    (['--lr', 'inf'], '--lr inf: must be a finite number'),
    (['--momentum', 'nan'], '--momentum nan: must be a finite number'),
    (['--lr', '0.01', '--min_lr', '0.1'], '--min_lr 0.1: must be between 0 and --lr'),
    (['--power', '0'], '--power 0.0: must be > 0'),
    (['--eval_interval_epochs', '-1'], '--eval_interval_epochs -1: must be >= 0'),
    (['--save_interval_epochs', '-2'], '--save_interval_epochs -2'),
    (['--log_interval', '0'], '--log_interval 0: must be at least 1'),
    (['--num_workers', '-1'], '--num_workers -1'),
    (['--num_classes', '151'], '--num_classes 151'),
    (['--seed', '-1'], '--seed -1: must be 0 .. 2**32 - 1'),
    (['--seed', str(2**32)], f'--seed {2**32}: must be 0 .. 2**32 - 1'),
    (['--crop_size', '513'], '--crop_size 513,513: is larger than --scale 2048,512'),
    (['--crop_size', '64,3000'], 'longer side <= 2048'),
    (['--inference_mode', 'slide', '--slide_stride', '600'], '--slide_stride 600,600'),
    (['--device', 'gpu'], "--device 'gpu': unknown device"),
    (['--device', 'mps'], "--device 'mps': unknown device"),
    (['--predict', '/no/such/dir'], "--predict '/no/such/dir': no such image file or folder"),
    (['--eval', 'a.pth', '--resume', 'b.pth'], "--eval and --resume: give one"),
    (['--summary', '--predict', '.', '--ckpt', 'a.pth'], "--predict and --summary: give one"),
    (['--ckpt', 'a.pth'], "--ckpt 'a.pth': is --predict's checkpoint"),
    (['--init', 'a.pth', '--resume', 'auto'], "--init 'a.pth': and --resume both give the weights"),
    (['--out', 'o'], "--out 'o': is where --eval and --predict write their pictures"),  # else: ignored
    (['--eval', 'a.pth', '--out', 'o', '--save_predictions', '0'], "--out 'o': would stay empty"),  # else: unused
    (['--predict', '.', '--init', 'a.pth'], "--init 'a.pth': starts a training run"),  # else: the latest's weights
    (['--eval', 'b.pth', '--init', 'a.pth'], "--init 'a.pth': starts a training run"),
    (['--tf32', 'maybe'], 'argument --tf32'),
    (['--max_iter', '20'], 'unrecognized arguments: --max_iter 20 (did you mean --max_iters?)'),
    (['--lr', '0.1', '--batchsize=8'], '(did you mean --batch_size?)'),
    (['--bogus'], 'unrecognized arguments: --bogus (`pspnet --help` lists the flags)'),  # nothing close: no guess
])
def test_bad_values_are_one_line_errors(capsys, argv, expect):
    assert expect in _error(capsys, argv)


def test_the_checks_edges_are_accepted():
    # legal settings at the edge of a check: a constant lr (min_lr = lr), plain SGD without momentum or weight decay,
    # no aux loss, slide windows that tile without overlap (stride = crop)
    cfg = config.parse(_seg(), ['--min_lr', '0.01', '--momentum', '0', '--weight_decay', '0', '--aux_weight', '0',
                                '--inference_mode', 'slide', '--slide_crop', '256', '--slide_stride', '256'], 'pspnet')
    assert (cfg['min_lr'], cfg['momentum'], cfg['weight_decay'], cfg['aux_weight'], cfg['slide_stride']) == \
        (0.01, 0.0, 0.0, 0.0, (256, 256))


def test_crop_against_scale_either_orientation(capsys):
    # (long, short) scale vs (h, w) crop: a portrait crop fits a landscape-written scale and vice versa
    assert config.parse(_seg(), ['--crop_size', '1024,512'])['crop_size'] == (1024, 512)
    assert config.parse(_seg(), ['--crop_size', '512,1024', '--scale', '512,2048'])['crop_size'] == (512, 1024)
    assert 'shorter side must be <= 512' in _error(capsys, ['--crop_size', '600,700'])
    # inference only: no training crop, so no check (the scale may come from a checkpoint)
    assert config.parse(_seg(), ['--crop_size', '600', '--summary'])['crop_size'] == (600, 600)


def test_an_amp_flag_the_chosen_amp_would_ignore_is_one_line(capsys):
    assert "--amp apex" in _error(capsys, ['--amp', 'torch', '--opt_level', 'O2'])
    assert "--opt_level O3" in _error(capsys, ['--amp', 'none', '--opt_level', 'O3'])
    assert "--amp none trains in fp32" in _error(capsys, ['--amp', 'none', '--amp_dtype', 'float16'])
    for ok in (['--amp', 'apex', '--opt_level', 'O2'], ['--amp', 'torch', '--opt_level', 'O1'],
               ['--amp', 'torch', '--amp_dtype', 'bfloat16'], ['--amp', 'none', '--amp_dtype', 'auto'],
               ['--opt_level', 'O3']):  # the script's fp16_cfg is apex
        config.parse(_seg(), ok, 'pspnet')


@pytest.mark.parametrize("fp16_cfg,key", [
    ({'type': 'apex', 'initialize': {'opt_level': 'O1', 'keep_batchnorm_fp32': True}}, 'keep_batchnorm_fp32'),
    ({'type': 'apex', 'initialize': {'opt_level': 'O1', 'loss_scale': 128.0}}, 'loss_scale'),
    ({'type': 'apex', 'initialize': {'opt_level': 'O1', 'min_loss_scale': 1.0}}, 'min_loss_scale'),
    ({'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {'init_scale': 1024.0}}, 'init_scale'),
    ({'type': 'pytorch', 'autocast': {'cache_enabled': False}}, 'cache_enabled'),
    ({'type': 'deepspeed'}, 'deepspeed'),
    ({'type': 'pytorch', 'autocast': {'dtype': torch.float32}}, 'float32'),
])
def test_a_script_fp16_cfg_setting_the_flags_cannot_carry_is_one_line(capsys, fp16_cfg, key):
    """A researcher who edits the script's fp16_cfg must not train with the setting silently dropped."""
    seg = _seg()
    seg['fp16_cfg'] = fp16_cfg
    with pytest.raises(SystemExit) as e:
        config.parse(seg, [], 'pspnet')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('pspnet: error: SEGMENTOR_CFG: ') and key in err, err


@pytest.mark.parametrize("edit,key", [
    (lambda s: s['backbone'].update(depth=101), "['backbone']['depth'] 101"),
    (lambda s: s['scheduler']['optimizer'].update(type='AdamW'), "'AdamW'"),
    (lambda s: s['losses'].pop('loss_aux'), "loss_aux"),
    (lambda s: s['inference']['forward'].update(mode='slide'), "--inference_mode"),
    (lambda s: s['dataset']['train']['data_pipelines'][1][1].update(one_category_max_ratio=1.0), "data_pipelines"),
    (lambda s: s['dataset']['train']['data_pipelines'].pop(2), "data_pipelines"),
    (lambda s: s.update(align_corners=True), "align_corners"),
    (lambda s: s['inference']['tta'].update(flip=True), "['inference']['tta']['flip'] True"),
    (lambda s: s['inference']['tta'].update(multiscale=[0.5, 1.0]), "['inference']['tta']['multiscale']"),
    (lambda s: s.update(norm_cfg={'type': 'GroupNorm'}), "['norm_cfg']"),
    (lambda s: s.update(act_cfg={'type': 'LeakyReLU'}), "['act_cfg']"),
    (lambda s: s['scheduler']['optimizer'].update(params_rules={'backbone_net': 0.1}), "params_rules"),
    (lambda s: s['scheduler'].update(type='CosineScheduler'), "['scheduler']['type']"),
    (lambda s: s['losses']['loss_cls'].update(scale_factor=2.0), "['losses']['loss_cls']['scale_factor']"),
    (lambda s: s['losses']['loss_aux'].update(type='FocalLoss'), "['losses']['loss_aux']['type']"),
    (lambda s: s['losses']['loss_aux'].update(ignore_index=-100), "['losses']['loss_aux']['ignore_index']"),
    (lambda s: s['losses']['loss_cls'].update(reduction='sum'), "['losses']['loss_cls']['reduction']"),
    (lambda s: s['backbone'].update(outstride=16), "['backbone']['outstride'] 16"),
    (lambda s: s['dataset']['test']['data_pipelines'][0][1].update(keep_ratio=False), "['test']['data_pipelines']"),
    (lambda s: s['dataset']['train'].update(data_pipelines='Resize'), "['train']['data_pipelines']"),
    (lambda s: s['dataset']['test']['data_pipelines'][0][1].update(output_size=(2048, 1024)),
     "['test'] Resize output_size (2048, 1024): the scripts run ['train'] Resize output_size (2048, 512) for it "
     "(--scale sets both)"),
    (lambda s: s['dataset']['train']['data_pipelines'][0][1].update(output_size=(1024, 384)),
     "['test'] Resize output_size (2048, 512): the scripts run ['train'] Resize output_size (1024, 384)"),
    (lambda s: s['dataset']['train']['data_pipelines'][6][1].update(output_size=[640, 640]),
     "['train'] Padding output_size [640, 640]: the scripts run ['train'] RandomCrop crop_size (512, 512) for it "
     "(--crop_size sets both)"),
    (lambda s: s['dataset']['train']['data_pipelines'][1][1].update(crop_size=512),
     "['train'] RandomCrop crop_size 512: a size is two positive integers"),
    (lambda s: s['dataset']['test']['data_pipelines'][0][1].update(output_size=(2048, 0)),
     "['test'] Resize output_size (2048, 0): a size is two positive integers"),
    (lambda s: s['dataset']['train']['data_pipelines'][0][1].update(output_size=(2048.0, 512)),
     "two positive integers"),
    (lambda s: s['dataset']['test']['data_pipelines'][0][1].pop('output_size'), "['test']['data_pipelines']"),
])
def test_a_script_config_edit_the_code_would_ignore_is_one_line(capsys, edit, key):
    """A copied script whose SEGMENTOR_CFG asks for a ResNet-101, AdamW, no aux loss or another augmentation must not
    train the reference's recipe without a word: every entry the code runs whatever its value (config._FIXED, the
    backbone, both pipelines)."""
    import pspnet
    seg = copy.deepcopy(pspnet.SEGMENTOR_CFG)
    edit(seg)
    with pytest.raises(SystemExit) as e:
        config.parse(seg, [], 'my_pspnet')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('my_pspnet: error: SEGMENTOR_CFG: ') and key in err, err


def test_a_script_config_edit_the_code_carries_runs():
    import pspnet
    seg = copy.deepcopy(pspnet.SEGMENTOR_CFG)
    seg['dataset']['train']['data_pipelines'][1] = ('RandomCrop', {'crop_size': [64, 64],
                                                                   'one_category_max_ratio': 0.75})
    seg['dataset']['train']['data_pipelines'][6][1]['output_size'] = (64, 64)  # the padding follows the crop
    seg['dataset']['train']['data_pipelines'][0][1]['scale_range'] = [0.5, 2.0]  # a list, as a JSON-minded user writes
    seg['backbone']['pretrained'] = False  # ssseg's from-scratch switch
    seg['losses']['loss_aux']['scale_factor'] = 0.0
    cfg = config.parse(seg, [], 'my_pspnet')
    assert (cfg['crop_size'], cfg['pretrained'], cfg['aux_weight']) == ((64, 64), 'none', 0.0)


def test_batch_must_split_over_torchrun_ranks(capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    assert 'WORLD_SIZE=3' in _error(capsys, ['--batch_size', '16'])
    assert config.parse(_seg(), ['--batch_size', '12'])['batch_size'] == 12


@pytest.mark.parametrize('value', ['abc', 'inf', '0', '-5'])
def test_a_bad_collective_timeout_is_one_line(capsys, monkeypatch, value):
    monkeypatch.setenv('SEG_DIST_TIMEOUT_S', value)
    assert f"SEG_DIST_TIMEOUT_S='{value}': must be a number of seconds > 0" in _error(capsys, [])
    monkeypatch.setenv('SEG_DIST_TIMEOUT_S', '3600.5')
    config.parse(_seg(), [], 'pspnet')


def test_more_torchrun_processes_than_gpus_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('LOCAL_RANK', '2')
    assert "LOCAL_RANK=2: torchrun started more processes on this machine than the 2 GPU(s)" in _error(capsys, [])
    assert "use --nproc_per_node 2 or fewer" in _error(capsys, ['--device', 'cuda'])
    monkeypatch.setenv('LOCAL_RANK', '1')
    config.parse(_seg(), [], 'pspnet')
    monkeypatch.setenv('LOCAL_RANK', '2')
    config.parse(_seg(), ['--device', 'cpu'], 'pspnet')  # gloo on the CPU: any number of processes


def test_a_cuda_index_beyond_the_visible_gpus_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert "--device cuda:2: only 2 CUDA device(s) are visible" in _error(capsys, ['--device', 'cuda:2'])
    assert config.parse(_seg(), ['--device', 'cuda:1'], 'pspnet')['device'] == 'cuda:1'  # indices count from 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu(capsys):
    assert 'no CUDA GPU is visible' in _error(capsys, ['--device', 'cuda'])


# ----------------------------------------------------------------------------------------------------------------
# --help


def test_every_flag_has_a_group_and_a_description():
    docs = config.flag_docs()
    assert set(docs) == set(config.DEFAULTS)
    for key, (group, text) in docs.items():
        assert group != 'other' and len(text) > 10, key
    groups = {g.partition(':')[0] for g, _ in docs.values()}
    for want in ('data', 'AMP', 'schedule', 'evaluation', 'kernels', 'distributed'):
        assert any(want in g for g in groups), (want, groups)
    assert docs['lr'][1].startswith('SGD base lr') and docs['pretrained'][1].startswith('ImageNet backbone')


def test_help_text_is_read_from_the_comments(tmp_path):
    src = tmp_path / 'cfg.py'
    src.write_text("X = 1\nDEFAULTS = dict(\n    # --- first: what it is for\n    a=1,  # one\n"
                   "    # two, above the key\n    # and its second line\n    b='x#y',\n"
                   "    # --- second\n    c=(1, 2),  # (h, w) three\n    d=dict(e=5),  # nested\n)\n"
                   "Z = dict(q=1)  # no\n")
    assert cli.flag_docs(str(src)) == {'a': ('first: what it is for', 'one'),
                                       'b': ('first: what it is for', 'two, above the key and its second line'),
                                       'c': ('second', '(h, w) three'), 'd': ('second', 'nested')}


def test_help_output_grouped(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse(_seg(), ['--help'], 'pspnet')
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert re.search(r"\ndata:\n", out) and re.search(r"\nAMP \(mixed precision\):\n", out)
    assert out.index('\ndata:\n') < out.index('--crop_size H,W') < out.index('\noptimiser and schedule:')
    assert 'SGD base lr (spec §1) (default 0.01; --data demo: 0.02)' in ' '.join(out.split())


# ----------------------------------------------------------------------------------------------------------------
# --eval / --predict take the checkpoint's config


def _ckpt(tmp_path, **cfg):
    path = str(tmp_path / 'ck.pth')
    torch.save({'model': {'w': torch.zeros(1)}, 'config': cfg}, path)
    return path


def test_eval_takes_data_and_scale_from_the_checkpoint(tmp_path):
    ck = _ckpt(tmp_path, data='demo', scale=[128, 32], num_classes=150, inference_mode='slide',
               slide_crop=[32, 32], slide_stride=[16, 16], lr=0.5, crop_size=[64, 64])
    notes = []
    cfg = config.parse(_seg(), ['--eval', ck], 'pspnet', notes)
    assert (cfg['data'], cfg['scale'], cfg['inference_mode'], cfg['slide_crop']) == ('demo', (128, 32), 'slide',
                                                                                     (32, 32))
    assert cfg['lr'] != 0.5 and cfg['work_dir'].endswith('_demo')  # only inference keys; demo's work dir
    assert len(notes) == 1 and "data 'demo'" in notes[0] and 'scale 128,32' in notes[0]
    cfg = config.parse(_seg(), ['--eval', ck, '--scale', '256,64', '--data', 'ade20k'], 'pspnet')
    assert (cfg['data'], cfg['scale'], cfg['slide_crop']) == ('ade20k', (256, 64), (32, 32))  # flags win
    image = tmp_path / 'x.jpg'
    image.write_bytes(b'')
    cfg = config.parse(_seg(), ['--predict', str(image), '--ckpt', ck], 'pspnet')
    assert (cfg['data'], cfg['scale']) == ('demo', (128, 32))
    # a demo run trained at the ADE scale: the saved scale wins over the demo preset's, though it equals the default
    ck = _ckpt(tmp_path, data='demo', scale=[2048, 512])
    assert config.parse(_seg(), ['--eval', ck], 'pspnet')['scale'] == (2048, 512)


def test_checkpoint_without_config_keeps_the_defaults(tmp_path, capsys):
    path = str(tmp_path / 'ssseg.pth')
    torch.save({'model': {'w': torch.zeros(1)}, 'cur_epoch': 130}, path)  # ssseg's format: no config
    cfg = config.parse(_seg(), ['--eval', path], 'pspnet')
    assert (cfg['data'], cfg['scale']) == ('ade20k', (2048, 512))


# ----------------------------------------------------------------------------------------------------------------
# main(): a user's mistake is one line (stderr and log.txt), exit 2; a bug keeps its traceback


class Tiny(nn.Module):
    def __init__(self, num_classes=150):
        super().__init__()
        self.backbone_net = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.decoder, self.auxiliary_decoder = nn.Conv2d(4, num_classes, 1), nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        f = self.backbone_net(x)
        return {'out': self.decoder(f), 'aux': self.auxiliary_decoder(f)} if self.training else \
            {'out': self.decoder(f)}


def _argv(work_dir, *flags):
    return ['--device', 'cpu', '--kernels', 'torch', '--pretrained', 'none', '--amp', 'none', '--crop_size', '32',
            '--scale', '128,32', '--batch_size', '2', '--num_workers', '0', '--work_dir', str(work_dir), *flags]


def test_missing_dataset_is_one_line_in_stderr_and_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes),
                   _argv(tmp_path, '--data_root', str(tmp_path / 'nowhere')), name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith(f"tiny: error: ADE20k not found under '{tmp_path / 'nowhere'}'")
    assert not os.listdir(tmp_path)  # no run folder yet, so no log.txt: a failed start writes nothing


def test_a_batch_the_data_cannot_fill_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes),
                   _argv(tmp_path, '--data', 'demo', '--batch_size', '4', '--num_train_images', '3'), name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith("tiny: error: --batch_size: 3 training images over 1 rank(s) do not fill one batch of 4")


def test_batch_1_with_a_global_pooling_bn_is_one_line_before_the_run_folder(tmp_path, capsys):
    class Pooled(Tiny):  # PSPNet's 1x1 bin / the ASPP image branch: BN over 1x1 maps needs 2+ images
        def __init__(self, num_classes):
            super().__init__(num_classes)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            out = super().forward(x)
            out['out'] = out['out'] + self.pool(self.backbone_net(x)).mean()
            return out

    argv = _argv(tmp_path, '--data', 'demo', '--batch_size', '1', '--max_iters', '1', '--num_val_images', '1')
    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Pooled(num_classes), argv, name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith("tiny: error: --batch_size 1: this model's global-pooling branch has a BatchNorm")
    assert not os.listdir(tmp_path)
    train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes), argv, name='tiny')  # no such branch: batch 1 trains


@pytest.mark.parametrize('flag', ['--work_dir', '--data_root', '--out'])
def test_a_folder_flag_that_cannot_be_made_is_one_line(tmp_path, capsys, flag):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    argv = _argv(tmp_path / 'work', '--data', 'demo', '--max_iters', '1')
    if flag == '--out':  # --predict writes its pictures there
        image = tmp_path / 'x.png'
        cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
        argv += ['--predict', str(image), '--ckpt', str(tmp_path / 'ck.pth')]
        torch.save({'state_dict': Tiny().state_dict()}, tmp_path / 'ck.pth')
    target = blocker / 'sub' if flag == '--out' else blocker  # a file in the way, itself or as a parent
    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes), argv + [flag, str(target)], name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith(f"tiny: error: {flag} {target}: cannot create this folder (a file is in the way)"), err


def test_eval_pictures_inside_the_dataset_are_one_line_before_any_work(tmp_path, capsys):
    root = data.dataset_root('demo', '')
    target = os.path.join(root, 'ADEChallengeData2016', 'annotations', 'validation')
    before = sorted(os.listdir(target))
    torch.save({'state_dict': Tiny().state_dict()}, tmp_path / 'ck.pth')
    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes),
                   _argv(tmp_path, '--data', 'demo', '--eval', str(tmp_path / 'ck.pth'), '--out', target), name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and f"--out {target}: inside the dataset" in err, err
    assert sorted(os.listdir(target)) == before


def test_each_eval_gets_its_own_pictures_folder_and_an_out_holding_them_is_refused_before_the_work(tmp_path, capsys):
    torch.save({'state_dict': Tiny().state_dict()}, tmp_path / 'ck.pth')
    argv = _argv(tmp_path / 'w', '--data', 'demo', '--eval', str(tmp_path / 'ck.pth'), '--num_val_images', '2')
    build = lambda cfg, num_classes: Tiny(num_classes)  # noqa: E731
    train.main(_seg(), build, argv, name='tiny')
    train.main(_seg(), build, argv, name='tiny')  # again: a second folder, the first one's pictures untouched
    folders = sorted((tmp_path / 'w' / 'pred').iterdir())
    assert len(folders) == 2 and all(len([f for f in os.listdir(d) if f.endswith('_compare.png')]) == 2
                                     for d in folders)
    before = {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # --out naming a folder that holds them: one line, before the evaluation
        train.main(_seg(), build, argv + ['--out', str(folders[0])], name='tiny')
    out, err = capsys.readouterr()
    assert e.value.code == 2 and err.count('\n') == 1 and 'is there already' in err and 'eval:' not in out, err
    assert {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()} == before


def test_eval_only_flags_in_a_training_run_and_eval_amp_without_a_half_type_say_so(tmp_path, capsys):
    build = lambda cfg, num_classes: Tiny(num_classes)  # noqa: E731
    argv = _argv(tmp_path, '--data', 'demo', '--max_iters', '1', '--num_val_images', '1')
    train.main(_seg(), build, argv + ['--eval_amp', '--tta'], name='tiny')
    out = capsys.readouterr().out
    assert "eval_amp: --eval_amp applies to --eval and --predict" in out
    assert "tta: --tta applies to --eval and --predict (the reference's test.py)" in out
    train.main(_seg(), build, argv + ['--eval', 'auto', '--eval_amp', '--save_predictions', '0'], name='tiny')
    out = capsys.readouterr().out  # --amp none: no half type to evaluate in
    assert "eval_amp: --amp none has no half type, so this runs in fp32 (--amp torch or apex picks one)" in out


def test_a_full_disk_at_the_runs_first_file_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, 'No space left on device')

    for where, what in ((runs.json, r"the lock .*\.lock"), (train, r".*config\.json")):  # lock first, then config
        with monkeypatch.context() as m:
            m.setattr(where, 'dump' if where is runs.json else '_jsonable', full)
            with pytest.raises(SystemExit) as e:
                train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes), _argv(tmp_path, '--data', 'demo'),
                           name='tiny')
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
        assert re.match(rf"tiny: error: --work_dir: could not write {what} \(No space left on device\)", err), err
    assert not [f for run in runs.runs(str(tmp_path)) for f in os.listdir(run) if f == '.lock']  # no lock left


def test_make_folder_names_the_flag_for_any_os_error(tmp_path, monkeypatch):
    def refuse(path, exist_ok=False):
        raise PermissionError(13, 'Permission denied', path)

    monkeypatch.setattr(os, 'makedirs', refuse)
    with pytest.raises(UserError, match=r"^--work_dir /x: cannot create this folder \(Permission denied\)"):
        errors.make_folder('/x', '--work_dir')


def test_one_line_keeps_all_of_a_message_holding_a_newline():
    # a path the user named may hold a newline; the error stays one line and keeps what comes after it
    assert errors.one_line(UserError("--work_dir a\nb: cannot create this folder")) == \
        "--work_dir a\\nb: cannot create this folder"
    assert errors.one_line(UserError("")) == "UserError"


def test_ctrl_c_is_one_line_with_exit_130_and_logged(tmp_path, capsys):
    class Interrupted(Tiny):
        def forward(self, x):
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Interrupted(num_classes), _argv(tmp_path, '--data', 'demo'),
                   name='tiny')
    (run,) = runs.runs(str(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 130 and err == "tiny: interrupted; this run had written no checkpoint\n"
    assert err.strip() in (Path(run) / 'log.txt').read_text() and not os.path.exists(Path(run) / '.lock')


def test_a_crash_keeps_its_traceback_and_logs_it(tmp_path):
    class Buggy(Tiny):
        def forward(self, x):
            raise ZeroDivisionError("a bug, not the user's")

    with pytest.raises(ZeroDivisionError):  # in the first step, when the run folder (and its log.txt) exists
        train.main(_seg(), lambda cfg, num_classes: Buggy(num_classes), _argv(tmp_path, '--data', 'demo'), name='tiny')
    (run,) = runs.runs(str(tmp_path))
    text = (Path(run) / 'log.txt').read_text()
    assert 'Traceback (most recent call last)' in text and "ZeroDivisionError: a bug, not the user's" in text


def test_demo_with_data_root_generates_there(tmp_path, monkeypatch):
    real = data.make_demo_ade20k
    monkeypatch.setattr(data, 'make_demo_ade20k', lambda root, n, m, seed=0: real(root, 2, 1, seed))  # small, fast
    lines = []
    root = data.dataset_root('demo', str(tmp_path / 'cache'), lines.append)
    assert root.startswith(str(tmp_path / 'cache')) and len(data.ADE20k(root, 'val')) == 1
    assert lines == [f"generating the demo dataset (first use) in {root}: 64 train + 16 val images"]
    assert data.dataset_root('demo', str(tmp_path / 'cache'), lines.append) == root and len(lines) == 1  # cached
    assert data.dataset_root('demo', root) == root  # the generated root itself (what a demo run logs as data:)
    with pytest.raises(MissingFile, match="ADE20k not found under 'ADE20k'"):
        data.dataset_root('ade20k', '')
    with pytest.raises(MissingFile) as e:  # still a FileNotFoundError for callers, and a UserError for main()
        data.ADE20k(str(tmp_path / 'nowhere'), 'val')
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, UserError)


# ----------------------------------------------------------------------------------------------------------------
# the log's shape


def test_config_in_a_few_short_lines():
    cfg = config.parse(_seg(), ['--data', 'demo'])
    lines = config.format_config(cfg)
    assert len(lines) <= 2 * len({g for g, _ in config.flag_docs().values()}) and max(map(len, lines)) <= 100
    text = ' '.join(lines)
    assert all(f' {k}=' in text for k in cfg) and 'crop_size=64,64' in text


def test_final_summary(tmp_path):
    recs = [dict(kind='train', iteration=1), dict(kind='eval', iteration=2, mIoU=0.5, aAcc=0.8),
            dict(kind='eval', iteration=4, mIoU=0.25, aAcc=0.7)]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (tmp_path / 'pred').mkdir()
    text = report.final_summary(str(tmp_path), 3725, str(tmp_path / 'pred'))
    assert text.splitlines()[0] == ('done in 1h02m | best mIoU 50.00 (iteration 2) | last mIoU 25.00 '
                                    '(iteration 4, aAcc 70.00)')
    assert 'checkpoint: none written' in text and f"pictures: {tmp_path / 'pred'}{os.sep}" in text


def test_final_summary_survives_a_damaged_latest_pointer(tmp_path):
    # the run has finished when the summary is written: a pointer edited by hand is named, not a traceback or exit 2
    (tmp_path / 'latest').write_text('checkpoint-gone.pth')
    text = report.final_summary(str(tmp_path), 5)
    assert "checkpoint: unknown (" in text and "names 'checkpoint-gone.pth', which does not exist" in text


def test_final_summary_names_no_pictures_folder_that_was_not_made(tmp_path):
    text = report.final_summary(str(tmp_path), 5, str(tmp_path / 'pred'))  # --save_predictions 0: no folder
    assert 'pictures' not in text
    assert text.splitlines()[0] == 'done in 0m05s | no evaluation ran (--eval_interval_epochs 0)'


def test_hms_switches_to_hours_at_one_hour():
    assert [report.hms(s) for s in (59, 3599, 3600, 3661)] == ['0m59s', '59m59s', '1h00m', '1h01m']


def test_fused_kernels_without_the_extension_is_a_user_error(tmp_path, capsys, monkeypatch):
    from common import layers, ops

    def missing(*names):
        raise RuntimeError("--kernels fused needs the compiled extension common._C, which lacks ['build_info']")

    monkeypatch.setattr(ops, 'require', missing)
    argv = [a if a != 'torch' else 'fused' for a in _argv(tmp_path, '--data', 'demo')]  # --kernels fused
    monkeypatch.setattr(layers, 'KERNELS', layers.KERNELS)  # restored after the test
    with pytest.raises(SystemExit) as e:
        train.main(_seg(), lambda cfg, num_classes: Tiny(num_classes), argv, name='tiny')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "tiny: error: --kernels fused needs the compiled extension common._C, " \
                                        "which lacks ['build_info']\n"


def test_a_checkout_without_its_build_says_so_and_names_the_command(tmp_path):
    # the real thing, not a mock: common/ copied without its .so and the editable install's finder removed, so
    # common._C cannot be found, as in a checkout where `pip install -e .` never ran
    shutil.copytree(os.path.join(ROOT, 'common'), tmp_path / 'common',
                    ignore=shutil.ignore_patterns('*.so', '__pycache__'))
    shutil.copy(os.path.join(ROOT, 'pspnet.py'), tmp_path)
    (tmp_path / 'run.py').write_text(
        "import runpy, sys\n"
        "sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import torch, common\n"
        "from common import train\n"
        "print(common.__file__)\n"
        "print(common.build_info())\n"
        "print(train._kernels('auto', torch.device('cpu'), print))\n"
        "sys.argv = ['pspnet.py', '--kernels', 'fused', '--device', 'cpu', '--data', 'demo', '--work_dir', 'w']\n"
        "runpy.run_path('pspnet.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    r = subprocess.run([sys.executable, 'run.py'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout.splitlines()
    assert out[0] == str(tmp_path / 'common' / '__init__.py'), r.stdout + r.stderr  # the copy, not this checkout
    build = '`pip install --no-build-isolation -e .`'
    assert out[1] == f'common._C: unavailable (common._C is not built); build it with {build}'
    assert out[2] == f'torch (auto: common._C not built; {build} for fused)'  # the log's kernels: line
    assert r.returncode == 2 and r.stderr == (
        'pspnet: error: --kernels fused needs the compiled extension common._C, which does not load (common._C is '
        f'not built). Build it with {build}, or run with --kernels torch.\n')
    assert not (tmp_path / 'w').exists()  # stopped before the run folder


def test_build_info_names_another_checkouts_build(monkeypatch):
    import common
    if not common.extension_loaded():
        pytest.skip("common._C is not built")
    assert "another checkout" not in common.build_info()  # this checkout's own build: nothing to say
    monkeypatch.setattr(common._C, "__file__", "/elsewhere/common/_C.so")  # loaded through another's editable install
    assert common.build_info().endswith("; loaded from /elsewhere/common/_C.so, another checkout's build: run "
                                        "`pip install --no-build-isolation -e .` here to use this one's csrc/)")


def test_a_script_config_that_leaves_entries_out_or_writes_tuples_runs():
    """An entry a SEGMENTOR_CFG leaves out runs the code's value (as in ssseg), a tuple reads as its list, and a
    backbone dict without 'pretrained' keeps the ImageNet weights (only False means --pretrained none)."""
    import pspnet
    seg = copy.deepcopy(pspnet.SEGMENTOR_CFG)
    for key in ('align_corners', 'norm_cfg', 'act_cfg'):
        seg.pop(key)
    seg['inference'].pop('forward')
    seg['losses']['loss_aux'].pop('ignore_index')
    seg['backbone'].pop('use_conv3x3_stem')
    seg['backbone'].pop('pretrained')
    cfg = config.parse(seg, [], 'my_pspnet')
    assert cfg['pretrained'] == config.DEFAULTS['pretrained'] != 'none'
    seg = copy.deepcopy(pspnet.SEGMENTOR_CFG)
    seg['inference']['tta']['multiscale'] = (1,)  # the reference's [1], as a tuple
    assert config.parse(seg, [], 'my_pspnet')['tta'] == config.DEFAULTS['tta']


def test_predict_writes_to_out_whatever_save_predictions_says(tmp_path):
    # --save_predictions counts --eval's pictures; --predict draws every image it is given
    ck = _ckpt(tmp_path)
    cfg = config.parse(_seg(), ['--predict', '.', '--ckpt', ck, '--out', 'o', '--save_predictions', '0'], 'pspnet')
    assert (cfg['out'], cfg['save_predictions']) == ('o', 0)
    assert config.parse(_seg(), ['--eval', ck, '--out', 'o', '--save_predictions', '1'], 'pspnet')['out'] == 'o'


def test_final_summary_reads_only_the_evaluation_records(tmp_path):
    # metrics.jsonl also holds train and --amp_report records (no mIoU)
    recs = [dict(kind='train', iteration=1), dict(kind='amp_report', iteration=2, skipped=1),
            dict(kind='eval', iteration=2, mIoU=0.5, aAcc=0.8, checkpoint='checkpoint-epoch-1.pth')]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    assert report.evaluations(str(tmp_path)) == recs[2:]
    assert 'best mIoU 50.00 (iteration 2) | last mIoU 50.00' in report.final_summary(str(tmp_path), 5)
