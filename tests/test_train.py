"""The trainer's pieces: poly lr, the CLI, empty batches, the overflow stop, the log files."""
import importlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common import checkpoint, config, data, infer, report, runs, train
from common.amp import Amp
from common.errors import BadFileError

# ----------------------------------------------------------------------------------------------------------------
# schedule


def test_poly_lr_values():
    # spec §7: lr = (1 - it/max)^0.9 x (0.01 - 1e-4) + 1e-4, it = finished iterations, from 0
    assert train.poly_lr(0, 164190) == 0.01  # the first step uses the base lr
    assert train.poly_lr(164190, 164190) == pytest.approx(1e-4, abs=1e-15)  # the floor, not 0
    assert train.poly_lr(82095, 164190) == pytest.approx(0.5 ** 0.9 * 0.0099 + 1e-4, rel=1e-12)
    assert train.poly_lr(1, 4) == pytest.approx(0.75 ** 0.9 * (0.01 - 1e-4) + 1e-4, rel=1e-12)
    lrs = [train.poly_lr(i, 100, base_lr=0.02, power=1.0, min_lr=0.0) for i in range(101)]
    assert lrs[0] == 0.02 and lrs[-1] == 0.0 and lrs[50] == pytest.approx(0.01)  # power 1: linear
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


# ----------------------------------------------------------------------------------------------------------------
# config / CLI


def _seg_cfg():
    return config.segmentor_cfg(num_classes=150, scheduler={
        'type': 'PolyScheduler', 'max_epochs': 130, 'power': 0.9,
        'optimizer': {'type': 'SGD', 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4, 'params_rules': {}}})


def test_parse_recipe_and_flags():
    cfg = config.parse(_seg_cfg(), [], 'pspnet')
    assert (cfg['lr'], cfg['momentum'], cfg['weight_decay'], cfg['power'], cfg['min_lr']) == (0.01, 0.9, 5e-4, 0.9,
                                                                                           pytest.approx(1e-4))
    assert (cfg['max_epochs'], cfg['batch_size'], cfg['crop_size'], cfg['aux_weight']) == (130, 16, (512, 512), 0.4)
    assert (cfg['amp'], cfg['opt_level'], cfg['tf32']) == ('apex', 'O1', False)  # the reference's fp16_cfg
    cfg = config.parse(_seg_cfg(), ['--amp', 'torch', '--batch_size=8', '--crop_size', '(64, 96)', '--tf32',
                                    '--channels_last', 'false', '--lr', '2e-2'], 'x')
    assert (cfg['amp'], cfg['batch_size'], cfg['crop_size'], cfg['tf32'], cfg['channels_last']) == \
        ('torch', 8, (64, 96), True, False)
    assert cfg['min_lr'] == pytest.approx(2e-4)  # PolyScheduler's floor follows the base lr
    for bad in (['--no_such_key', '1'], ['--amp', 'fp16'], ['--batch_size', 'x'], ['--crop_size', '64,64,3'],
                ['--batc', '8']):  # unknown key, bad choice, bad int, not a pair, no abbreviations (tests/test_cli.py)
        with pytest.raises(SystemExit):
            config.parse(_seg_cfg(), bad, 'x')


def test_parse_fp16_cfg_and_demo_preset():
    seg = _seg_cfg()
    seg['fp16_cfg'] = {'type': 'pytorch', 'autocast': {'dtype': torch.bfloat16}, 'grad_scaler': {}}
    assert [config.parse(seg, [])[k] for k in ('amp', 'amp_dtype')] == ['torch', 'bfloat16']
    # the pytorch form names no opt level: switched to --amp apex, it must train the reference's O1
    assert config.parse(seg, ['--amp', 'apex'])['opt_level'] == 'O1'
    seg['fp16_cfg'] = {'is_on': True, 'opts': {'opt_level': 'O2'}}  # the 2021 form
    assert [config.parse(seg, [])[k] for k in ('amp', 'opt_level')] == ['apex', 'O2']
    demo = config.parse(_seg_cfg(), ['--data', 'demo', '--batch_size', '2'], 'pspnet')
    for k, v in config.DEMO_PRESET.items():
        assert demo[k] == (2 if k == 'batch_size' else v), k  # the preset, except what the flags say
    assert demo['work_dir'] == os.path.join('work_dirs', 'ckpts_demo')  # segmentor_cfg's work_dir + _demo


@pytest.mark.parametrize('script', ['fcn', 'pspnet', 'deeplabv3', 'deeplabv3plus'])
def test_a_scripts_own_config_gives_the_reference_recipe(script):
    # _seg_cfg() writes its scheduler out, so the tests above cannot see a number changed in common/config.py's
    # shared base; the scripts' own SEGMENTOR_CFG can (the reference recipe's numbers)
    cfg = config.parse(importlib.import_module(script).SEGMENTOR_CFG, [], script)
    want = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, power=0.9, max_epochs=130, aux_weight=0.4, num_classes=150,
                batch_size=16, crop_size=(512, 512), scale=(2048, 512), eval_interval_epochs=10, save_interval_epochs=1,
                log_interval=50, amp='apex', opt_level='O1')
    assert {k: cfg[k] for k in want} == want and cfg['min_lr'] == pytest.approx(1e-4)
    # DEFAULTS are what parse(None) runs on and what --help shows where a config is silent: the same numbers
    assert {k: config.DEFAULTS[k] for k in want} == want and config.DEFAULTS['min_lr'] == pytest.approx(1e-4)


