"""common/fold.py: the folded eval copy against the unfolded model (the independent reference: BatchNormAct2d's own
eval forward), on all four segmentors, NCHW and channels_last, whole and slide inference; the training model and its
state dict are never touched; the demo mIoU of one checkpoint is the same folded and unfolded."""
import copy
import importlib
import re

import pytest
import torch
import torch.nn as nn

import common.layers as layers
from common import fold, infer

NAMES = ["fcn", "pspnet", "deeplabv3", "deeplabv3plus"]
UNITS = {"fcn": 58, "pspnet": 61, "deeplabv3": 62, "deeplabv3plus": 70}  # conv-BN pairs: every BN of the model


def randomize_bn(model, seed=0):
    """BN statistics and affine away from (0, 1, 1, 0), so that a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {n: randomize_bn(importlib.import_module(n).build_model(num_classes=7)).eval() for n in NAMES}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    sd = model.state_dict()
    return list(sd) == list(snap) and all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in snap.items())


@pytest.mark.parametrize("name", NAMES)
def test_folded_logits_match_unfolded(models, name):
    model = models[name]
    snap = snapshot(model)
    x = torch.randn(1, 3, 17, 23)
    # float64 on both sides: the fold itself is exact up to rounding
    ref64 = copy.deepcopy(model).double()
    f64 = fold.Folded(ref64, torch.float64)
    assert len(f64.units) == UNITS[name]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in f64.net.modules())  # every BN became part of a conv
    with torch.no_grad():
        want = ref64(x.double())["out"]
        got = f64(x.double())["out"]
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-12 * scale
    # float32, NCHW and channels_last, against the float64 reference
    with torch.no_grad():
        ref32 = model(x)["out"]
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = fold.Folded(model, torch.float32, fmt)(x)["out"]
            assert got.dtype == torch.float32
            assert (got.double() - want).abs().max() <= 2e-5 * scale, fmt
            assert (ref32.double() - want).abs().max() <= 2e-5 * scale  # the unfolded fp32 model: the same bound
    assert same_state(model, snap) and not model.training


def test_folded_bf16_channels_last(models):
    # stated tolerance: bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); through ~60 convs the logits of
    # these random-init nets stay within 5% of their largest magnitude of the fp32 unfolded model's
    model = models["pspnet"]
    x = torch.randn(1, 3, 17, 23)
    with torch.no_grad():
        want = model(x)["out"]
        got = fold.Folded(model, torch.bfloat16, torch.channels_last)(x)["out"]
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("name", ["deeplabv3plus"])
def test_slide_inference_folded_matches_unfolded(models, name):
    model = models[name]
    cfg = dict(inference_mode="slide", slide_crop=(16, 16), slide_stride=(12, 12))
    x = torch.randn(1, 3, 28, 36)  # 2 x 3 windows, the last ones clipped to the image
    want = infer.predict_logits(model, x, (28, 36), cfg)
    got = infer.predict_logits(fold.Folded(model), x, (28, 36), cfg)
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()


def test_for_eval_never_touches_the_training_model():
    import fcn
    torch.manual_seed(0)
    model = randomize_bn(fcn.build_model(num_classes=5)).train()
    snap, types = snapshot(model), [type(m) for m in model.modules()]
    cfg = dict(fold=True, compile="none")
    net, amp = fold.for_eval(model, cfg, None, log=lambda m: None)
    assert amp is None and model.training and same_state(model, snap) and [type(m) for m in model.modules()] == types
    x = torch.randn(1, 3, 17, 23)
    with torch.no_grad():
        got = net(x)["out"]
        assert same_state(model, snap)  # evaluating the copy updates no running statistic of the model
        want = model.eval()(x)["out"]
        model.train()
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()
    # a training step changes the model; the next for_eval re-folds the same cached copy from the new weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(2, 3, 33, 41))
    (out["out"].square().mean() + out["aux"].square().mean()).backward()
    opt.step()
    net2, _ = fold.for_eval(model, cfg, None, log=lambda m: None)
    assert net2 is net
    with torch.no_grad():
        want = model.eval()(x)["out"]
        got = net2(x)["out"]
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()
    assert list(model.state_dict()) == list(snap)  # still the reference's unfolded keys (what checkpoints hold)
    assert fold.for_eval(model, dict(cfg, fold=False), "amp", log=lambda m: None) == (model, "amp")


def test_the_copy_drops_a_forward_patched_on_the_instance():
    """NVIDIA apex O2/O3 replace model.forward with a closure over the original forward (apex/amp/_initialize.py's
    patch_forward): the folded copy must run its own folded net, not the training model through that closure."""
    import pspnet
    torch.manual_seed(0)
    model = randomize_bn(pspnet.build_model(num_classes=5)).train()
    calls = []

    def patch_forward(old_fwd):
        def new_fwd(*args, **kwargs):
            calls.append(1)
            return old_fwd(*args, **kwargs)
        return new_fwd

    model.forward = patch_forward(model.forward)
    snap = snapshot(model)
    net, _ = fold.for_eval(model, dict(fold=True, compile="none"), None, log=lambda m: None)
    x = torch.randn(1, 3, 17, 23)  # batch 1: the training model's pooled BN would refuse it
    with torch.no_grad():
        got = net(x)["out"]
    assert not calls and same_state(model, snap) and model.training
    with torch.no_grad():
        want = model.eval()(x)["out"]  # through the patch, as apex's eval would
    assert calls and (got - want).abs().max() <= 2e-5 * want.abs().max()


def test_fold_refuses_a_bn_without_its_conv():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.BatchNorm2d(4)  # not named after its conv, not in a Sequential: we cannot know the pairing

        def forward(self, x):
            return {"out": self.norm(self.conv(x))}

    with pytest.raises(TypeError, match="cannot fold norm.*--fold false"):
        fold.Folded(Odd().eval())


def test_fused_kernels_fold_the_same(models):
    pytest.importorskip("common._C")
    model = models["fcn"]
    x = torch.randn(1, 3, 17, 23)
    try:
        layers.set_kernels("fused")
        with torch.no_grad():
            want = model(x)["out"]  # bn_relu's eval path
            got = fold.Folded(model)(x)["out"]
    finally:
        layers.set_kernels("torch")
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()


def test_demo_miou_identical_folded_and_unfolded(tmp_path, capsys):
    # one checkpoint (random init with non-trivial BN statistics), evaluated by --eval on demo images both ways
    import pspnet
    torch.manual_seed(0)
    model = randomize_bn(pspnet.build_model(num_classes=150))
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    res, out = {}, {}
    for f in ("true", "false"):
        argv = ["--data", "demo", "--device", "cpu", "--kernels", "torch", "--num_workers", "0", "--eval",
                str(tmp_path / "ckpt.pth"), "--num_val_images", "2", "--scale", "(96, 32)", "--fold", f,
                "--work_dir", str(tmp_path / f)]
        res[f] = pspnet.main(argv)
        out[f] = capsys.readouterr().out  # --eval writes no files: its log is stdout
    assert res["true"]["mIoU"] == res["false"]["mIoU"] and res["true"]["IoU"] == pytest.approx(res["false"]["IoU"],
                                                                                               nan_ok=True)
    assert "fold: 61 conv-BN units folded" in out["true"] and "fold:" not in out["false"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cudnn_fused_epilogue_matches_composition(dtype):
    # torch.cudnn_convolution_relu / _add_relu (--kernels fused) against conv2d + add + relu, dilated and grouped
    torch.manual_seed(0)
    dev = "cuda"
    for groups, dilation, stride in ((1, 1, 1), (1, 4, 1), (1, 1, 2), (8, 12, 1)):
        x = torch.randn(2, 16, 33, 41, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(32, 16 // groups, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        b = torch.randn(32, device=dev, dtype=dtype)
        y = torch.nn.functional.conv2d(x.float(), w.float(), b.float(), stride, dilation, dilation, groups)
        r = torch.randn_like(y).to(dtype).contiguous(memory_format=torch.channels_last)
        try:
            layers.set_kernels("fused")
            got = fold.folded_conv(x, w, b, (stride,) * 2, (dilation,) * 2, (dilation,) * 2, groups)
            got_r = fold.folded_conv(x, w, b, (stride,) * 2, (dilation,) * 2, (dilation,) * 2, groups, residual=r)
        finally:
            layers.set_kernels("torch")
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        assert (got.float() - y.relu()).abs().max() <= tol * y.abs().max()
        assert (got_r.float() - (y + r.float()).relu()).abs().max() <= tol * y.abs().max()


def test_a_configuration_cudnn_refuses_runs_the_plain_form_and_is_logged_once(models, monkeypatch):
    """The fused branch forced on the CPU, with a stand-in cuDNN that refuses every dilated conv: the same logits,
    one log line per refused configuration, and cuDNN is not asked again for it at another image size."""
    asked = []

    def conv(x, w, r, b, stride, padding, dilation, groups):
        asked.append(tuple(dilation))
        if dilation[0] > 1:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\n(the rest of cuDNN's message)")
        y = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
        return (y if r is None else y + r).relu_()

    model = models["pspnet"]
    x = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    want = fold.Folded(model)(x)["out"]
    monkeypatch.setattr(fold, "REFUSED", {})
    monkeypatch.setattr(fold, "_cudnn_epilogue", lambda x, relu: relu)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", lambda x, w, b, *a: conv(x, w, None, b, *a))
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", lambda x, w, r, alpha, b, *a: conv(x, w, r, b, *a))
    lines = []
    net = fold.Folded(model, log=lines.append)
    torch.testing.assert_close(net(x)["out"], want)
    assert asked and {d for d in asked if d[0] > 1}, "the stand-in cuDNN was never asked"
    refused = list(fold.REFUSED)
    assert refused and all(dilation[0] > 1 for _, _, _, _, dilation, _, _ in refused)
    assert len(lines) == len(refused)
    assert all(re.match(r"fold: cuDNN's fused conv\+bias(\+add)?\+ReLU refused weight \(.*\) float32 NCHW .*"
                        r"dilation \((2|4), \2\) .*CUDNN_STATUS_NOT_SUPPORTED\): those units run conv2d", l)
               for l in lines), lines
    asked.clear()
    net(torch.randn(1, 3, 56, 40))
    assert asked and all(d[0] == 1 for d in asked)  # refused configurations are not tried again, at any size
    assert len(lines) == len(refused)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_every_unit_of_each_model_takes_cudnns_fused_call(models, name):
    """The models' real conv configurations (stem, 1x1, dilated up to 36, depthwise) in fp16 and fp32, NCHW and
    channels_last: cuDNN's fused epilogue must take every one (REFUSED stays empty) and match the unfolded model."""
    fold.REFUSED.clear()
    model = copy.deepcopy(models[name]).cuda()
    x = torch.randn(1, 3, 160, 216, device="cuda")
    try:
        layers.set_kernels("fused")
        with torch.no_grad():
            want = model(x)["out"].double()
        for dtype in (torch.float32, torch.float16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                got = fold.Folded(model, dtype, fmt)(x)["out"].double()
                assert (got - want).abs().max() <= 2e-2 * want.abs().max(), (dtype, fmt)
    finally:
        layers.set_kernels("torch")
    assert not fold.REFUSED, f"cuDNN refused {len(fold.REFUSED)} configuration(s): {fold.REFUSED}"


def test_a_unit_folds_a_conv_bias_and_the_bns_own_eps():
    """The fold uses the conv's bias and the BN's eps (every unit of our models has neither, so check them here)."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True).double(), randomize_bn(nn.BatchNorm2d(4, eps=1e-1)).double()
    unit = fold.FoldedConvBNReLU(conv, bn, torch.float64)
    unit.load(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(unit(x), bn.eval()(conv(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,opt_level", [("apex", "O3"), ("apex", "O2"), ("torch", "O1")])
def test_for_eval_folds_into_the_amps_half_type(kind, opt_level):
    """An Amp with a half type (O2/O3's cast model, O1/torch's autocast) gets a folded copy in that type, not fp32."""
    import fcn
    from common.amp import Amp
    torch.manual_seed(0)
    model = randomize_bn(fcn.build_model(num_classes=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Amp(kind, opt_level=opt_level, dtype=torch.bfloat16, device="cpu")
    model, opt = amp.initialize(model, opt)
    net, net_amp = fold.for_eval(model, dict(fold=True, compile="none"), amp, log=lambda m: None)
    assert net_amp is None and net.dtype == torch.bfloat16
    assert {p.dtype for p in net.net.state_dict().values() if p.is_floating_point()} == {torch.bfloat16}


def test_evaluate_runs_an_unfolded_model_in_eval_mode_and_gives_it_back_unchanged():
    """--fold false evaluates the training model itself: BN must use its running statistics (not the batch's, and
    without updating them), dropout must be off, and the model comes back in training mode, every bit as it was."""
    import fcn
    torch.manual_seed(0)
    model = randomize_bn(fcn.build_model(num_classes=5)).train()
    snap = snapshot(model)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(1, 3, 17, 23, generator=g), torch.randint(0, 5, (1, 17, 23), generator=g))
              for _ in range(3)]
    quiet = lambda *a: None  # noqa: E731
    got = infer.evaluate(model, loader, 5, "cpu", dict(fold=False), log=quiet)
    assert model.training and same_state(model, snap)
    want = infer.evaluate(copy.deepcopy(model).eval(), loader, 5, "cpu", dict(fold=False), log=quiet)
    assert got["mIoU"] == want["mIoU"] and got["aAcc"] == want["aAcc"]
