"""The four segmentors and their building blocks vs spec §4/§5: keys, shapes, dilations, concat orders, loading."""
import ast
import importlib
import io
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common.layers as layers
from common.backbone import PRETRAINED_URLS, ResNetV1c, load_pretrained
from common.config import BASE_SEGMENTOR_CFG, FP16_CFG_APEX, FP16_CFG_PYTORCH
from common.errors import BadFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["fcn", "pspnet", "deeplabv3", "deeplabv3plus"]
COUNTS = {"fcn": 352, "pspnet": 370, "deeplabv3": 376, "deeplabv3plus": 424}  # spec §5


# ---- the reference layout, written out from the spec's text (independently of the model code)

def bn(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
            f"{p}.num_batches_tracked": ()}


def conv(p, cout, cin, k):
    return {f"{p}.weight": (cout, cin, k, k)}


def spec_backbone(prefix=""):
    keys = {}
    for i, (cin, cout) in enumerate([(3, 32), (32, 32), (32, 64)]):  # stem convs at 0, 3, 6, BNs at 1, 4, 7
        keys |= conv(f"{prefix}stem.{3 * i}", cout, cin, 3) | bn(f"{prefix}stem.{3 * i + 1}", cout)
    inplanes = 64
    for s, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            p = f"{prefix}layer{s + 1}.{b}"
            cin = inplanes if b == 0 else 4 * planes
            keys |= conv(f"{p}.conv1", planes, cin, 1) | bn(f"{p}.bn1", planes)
            keys |= conv(f"{p}.conv2", planes, planes, 3) | bn(f"{p}.bn2", planes)
            keys |= conv(f"{p}.conv3", 4 * planes, planes, 1) | bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                keys |= conv(f"{p}.downsample.0", 4 * planes, cin, 1) | bn(f"{p}.downsample.1", 4 * planes)
        inplanes = 4 * planes
    return keys


def spec_keys(name, K=150):
    keys = spec_backbone("backbone_net.")
    keys |= conv("auxiliary_decoder.0", 512, 1024, 3) | bn("auxiliary_decoder.1", 512)
    keys |= {"auxiliary_decoder.4.weight": (K, 512, 1, 1), "auxiliary_decoder.4.bias": (K,)}
    cls = {"fcn": "decoder.7", "pspnet": "decoder.1", "deeplabv3": "decoder.1", "deeplabv3plus": "decoder.3"}[name]
    keys |= {f"{cls}.weight": (K, 512, 1, 1), f"{cls}.bias": (K,)}
    if name == "fcn":
        keys |= conv("decoder.0", 512, 2048, 3) | bn("decoder.1", 512)
        keys |= conv("decoder.3", 512, 512, 3) | bn("decoder.4", 512)
    if name == "pspnet":
        for i in range(4):
            keys |= conv(f"ppm_net.branches.{i}.1", 512, 2048, 1) | bn(f"ppm_net.branches.{i}.2", 512)
        keys |= conv("ppm_net.bottleneck.0", 512, 4096, 3) | bn("ppm_net.bottleneck.1", 512)
    if name in ("deeplabv3", "deeplabv3plus"):
        keys |= conv("aspp_net.parallel_branches.0.0", 512, 2048, 1) | bn("aspp_net.parallel_branches.0.1", 512)
        keys |= conv("aspp_net.global_branch.1", 512, 2048, 1) | bn("aspp_net.global_branch.2", 512)
        keys |= conv("aspp_net.bottleneck.0", 512, 2560, 3) | bn("aspp_net.bottleneck.1", 512)
    if name == "deeplabv3":
        for i in (1, 2, 3):
            p = f"aspp_net.parallel_branches.{i}"
            keys |= conv(f"{p}.0", 512, 2048, 3) | bn(f"{p}.1", 512)
    if name == "deeplabv3plus":
        def ds(p, cin, cout):
            return ({f"{p}.depthwise_conv.weight": (cin, 1, 3, 3)} | bn(f"{p}.depthwise_bn", cin)
                    | conv(f"{p}.pointwise_conv", cout, cin, 1) | bn(f"{p}.pointwise_bn", cout))
        for i in (1, 2, 3):
            keys |= ds(f"aspp_net.parallel_branches.{i}", 2048, 512)
        keys |= conv("shortcut.0", 48, 256, 1) | bn("shortcut.1", 48)
        keys |= ds("decoder.0", 560, 512) | ds("decoder.1", 512, 512)
    return keys


