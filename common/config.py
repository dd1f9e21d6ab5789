"""The reference recipe as data (top, MODELS) and the run config + CLI (bottom, TRAINER).

Top: ssseg's base FP16 segmentor config (spec §1), its ADE20k 512x512 dataset (§2) and its batch-16 dataloader
(§2.3) as nested dicts with the reference's keys. Each script builds its SEGMENTOR_CFG from them with
`segmentor_cfg(...)`, the way an ssseg config file deep-copies the base and overwrites a few entries.
"""
import copy
import os
import sys

import torch

from . import amp, cli, zoo
from .errors import UserError

# ---- reference base config (MODELS): ssseg/configs/_base_/segmentors/fp16.py and friends, spec §1-§2

# the two fp16_cfg shapes the ssseg FP16 README documents (spec §9); the published numbers used apex O1
FP16_CFG_APEX = {'type': 'apex', 'initialize': {'opt_level': 'O1'}, 'scale_loss': {}}
FP16_CFG_PYTORCH = {'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {}}

# ImageNet normalisation on the 0-255 scale, RGB order (the pipeline converts cv2's BGR first, spec §2.1 step 5)
_NORMALIZE = ('Normalize', {'mean': [123.675, 116.28, 103.53], 'std': [58.395, 57.12, 57.375], 'to_rgb': True})

# recipe() reads the crop and the scale from here; the other values run as common/data.py's defaults, held equal to
# these by tests/test_data.py
DATASET_CFG_ADE20k_512x512 = {
    'type': 'ADE20kDataset',
    'rootdir': 'ADE20k',  # ssseg: os.path.join(os.getcwd(), 'ADE20k'); a relative path resolves the same way at use
    'train': {
        'set': 'train',
        'data_pipelines': [
            ('Resize', {'output_size': (2048, 512), 'keep_ratio': True, 'scale_range': (0.5, 2.0)}),
            ('RandomCrop', {'crop_size': (512, 512), 'one_category_max_ratio': 0.75}),
            ('RandomFlip', {'prob': 0.5}),
            ('PhotoMetricDistortion', {}),  # defaults: brightness 32, contrast/saturation (0.5, 1.5), hue 18
            _NORMALIZE,
            ('ToTensor', {}),
            ('Padding', {'output_size': (512, 512), 'data_type': 'tensor'}),  # centred padding, spec §10.3
        ],
    },
    'test': {
        'set': 'val',
        'data_pipelines': [
            ('Resize', {'output_size': (2048, 512), 'keep_ratio': True, 'scale_range': None}),
            _NORMALIZE,
            ('ToTensor', {}),
        ],
    },
}

DATALOADER_CFG_BS16 = {
    'expected_total_train_bs_for_assert': 16,  # per-GPU batch = 16 // world_size (8 GPUs x 2 in the reference)
    'auto_adapt_to_expected_train_bs': True,
    'train': {'batch_size_per_gpu': 2, 'num_workers_per_gpu': 2, 'shuffle': True, 'pin_memory': True, 'drop_last': True},
    'test': {'batch_size_per_gpu': 1, 'num_workers_per_gpu': 2, 'shuffle': False, 'pin_memory': True, 'drop_last': False},
}

BASE_SEGMENTOR_CFG = {
    'type': 'FCN',  # overridden by every config
    'num_classes': -1,  # -> 150 for ADE20k
    'benchmark': True,  # cudnn.benchmark
    'align_corners': False,  # every bilinear resize: heads, loss, inference
    'work_dir': 'ckpts',  # each config sets its own file name
    'eval_interval_epochs': 10,  # (+ always at the last epoch)
    'save_interval_epochs': 1,  # (+ always at the last epoch)
    # ssseg HEAD splits this into logger_handle_cfg + training_logging_manager_cfg; one dict here
    'logger': {'type': 'LocalLoggerHandle', 'logfilepath': '', 'log_interval_iters': 50},
    'norm_cfg': {'type': 'SyncBatchNorm'},  # eps 1e-5, momentum 0.1, affine (PyTorch defaults)
    'act_cfg': {'type': 'ReLU', 'inplace': True},
    'fp16_cfg': copy.deepcopy(FP16_CFG_APEX),
    'backbone': {
        'type': 'ResNet', 'depth': 101, 'structure_type': 'resnet101conv3x3stem', 'pretrained': True,
        'outstride': 8, 'use_conv3x3_stem': True, 'selected_indices': (2, 3),
    },
    'head': {'in_channels': 2048, 'feats_channels': 512, 'dropout': 0.1},
    'auxiliary': {'in_channels': 1024, 'out_channels': 512, 'dropout': 0.1},  # num_convs 1, on layer3
    'losses': {
        # ssseg HEAD ignores -100, the 2021 code that trained the published models 255 (same behaviour, spec §10.13);
        # our data pipeline marks ignore pixels with 255 (common.data.IGNORE_INDEX)
        'loss_aux': {'type': 'CrossEntropyLoss', 'scale_factor': 0.4, 'ignore_index': 255, 'reduction': 'mean'},
        'loss_cls': {'type': 'CrossEntropyLoss', 'scale_factor': 1.0, 'ignore_index': 255, 'reduction': 'mean'},
    },
    'inference': {
        'forward': {'mode': 'whole', 'cropsize': None, 'stride': None},
        'tta': {'multiscale': [1], 'flip': False, 'use_probs_before_resize': False},
        'evaluate': {'metric_list': ['iou', 'miou']},
    },
    'scheduler': {
        'type': 'PolyScheduler', 'max_epochs': 0, 'power': 0.9,  # max_epochs -> 130 in every ADE20k config
        # min_lr is not in the config: PolyScheduler defaults it to 1% of lr = 1e-4 (spec §7, §10.7)
        'optimizer': {
            # one param group: weight decay on every parameter, BN and bias included (spec §10.7)
            'type': 'SGD', 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4, 'params_rules': {},
        },
    },
    'dataset': copy.deepcopy(DATASET_CFG_ADE20k_512x512),
    'dataloader': copy.deepcopy(DATALOADER_CFG_BS16),
}


def segmentor_cfg(**overrides):
    """A deep copy of BASE_SEGMENTOR_CFG with top-level entries replaced (ssseg's `cfg = base.copy(); cfg[k] = v`).

    Replacement is whole-entry, like ssseg's configs: `backbone={...}` swaps the backbone dict, it does not merge.
    """
    unknown = sorted(set(overrides) - set(BASE_SEGMENTOR_CFG))
    if unknown:
        raise KeyError(f"common/config.py: segmentor_cfg got keys the reference config does not have: {unknown}")
    cfg = copy.deepcopy(BASE_SEGMENTOR_CFG)
    cfg.update(copy.deepcopy(overrides))
    return cfg


# ---- run config and CLI (TRAINER)
# Every knob of a run, flat, one line each; the CLI flag is the key (`--batch_size 8`, `--amp=torch`). The recipe
# numbers (lr, epochs, batch, amp, ...) shown here are only fallbacks: parse() takes them from the script's
# SEGMENTOR_CFG, so the reference dicts above stay the one source of truth. Precedence, lowest first:
# DEFAULTS < SEGMENTOR_CFG < the `--data demo` preset < explicit flags. `--help` is read from this block: a
# `# --- title` line opens a group, a key's trailing comment (else the comment lines right above it) is its help.
DEFAULTS = dict(
    # --- AMP (mixed precision)
    amp='apex',  # none | torch | apex (the reference trains with apex O1, spec §1; ours implements its semantics)
    opt_level='O1',  # apex opt level O0 | O1 | O2 | O3 (with amp=apex; another level with amp none/torch: an error)
    # auto | float16 | bfloat16; auto = float16 on CUDA (the reference); on CPU bfloat16 where the CPU has bf16
    # instructions (AVX512-BF16 / AMX), else --amp torch and apex O1 run fp32 arithmetic (common/cpu.py; the log says)
    amp_dtype='auto',
    # every N iterations one step records per-layer fp16/bf16 overflow and underflow (common/amp_report.py) into
    # RUN_DIR/amp_report.jsonl + .png; 0 = off (a skipped step is still diagnosed, automatically)
    amp_report=0,
    # --- data
    data='ade20k',  # ade20k | demo (a synthetic ADE-layout dataset generated on first use, no download)
    data_root='',  # folder holding ADEChallengeData2016 ('' = ./ADE20k, ssseg's default); with demo: its cache folder
    num_classes=150,  # classes the model predicts: ADE20k's 150 (spec §0)
    crop_size=(512, 512),  # (h, w) train crop (spec §2.1)
    scale=(2048, 512),  # (long, short) resize target of train (x ratio 0.5-2.0) and test images (spec §2.1, §2.2)
    batch_size=16,  # total over all ranks; per rank = batch_size // world_size (spec §2.3)
    num_workers=2,  # data loader workers per rank (spec §2.3)
    num_train_images=0,  # use only the first N training images (0 = all; for smoke runs)
    # evaluate on the first N validation images only (0 = all 2000). mIoU over a subset leaves out the classes absent
    # from both prediction and label (as ssseg and mmseg do); the official ADE20k benchmark counts them as 0, so its
    # number is lower there. On all 2000 every class is labelled (the benchmark's objectInfo150.txt: each in >= 3 val
    # images), so the two agree there.
    num_val_images=0,
    # --- optimiser and schedule
    max_epochs=130,  # iterations = max_epochs x len(train loader) (spec §2.3: 164,190 at batch 16)
    max_iters=0,  # > 0 overrides the epoch-derived count (short runs); epochs become ceil(max_iters / per epoch)
    stop_iters=0,  # > 0: stop (with a checkpoint) after this many iterations, schedule unchanged; --resume continues
    lr=0.01,  # SGD base lr (spec §1)
    momentum=0.9,  # SGD momentum (spec §1)
    weight_decay=5e-4,  # on every parameter, BN and bias included (spec §10.7)
    power=0.9,  # poly lr exponent (spec §7)
    min_lr=1e-4,  # poly floor: 1% of the base lr (spec §7, §10.7)
    aux_weight=0.4,  # loss = CE(out) + aux_weight * CE(aux) (spec §6)
    # --- initial weights
    # ImageNet backbone (spec §4): a .pth path, a URL or a key of common.backbone.PRETRAINED_URLS (downloaded once into
    # the torch hub cache; needs internet), or 'none' (from scratch). The default is the reference's v1c checkpoint.
    pretrained='resnet50conv3x3stem',
    # a whole-segmentor checkpoint to start training from: ours, ssseg's {'model': sd}, a bare sd, or ssseg:NAME (the
    # published FP16 model, downloaded once into the torch hub cache; NAME: fcn, pspnet, deeplabv3, deeplabv3plus)
    init='',
    # --- run: work folder, checkpoints, logging
    work_dir='',  # '' = work_dirs/<SEGMENTOR_CFG's work_dir, else the script name>[_demo]
    eval_interval_epochs=10,  # evaluate every N epochs and always at the end (spec §1); 0 = never
    save_interval_epochs=1,  # checkpoint every N epochs and always at the end (spec §1); 0 = never
    keep_checkpoints=3,  # delete older checkpoint files beyond the newest N and the best (0 = keep all, as ssseg)
    log_interval=50,  # iterations between progress lines (spec §7)
    tensorboard=False,  # also write the logged scalars and a few val pictures per evaluation to RUN_DIR/tensorboard
    max_skipped_steps=100,  # stop when this many consecutive steps are skipped for non-finite gradients
    save_predictions=0,  # pictures of the first N val images (after training in RUN_DIR/pred; with --eval in --out)
    # --- modes: evaluate, predict or summarise instead of training
    resume='',  # '' | checkpoint path | 'auto' (work_dir/latest); continues exactly where it stopped
    eval='',  # checkpoint path, or ssseg:NAME (the published model, e.g. ssseg:pspnet): evaluate it on val and exit
    predict='',  # image file or folder: write colour masks of --ckpt's predictions to --out and exit
    ckpt='',  # checkpoint for --predict (a path or ssseg:NAME)
    out='',  # output folder for --predict / --eval pictures ('' = a new work_dir/pred/<YYYYmmdd_HHMMSS> per call)
    summary=False,  # print the parameter / multiply-accumulate table and exit
    # --- evaluation and inference
    inference_mode='whole',  # whole | slide (the reference evaluates whole images, spec §8)
    slide_crop=(512, 512),  # (h, w) window for inference_mode=slide
    slide_stride=(341, 341),  # (h, w) window step for inference_mode=slide (mmseg's 2/3 overlap)
    tta=False,  # --eval/--predict: horizontal flip x scales 0.5-1.75 of the test scale, averaged (common/tta.py)
    # ssseg's inference.tta flag: softmax the net's output before the resize to the original size and the average over
    # views / slide windows (true), or resize and average logits (false). auto = true with --tta (every ssseg ADE20k
    # config with multi-scale TTA sets it), false without (the base config, which the published numbers used)
    use_probs_before_resize='auto',
    fold=True,  # eval/predict: each conv-BN(-add)-ReLU unit as one conv with bias (common/fold.py); false = unfolded
    eval_amp=False,  # --eval/--predict in --amp's half type (fp16 CUDA, bf16 CPU); default fp32 as the reference
    # --- device and kernels
    device='auto',  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    seed=0,  # data order, augmentation and init are a pure function of this (the reference does not seed, spec §7)
    kernels='auto',  # auto (fused when common._C is built, per op as measured: layers.AUTO; logged) | fused | torch
    channels_last=False,  # NHWC memory format for model and inputs
    compile='none',  # none | default | max-autotune: torch.compile the model's forward for training and evaluation
    tf32=False,  # the reference disables TF32 (spec §7.3); true allows it for matmul and cuDNN
    # --- distributed: torchrun --nproc_per_node N script.py ...; --batch_size stays the total over the N ranks
    ddp_fp16_compress='auto',  # auto | true | false: all-reduce grads in fp16 (auto = reference: on for amp torch fp16)
)

CHOICES = dict(amp=('none', 'torch', 'apex'), opt_level=('O0', 'O1', 'O2', 'O3'),
               amp_dtype=('auto', 'float16', 'bfloat16'), data=('ade20k', 'demo'),
               kernels=('auto', 'fused', 'torch'), inference_mode=('whole', 'slide'),
               ddp_fp16_compress=('auto', 'true', 'false'), compile=('none', 'default', 'max-autotune'),
               use_probs_before_resize=('auto', 'true', 'false'))

# `--data demo`: a CPU-sized run of the full recipe (a ResNet-50-D8 from scratch) on the synthetic dataset: small
# crops, a short schedule, eval only at the end, a few prediction PNGs. A few minutes on a 2-core CPU; the measured
# times and mIoUs, with and without bf16 instructions, are in docs/demo.md.
DEMO_PRESET = dict(
    crop_size=(64, 64), scale=(512, 128), batch_size=4, num_workers=1, max_iters=250, lr=0.02,
    eval_interval_epochs=1000, save_interval_epochs=1000, log_interval=10, pretrained='none', save_predictions=4,
)


def _fp16_flat(fp16_cfg):
    """The reference's fp16_cfg (any documented shape, spec §1/§9) as flat (amp, opt_level, amp_dtype) strings. The
    scripts build their Amp from those three flags, so a scaler setting the flags cannot carry is an error naming it."""
    kind, kw = amp.fp16_cfg_args(fp16_cfg)
    extra = sorted(k for k in kw if k not in ('opt_level', 'dtype'))
    if extra:
        raise amp.Fp16CfgError(f"fp16_cfg sets {', '.join(extra)}: the scripts take only the AMP type, opt_level and "
                               "autocast dtype from it (the --amp, --opt_level, --amp_dtype flags), with the "
                               "reference's dynamic loss scaling; remove the setting")
    dtype = kw.get('dtype', 'auto')
    dtype = 'auto' if dtype is None else str(dtype).replace('torch.', '')
    if dtype not in CHOICES['amp_dtype']:
        raise amp.Fp16CfgError(f"fp16_cfg['autocast']['dtype'] {dtype}: must be torch.float16 or torch.bfloat16")
    return kind, kw.get('opt_level', 'O1'), dtype


# what the code runs whatever a SEGMENTOR_CFG says: (key path, the value it runs, what to do instead). An edited
# value here would be dropped without a word, so recipe() refuses it, as it refuses an fp16_cfg key (spec §1, §2)
_RESNET50_D8 = {'type': 'ResNet', 'depth': 50, 'structure_type': 'resnet50conv3x3stem', 'outstride': 8,
                'use_conv3x3_stem': True}
_FIXED = (
    (('scheduler', 'type'), 'PolyScheduler', "the poly schedule is common/train.py's (--power, --min_lr)"),
    (('scheduler', 'optimizer', 'type'), 'SGD', "the optimiser is SGD over every parameter (common/train.py)"),
    (('scheduler', 'optimizer', 'params_rules'), {}, "one parameter group (common/train.py)"),
    (('losses', 'loss_cls', 'scale_factor'), 1.0, "the main loss has weight 1; --aux_weight sets the auxiliary's"),
    (('inference', 'forward', 'mode'), 'whole', "use the --inference_mode flag"),
    (('inference', 'tta', 'multiscale'), [1], "use the --tta flag"),
    (('inference', 'tta', 'flip'), False, "use the --tta flag"),
    (('norm_cfg',), {'type': 'SyncBatchNorm'}, "BatchNorm, synced under torchrun, is built in (common/layers.py)"),
    (('act_cfg',), {'type': 'ReLU', 'inplace': True}, "ReLU is built in (common/layers.py)"),
    (('align_corners',), False, "every resize runs align_corners=False"),
) + tuple((('losses', loss, key), value, "the loss is common/layers.py's seg_cross_entropy")
          for loss in ('loss_cls', 'loss_aux') for key, value in (
              ('type', 'CrossEntropyLoss'), ('ignore_index', 255), ('reduction', 'mean')))


def _check_fixed(seg_cfg):
    """UserError naming the first SEGMENTOR_CFG entry that differs from what the code runs (_FIXED, the backbone, the
    data pipelines but for their sizes, a size that follows another); an entry the config leaves out runs the code's
    value, as in ssseg."""
    def norm(v):  # lists and tuples compare alike: (0.5, 2.0) == [0.5, 2.0]
        return tuple(map(norm, v)) if isinstance(v, (list, tuple)) else {k: norm(x) for k, x in v.items()} \
            if isinstance(v, dict) else v

    def at(path):
        cfg = seg_cfg
        for key in path:
            if not isinstance(cfg, dict) or key not in cfg:
                return None
            cfg = cfg[key]
        return cfg

    if 'losses' in seg_cfg and 'loss_aux' not in seg_cfg['losses']:
        raise UserError("['losses'] has no 'loss_aux', but every model here trains its auxiliary head; set its "
                        "scale_factor to 0 (or pass --aux_weight 0) to train without its loss")
    if seg_cfg.get('backbone') not in (None, BASE_SEGMENTOR_CFG['backbone']):  # the base's is a placeholder
        for key, value in _RESNET50_D8.items():
            if seg_cfg['backbone'].get(key, value) != value:
                raise UserError(f"['backbone']['{key}'] {seg_cfg['backbone'][key]!r}: the scripts build the "
                                f"ResNet-50-D8 backbone only (common/backbone.py); set {value!r}")
    for path, value, how in _FIXED:
        got = at(path)
        if got is not None and norm(got) != norm(value):
            raise UserError(f"{''.join(f'[{k!r}]' for k in path)} {got!r}: the scripts run {value!r} whatever the "
                            f"config says ({how}); remove the edit")
    def sizeless(steps):  # a size's value is checked below, its presence here
        return [(n, {k: 'size' if k in ('crop_size', 'output_size') else v for k, v in a.items()}) for n, a in steps]

    steps = {}
    for split in ('train', 'test'):  # the sizes are read (crop_size, scale) or follow them; nothing else
        got = at(('dataset', split, 'data_pipelines'))
        want = DATASET_CFG_ADE20k_512x512[split]['data_pipelines']
        try:
            same = got is None or norm(sizeless(got)) == norm(sizeless(want))
        except (TypeError, ValueError, AttributeError):  # not a list of (name, {args}) pairs
            same = False
        if not same:
            raise UserError(f"['dataset']['{split}']['data_pipelines']: only the sizes (RandomCrop crop_size, Resize "
                            f"output_size) are read from it, the steps and their other settings are common/data.py's "
                            f"(the reference's: {[n for n, _ in want]}); use --crop_size / --scale, remove the edit")
        steps[split] = dict(got or want)
    train, test = steps['train'], steps['test']
    sizes = {"['train'] Resize output_size": train['Resize']['output_size'],
             "['train'] RandomCrop crop_size": train['RandomCrop']['crop_size'],
             "['train'] Padding output_size": train['Padding']['output_size'],
             "['test'] Resize output_size": test['Resize']['output_size']}
    for where, value in sizes.items():
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(type(n) is int and n > 0 for n in value)):
            raise UserError(f"['dataset']{where} {value!r}: a size is two positive integers, e.g. (512, 512)")
    # two sizes follow another (one flag sets both): test images are resized as the train ones, batches padded to the
    # crop; a different value would be dropped
    for where, ref, flag in (("['test'] Resize output_size", "['train'] Resize output_size", '--scale'),
                             ("['train'] Padding output_size", "['train'] RandomCrop crop_size", '--crop_size')):
        if norm(sizes[where]) != norm(sizes[ref]):
            raise UserError(f"['dataset']{where} {sizes[where]!r}: the scripts run {ref} {sizes[ref]!r} for it "
                            f"({flag} sets both); set the two equal")


