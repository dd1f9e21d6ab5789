"""PSPNet with a ResNet-50-D8 backbone on ADE20k, trained in mixed precision.

Paper: "Pyramid Scene Parsing Network", Zhao, Shi, Qi, Wang, Jia, CVPR 2017, https://arxiv.org/abs/1612.01105
Recipe: ssseg `configs/fp16/pspnet_resnet50os8_apexfp16_ade20k.py`, reported 42.06 mIoU on ADE20k val (spec §0).

    python pspnet.py --data_root ADE20k --pretrained resnet50_v1c-2cccc1ad.pth   # 1 GPU, batch 16 on one card
    torchrun --nproc_per_node 8 pspnet.py --pretrained resnet50_v1c-2cccc1ad.pth  # the reference: 8 GPUs x 2 images
    python pspnet.py --data demo --device cpu           # smoke run on the synthetic demo data
    python pspnet.py --eval path/to/checkpoint.pth      # mIoU of a checkpoint (ours or ssseg's published one)
    python pspnet.py --summary                          # parameters and multiply-accumulates per module group
(the flags are common/config.py's DEFAULTS; `python pspnet.py --help` lists them)
"""
import torch.nn as nn

from common.backbone import ResNetV1c
from common.config import segmentor_cfg
from common.layers import AdaptiveAvgPool2d, auxiliary_decoder, conv_bn_relu, upsample_concat

# the ssseg config file, key for key (spec §1, §5.2); everything not set here is the shared base in common/config.py
SEGMENTOR_CFG = segmentor_cfg(
    type='PSPNet',
    num_classes=150,
    work_dir='pspnet_resnet50os8_apexfp16_ade20k',
    # the published numbers used apex O1; the pytorch-native form is
    # {'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {}} (common.config.FP16_CFG_PYTORCH)
    fp16_cfg={'type': 'apex', 'initialize': {'opt_level': 'O1'}, 'scale_loss': {}},
    backbone={
        'type': 'ResNet', 'depth': 50, 'structure_type': 'resnet50conv3x3stem', 'pretrained': True,
        'outstride': 8, 'use_conv3x3_stem': True, 'selected_indices': (2, 3),
    },
    head={
        'in_channels': 2048, 'feats_channels': 512, 'dropout': 0.1,
        'pool_scales': [1, 2, 3, 6],  # bin sizes of the paper's pyramid pooling module (§3.3)
    },
)
SEGMENTOR_CFG['scheduler']['max_epochs'] = 130  # 1263 iters/epoch at batch 16 -> 164,190 iterations (spec §2.3)
SEGMENTOR_CFG['logger']['logfilepath'] = 'pspnet_resnet50os8_apexfp16_ade20k/pspnet_resnet50os8_apexfp16_ade20k.log'


class PyramidPoolingModule(nn.Module):
    """Average-pool layer4 to s x s bins, 1x1 conv each, upsample back, concat with the input, 3x3 bottleneck."""

    def __init__(self, pool_scales, in_channels, out_channels):
        super().__init__()
        # branches[i] = [AdaptiveAvgPool2d(s), conv1x1, BN, ReLU] -> keys branches.i.1.weight, branches.i.2.*
        # (scale 1 runs BN on 1x1 maps: training needs > 1 image per BN, i.e. batch >= 2 or SyncBN over GPUs)
        self.branches = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool2d(s), *conv_bn_relu(in_channels, out_channels, 1)) for s in pool_scales)
        self.bottleneck = nn.Sequential(
            *conv_bn_relu(in_channels + len(pool_scales) * out_channels, out_channels, 3))

    def forward(self, x):
        # concat order [x, s1, s2, s3, s6] (spec §5.2): the bottleneck's input channels depend on it
        x = upsample_concat([x] + [branch(x) for branch in self.branches], x.shape[-2:])  # (B, 2048 + 4*512, H/8, W/8)
        return self.bottleneck(x)  # (B, 512, H/8, W/8)


class PSPNet(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        head, aux = cfg['head'], cfg['auxiliary']
        self.backbone_net = ResNetV1c()
        self.ppm_net = PyramidPoolingModule(head['pool_scales'], head['in_channels'], head['feats_channels'])
        self.decoder = nn.Sequential(nn.Dropout2d(head['dropout']), nn.Conv2d(head['feats_channels'], num_classes, 1))
        self.auxiliary_decoder = auxiliary_decoder(num_classes, aux['in_channels'], aux['out_channels'],
                                                   aux['dropout'])

    def forward(self, x):
        _, _, c3, c4 = self.backbone_net(x)  # c3 (B, 1024, H/8, W/8), c4 (B, 2048, H/8, W/8)
        out = self.decoder(self.ppm_net(c4))  # (B, K, H/8, W/8); upsampling to the crop happens in the loss
        if not self.training:
            return {'out': out}
        return {'out': out, 'aux': self.auxiliary_decoder(c3)}  # aux head on layer3 (spec §5)


def build_model(cfg=None, num_classes=150):
    """Pure constructor: random init, no I/O (the trainer loads the ImageNet backbone)."""
    return PSPNet(SEGMENTOR_CFG if cfg is None else cfg, num_classes)


def main(argv=None):
    from common import train  # imported here, so that importing this script stays light and side-effect free
    return train.main(SEGMENTOR_CFG, build_model, argv)


if __name__ == "__main__":
    main()
