"""DeepLabV3 with a ResNet-50-D8 backbone on ADE20k, trained in mixed precision.

Paper: "Rethinking Atrous Convolution for Semantic Image Segmentation", Chen, Papandreou, Schroff, Adam, 2017,
https://arxiv.org/abs/1706.05587
Recipe: ssseg `configs/fp16/deeplabv3_resnet50os8_apexfp16_ade20k.py`, reported 43.54 mIoU on ADE20k val (spec §0).

    python deeplabv3.py --data_root ADE20k --pretrained resnet50_v1c-2cccc1ad.pth   # 1 GPU, batch 16 on one card
    torchrun --nproc_per_node 8 deeplabv3.py --pretrained resnet50_v1c-2cccc1ad.pth  # the reference: 8 GPUs x 2
    python deeplabv3.py --data demo --device cpu           # smoke run on the synthetic demo data
    python deeplabv3.py --eval path/to/checkpoint.pth      # mIoU of a checkpoint (ours or ssseg's published one)
    python deeplabv3.py --summary                          # parameters and multiply-accumulates per module group
(the flags are common/config.py's DEFAULTS; `python deeplabv3.py --help` lists them)
"""
import torch.nn as nn

from common.backbone import ResNetV1c
from common.config import segmentor_cfg
from common.layers import AdaptiveAvgPool2d, auxiliary_decoder, conv_bn_relu, upsample_concat

# the ssseg config file, key for key (spec §1, §5.3); everything not set here is the shared base in common/config.py
SEGMENTOR_CFG = segmentor_cfg(
    type='Deeplabv3',
    num_classes=150,
    work_dir='deeplabv3_resnet50os8_apexfp16_ade20k',
    # the published numbers used apex O1; the pytorch-native form is
    # {'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {}} (common.config.FP16_CFG_PYTORCH)
    fp16_cfg={'type': 'apex', 'initialize': {'opt_level': 'O1'}, 'scale_loss': {}},
    backbone={
        'type': 'ResNet', 'depth': 50, 'structure_type': 'resnet50conv3x3stem', 'pretrained': True,
        'outstride': 8, 'use_conv3x3_stem': True, 'selected_indices': (2, 3),
    },
    head={
        'in_channels': 2048, 'feats_channels': 512, 'dropout': 0.1,
        'dilations': [1, 12, 24, 36],  # the paper's OS16 ASPP rates (6, 12, 18) doubled for OS8, plus a 1x1 branch
    },
)
SEGMENTOR_CFG['scheduler']['max_epochs'] = 130  # 1263 iters/epoch at batch 16 -> 164,190 iterations (spec §2.3)
SEGMENTOR_CFG['logger']['logfilepath'] = \
    'deeplabv3_resnet50os8_apexfp16_ade20k/deeplabv3_resnet50os8_apexfp16_ade20k.log'


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel 1x1 / dilated 3x3 branches + image pooling, concat, 3x3 bottleneck."""

    def __init__(self, in_channels, out_channels, dilations):
        super().__init__()
        # parallel_branches[i] = [conv (1x1 for d = 1, else 3x3 dilated, padding d), BN, ReLU]
        self.parallel_branches = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(in_channels, out_channels, 1 if d == 1 else 3, dilation=d)) for d in dilations)
        # twin: deeplabv3plus.py DepthwiseSeparableASPP.global_branch / .bottleneck (keys checked by test_models.py).
        # Image pooling = BN on 1x1 maps: training needs > 1 image per BN (batch >= 2, or SyncBN over GPUs); the
        # reference raises the same way at batch 1
        self.global_branch = nn.Sequential(AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels, 1))
        self.bottleneck = nn.Sequential(*conv_bn_relu(out_channels * (len(dilations) + 1), out_channels, 3))

    def forward(self, x):
        # concat order [d1, d12, d24, d36, image pooling LAST] (spec §10.1: mmseg puts it first)
        feats = [branch(x) for branch in self.parallel_branches] + [self.global_branch(x)]
        x = upsample_concat(feats, x.shape[-2:])  # (B, 5*512, H/8, W/8); the 1x1 pooled map is broadcast bilinearly
        return self.bottleneck(x)  # (B, 512, H/8, W/8)


class DeepLabV3(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        head, aux = cfg['head'], cfg['auxiliary']
        self.backbone_net = ResNetV1c()
        self.aspp_net = ASPP(head['in_channels'], head['feats_channels'], head['dilations'])
        self.decoder = nn.Sequential(nn.Dropout2d(head['dropout']), nn.Conv2d(head['feats_channels'], num_classes, 1))
        self.auxiliary_decoder = auxiliary_decoder(num_classes, aux['in_channels'], aux['out_channels'],
                                                   aux['dropout'])

    def forward(self, x):
        _, _, c3, c4 = self.backbone_net(x)  # c3 (B, 1024, H/8, W/8), c4 (B, 2048, H/8, W/8)
        out = self.decoder(self.aspp_net(c4))  # (B, K, H/8, W/8); upsampling to the crop happens in the loss
        if not self.training:
            return {'out': out}
        return {'out': out, 'aux': self.auxiliary_decoder(c3)}  # aux head on layer3 (spec §5)


def build_model(cfg=None, num_classes=150):
    """Pure constructor: random init, no I/O (the trainer loads the ImageNet backbone)."""
    return DeepLabV3(SEGMENTOR_CFG if cfg is None else cfg, num_classes)


def main(argv=None):
    from common import train  # imported here, so that importing this script stays light and side-effect free
    return train.main(SEGMENTOR_CFG, build_model, argv)


if __name__ == "__main__":
    main()
