"""DeepLabV3+ with a ResNet-50-D8 backbone on ADE20k, trained in mixed precision.

Paper: "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation", Chen, Zhu, Papandreou,
Schroff, Adam, ECCV 2018, https://arxiv.org/abs/1802.02611
Recipe: ssseg `configs/fp16/deeplabv3plus_resnet50os8_apexfp16_ade20k.py`, reported 43.87 mIoU on ADE20k val (spec §0).

    python deeplabv3plus.py --data_root ADE20k --pretrained resnet50_v1c-2cccc1ad.pth   # 1 GPU, batch 16 on one card
    torchrun --nproc_per_node 8 deeplabv3plus.py --pretrained resnet50_v1c-2cccc1ad.pth  # the reference: 8 GPUs x 2
    python deeplabv3plus.py --data demo --device cpu           # smoke run on the synthetic demo data
    python deeplabv3plus.py --eval path/to/checkpoint.pth      # mIoU of a checkpoint (ours or ssseg's published one)
    python deeplabv3plus.py --summary                          # parameters and multiply-accumulates per module group
(the flags are common/config.py's DEFAULTS; `python deeplabv3plus.py --help` lists them)
"""
import torch.nn as nn

from common.backbone import ResNetV1c
from common.config import segmentor_cfg
from common.layers import AdaptiveAvgPool2d, auxiliary_decoder, conv_bn_relu, upsample_concat

# the ssseg config file, key for key (spec §1, §5.4); everything not set here is the shared base in common/config.py
SEGMENTOR_CFG = segmentor_cfg(
    type='Deeplabv3Plus',
    num_classes=150,
    work_dir='deeplabv3plus_resnet50os8_apexfp16_ade20k',
    # the published numbers used apex O1; the pytorch-native form is
    # {'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {}} (common.config.FP16_CFG_PYTORCH)
    fp16_cfg={'type': 'apex', 'initialize': {'opt_level': 'O1'}, 'scale_loss': {}},
    backbone={
        'type': 'ResNet', 'depth': 50, 'structure_type': 'resnet50conv3x3stem', 'pretrained': True,
        'outstride': 8, 'use_conv3x3_stem': True, 'selected_indices': (0, 1, 2, 3),
    },
    head={
        'in_channels': [256, 2048],  # layer1 for the shortcut, layer4 for the ASPP
        'feats_channels': 512, 'dropout': 0.1,
        'shortcut_channels': 48,  # low-level features squeezed to 48 channels (paper §4.1)
        'dilations': [1, 12, 24, 36],  # the paper's OS16 ASPP rates (6, 12, 18) doubled for OS8, plus a 1x1 branch
    },
)
SEGMENTOR_CFG['scheduler']['max_epochs'] = 130  # 1263 iters/epoch at batch 16 -> 164,190 iterations (spec §2.3)
SEGMENTOR_CFG['logger']['logfilepath'] = \
    'deeplabv3plus_resnet50os8_apexfp16_ade20k/deeplabv3plus_resnet50os8_apexfp16_ade20k.log'


class DepthwiseSeparableConv2d(nn.Module):
    """k x k depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (BN+ReLU after BOTH, spec §10.2)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, dilation=1):
        super().__init__()
        self.depthwise_conv, self.depthwise_bn, _ = conv_bn_relu(in_channels, in_channels, kernel_size,
                                                                 dilation=dilation, groups=in_channels)
        self.pointwise_conv, self.pointwise_bn, _ = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x):
        x = self.depthwise_bn(self.depthwise_conv(x))  # (B, C_in, H, W)
        return self.pointwise_bn(self.pointwise_conv(x))  # (B, C_out, H, W)


class DepthwiseSeparableASPP(nn.Module):
    """ASPP whose dilated branches are depthwise-separable; the 1x1 branch, image pooling and bottleneck are plain."""

    def __init__(self, in_channels, out_channels, dilations):
        super().__init__()
        self.parallel_branches = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(in_channels, out_channels, 1)) if d == 1 else
            DepthwiseSeparableConv2d(in_channels, out_channels, 3, dilation=d) for d in dilations)
        # twin: deeplabv3.py ASPP.global_branch / .bottleneck (keys checked by test_models.py).
        # Image pooling = BN on 1x1 maps: training needs > 1 image per BN (batch >= 2, or SyncBN over GPUs); the
        # reference raises the same way at batch 1
        self.global_branch = nn.Sequential(AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels, 1))
        self.bottleneck = nn.Sequential(*conv_bn_relu(out_channels * (len(dilations) + 1), out_channels, 3))

    def forward(self, x):
        # concat order [d1, d12, d24, d36, image pooling LAST] (spec §10.1: mmseg puts it first)
        feats = [branch(x) for branch in self.parallel_branches] + [self.global_branch(x)]
        x = upsample_concat(feats, x.shape[-2:])  # (B, 5*512, H/8, W/8); the 1x1 pooled map is broadcast bilinearly
        return self.bottleneck(x)  # (B, 512, H/8, W/8)


class DeepLabV3Plus(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        head, aux = cfg['head'], cfg['auxiliary']
        low_channels, high_channels = head['in_channels']
        feats, short = head['feats_channels'], head['shortcut_channels']
        self.backbone_net = ResNetV1c()
        self.aspp_net = DepthwiseSeparableASPP(high_channels, feats, head['dilations'])
        self.shortcut = nn.Sequential(*conv_bn_relu(low_channels, short, 1))
        self.decoder = nn.Sequential(DepthwiseSeparableConv2d(feats + short, feats, 3),
                                     DepthwiseSeparableConv2d(feats, feats, 3),
                                     nn.Dropout2d(head['dropout']), nn.Conv2d(feats, num_classes, 1))
        self.auxiliary_decoder = auxiliary_decoder(num_classes, aux['in_channels'], aux['out_channels'],
                                                   aux['dropout'])

    def forward(self, x):
        c1, _, c3, c4 = self.backbone_net(x)  # c1 (B, 256, H/4, W/4), c3 (B, 1024, H/8, W/8), c4 (B, 2048, H/8, W/8)
        # concat order [ASPP upsampled to layer1's size, shortcut] (spec §5.4)
        feats = upsample_concat([self.aspp_net(c4), self.shortcut(c1)], c1.shape[-2:])  # (B, 512 + 48, H/4, W/4)
        out = self.decoder(feats)  # (B, K, H/4, W/4); upsampling to the crop happens in the loss
        if not self.training:
            return {'out': out}
        return {'out': out, 'aux': self.auxiliary_decoder(c3)}  # aux head on layer3 here too (spec §10.5)


def build_model(cfg=None, num_classes=150):
    """Pure constructor: random init, no I/O (the trainer loads the ImageNet backbone)."""
    return DeepLabV3Plus(SEGMENTOR_CFG if cfg is None else cfg, num_classes)


def main(argv=None):
    from common import train  # imported here, so that importing this script stays light and side-effect free
    return train.main(SEGMENTOR_CFG, build_model, argv)


if __name__ == "__main__":
    main()
