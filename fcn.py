"""FCN with a ResNet-50-D8 backbone on ADE20k, trained in mixed precision.

Paper: "Fully Convolutional Networks for Semantic Segmentation", Long, Shelhamer, Darrell, CVPR 2015,
https://arxiv.org/abs/1411.4038 (here in its dilated-backbone form: two 3x3 convs on layer4 at output stride 8).
Recipe: ssseg `configs/fp16/fcn_resnet50os8_apexfp16_ade20k.py`, reported 36.67 mIoU on ADE20k val (spec §0).

    python fcn.py --data_root ADE20k --pretrained resnet50_v1c-2cccc1ad.pth   # 1 GPU, batch 16 on one card
    torchrun --nproc_per_node 8 fcn.py --pretrained resnet50_v1c-2cccc1ad.pth  # the reference: 8 GPUs x 2 images
    python fcn.py --data demo --device cpu           # smoke run on the synthetic demo data
    python fcn.py --eval path/to/checkpoint.pth      # mIoU of a checkpoint (ours or ssseg's published one)
    python fcn.py --summary                          # parameters and multiply-accumulates per module group
(the flags are common/config.py's DEFAULTS; `python fcn.py --help` lists them)
"""
import torch.nn as nn

from common.backbone import ResNetV1c
from common.config import segmentor_cfg
from common.layers import auxiliary_decoder, conv_bn_relu

# the ssseg config file, key for key (spec §1, §5.1); everything not set here is the shared base in common/config.py
SEGMENTOR_CFG = segmentor_cfg(
    type='FCN',
    num_classes=150,
    work_dir='fcn_resnet50os8_apexfp16_ade20k',
    # the published numbers used apex O1; the pytorch-native form is
    # {'type': 'pytorch', 'autocast': {'dtype': torch.float16}, 'grad_scaler': {}} (common.config.FP16_CFG_PYTORCH)
    fp16_cfg={'type': 'apex', 'initialize': {'opt_level': 'O1'}, 'scale_loss': {}},
    backbone={
        'type': 'ResNet', 'depth': 50, 'structure_type': 'resnet50conv3x3stem', 'pretrained': True,
        'outstride': 8, 'use_conv3x3_stem': True, 'selected_indices': (2, 3),
    },
    head={'in_channels': 2048, 'feats_channels': 512, 'dropout': 0.1},  # num_convs defaults to 2
)
SEGMENTOR_CFG['scheduler']['max_epochs'] = 130  # 1263 iters/epoch at batch 16 -> 164,190 iterations (spec §2.3)
SEGMENTOR_CFG['logger']['logfilepath'] = 'fcn_resnet50os8_apexfp16_ade20k/fcn_resnet50os8_apexfp16_ade20k.log'


class FCN(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        head, aux = cfg['head'], cfg['auxiliary']
        num_convs = head.get('num_convs', 2)
        self.backbone_net = ResNetV1c()
        # decoder = num_convs x [conv3x3, BN, ReLU], Dropout2d, conv1x1 -> keys decoder.{0,1,3,4,7}.* for num_convs 2.
        # ssseg's FCN has no concat-input / conv_cat (unlike mmseg's FCNHead, spec §10.2)
        convs = []
        for i in range(num_convs):
            convs += conv_bn_relu(head['in_channels'] if i == 0 else head['feats_channels'], head['feats_channels'], 3)
        self.decoder = nn.Sequential(*convs, nn.Dropout2d(head['dropout']),
                                     nn.Conv2d(head['feats_channels'], num_classes, 1))
        self.auxiliary_decoder = auxiliary_decoder(num_classes, aux['in_channels'], aux['out_channels'],
                                                   aux['dropout'])

    def forward(self, x):
        _, _, c3, c4 = self.backbone_net(x)  # c3 (B, 1024, H/8, W/8), c4 (B, 2048, H/8, W/8)
        out = self.decoder(c4)  # (B, K, H/8, W/8); upsampling to the crop happens in the loss
        if not self.training:
            return {'out': out}
        return {'out': out, 'aux': self.auxiliary_decoder(c3)}  # aux head on layer3 (spec §5)


def build_model(cfg=None, num_classes=150):
    """Pure constructor: random init, no I/O (the trainer loads the ImageNet backbone)."""
    return FCN(SEGMENTOR_CFG if cfg is None else cfg, num_classes)


def main(argv=None):
    from common import train  # imported here, so that importing this script stays light and side-effect free
    return train.main(SEGMENTOR_CFG, build_model, argv)


if __name__ == "__main__":
    main()