def recipe(seg_cfg):
    """The flat numbers the reference config fixes (spec §1, §2), read from a SEGMENTOR_CFG."""
    _check_fixed(seg_cfg)
    sched, out = seg_cfg.get('scheduler', {}), {}
    if seg_cfg.get('backbone', {}).get('pretrained') is False:  # ssseg's way to train from scratch
        out['pretrained'] = 'none'
    opt = sched.get('optimizer', {})
    for key, src in (('lr', opt), ('momentum', opt), ('weight_decay', opt), ('power', sched), ('min_lr', sched)):
        if src.get(key) is not None:
            out[key] = src[key]
    if sched.get('max_epochs'):
        out['max_epochs'] = sched['max_epochs']
    if seg_cfg.get('num_classes', -1) > 0:
        out['num_classes'] = seg_cfg['num_classes']
    aux = seg_cfg.get('losses', {}).get('loss_aux')
    if aux is not None:
        out['aux_weight'] = aux.get('scale_factor', 1.0)
    for key in ('eval_interval_epochs', 'save_interval_epochs'):
        if key in seg_cfg:
            out[key] = seg_cfg[key]
    if 'log_interval_iters' in seg_cfg.get('logger', {}):
        out['log_interval'] = seg_cfg['logger']['log_interval_iters']
    dl = seg_cfg.get('dataloader', {})
    if 'expected_total_train_bs_for_assert' in dl:
        out['batch_size'] = dl['expected_total_train_bs_for_assert']
    for name, args in seg_cfg.get('dataset', {}).get('train', {}).get('data_pipelines', []):
        if name == 'RandomCrop':
            out['crop_size'] = tuple(args['crop_size'])
        if name == 'Resize':
            out['scale'] = tuple(args['output_size'])
    if 'fp16_cfg' in seg_cfg:
        out['amp'], out['opt_level'], out['amp_dtype'] = _fp16_flat(seg_cfg['fp16_cfg'])
    return out