def test_an_edited_config_is_what_parse_and_help_use(capsys):
    # each number recipe() takes, changed where an ssseg config keeps it: parse() and --help must follow the edit
    seg = config.segmentor_cfg(num_classes=100, eval_interval_epochs=3, save_interval_epochs=2)
    seg['scheduler'].update(max_epochs=7, power=0.8, min_lr=3e-5)
    seg['scheduler']['optimizer'].update(lr=0.03, momentum=0.8, weight_decay=1e-4)
    seg['losses']['loss_aux']['scale_factor'] = 0.3  # loss_cls keeps its 1.0
    seg['logger']['log_interval_iters'] = 7
    seg['dataloader']['expected_total_train_bs_for_assert'] = 8
    pipelines = dict(seg['dataset']['train']['data_pipelines'])  # the same dicts as in the list
    pipelines['RandomCrop']['crop_size'] = pipelines['Padding']['output_size'] = (256, 320)
    test_resize = dict(seg['dataset']['test']['data_pipelines'])['Resize']
    pipelines['Resize']['output_size'] = test_resize['output_size'] = (1024, 384)  # one --scale for both
    want = dict(num_classes=100, eval_interval_epochs=3, save_interval_epochs=2, max_epochs=7, power=0.8, min_lr=3e-5,
                lr=0.03, momentum=0.8, weight_decay=1e-4, aux_weight=0.3, log_interval=7, batch_size=8,
                crop_size=(256, 320), scale=(1024, 384))
    cfg = config.parse(seg, [], 'x')
    assert {k: cfg[k] for k in want} == want
    with pytest.raises(SystemExit):
        config.parse(seg, ['--help'], 'x')
    assert 'SGD base lr (spec §1) (default 0.03;' in ' '.join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------------------------------------------
# the loop on a tiny model and toy data


class ToyTransform:
    def reseed(self, seed):
        self.g = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))


class ToyData(Dataset):
    """8 random 16x16 images; labels = a fixed function of the image, or all ignore (255) with empty=True."""

    def __init__(self, empty=False):
        self.transform, self.empty = ToyTransform(), empty

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.randn(3, 16, 16, generator=self.transform.g)
        y = torch.full((16, 16), 255) if self.empty else (x[0] > 0).long()
        return x, y


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone_net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.decoder, self.auxiliary_decoder = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)
        self.gain = 1.0  # set to inf to make every later step overflow

    def forward(self, x):
        f = self.backbone_net(x)
        return {'out': self.decoder(f) * self.gain, 'aux': self.auxiliary_decoder(f)}


def _fit(tmp_path, empty=False, model=None, hook=None, val_loader=None, **over):
    cfg = dict(config.DEFAULTS, num_classes=2, max_iters=6, batch_size=2, num_workers=0, log_interval=1,
               eval_interval_epochs=0, save_interval_epochs=1, work_dir=str(tmp_path), kernels='torch')
    cfg.update(over)
    model = model or TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=cfg['lr'], momentum=cfg['momentum'],
                          weight_decay=cfg['weight_decay'])
    if hook is not None:
        hook(opt)
    amp = Amp('none', device='cpu')
    model, opt = amp.initialize(model, opt)
    loader = data.train_loader(ToyData(empty), 2, 0, seed=0, num_items=4)  # 2 iterations per epoch
    log = train.Logger(str(tmp_path))
    return train.fit(cfg, model, opt, amp, loader, val_loader, 0, 'cpu', log), model