@pytest.fixture(scope="module")
def models():
    return {n: importlib.import_module(n).build_model() for n in NAMES}


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# ---- keys, shapes, loading

@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_the_reference_layout(models, name):
    sd = models[name].state_dict()
    assert len(sd) == COUNTS[name] == len(spec_keys(name))
    assert shapes(sd) == spec_keys(name)


def constants(layout):
    # a distinct value per key catches same-shaped tensors landing in each other's place; expand() keeps a saved
    # file tiny (one element of storage per tensor), so the round trips below cost nothing
    return {k: torch.tensor(i, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32).expand(s)
            for i, (k, s) in enumerate(layout.items())}


@pytest.mark.parametrize("name", NAMES)
def test_reference_checkpoint_round_trip(name):
    # a checkpoint in the published layout, made from the spec's key list alone, loads strictly in both forms
    ref = constants(spec_keys(name))
    buf = io.BytesIO()
    torch.save({"model": ref}, buf)
    published = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    for sd in (published["model"], ref):  # {'model': sd} as ssseg publishes it, and a bare state dict
        with torch.device("meta"):
            model = importlib.import_module(name).build_model()
        model.load_state_dict(sd, strict=True, assign=True)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def mmcv_v1c_checkpoint():
    sd = constants(spec_backbone())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return sd


def test_another_scripts_checkpoint_names_that_script(models):
    from common import checkpoint
    for name, other in (("pspnet", "fcn"), ("fcn", "deeplabv3plus"), ("deeplabv3plus", "deeplabv3")):
        with pytest.raises(BadFileError, match=rf"x\.pth: does not match this model \(its \d+ tensors are {other}'s: "
                                               rf"run {other}\.py\)"):
            checkpoint.check_matches(models[name], models[other].state_dict(), "x.pth")
    sd = models["fcn"].state_dict()
    del sd[next(iter(sd))]  # a count no script has: the usual hint
    with pytest.raises(BadFileError, match=r"another model or --num_classes\?"):
        checkpoint.check_matches(models["fcn"], sd, "x.pth")


def test_load_pretrained_report_and_strictness(tmp_path):
    backbone, sd = ResNetV1c(), mmcv_v1c_checkpoint()
    for i, ckpt in enumerate([sd, {"state_dict": sd}, {"model": {"backbone." + k: v for k, v in sd.items()}}]):
        torch.save(ckpt, tmp_path / f"ok{i}.pth")
        lines = []
        load_pretrained(backbone, str(tmp_path / f"ok{i}.pth"), log=lines.append)
        assert len(lines) == 1 and "loaded 330 / missing 0 / unexpected 0 / ignored 2" in lines[0]
        assert all(torch.equal(backbone.state_dict()[k], v) for k, v in sd.items() if not k.startswith("fc."))

    broken = dict(sd)
    del broken["layer1.0.conv1.weight"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "bad.pth")
    lines = []
    with pytest.raises(BadFileError, match=r"bad\.pth: does not match.*layer1\.0\.conv1\.weight.*layer5\.0\.conv1"):
        load_pretrained(ResNetV1c(), str(tmp_path / "bad.pth"), log=lines.append)
    assert "loaded 329 / missing 1 (layer1.0.conv1.weight) / unexpected 1 (layer5.0.conv1.weight)" in lines[0]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(backbone, str(tmp_path / "nope.pth"))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok0.pth").read_bytes()[:1000])
    with pytest.raises(BadFileError, match="cut.pth: truncated or corrupt"):
        load_pretrained(backbone, str(tmp_path / "cut.pth"))
    assert PRETRAINED_URLS["resnet50conv3x3stem"].endswith("resnet50_v1c-2cccc1ad.pth")