# what --eval / --predict take from the checkpoint's saved config unless a flag says otherwise: what the model was
# trained on (data kind and root, classes) and how it was meant to be run (test scale, window)
INFERENCE_KEYS = ('data', 'data_root', 'num_classes', 'scale', 'inference_mode', 'slide_crop', 'slide_stride')
# what --resume does not take from the checkpoint's saved config (it takes every other key unless a flag says
# otherwise): the mode, the weights it replaces, the machine (device, workers) and one invocation's stop or TTA
NOT_RESUMED = ('resume', 'eval', 'predict', 'ckpt', 'out', 'summary', 'init', 'pretrained', 'device', 'num_workers',
               'stop_iters', 'tta')


def flag_docs():
    return cli.flag_docs(__file__)


def format_config(cfg):
    """The resolved config in a few lines for the log, grouped as --help groups it."""
    return cli.format_config(cfg, flag_docs())


def parse(seg_cfg=None, argv=None, name='run', notes=None):
    """Resolve the run config: DEFAULTS < recipe(seg_cfg) < DEMO_PRESET (with --data demo) < the checkpoint's saved
    config (--eval/--predict: its INFERENCE_KEYS; --resume: all but NOT_RESUMED) < explicit flags. Any mistake: one
    line on stderr, exit 2. `notes` (a list) receives lines for the log (what came from the checkpoint)."""
    try:
        docs, rec = flag_docs(), recipe(seg_cfg or {})
    except UserError as e:  # the script's SEGMENTOR_CFG: one line naming the key, before any flag is read
        print(f"{name}: error: SEGMENTOR_CFG: {e}", file=sys.stderr)
        sys.exit(2)
    p = cli.build_parser(name, DEFAULTS, CHOICES, docs, {**DEFAULTS, **rec}, DEMO_PRESET, description=(
        "Train, evaluate (--eval) or predict (--predict); each flag is a key of common.config.DEFAULTS. Values "
        "come from the script's SEGMENTOR_CFG unless a flag gives them; tuples: 512, 512,512, 512x512 or '512 512'."))
    given = vars(p.parse_args(argv))  # only the flags on the command line (SUPPRESS keeps the rest out)
    try:
        cfg = _resolve(seg_cfg, rec, given, name, {})
        cli.validate(cfg)  # first: a mistyped path is reported before it is read
        zoo.check_flags(cfg, (seg_cfg or {}).get('type'))  # an unknown ssseg:NAME, or another model's, fails here
        keys = (INFERENCE_KEYS if cfg['eval'] or cfg['predict'] else
                [k for k in DEFAULTS if k not in NOT_RESUMED] if cfg['resume'] else ())
        saved = _checkpoint_config(cfg) if keys else {}
        taken = {k: saved[k] for k in keys if k in saved and k not in given}
        if taken:
            before, cfg = cfg, _resolve(seg_cfg, rec, given, name, taken)
            changed = [f"{k} {cli.show(cfg[k])}" for k in taken if cfg[k] != before[k]]
            if changed and notes is not None:
                notes.append(f"from the checkpoint's config: {', '.join(changed)} (flags override)")
            cli.validate(cfg)
        _check_amp_flags(cfg, given)  # on the final values: --resume may have taken --amp from the checkpoint
    except UserError as e:
        p.exit(2, f"{name}: error: {e}\n")
    return cfg