def _records(tmp_path):
    with open(tmp_path / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


def test_seg_loss_is_cls_plus_aux_weight_times_the_aux_ce():
    """spec §6, loss = CE(out) + 0.4 CE(aux), each CE on logits upsampled to the crop, the aux term logged
    already weighted; against F.interpolate + F.cross_entropy (no tiny-net run can tell a dropped 0.4)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    out = {'out': torch.randn(2, 3, 4, 4, generator=g), 'aux': torch.randn(2, 3, 4, 4, generator=g) * 3}
    targets = torch.randint(0, 3, (2, 16, 16), generator=g)
    targets[0, :4] = data.IGNORE_INDEX

    def ce(logits):
        up = F.interpolate(logits.double(), size=(16, 16), mode='bilinear', align_corners=False)
        return F.cross_entropy(up, targets, ignore_index=data.IGNORE_INDEX).item()
    total, cls, aux = train.seg_loss(out, targets, 0.4)  # the torch composition (KERNELS' default)
    assert cls.item() == pytest.approx(ce(out['out']), rel=1e-5)
    assert aux.item() == pytest.approx(0.4 * ce(out['aux']), rel=1e-5)
    assert total.item() == pytest.approx(ce(out['out']) + 0.4 * ce(out['aux']), rel=1e-5)


def test_all_ignore_batches_give_zero_loss(tmp_path):
    _, model = _fit(tmp_path, empty=True)
    recs = [r for r in _records(tmp_path) if r['kind'] == 'train']
    assert [r['iteration'] for r in recs] == list(range(1, 7))
    assert [r['empty_batches'] for r in recs] == list(range(1, 7))  # counted in the log
    assert all(r['loss'] == 0.0 and r['skipped'] == 0 for r in recs)  # 0, not the reference's NaN; not skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_each_optimizer_step_uses_the_poly_lr_of_the_finished_iterations(tmp_path):
    """What the optimizer steps with, read at the step, not what the log says: iteration i (from 0) uses poly_lr(i)."""
    model = TinyNet()
    seen = []
    _fit(tmp_path, model=model, lr=0.02, min_lr=0.001, power=0.9,
         hook=lambda opt: opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]['lr'])))
    assert seen == [train.poly_lr(i, 6, 0.02, 0.9, 0.001) for i in range(6)] and seen[0] == 0.02


def test_the_optimizer_steps_with_the_configured_poly_power(tmp_path):
    """--power reaches the schedule (the test above uses the default 0.9, so a hard-coded power passes it)."""
    model, seen = TinyNet(), []
    _fit(tmp_path, model=model, lr=0.02, min_lr=0.0, power=2.0,
         hook=lambda opt: opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]['lr'])))
    assert seen == pytest.approx([0.02 * (1 - i / 6) ** 2 for i in range(6)], rel=1e-12)


@pytest.mark.parametrize('max_iters', [6, 5])
def test_progress_lines_number_epochs_from_one_like_the_records(tmp_path, max_iters):
    """The log line's `ep E/N` is the 1-based epoch of its iteration, as in metrics.jsonl, out of the epochs
    the schedule touches (2 iterations per epoch: iterations 1-2 are epoch 1, ...; 5 iterations end in a 3rd)."""
    _fit(tmp_path, max_iters=max_iters)
    with open(tmp_path / 'log.txt') as f:
        text = f.read()
    eps = [tuple(map(int, m.groups())) for m in re.finditer(rf' it (\d+)/{max_iters} ep (\d+)/3 ', text)]
    assert eps == [(i, (i + 1) // 2) for i in range(1, max_iters + 1)]
    recs = [r for r in _records(tmp_path) if r['kind'] == 'train']
    assert [(r['iteration'], r['epoch']) for r in recs] == eps
    how = '3 epochs x 2' if max_iters == 6 else '--max_iters, within 3 epochs of 2'
    assert f'schedule: {max_iters} iterations = {how} iterations/epoch' in text


def test_a_mid_epoch_checkpoint_names_the_epoch_its_next_iteration_belongs_to(tmp_path):
    """common/checkpoint.py's format: `epoch` is the epoch the next iteration belongs to (iteration // ipe),
    so a planned stop at iteration 3 of 2-iteration epochs saves epoch 1, the end of epoch 1 epoch 1."""
    _fit(tmp_path, stop_iters=3)
    folder = str(tmp_path)
    ck = {f: checkpoint.load(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith('.pth')}
    assert {f: (c['iteration'], c['epoch']) for f, c in ck.items()} == {'checkpoint-epoch-1.pth': (2, 1),
                                                                        'checkpoint-iter-3.pth': (3, 1)}


def test_overflow_stops_with_last_checkpoint_intact(tmp_path):
    model = TinyNet()

    class Inject:  # from iteration 3 on, every forward makes inf logits (-> NaN grads)
        n = 0

        def __call__(self, mod, args):
            Inject.n += 1
            if Inject.n == 3:
                model.gain = float('inf')

    model.register_forward_pre_hook(Inject())
    with pytest.raises(train.TooManySkippedSteps, match=r"last 2 steps were all skipped.*checkpoint-epoch-1\.pth"):
        _fit(tmp_path, model=model, max_skipped_steps=2)
    recs = [r for r in _records(tmp_path) if r['kind'] == 'train']
    assert [r['skipped'] for r in recs] == [0, 0, 1, 2]
    # the checkpoint of epoch 1 (iteration 2) is the latest and loads; the skipped steps left the weights alone
    path = checkpoint.resolve('auto', str(tmp_path))
    assert os.path.basename(path) == 'checkpoint-epoch-1.pth'
    ck = checkpoint.load(path)
    assert ck['iteration'] == 2
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, ck['model'][name]), name
    assert not [f for f in os.listdir(tmp_path) if '.tmp-' in f]  # no half-written temp files left behind


def test_a_step_skipped_for_its_gradients_puts_the_bn_statistics_back(tmp_path):
    """a step skipped for non-finite GRADIENTS (the BN buffers stayed finite, so guard.finite() saw nothing)
    must still put back the running stats its forward moved: after the stop the model equals its last checkpoint,
    buffers included (common/guard.py: a skipped step leaves every tensor of the model as it was)."""
    model = TinyNet()
    calls = []

    def inject(mod, args):  # from the 3rd forward on: inf logits after the BN (-> NaN grads, finite BN buffers)
        calls.append(1)
        if len(calls) == 3:
            model.gain = float('inf')
    model.register_forward_pre_hook(inject)
    with pytest.raises(train.TooManySkippedSteps):
        _fit(tmp_path, model=model, max_skipped_steps=2)
    ck = checkpoint.load(checkpoint.resolve('auto', str(tmp_path)))
    assert ck['iteration'] == 2
    bn = model.backbone_net[1]
    assert int(bn.num_batches_tracked) == 2 and torch.isfinite(bn.running_var).all()
    for name, v in model.state_dict().items():
        assert torch.equal(v, ck['model'][name]), name


def test_checkpoint_save_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Atomic and durable: a power cut after save() returns must find the new file whole, not an empty one."""
    import stat
    events, fsync, replace = [], os.fsync, os.replace

    def rec_fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return fsync(fd)

    def rec_replace(a, b):
        events.append("replace " + os.path.basename(b))
        return replace(a, b)
    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "replace", rec_replace)
    checkpoint.save(str(tmp_path / 'a.pth'), {'model': TinyNet().state_dict(), 'iteration': 1})
    assert events[:3] == ["fsync file", "replace a.pth", "fsync dir"], events