def test_load_pretrained_by_url_downloads_once_and_names_a_damaged_cache_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    downloads = []

    def download(url, dst, progress=True):  # what torch.hub would fetch: an ImageNet file
        downloads.append(url)
        torch.save(mmcv_v1c_checkpoint(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = PRETRAINED_URLS["resnet50conv3x3stem"]
    cached = tmp_path / "hub" / "checkpoints" / "resnet50_v1c-2cccc1ad.pth"
    for _ in range(2):
        lines = []
        load_pretrained(ResNetV1c(), "resnet50conv3x3stem", log=lines.append)
        assert "loaded 330 / missing 0" in lines[0]
    assert downloads == [url] and cached.is_file()  # the second run read the cache
    cached.write_bytes(cached.read_bytes()[:1000])  # a copy cut short (a user's offline copy, a full disk)
    with pytest.raises(BadFileError, match=r"resnet50_v1c-2cccc1ad\.pth: truncated or corrupt .*delete it, and the "
                       r"next run downloads it again"):
        load_pretrained(ResNetV1c(), "resnet50conv3x3stem")


def test_load_pretrained_takes_the_backbone_of_a_whole_segmentors_file(tmp_path):
    sd = {"backbone_net." + k: v for k, v in mmcv_v1c_checkpoint().items() if not k.startswith("fc.")}
    sd["decoder.weight"] = torch.zeros(3, 8, 1, 1)  # ours / ssseg's layout: the heads beside the backbone
    torch.save({"model": sd}, tmp_path / "segmentor.pth")
    backbone, lines = ResNetV1c(), []
    load_pretrained(backbone, str(tmp_path / "segmentor.pth"), log=lines.append)
    assert lines[0].endswith("a whole segmentor's file: its backbone only (330 tensors; --init starts from all 331)")
    assert "loaded 330 / missing 0 / unexpected 0 / ignored 0" in lines[1]
    assert torch.equal(backbone.state_dict()["stem.0.weight"], sd["backbone_net.stem.0.weight"])


def test_load_pretrained_accepts_a_file_without_bn_step_counters(tmp_path):
    # converted ImageNet files often lack them (momentum 0.1 never reads them): ours stay, the report says so
    sd = {k: v for k, v in mmcv_v1c_checkpoint().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "converted.pth")
    backbone, lines = ResNetV1c(), []
    backbone.layer1[0].bn1.num_batches_tracked.fill_(7)  # ours stay as they are
    load_pretrained(backbone, str(tmp_path / "converted.pth"), log=lines.append)
    assert ("loaded 275 / missing 0 / unexpected 0 / ignored 2 / BN step counters absent from the file, left as they "
            "are: 55") in lines[0]
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in sd.items() if not k.startswith("fc."))
    assert int(backbone.layer1[0].bn1.num_batches_tracked) == 7
    del sd["layer1.0.bn1.running_var"]  # any other absent key still fails
    torch.save(sd, tmp_path / "converted.pth")
    with pytest.raises(BadFileError, match=r"missing 1 \(layer1\.0\.bn1\.running_var\)"):
        load_pretrained(ResNetV1c(), str(tmp_path / "converted.pth"), log=lines.append)


# ---- geometry

def expected_dilation(name):
    # spec §4 OS8 with contract dilation; ASPP rates 12/24/36 on branches 1..3; everything else 1
    if name.startswith("backbone_net.layer3."):
        return 1 if name.startswith("backbone_net.layer3.0.") else 2
    if name.startswith("backbone_net.layer4."):
        return 2 if name.startswith("backbone_net.layer4.0.") else 4
    for i, d in ((1, 12), (2, 24), (3, 36)):
        if name.startswith(f"aspp_net.parallel_branches.{i}."):
            return d
    return 1


@pytest.mark.parametrize("name", NAMES)
def test_every_conv_dilation_padding_stride(models, name):
    n3 = 0
    for mname, m in models[name].named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        k = m.kernel_size[0]
        d = expected_dilation(mname) if k == 3 else 1
        assert m.dilation == (d, d) and m.padding == (d * (k // 2),) * 2, mname
        stride = 2 if mname in ("backbone_net.stem.0", "backbone_net.layer2.0.conv2",
                                "backbone_net.layer2.0.downsample.0") else 1
        assert m.stride == (stride, stride), mname
        assert (m.bias is not None) == (m.out_channels == 150), mname  # only the classifiers have a bias
        n3 += k == 3
    assert n3 == {"fcn": 22, "pspnet": 21, "deeplabv3": 24, "deeplabv3plus": 26}[name]


@pytest.mark.parametrize("name", NAMES)
def test_bn_dropout_and_pooling_settings(models, name):
    # what the key layout cannot see (the spec's layer lists): PyTorch's BN defaults; a ReLU after every BN but the
    # downsample's (the DS convs' depthwise BN has one too); channel dropout 0.1 in the two heads; global image pooling
    for mname, m in models[name].named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.eps, m.momentum, m.affine, m.relu) == (1e-5, 0.1, True, not mname.endswith("downsample.1")), mname
    drops = [(type(m), m.p) for m in models[name].modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert drops == [(nn.Dropout2d, 0.1)] * 2
    pools = [m.output_size for m in models[name].modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert pools == {"fcn": [], "pspnet": [1, 2, 3, 6], "deeplabv3": [1], "deeplabv3plus": [1]}[name]


@pytest.mark.parametrize("name", NAMES)
def test_outputs_odd_size_train_and_eval(models, name):
    model = models[name]
    torch.manual_seed(0)
    s = 4 if name == "deeplabv3plus" else 8  # logits at 1/4 for DeepLabV3+ (spec §5.4), else 1/8
    size = lambda h, w, stride: (-(-h // stride), -(-w // stride))  # conv arithmetic rounds up at each stride 2
    with torch.no_grad():
        model.train().to(memory_format=torch.channels_last)  # channels_last end to end, in training
        tracked = model.backbone_net.stem[1].num_batches_tracked.item()
        out = model(torch.randn(2, 3, 33, 49).to(memory_format=torch.channels_last))
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == (2, 150, *size(33, 49, s)) and out["aux"].shape == (2, 150, *size(33, 49, 8))
        assert model.backbone_net.stem[1].num_batches_tracked.item() == tracked + 1
        model.eval().to(memory_format=torch.contiguous_format)
        ev = model(torch.randn(1, 3, 65, 97))  # batch 1 in eval (BN on 1x1 maps forbids it in training, see below)
        assert set(ev) == {"out"} and ev["out"].shape == (1, 150, *size(65, 97, s))
        assert torch.isfinite(ev["out"]).all()
        assert model.backbone_net.stem[1].num_batches_tracked.item() == tracked + 1  # eval leaves BN stats alone


@pytest.mark.parametrize("name", NAMES)
def test_the_aux_loss_trains_the_backbone_up_to_layer3(models, name):
    # deep supervision: the aux head's loss alone reaches layer3 and everything below it, not layer4
    model = models[name].train()
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 17, 25))["aux"].sum().backward()
    grads = dict(model.named_parameters())
    for k in ("backbone_net.layer3.5.conv3.weight", "backbone_net.stem.0.weight"):
        assert grads[k].grad.abs().sum() > 0, k
    assert all(p.grad is None for k, p in grads.items() if k.startswith("backbone_net.layer4."))
    model.zero_grad(set_to_none=True)


def test_batch_one_training_refused_like_the_reference():
    # image pooling / PPM scale 1 run BN on 1x1 maps; PyTorch BN (and so ssseg outside SyncBN) refuses 1 value per
    # channel in training. We keep that: the torch path raises, and the fused path raises the same way
    import deeplabv3
    aspp = deeplabv3.ASPP(8, 4, [1, 2])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        aspp.train()(torch.randn(1, 8, 5, 7))
    assert aspp.eval()(torch.randn(1, 8, 5, 7)).shape == (1, 4, 5, 7)
    assert aspp.train()(torch.randn(2, 8, 5, 7)).shape == (2, 4, 5, 7)


def test_every_parameter_gets_a_gradient():
    # DDP runs with find_unused_parameters=False (spec §7.10): every parameter must take part in the training loss
    import deeplabv3plus
    model = deeplabv3plus.build_model(num_classes=5).train()
    out = model(torch.randn(2, 3, 17, 25))
    target = torch.randint(0, 5, (2, 17, 25))
    target[0, :3] = 255
    loss = layers.seg_cross_entropy(out["out"], target) + 0.4 * layers.seg_cross_entropy(out["aux"], target)
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def reference_v1c_forward(sd, x):
    """ResNet-50 v1c OS8 in eval mode, written from spec §4 with F.* on a state dict: deep stem, max pool 3x3/2/1,
    bottlenecks relu(bn3(conv3) + downsample(x)) with the stride on the 3x3, contract dilation in layers 3-4."""
    def bn(p, y):
        return F.batch_norm(y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def conv(p, y, stride=1, dilation=1):
        w = sd[f"{p}.weight"]
        return F.conv2d(y, w, stride=stride, padding=dilation * (w.shape[-1] // 2), dilation=dilation)
    for i, stride in enumerate((2, 1, 1)):
        x = F.relu(bn(f"stem.{3 * i + 1}", conv(f"stem.{3 * i}", x, stride)))
    x, outs = F.max_pool2d(x, 3, 2, 1), []
    for s, (blocks, stride, dilations) in enumerate([(3, 1, [1] * 3), (4, 2, [1] * 4), (6, 1, [1] + [2] * 5),
                                                    (3, 1, [2, 4, 4])]):
        for b in range(blocks):
            p, st = f"layer{s + 1}.{b}", stride if b == 0 else 1
            y = F.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", x)))
            y = F.relu(bn(f"{p}.bn2", conv(f"{p}.conv2", y, st, dilations[b])))
            identity = bn(f"{p}.downsample.1", conv(f"{p}.downsample.0", x, st)) if b == 0 else x
            x = F.relu(bn(f"{p}.bn3", conv(f"{p}.conv3", y)) + identity)
        outs.append(x)
    return outs


def test_backbone_forward_matches_a_functional_transcription_of_the_spec():
    # the key, shape, stride and dilation tests above cannot see the forward: a dropped residual or ReLU, the
    # identity taken before the downsample, another pooling. No BN is an identity: random affine parameters, and
    # running statistics of the input itself (one train-mode pass at momentum 1), which keep every layer's values
    # near unit scale (PyTorch's 0 / 1 would shrink them into slow denormals by layer4)
    torch.manual_seed(0)
    backbone, x = ResNetV1c(), torch.randn(1, 3, 35, 41)
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0
        m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
    with torch.no_grad():
        backbone.train()(x)
        backbone.eval()
        ours, ref = backbone(x), reference_v1c_forward(backbone.state_dict(), x)
    assert [tuple(o.shape) for o in ours] == [(1, 256, 9, 11), (1, 512, 5, 6), (1, 1024, 5, 6), (1, 2048, 5, 6)]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_keeps_pytorchs_default_init(models, name):
    # spec §4: no custom initialisation anywhere: conv weights (and the classifiers' biases) U(-b, b),
    # b = 1/sqrt(fan_in) (kaiming_uniform_ with a = sqrt(5)), BN weight 1 and bias 0. Not mmseg's kaiming-normal convs or N(0, 0.01)
    # classifiers with zero bias: the heads start training from these numbers
    for mname, m in models[name].named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()
            bound = (w[0].numel()) ** -0.5  # fan_in = in_channels / groups x kh x kw
            assert w.abs().max() <= bound * (1 + 1e-6), mname
            if w.numel() >= 4096:  # the uniform's std, bound / sqrt(3), to a few percent
                assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05), mname
            if m.bias is not None:
                assert 0 < m.bias.detach().abs().max() <= bound * (1 + 1e-6), mname
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all()), mname


# ---- concat orders (spec §5, §10.1)

def constant_branch(seq_or_bn, value):
    """Make a conv-BN-ReLU unit output `value` everywhere: zero conv, BN bias = value (eval, running stats 0/1)."""
    for m in seq_or_bn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.weight)
            nn.init.constant_(m.bias, value)


def bottleneck_input(module, x):
    seen = []
    h = module.bottleneck.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        module.eval()(x)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("script,cls", [("deeplabv3", "ASPP"), ("deeplabv3plus", "DepthwiseSeparableASPP")])
def test_aspp_image_pooling_is_concatenated_last(script, cls):
    aspp = getattr(importlib.import_module(script), cls)(6, 3, [1, 2, 3, 4])
    for i, branch in enumerate(aspp.parallel_branches):
        constant_branch(branch, i + 1)  # branch i -> i + 1
    constant_branch(aspp.global_branch, 7)  # image pooling -> 7
    feats = bottleneck_input(aspp, torch.randn(1, 6, 5, 7))  # (1, 5*3, 5, 7)
    per_block = feats.view(1, 5, 3, 5, 7).amax(dim=(0, 2, 3, 4))  # (bilinear weights of a 1x1 map sum to ~1)
    assert per_block.tolist() == pytest.approx([1, 2, 3, 4, 7], abs=1e-5)  # mmseg order would give [7, 1, 2, 3, 4]


def test_ppm_concat_order():
    import pspnet
    ppm = pspnet.PyramidPoolingModule([1, 2, 3, 6], 4, 2)
    for i, branch in enumerate(ppm.branches):
        constant_branch(branch, 10 + i)
    x = torch.randn(1, 4, 6, 9)
    feats = bottleneck_input(ppm, x)  # (1, 4 + 4*2, 6, 9)
    assert torch.equal(feats[:, :4], x)  # the input first
    assert feats[:, 4:].view(4, 2, 6, 9).amax(dim=(1, 2, 3)).tolist() == pytest.approx([10, 11, 12, 13], abs=1e-5)


def test_deeplabv3plus_concat_order_and_shortcut_resolution():
    import deeplabv3plus
    cfg = {"head": {"in_channels": [256, 2048], "feats_channels": 8, "shortcut_channels": 3, "dropout": 0.1,
                    "dilations": [1, 12, 24, 36]},
           "auxiliary": {"in_channels": 1024, "out_channels": 8, "dropout": 0.1}}
    model = deeplabv3plus.build_model(cfg, num_classes=5).eval()
    constant_branch(model.aspp_net.bottleneck, 2)
    constant_branch(model.shortcut, 9)
    seen = []
    model.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 33, 49))
    feats = seen[0]  # (1, 8 + 3, H/4, W/4): ASPP first, shortcut last
    assert feats.shape == (1, 11, 9, 13)
    assert torch.allclose(feats[:, :8], torch.tensor(2.0)) and torch.allclose(feats[:, 8:], torch.tensor(9.0))


def test_twin_modules_have_identical_keys(models):
    a, b = models["deeplabv3"].aspp_net, models["deeplabv3plus"].aspp_net
    for part in ("global_branch", "bottleneck"):
        assert shapes(getattr(a, part).state_dict()) == shapes(getattr(b, part).state_dict())
    assert shapes(a.parallel_branches[0].state_dict()) == shapes(b.parallel_branches[0].state_dict())


def test_kernels_switch_keeps_every_key(models, monkeypatch):
    # the switch is read at run time only; building under 'fused' must give the same modules and keys
    import deeplabv3plus
    monkeypatch.setattr(layers, "KERNELS", "fused")  # no set_kernels(): construction needs no compiled op
    with torch.device("meta"):  # shapes only, no init cost
        fused = deeplabv3plus.build_model()
    assert shapes(fused.state_dict()) == shapes(models["deeplabv3plus"].state_dict())


def test_keep_aten_routes_each_op_on_its_own(monkeypatch):
    # --kernels auto may keep single ops on ATen (layers.AUTO, from a card's kernel table): each block must then take
    # the composition while the others stay fused
    from common import ops
    calls = []
    for name in ("bn_relu", "upsample_concat", "upsample_cross_entropy"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name, **k: calls.append(_n) or "fused")
    monkeypatch.setattr(ops, "require", lambda *names: None)  # the fakes above stand in for the compiled ops
    monkeypatch.setattr(layers, "KERNELS", layers.KERNELS)  # both restored after the test
    monkeypatch.setattr(layers, "KEEP_ATEN", layers.KEEP_ATEN)
    bn, x = layers.BatchNormAct2d(3), torch.randn(2, 3, 4, 4)
    feats, logits, target = [torch.randn(1, 2, 2, 2), torch.randn(1, 3, 4, 4)], torch.randn(1, 3, 2, 2), \
        torch.zeros(1, 4, 4, dtype=torch.long)

    def run():
        calls.clear()
        out = (bn(x), layers.upsample_concat(feats, (4, 4)), layers.seg_cross_entropy(logits, target))
        return [o == "fused" if isinstance(o, str) else False for o in out]

    layers.set_kernels("fused", keep_aten={"upsample_ce"})
    assert run() == [True, True, False] and calls == ["bn_relu", "upsample_concat"]
    assert layers.describe() == "fused (ATen: upsample_ce)"
    layers.set_kernels("fused", keep_aten=("upsample_ce", "bn_act"))
    assert run() == [False, True, False] and layers.describe() == "fused (ATen: bn_act, upsample_ce)"
    layers.set_kernels("torch")  # 'torch' clears the kept set: every op on ATen, and said so plainly
    assert run() == [False, False, False] and calls == [] and layers.describe() == "torch"
    layers.set_kernels("fused")
    assert run() == [True, True, True] and layers.describe() == "fused"
    with pytest.raises(ValueError, match=r"unknown ops \['bn_relu'\]; the ops are \['bn_act', "):
        layers.set_kernels("fused", keep_aten={"bn_relu"})
    # the folded eval copy's cuDNN conv+ReLU is chosen the same way (it reads only is_cuda and dtype)
    from common import fold
    card = types.SimpleNamespace(is_cuda=True, dtype=torch.float16)
    assert fold._cudnn_epilogue(card, relu=True)
    layers.set_kernels("fused", keep_aten={"cudnn_conv_relu"})
    assert not fold._cudnn_epilogue(card, relu=True) and run() == [True, True, True]


def test_kernels_auto_applies_the_device_table_and_logs_why(monkeypatch):
    import common
    from common import train
    if not common.extension_loaded():
        pytest.skip("common._C is not built")
    monkeypatch.setattr(layers, "KERNELS", layers.KERNELS)
    monkeypatch.setattr(layers, "KEEP_ATEN", layers.KEEP_ATEN)
    monkeypatch.setitem(layers.AUTO, "cpu", (frozenset({"upsample_concat"}), "measured in test"))
    line = train._kernels("auto", torch.device("cpu"), print)
    assert line.startswith("fused (ATen: upsample_concat) (auto for cpu: measured in test; common._C: ")
    assert layers.fused("bn_act") and not layers.fused("upsample_concat") and layers.fused("upsample_ce")
    assert train._kernels("fused", torch.device("cpu"), print).startswith("fused (common._C: ")  # all, as asked
    assert layers.KEEP_ATEN == frozenset()
    assert set(layers.AUTO) == {"cpu", "cuda"}  # every --device config.parse accepts has an entry
    for keep, why in layers.AUTO.values():
        assert keep <= set(layers.OPS) and why


# ---- building blocks (torch path) against plain PyTorch

@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnormact_is_batchnorm(momentum):
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(6, momentum=momentum), layers.BatchNormAct2d(6, relu=True, momentum=momentum)
    assert list(ref.state_dict()) == list(ours.state_dict())
    for _ in range(3):
        x, r = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7)
        assert torch.allclose(ours(x, residual=r), F.relu(ref(x) + r), atol=1e-6)
    for k, v in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[k].float(), v.float(), atol=1e-6), k
    ref.eval(), ours.eval()
    x = torch.randn(2, 6, 5, 7)
    assert torch.allclose(ours(x), F.relu(ref(x)), atol=1e-6)
    conv, bnact, ident = layers.conv_bn_relu(4, 6, 3, stride=2, dilation=3, groups=2)
    assert conv.bias is None and conv.padding == (3, 3) and bnact.relu and isinstance(ident, nn.Identity)