def _check_amp_flags(cfg, given):
    """An AMP flag given on the command line that the chosen --amp would ignore is a mistake, not a no-op."""
    if 'opt_level' in given and cfg['opt_level'] != 'O1' and cfg['amp'] != 'apex':
        raise UserError(f"--opt_level {cfg['opt_level']}: opt levels are apex's, and --amp is {cfg['amp']}; add "
                        "--amp apex (--amp torch is autocast + GradScaler, apex O1's scheme)")
    if 'amp_dtype' in given and cfg['amp_dtype'] != 'auto' and cfg['amp'] == 'none':
        raise UserError(f"--amp_dtype {cfg['amp_dtype']}: --amp none trains in fp32; give --amp torch or --amp apex "
                        "with it")


def _resolve(seg_cfg, rec, given, name, saved):
    cfg = dict(DEFAULTS)
    cfg.update(rec)
    if given.get('data', saved.get('data', cfg['data'])) == 'demo':
        cfg.update(DEMO_PRESET)
    cfg.update(saved)
    cfg.update(given)
    if 'min_lr' not in given and 'min_lr' not in saved and 'min_lr' not in (seg_cfg or {}).get('scheduler', {}):
        cfg['min_lr'] = cfg['lr'] * 0.01  # PolyScheduler's floor follows the base lr (spec §7), also for --lr X
    if not cfg['work_dir']:
        run = (seg_cfg or {}).get('work_dir') or name
        cfg['work_dir'] = os.path.join('work_dirs', run + ('_demo' if cfg['data'] == 'demo' else ''))
    return cfg