def test_rng_state_round_trips_every_generator():
    import random
    import numpy as np
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_checkpoint_atomic_save_and_reference_formats(tmp_path):
    net = TinyNet()
    sd = net.state_dict()
    checkpoint.save(str(tmp_path / 'a.pth'), {'model': sd, 'iteration': 1})
    checkpoint.save(str(tmp_path / 'b.pth'), {'model': sd, 'iteration': 2})
    assert checkpoint.resolve('auto', str(tmp_path)).endswith('b.pth')
    assert checkpoint.resolve(str(tmp_path), 'unused').endswith('b.pth')
    # ssseg's {'model': sd, 'cur_epoch': ...}, mmseg's {'state_dict': sd}, a bare sd, a DDP 'module.' sd
    for i, obj in enumerate(({'model': sd, 'cur_epoch': 130}, {'state_dict': sd}, sd,
                             {'module.' + k: v for k, v in sd.items()})):
        torch.save(obj, tmp_path / f'ref{i}.pth')
        other = TinyNet()
        checkpoint.load_weights(other, str(tmp_path / f'ref{i}.pth'), log=lambda m: None)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())
    torch.save({'model': {'decoder.weight': sd['decoder.weight']}}, tmp_path / 'partial.pth')
    with pytest.raises(BadFileError, match=r'partial\.pth: does not match this model.*missing 10'):
        checkpoint.load_weights(TinyNet(), str(tmp_path / 'partial.pth'), log=lambda m: None)
    with pytest.raises(FileNotFoundError):
        checkpoint.resolve('auto', str(tmp_path / 'nothing_here'))


def test_latest_pointers_are_relative_so_a_relative_or_moved_work_dir_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint.save(os.path.join('w', 'run', 'checkpoint-epoch-1.pth'), {'model': {'w': torch.ones(1)}}, root='w')
    assert Path('w/run/latest').read_text() == 'checkpoint-epoch-1.pth\n'
    assert Path('w/latest').read_text() == os.path.join('run', 'checkpoint-epoch-1.pth') + '\n'
    os.rename('w', 'moved')
    assert checkpoint.resolve('auto', 'moved') == os.path.join('moved', 'run', 'checkpoint-epoch-1.pth')


def test_pruning_keeps_the_newest_checkpoints_not_the_last_names(tmp_path):
    # epoch-10 sorts before epoch-9 by name; final before iter-*: the age decides
    names = ['checkpoint-epoch-9.pth', 'checkpoint-epoch-10.pth', 'checkpoint-iter-11.pth', 'checkpoint-final.pth']
    for age, name in enumerate(names):
        (tmp_path / name).write_bytes(b'')
        os.utime(tmp_path / name, (1_000_000 + age, 1_000_000 + age))
    assert checkpoint.older_than_newest(str(tmp_path), 2) == [str(tmp_path / n) for n in names[:2]]


def test_a_legacy_pickle_checkpoint_loads(tmp_path):
    # torch.save before the zip format (torch < 1.6, as older published checkpoints are)
    sd = TinyNet().state_dict()
    torch.save({'state_dict': sd}, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    other = TinyNet()
    checkpoint.load_weights(other, str(tmp_path / 'old.pth'), log=lambda m: None)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == a


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)])
def test_checkpoints_hold_cpu_tensors_and_the_state_dicts_metadata(tmp_path, device):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 3, 3, device=device)).sum().backward()
    opt.step()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'iteration': 1, 'pair': (torch.ones(1), 2)}
    path = checkpoint.save(str(tmp_path / 'c.pth'), state)
    ck = torch.load(path, weights_only=True)  # no map_location: what a user on another machine does
    tensors = [ck['model'][k] for k in ck['model']] + [s['momentum_buffer'] for s in ck['optimizer']['state'].values()]
    assert tensors and all(t.device.type == 'cpu' for t in tensors)
    assert ck['model']._metadata == state['model']._metadata and ck['pair'][1] == 2
    for k, v in state['model'].items():
        assert torch.equal(ck['model'][k], v.cpu()), k
    if device == 'cpu':  # nothing copied on the CPU
        assert checkpoint._on_cpu(state)['model']['0.weight'] is state['model']['0.weight']


@pytest.mark.cuda
def test_logged_cuda_memory_is_the_peak_of_its_window():
    device = torch.device('cuda')
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 0.25 GB, freed before the first window ends
    del big
    first = train.peak_memory_gb(device)
    assert first >= 0.25 and train.peak_memory_gb(device) < first - 0.2  # the second window never held it


def test_cuda_rng_states_of_more_gpus_than_visible_restore_those_that_exist(monkeypatch):
    # a checkpoint of an 8-GPU node resumed on a 1-GPU machine: torch's set_rng_state_all would index past the GPUs
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, i: calls.append((int(s[0]), i)))
    state = checkpoint.rng_state()
    state['cuda'] = [torch.tensor([g], dtype=torch.uint8) for g in (10, 11, 12, 13)]
    checkpoint.set_rng_state(state)
    assert calls == [(10, 0), (11, 1)]


def build_tiny(cfg=None, num_classes=150):
    """A segmentor builder (the scripts' signature) of TinyNet with num_classes outputs, for train.main."""
    net = TinyNet()
    net.decoder, net.auxiliary_decoder = nn.Conv2d(4, num_classes, 1), nn.Conv2d(4, num_classes, 1)
    return net


