"""The reference recipe as data (top, MODELS) and the run config + CLI (bottom, TRAINER).

Top: ssseg's base FP16 segmentor config (spec §1), its ADE20k 512x512 dataset (§2) and its batch-16 dataloader
(§2.3) as nested dicts with the reference's keys. Each script builds its SEGMENTOR_CFG from them with
`segmentor_cfg(...)`, the way an ssseg config file deep-copies the base and overwrites a few entries.
"""
import copy

import torch

# ---- reference base config (MODELS): ssseg/configs/_base_/segmentors/fp16.py and friends, spec §1-§2

# the two fp16_cfg shapes the ssseg FP16 README documents (spec §9); the published numbers used apex O1
FP16_CFG_APEX = {'type': 'apex', 'initialize': {'opt_level': 'O1'}, 'scale_loss': {}}
FP16_CFG_PYTORCH = {'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {}}

# ImageNet normalisation on the 0-255 scale, RGB order (the pipeline converts cv2's BGR first, spec §2.1 step 5)
_NORMALIZE = ('Normalize', {'mean': [123.675, 116.28, 103.53], 'std': [58.395, 57.12, 57.375], 'to_rgb': True})

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