def test_upsample_concat_and_loss():
    a, b = torch.randn(2, 3, 5, 7), torch.randn(2, 2, 1, 1)
    out = layers.upsample_concat([a, b], (5, 7))
    assert torch.equal(out[:, :3], a) and torch.allclose(out[:, 3:], b.expand(2, 2, 5, 7), atol=1e-6)
    up = layers.upsample_concat([a], (9, 13))
    assert torch.equal(up, F.interpolate(a, (9, 13), mode="bilinear", align_corners=False))
    logits = torch.randn(2, 4, 5, 7, requires_grad=True)
    target = torch.randint(0, 4, (2, 33, 49))
    target[1, 10:] = 255
    up = F.interpolate(logits, (33, 49), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, target, ignore_index=255)
    assert torch.allclose(layers.seg_cross_entropy(logits, target), ref, atol=1e-6)
    empty = layers.seg_cross_entropy(logits, torch.full((2, 33, 49), 255))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad.abs().sum() == 0


# ---- scripts and configs

@pytest.mark.parametrize("name", NAMES)
def test_script_config_and_imports(name):
    mod = importlib.import_module(name)
    cfg = mod.SEGMENTOR_CFG
    assert set(cfg) == set(BASE_SEGMENTOR_CFG) and cfg["num_classes"] == 150
    assert cfg["fp16_cfg"] == FP16_CFG_APEX and FP16_CFG_PYTORCH["autocast"]["dtype"] is torch.float16
    assert cfg["scheduler"]["max_epochs"] == 130 and BASE_SEGMENTOR_CFG["scheduler"]["max_epochs"] == 0  # deep copy
    assert cfg["backbone"]["structure_type"] == "resnet50conv3x3stem" and cfg["backbone"]["depth"] == 50
    assert cfg["head"]["feats_channels"] == 512 and cfg["head"]["dropout"] == 0.1
    assert cfg["head"].get("dilations", [1, 12, 24, 36]) == [1, 12, 24, 36]
    assert cfg["head"].get("pool_scales", [1, 2, 3, 6]) == [1, 2, 3, 6]
    # self-contained: a script imports common, torch and the standard library, never another script
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & set(NAMES), imported
    assert callable(mod.main) and callable(mod.build_model)