def test_main_writes_config_jsonl_and_eval(tmp_path, monkeypatch):
    pinned = []  # a CPU run on a machine with a GPU pins nothing (the pin thread would open a context on GPU 0)
    for name in ('train_loader', 'test_loader'):
        real = getattr(data, name)
        monkeypatch.setattr(data, name, lambda *a, real=real, **k: pinned.append(k.get('pin_memory')) or real(*a, **k))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)

    argv = ['--data', 'demo', '--amp', 'torch', '--amp_dtype', 'bfloat16', '--device', 'cpu', '--kernels', 'torch',
            '--crop_size', '(32, 32)', '--scale', '(128, 32)', '--batch_size', '2', '--num_workers', '0',
            '--num_train_images', '4', '--num_val_images', '2', '--max_iters', '3', '--log_interval', '2',
            '--save_predictions', '1', '--work_dir', str(tmp_path)]
    metrics = train.main(_seg_cfg(), build_tiny, argv, name='tiny')
    assert pinned == [False, False]
    # everything lands in the run's own timestamped folder; the work dir holds only it and the latest pointer
    (run,) = runs.runs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(run), 'latest'])
    assert re.fullmatch(r'\d{8}_\d{6}', os.path.basename(run))
    root, tmp_path = tmp_path, Path(run)
    with open(tmp_path / 'config.json') as f:
        saved = json.load(f)
    assert saved['amp'] == 'torch' and saved['crop_size'] == [32, 32] and saved['max_iters'] == 3
    recs = _records(tmp_path)
    train_recs = [r for r in recs if r['kind'] == 'train']
    assert [r['iteration'] for r in train_recs] == [2, 3]  # every log_interval and at the end
    assert {'loss', 'loss_cls', 'loss_aux', 'lr', 'loss_scale', 'skipped', 'empty_batches', 'img_s',
            'mem_gb'} <= set(train_recs[0])
    assert train_recs[0]['loss'] == pytest.approx(train_recs[0]['loss_cls'] + train_recs[0]['loss_aux'])  # aux x 0.4
    evals = [r for r in recs if r['kind'] == 'eval']
    assert len(evals) == 1 and evals[0]['mIoU'] == pytest.approx(metrics['mIoU'])
    assert evals[0]['precision'] == 'bf16 folded weights' and len(evals[0]['Acc']) == 150 and 'mAcc' in evals[0]
    # the pictures of val image 0: mask, overlay with legend, image | ground truth | prediction
    assert len([f for f in os.listdir(tmp_path / 'pred') if f.endswith('_compare.png')]) == 1
    assert 'mIoU' in (tmp_path / 'log.txt').read_text()
    try:
        import matplotlib  # noqa: F401 (a dependency; without it the log says so instead of drawing)
        assert os.path.getsize(tmp_path / 'curves.png') > 10000
    except ImportError:
        assert 'curves: not written, matplotlib is not installed' in (tmp_path / 'log.txt').read_text()
    assert checkpoint.resolve('auto', str(root)) == checkpoint.resolve('auto', str(tmp_path))
    ck = checkpoint.load(checkpoint.resolve('auto', str(root)))
    log = (tmp_path / 'log.txt').read_text().splitlines()
    assert all(re.match(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ', line) for line in log)  # every line time-stamped
    config_lines = log[log.index(next(line for line in log if line.endswith(' config:'))) + 1:]
    config_lines = config_lines[:next(i for i, line in enumerate(config_lines) if ' kernels: ' in line)]
    assert 5 <= len(config_lines) <= 20 and max(map(len, config_lines)) <= 120  # a few lines, not one JSON line
    summary = '\n'.join(log[-5:])
    assert re.search(r' done in \dm\d\ds \| best mIoU [\d.]+ \(iteration 3\) \| last mIoU', summary)
    assert f"checkpoint: {tmp_path / 'checkpoint-final.pth'}" in summary and f"pictures: {tmp_path / 'pred'}" in summary
    assert f"best: {tmp_path / 'checkpoint-best.pth'} (iteration 3, mIoU" in summary  # the final one: one evaluation
    assert evals[0]['checkpoint'] == 'checkpoint-final.pth'
    assert ck['config']['max_iters'] == 3 and ck['iteration'] == 3


def test_main_with_tensorboard_writes_the_runs_scalars_and_pictures(tmp_path):
    # the whole --tensorboard path of a run (set-up, records, evaluation pictures, close); the package is in
    # requirements-test.txt, not requirements.txt
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ['--data', 'demo', '--amp', 'none', '--device', 'cpu', '--kernels', 'torch', '--crop_size', '(32, 32)',
            '--scale', '(128, 32)', '--batch_size', '2', '--num_workers', '0', '--num_train_images', '4',
            '--num_val_images', '2', '--max_iters', '2', '--log_interval', '1', '--save_predictions', '2',
            '--tensorboard', '--work_dir', str(tmp_path)]
    metrics = train.main(_seg_cfg(), build_tiny, argv, name='tiny')
    (run,) = runs.runs(str(tmp_path))
    assert f"tensorboard: {os.path.join(run, 'tensorboard')}" in Path(run, 'log.txt').read_text()
    acc = EventAccumulator(os.path.join(run, 'tensorboard')).Reload()
    assert [(e.step, e.value) for e in acc.Scalars('eval/mIoU')] == [(2, pytest.approx(metrics['mIoU']))]
    assert [e.step for e in acc.Scalars('train/loss')] == [1, 2]
    assert sorted(acc.Tags()['images']) == ['val/0', 'val/1'] and acc.Images('val/0')[0].step == 2


# ----------------------------------------------------------------------------------------------------------------
# evaluation


class PixelNet(nn.Module):
    """Per-pixel logits from a 1x1 conv, at stride `stride` (average pool first): no context, so windows agree."""

    def __init__(self, k=3, stride=8):
        super().__init__()
        self.stride, self.head = stride, nn.Conv2d(3, k, 1)

    def forward(self, x):
        return {'out': self.head(nn.functional.avg_pool2d(x, self.stride) if self.stride > 1 else x)}


def test_evaluate_resizes_low_res_logits_straight_to_label_size():
    torch.manual_seed(0)
    net, k = PixelNet(), 3
    # two "resized" inputs whose labels are at other (original) sizes, with ignore pixels
    samples = [(torch.randn(1, 3, 32, 48), torch.randint(0, k, (1, 45, 70))),
               (torch.randn(1, 3, 40, 24), torch.randint(0, k, (1, 81, 50)))]
    samples[0][1][0, :5] = 255
    res = infer.evaluate(net, samples, num_classes=k, log=lambda m: None, classes=['a', 'b', 'c'])
    mat = torch.zeros(k, k, dtype=torch.int64)
    for x, y in samples:  # independent reference: resize the (1, K, h/8, w/8) logits to H x W, argmax, count
        logits = nn.functional.interpolate(net(x)['out'], size=y.shape[-2:], mode='bilinear', align_corners=False)
        pred, y = logits.argmax(1).flatten(), y.flatten()
        for t, p in zip(y[y != 255].tolist(), pred[y != 255].tolist()):
            mat[t, p] += 1
    iou = mat.diag() / (mat.sum(0) + mat.sum(1) - mat.diag())
    assert res['mIoU'] == pytest.approx(float(iou.nanmean()))
    assert res['aAcc'] == pytest.approx(float(mat.diag().sum() / mat.sum()))


def test_slide_inference_covers_every_pixel_once_averaged():
    torch.manual_seed(0)
    net, x = PixelNet(stride=1).eval(), torch.randn(1, 3, 37, 53)
    whole = net(x)['out']
    with torch.no_grad():
        slide = infer.slide_logits(net, x, crop=(16, 20), stride=(10, 13))  # overlapping, ragged last windows
    assert torch.allclose(slide, whole, atol=1e-6)


def test_keeps_only_the_newest_checkpoints(tmp_path):
    _fit(tmp_path, keep_checkpoints=2, max_iters=8)  # epochs end at 2, 4, 6, 8 -> files for epochs 1-3 + final
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) == ['checkpoint-epoch-3.pth',
                                                                             'checkpoint-final.pth']
    assert checkpoint.resolve('auto', str(tmp_path)).endswith('checkpoint-final.pth')


def _scripted_evals(monkeypatch, mious):
    """train.fit's evaluations return these mIoUs in turn (the model is not evaluated)."""
    mious = iter(mious)
    monkeypatch.setattr(train.fold, 'for_eval', lambda model, cfg, amp, log: (model, amp))
    monkeypatch.setattr(train.infer, 'evaluate', lambda *a, **k: dict(
        mIoU=next(mious), mAcc=0.0, aAcc=0.0, precision='fp32', IoU=[], Acc=[]))


def test_the_best_evaluations_checkpoint_outlives_the_pruning(tmp_path, monkeypatch):
    # keep 1 of the epochs' checkpoints: epoch 2's (mIoU 0.5, the best) stays as checkpoint-best.pth
    _scripted_evals(monkeypatch, [0.3, 0.5, 0.4, 0.45])
    _fit(tmp_path, val_loader=[], keep_checkpoints=1, max_iters=8, eval_interval_epochs=1)
    assert sorted(f for f in os.listdir(tmp_path) if '.pth' in f) == ['checkpoint-best.pth', 'checkpoint-final.pth']
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 4
    assert checkpoint.resolve('auto', str(tmp_path)).endswith('checkpoint-final.pth')  # latest is still the newest
    evals = [r for r in _records(tmp_path) if r['kind'] == 'eval']
    assert [r['checkpoint'] for r in evals] == ['checkpoint-epoch-1.pth', 'checkpoint-epoch-2.pth',
                                                'checkpoint-epoch-3.pth', 'checkpoint-final.pth']
    log = (tmp_path / 'log.txt').read_text()
    assert log.count('best mIoU so far') == 2 and 'checkpoint-epoch-2.pth is also' in log
    assert checkpoint.temp_files(str(tmp_path)) == []
    summary = report.final_summary(str(tmp_path), 1)
    assert f"best: {tmp_path / 'checkpoint-best.pth'} (iteration 4, mIoU 50.00)" in summary


def test_a_resumed_run_keeps_the_best_of_its_earlier_evaluations(tmp_path, monkeypatch):
    # metrics.jsonl's evaluations before the resume count; one without a checkpoint at its iteration does not
    earlier = [dict(kind='eval', iteration=2, mIoU=0.9), dict(kind='eval', iteration=4, mIoU=0.6,
                                                              checkpoint='checkpoint-epoch-2.pth')]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in earlier))
    _scripted_evals(monkeypatch, [0.5, 0.55])
    _fit(tmp_path, val_loader=[], max_iters=4, eval_interval_epochs=1)
    assert not (tmp_path / 'checkpoint-best.pth').exists()  # 0.55 < 0.6
    _scripted_evals(monkeypatch, [0.7, 0.65])
    _fit(tmp_path, val_loader=[], max_iters=4, eval_interval_epochs=1)
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 2  # 0.7 > 0.6, though < 0.9