def _checkpoint_config(cfg):
    """The DEFAULTS keys of the run config saved in the --resume / --eval / --ckpt checkpoint; {} for one without
    (ssseg's, a bare state dict). A checkpoint that cannot be found or read is one line here, before the data is
    looked for: the file the user named comes first."""
    from . import checkpoint
    if cfg['resume']:
        flag, spec = 'resume', cfg['resume']
    elif cfg['eval']:
        flag, spec = 'eval', cfg['eval']
    else:
        flag, spec = 'ckpt', cfg['ckpt'] or 'auto'
    if zoo.is_name(spec):
        return {}  # a published ssseg file holds no run config (and is not downloaded just for this)
    try:
        path = checkpoint.resolve(spec, cfg['work_dir'], f'--{flag}')
    except checkpoint.NoCheckpointError as e:
        if cfg['predict'] and not cfg['ckpt']:
            e = (f"--predict needs a checkpoint: pass --ckpt PATH (none given, and none written in {cfg['work_dir']} "
                 f"yet)")
        raise UserError(f"{e}{_demo_hint(cfg) if spec == 'auto' else ''}") from None
    try:  # mmap: only the small config is read here, not the weights
        ck = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        ck = checkpoint.load(path)  # the one-line cause of a damaged file; or a legacy (non-zip) one, read whole
    saved = ck.get('config') if isinstance(ck, dict) else None
    if not isinstance(saved, dict):
        return {}
    return {k: tuple(saved[k]) if isinstance(DEFAULTS[k], tuple) else saved[k] for k in DEFAULTS if k in saved}


def _demo_hint(cfg):
    """Where a demo run's checkpoints are, when the user looked in the ADE20k work dir beside it."""
    demo = cfg['work_dir'].rstrip('/') + '_demo'
    if cfg['data'] != 'demo' and os.path.isfile(os.path.join(demo, 'latest')):
        return f"; the demo runs' checkpoints are in {demo}: add --data demo"
    return ""
