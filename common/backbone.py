"""ResNet-50 v1c (deep 3x3 stem) at output stride 8, key for key the mmcv / ssseg layout (spec §4).

Returns the four stage outputs (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 1024, H/8, W/8), (B, 2048, H/8, W/8).
ImageNet weights: the openmmlab resnet50_v1c checkpoint, loaded strictly except for the classifier (spec §10.16).
"""
import os
import urllib.parse

import torch
import torch.nn as nn

from . import dist
from .checkpoint import check_matches, few, load, model_state
from .errors import MissingFile, UserError
from .layers import conv_bn_relu

# output stride 8 (spec §4): layer3/4 trade their stride for dilation, so the maps stay at 1/8.
# contract_dilation: the first block of a dilated stage uses d // 2 (layer3 [1, 2, 2, 2, 2, 2], layer4 [2, 4, 4]).
STAGES = [  # (planes, blocks, stride, dilation)
    (64, 3, 1, 1),
    (128, 4, 2, 1),
    (256, 6, 1, 2),
    (512, 3, 1, 4),
]
EXPANSION = 4

PRETRAINED_URLS = {
    'resnet50conv3x3stem': 'https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth',
}
PRETRAINED_IGNORE = ('fc.',)  # ImageNet classifier: in the checkpoint, not in a segmentation backbone


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation; 'pytorch' style: the stride sits on the 3x3) -> 1x1, then relu(bn3 + identity)."""

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1, _ = conv_bn_relu(inplanes, planes, 1)
        self.conv2, self.bn2, _ = conv_bn_relu(planes, planes, 3, stride=stride, dilation=dilation)
        # bn3's ReLU comes after the residual add, which BatchNormAct2d takes as its second argument
        self.conv3, self.bn3, _ = conv_bn_relu(planes, planes * EXPANSION, 1)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), residual=identity)  # relu(bn3(conv3(out)) + identity)


def make_stage(inplanes, planes, blocks, stride, dilation):
    # every stage's first block changes the channel count, so it always has a downsample (stride 1 for layer1/3/4)
    downsample = nn.Sequential(*conv_bn_relu(inplanes, planes * EXPANSION, 1, stride=stride, relu=False)[:2])
    first_dilation = dilation // 2 if dilation > 1 else dilation  # contract_dilation
    layers = [Bottleneck(inplanes, planes, stride, first_dilation, downsample)]
    layers += [Bottleneck(planes * EXPANSION, planes, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetV1c(nn.Module):
    def __init__(self, stages=STAGES):
        super().__init__()
        # deep stem 3 -> 32 -> 32 -> 64, indices 0..8 with the ReLUs (Identity placeholders) at 2, 5, 8
        self.stem = nn.Sequential(*conv_bn_relu(3, 32, 3, stride=2), *conv_bn_relu(32, 32, 3),
                                  *conv_bn_relu(32, 64, 3))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride, dilation) in enumerate(stages):
            setattr(self, f"layer{i + 1}", make_stage(inplanes, planes, blocks, stride, dilation))
            inplanes = planes * EXPANSION

    def forward(self, x):
        x = self.maxpool(self.stem(x))  # (B, 64, H/4, W/4)
        c1 = self.layer1(x)  # (B, 256, H/4, W/4)
        c2 = self.layer2(c1)  # (B, 512, H/8, W/8)
        c3 = self.layer3(c2)  # (B, 1024, H/8, W/8)
        c4 = self.layer4(c3)  # (B, 2048, H/8, W/8)
        return c1, c2, c3, c4


def load_pretrained(backbone, path_or_url, log=print, ignore=PRETRAINED_IGNORE):
    """Load ImageNet weights into `backbone` strictly, except keys starting with an `ignore` prefix; log one line.

    `path_or_url`: a local file, a key of PRETRAINED_URLS, or an http(s) URL (downloaded into the torch hub cache,
    for users with internet). Accepts {'model': sd}, {'state_dict': sd} or a bare state dict, 'backbone.' prefixed
    (mmseg) or not. Unlike ssseg's strict=False, any other missing or unexpected key, or a wrong shape, is a
    BadFileError naming it (BN step counters may be absent).
    """
    src = PRETRAINED_URLS.get(path_or_url, path_or_url)
    if src.startswith(("http://", "https://")):
        # torch.hub's cache file (load_state_dict_from_url's), read by us: a damaged copy is one line naming it
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(src).path))
        try:
            with dist.local_main_first():  # under torchrun one rank per machine downloads; the others find it cached
                if not os.path.isfile(cached):
                    os.makedirs(os.path.dirname(cached), exist_ok=True)
                    torch.hub.download_url_to_file(src, cached, progress=False)  # via a temp file: whole or absent
        except OSError as e:  # URLError is an OSError: no internet, proxy, 404 ...
            raise UserError(f"--pretrained: could not download the pretrained weights {src} ({e}). Download "
                               f"them elsewhere and pass the file with --pretrained PATH, or train from scratch with "
                               f"--pretrained none") from e
        sd = load(cached, instead="delete it, and the next run downloads it again")
    elif os.path.isfile(src):
        sd = load(src, instead="download it again")  # a damaged or foreign file: one line naming it
    else:
        raise MissingFile(f"--pretrained {path_or_url!r}: neither a file, a URL nor a key of PRETRAINED_URLS "
                                f"(download {PRETRAINED_URLS['resnet50conv3x3stem']} and pass its path)")
    sd = model_state(sd, f"--pretrained {path_or_url}")
    # a segmentor's file (mmseg's 'backbone.', ours and ssseg's 'backbone_net.'): its backbone, as mmseg's Pretrained
    # init with a prefix takes it; ImageNet files have no prefix
    prefix = next((p for p in ("backbone.", "backbone_net.") if any(k.startswith(p) for k in sd)), None)
    if prefix:
        rest = sum(not k.startswith(prefix) for k in sd)
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if rest:
            log(f"pretrained {path_or_url}: a whole segmentor's file: its backbone only ({len(sd)} tensors; --init "
                f"starts from all {len(sd) + rest})")
    ignored = [k for k in sd if k.startswith(tuple(ignore))]
    sd = {k: v for k, v in sd.items() if k not in set(ignored)}
    own = backbone.state_dict()
    # files converted from other frameworks often lack BN's step counters, which momentum 0.1 never reads: ours (0 in
    # a new model) stay, as mmcv's loader allows; any other absent key is an error
    counters = [k for k in own if k.endswith(".num_batches_tracked") and k not in sd]
    sd.update({k: own[k] for k in counters})
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    log(f"pretrained {path_or_url}: loaded {len(own) - len(missing) - len(counters)} / missing {few(missing)} / "
        f"unexpected {few(unexpected)} / ignored {len(ignored)}"
        + (f" / BN step counters absent from the file, left as they are: {len(counters)}" if counters else ""))
    check_matches(backbone, sd, f"--pretrained {path_or_url}",
                  hint=f"not the ResNet-50 v1c ImageNet weights? only {list(ignore)} may be skipped")
    backbone.load_state_dict(sd, strict=True)
    return backbone