def test_a_killed_runs_cut_metrics_line_does_not_stop_its_resume(tmp_path, monkeypatch, capsys):
    # kill -9 mid-write leaves a partial line, which the resumed run's first record then continues: the best so far
    # and the final summary read past it (one stderr note), as curves.png does
    (tmp_path / 'metrics.jsonl').write_text(json.dumps(dict(kind='eval', iteration=2, mIoU=0.6,
                                                            checkpoint='checkpoint-epoch-1.pth')) + '\n{"kind": "tr')
    _scripted_evals(monkeypatch, [0.5, 0.7])
    _fit(tmp_path, val_loader=[], max_iters=4, eval_interval_epochs=1)
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 4  # 0.7 > 0.6; 0.5 was not
    assert 'iteration 4, mIoU 70.00' in report.final_summary(str(tmp_path), 1)
    assert 'not JSON, skipped' in capsys.readouterr().err


def test_no_checkpoint_no_best(tmp_path, monkeypatch):
    # evaluations at epochs without a checkpoint (save every 2, eval every 1) make nothing the best
    _scripted_evals(monkeypatch, [0.9, 0.3, 0.2])
    _fit(tmp_path, val_loader=[], max_iters=6, eval_interval_epochs=1, save_interval_epochs=2)
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 4  # epoch 1's 0.9 had no file
    assert [r.get('checkpoint') for r in _records(tmp_path) if r['kind'] == 'eval'] == [
        None, 'checkpoint-epoch-2.pth', 'checkpoint-final.pth']


