"""common.summary: our MAC counter against torchvision's published figures and torch's own flop counter."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from common.summary import count_macs, summarize

# torchvision's model metadata (docs "GFLOPS", meta "_ops"; they are multiply-accumulates): eval, 1x3x520x520
# (weights.transforms() resizes to 520), 21 classes, aux head on. torchvision counts conv / matmul multiplications only
# (test/common_extended_utils.py: conv = batch * prod(weight.shape) * output pixels; no BN, bias, pooling, resize)
PUBLISHED = {  # name: (GMACs, params in M)
    "fcn_resnet50": (152.717, 35.322),
    "deeplabv3_resnet50": (178.722, 42.004),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_torchvision_published_figures(name):
    import torchvision.models.segmentation as seg
    model = getattr(seg, name)(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    gmacs, mparams = PUBLISHED[name]
    macs = sum(count_macs(model, (1, 3, 520, 520)).values())
    assert round(macs / 1e9, 3) == gmacs  # the docs show 152.72 / 178.72; the meta file 3 decimals
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == mparams
    table = summarize(model, (1, 3, 520, 520))
    assert table.splitlines()[-1].split()[1:] == [f"{mparams:.3f}", f"{gmacs:.2f}"]


def test_matches_torch_flop_counter_on_groups_dilation_linear():
    # an independent reference: torch.utils.flop_counter counts 2 FLOPs per MAC for conv and linear
    model = nn.Sequential(nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(12),
                          nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),
                          nn.ConvTranspose2d(12, 4, 3, stride=2),  # MACs from every input pixel (none in our models)
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    x = torch.randn(3, 6, 17, 23)
    with FlopCounterMode(display=False) as fc:
        model(x)
    macs = count_macs(model, tuple(x.shape))
    assert sum(macs.values()) * 2 == fc.get_total_flops()
    assert macs["2"] == 3 * 12 * 9 * 9 * 12  # depthwise: 9 MACs per output element (groups divide the weight)


def test_our_model_groups_and_batch_one():
    import deeplabv3plus
    model = deeplabv3plus.build_model()
    # batch 1 must work although the image-pooling BN would refuse it in training (the counter runs 2 and halves)
    one = count_macs(model, (1, 3, 64, 96))
    two = count_macs(model, (2, 3, 64, 96))
    assert all(two[k] == 2 * one[k] for k in one)
    table = summarize(model, (1, 3, 64, 96))
    groups = {line.split()[0]: float(line.split()[1]) for line in table.splitlines()[1:] if not line.startswith(" ")}
    assert set(groups) == {"backbone", "head", "auxiliary", "total"}
    assert groups["total"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-3)
    assert groups["backbone"] == pytest.approx(sum(p.numel() for p in model.backbone_net.parameters()) / 1e6, abs=1e-3)
    children = {line.split()[0]: float(line.split()[1]) for line in table.splitlines() if line.startswith("  ")}
    for child in ("backbone_net.stem", "backbone_net.layer4", "aspp_net", "decoder", "auxiliary_decoder"):  # per child
        assert children[child] == pytest.approx(sum(p.numel() for p in model.get_submodule(child).parameters()) / 1e6,
                                                abs=1e-3), child
    with FlopCounterMode(display=False) as fc:  # and against torch's counter on the real model, meta input
        model.train().to("meta")(torch.empty(2, 3, 64, 96, device="meta"))
    assert sum(two.values()) * 2 == fc.get_total_flops()