# ----------------------------------------------------------------------------------------------------------------
# spec §7: the schedule the loop runs and the set-up main does (what the recipe dicts above only name)


def _fit_epochs(tmp_path, monkeypatch, **over):
    """train.fit on ToyData (2 iterations per epoch) with max_iters 0, so the schedule comes from max_epochs.
    Records per step (lr, aux weight, sampler epoch), and the iterations of each evaluation and checkpoint."""
    seen = dict(steps=[], evals=[], saves=[])
    model = TinyNet()
    loader = data.train_loader(ToyData(), 2, 0, seed=0, num_items=4)
    seg_loss = train.seg_loss

    def loss(out, targets, aux_weight):
        seen['steps'].append((opt.param_groups[0]['lr'], aux_weight, loader.sampler.epoch))
        return seg_loss(out, targets, aux_weight)
    monkeypatch.setattr(train, 'seg_loss', loss)
    monkeypatch.setattr(train.fold, 'for_eval', lambda model, cfg, amp, log: (model, amp))
    monkeypatch.setattr(train.infer, 'evaluate', lambda net, *a, **k: seen['evals'].append(it()) or dict(
        mIoU=0.0, mAcc=0.0, aAcc=0.0, precision='fp32', IoU=[], Acc=[]))
    monkeypatch.setattr(checkpoint, 'keep_as_best', lambda path: path)  # the saves below write no file
    monkeypatch.setattr(checkpoint, 'save', lambda path, state, root=None: seen['saves'].append(
        (os.path.basename(path), state['iteration'])) or path)
    it = lambda: len(seen['steps'])  # noqa: E731 (iterations run so far)
    cfg = dict(config.DEFAULTS, num_classes=2, max_iters=0, batch_size=2, num_workers=0, log_interval=1,
               work_dir=str(tmp_path), kernels='torch')
    cfg.update(over)
    opt = torch.optim.SGD(model.parameters(), lr=cfg['lr'], momentum=cfg['momentum'])
    amp = Amp('none', device='cpu')
    model, opt = amp.initialize(model, opt)
    train.fit(cfg, model, opt, amp, loader, val_loader=[], start_iter=0, device='cpu', log=train.Logger(str(tmp_path)))
    return seen


def test_the_schedule_is_max_epochs_times_the_loader_with_evals_every_n_epochs_and_at_the_end(tmp_path, monkeypatch):
    """spec §7/§1: max_iters = max_epochs x iterations per epoch (the poly lr decays over it), a new shuffle each
    epoch (sampler.set_epoch), a checkpoint every save_interval_epochs and an evaluation every eval_interval_epochs,
    both also at the last epoch (130 epochs, eval every 10: 13 evaluations, the last at epoch 130)."""
    seen = _fit_epochs(tmp_path, monkeypatch, max_epochs=5, eval_interval_epochs=2, save_interval_epochs=2,
                       lr=0.02, min_lr=0.001)
    assert [s[0] for s in seen['steps']] == [train.poly_lr(i, 10, 0.02, 0.9, 0.001) for i in range(10)]
    assert [s[2] for s in seen['steps']] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # sampler epoch of every batch
    assert seen['evals'] == [4, 8, 10]  # epochs 2, 4 and the last, 5
    assert seen['saves'] == [('checkpoint-epoch-2.pth', 4), ('checkpoint-epoch-4.pth', 8), ('checkpoint-final.pth', 10)]


def test_the_loop_weights_the_aux_loss_with_the_configured_factor(tmp_path, monkeypatch):
    """spec §6: the aux CE is scaled by the config's loss_aux scale_factor (recipe() -> cfg['aux_weight'] -> fit);
    test_seg_loss_* checks seg_loss with the weight it is given, this that fit gives it cfg's, not a constant."""
    seen = _fit_epochs(tmp_path, monkeypatch, max_epochs=1, aux_weight=0.25, eval_interval_epochs=0,
                       save_interval_epochs=0)
    assert [s[1] for s in seen['steps']] == [0.25, 0.25]


class _Built(Exception):
    pass


def test_main_sets_up_the_references_optimizer_and_backends(tmp_path, monkeypatch):
    """spec §7 steps 3-5, §1: TF32 off for matmul and cuDNN, cudnn.benchmark on, and one SGD param group over every
    parameter (weight decay on BN and bias too) with the script's lr 0.01, momentum 0.9, weight decay 5e-4, no
    nesterov or dampening. The tests above build their own SGD; this one stops main right after it builds its own."""
    import fcn
    for sub in ('images', 'annotations'):
        os.makedirs(tmp_path / 'ADE20k' / 'ADEChallengeData2016' / sub)  # found; never read (main stops first)
    backends = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = backends[0].allow_tf32, backends[1].allow_tf32, backends[1].benchmark  # not monkeypatch: torch 2.11's
    backends[0].allow_tf32 = backends[1].allow_tf32 = True  # cuBLAS module has no attribute to restore by setattr
    backends[1].benchmark = False
    built, sgd = [], torch.optim.SGD

    class Spy(sgd):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            built.append(self)
            raise _Built
    monkeypatch.setattr(torch.optim, 'SGD', Spy)
    models = []

    def build(cfg=None, num_classes=150):
        models.append(TinyNet())
        return models[-1]
    try:
        with pytest.raises(_Built):
            train.main(fcn.SEGMENTOR_CFG, build, ['--data_root', str(tmp_path / 'ADE20k'), '--device', 'cpu',
                                                  '--pretrained', 'none', '--kernels', 'torch',
                                                  '--work_dir', str(tmp_path / 'w')], name='fcn')
        assert (backends[0].allow_tf32, backends[1].allow_tf32, backends[1].benchmark) == (False, False, True)
    finally:
        backends[0].allow_tf32, backends[1].allow_tf32, backends[1].benchmark = saved
    (group,) = built[0].param_groups
    assert [id(p) for p in group['params']] == [id(p) for p in models[0].parameters()]  # BN and biases included
    assert (group['lr'], group['momentum'], group['weight_decay'], group['dampening'], group['nesterov']) == \
        (0.01, 0.9, 5e-4, 0, False)


def test_a_tied_evaluation_keeps_the_first_best(tmp_path, monkeypatch):
    # an equal mIoU later is no better: checkpoint-best.pth stays the file the summary's best line names (the first)
    _scripted_evals(monkeypatch, [0.5, 0.5, 0.4, 0.4])
    _fit(tmp_path, val_loader=[], keep_checkpoints=0, max_iters=8, eval_interval_epochs=1)
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 2
    log = (tmp_path / 'log.txt').read_text()
    assert log.count('best mIoU so far') == 1
    assert f"checkpoint-epoch-1.pth is also {tmp_path / 'checkpoint-best.pth'}" in log
    assert f"best: {tmp_path / 'checkpoint-best.pth'} (iteration 2, mIoU 50.00)" in report.final_summary(
        str(tmp_path), 1)


def test_a_stop_checkpoint_can_be_the_best(tmp_path, monkeypatch):
    # --stop_iters at an epoch end with an evaluation due but no epoch checkpoint: the iter-N file is the eval's
    _scripted_evals(monkeypatch, [0.5])
    _fit(tmp_path, val_loader=[], max_iters=8, eval_interval_epochs=1, save_interval_epochs=3, stop_iters=2)
    assert [r.get('checkpoint') for r in _records(tmp_path) if r['kind'] == 'eval'] == ['checkpoint-iter-2.pth']
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 2


def test_the_summary_names_the_best_evaluation_with_a_checkpoint(tmp_path, monkeypatch):
    # the run's best mIoU (0.9, epoch 1, no file) is not the kept one (0.3 at iteration 4)
    _scripted_evals(monkeypatch, [0.9, 0.3, 0.2])
    _fit(tmp_path, val_loader=[], max_iters=6, eval_interval_epochs=1, save_interval_epochs=2)
    summary = report.final_summary(str(tmp_path), 1)
    assert 'best mIoU 90.00 (iteration 2)' in summary
    assert f"best: {tmp_path / 'checkpoint-best.pth'} (iteration 4, mIoU 30.00)" in summary
    os.remove(tmp_path / 'checkpoint-best.pth')  # no file, no line
    assert 'best:' not in report.final_summary(str(tmp_path), 1)


def test_keep_as_best_links_the_file_and_a_killed_one_leaves_a_temp_file_that_is_found(tmp_path, monkeypatch):
    path = checkpoint.save(str(tmp_path / 'checkpoint-epoch-1.pth'), {'model': {'w': torch.ones(1)}})
    leftover = tmp_path / f'.checkpoint-best.pth.tmp-{os.getpid()}'  # a killed process of this pid left it
    leftover.write_bytes(b'half')
    assert checkpoint.keep_as_best(path) == str(tmp_path / 'checkpoint-best.pth')
    assert os.path.samefile(tmp_path / 'checkpoint-best.pth', path) and not leftover.exists()

    def killed(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.os, 'replace', killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.keep_as_best(path)
    monkeypatch.undo()
    assert checkpoint.temp_files(str(tmp_path)) == [str(leftover)]


def test_only_the_classifiers_differing_is_named_another_number_of_classes(tmp_path):
    sd = TinyNet().state_dict()
    three = dict(sd, **{f'{m}.{p}': torch.zeros((3, 4, 1, 1) if p == 'weight' else (3,))
                        for m in ('decoder', 'auxiliary_decoder') for p in ('weight', 'bias')})
    with pytest.raises(BadFileError, match=r'it predicts 3 classes, the model 2: --num_classes 3'):
        checkpoint.check_matches(TinyNet(), three, 'f.pth')
    others = {  # another head width; a head of 3 and one of 5 classes; 3 classes and an extra tensor
        'width': dict(sd, **{f'{m}.weight': torch.zeros(2, 8, 1, 1) for m in ('decoder', 'auxiliary_decoder')}),
        'two-counts': dict(three, **{'auxiliary_decoder.weight': torch.zeros(5, 4, 1, 1),
                                     'auxiliary_decoder.bias': torch.zeros(5)}),
        'extra': dict(three, extra=torch.zeros(1))}
    for name, other in others.items():
        with pytest.raises(BadFileError) as e:
            checkpoint.check_matches(TinyNet(), other, 'f.pth')
        assert 'predicts' not in str(e.value), (name, str(e.value))


def test_a_checkpoint_refused_for_non_finite_state_is_no_evaluations_checkpoint(tmp_path, monkeypatch):
    # the final save is refused (NonFiniteState: nothing written): its evaluation, the best mIoU, names no file
    save = checkpoint.save

    def refusing(path, state, root=None):
        if path.endswith('checkpoint-final.pth'):
            raise checkpoint.NonFiniteState('1 non-finite tensor(s), e.g. decoder.weight')
        return save(path, state, root)
    monkeypatch.setattr(checkpoint, 'save', refusing)
    _scripted_evals(monkeypatch, [0.3, 0.9])
    _fit(tmp_path, val_loader=[], max_iters=4, eval_interval_epochs=1)
    assert [r.get('checkpoint') for r in _records(tmp_path) if r['kind'] == 'eval'] == ['checkpoint-epoch-1.pth', None]
    assert checkpoint.load(str(tmp_path / 'checkpoint-best.pth'))['iteration'] == 2
    assert 'WARNING: not saving' in (tmp_path / 'log.txt').read_text()
