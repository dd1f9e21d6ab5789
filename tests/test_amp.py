"""common/amp.py against the rules in amp_spec §2.5 (apex's LossScaler), torch's GradScaler, and plain fp32 steps.

Everything runs on CPU with tiny conv+BN nets; fp16 and bf16 both work there (amp_spec §3.4, §3.5). CPU autocast's op
lists differ from CUDA's (amp_spec trap 6), so the CUDA dtype checks are a separate `cuda`-marked test.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common.amp as amp_mod
from common import layers
from common.amp import Amp, AmpStateError, LossScaler


@pytest.fixture(autouse=True)
def _our_apex(monkeypatch):
    # exercise our implementation even on a machine that has NVIDIA's apex.amp
    monkeypatch.setattr(amp_mod, "PREFER_NVIDIA_APEX", False)


class BNAct(nn.BatchNorm2d):
    """Stand-in with BatchNormAct2d's shape (a BatchNorm2d subclass whose forward takes a residual)."""

    def forward(self, x, residual=None):
        y = super().forward(x)
        return F.relu(y if residual is None else y + residual)


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 with a residual add into the second BN, then a 1x1 classifier: (B, 3, H, W) -> dict of logits."""

    def __init__(self, bn=BNAct, k=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), bn(8)
        self.cls = nn.Conv2d(8, k, 1)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(h), residual=h)
        return {"out": self.cls(h)}


def make(kind="none", opt_level="O1", dtype=torch.float16, seed=0, bn=BNAct, **kw):
    torch.manual_seed(seed)
    model = TinyNet(bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = Amp(kind, opt_level=opt_level, dtype=dtype, device="cpu", **kw)
    model, opt = amp.initialize(model, opt)
    return model, opt, amp


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 5, (2, 8, 8), generator=g)


def train_step(model, opt, amp, x, y, poison=None):
    """The trainer's loop body; poison=param makes that param's gradient inf (overflow injection)."""
    opt.zero_grad()
    handle = poison.register_hook(lambda g: torch.full_like(g, float("inf"))) if poison is not None else None
    with amp.autocast():
        loss = F.cross_entropy(model(x)["out"], y)
    amp.backward(loss, opt)
    if handle is not None:
        handle.remove()
    return amp.step(opt)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in amp_mod._optimizer_params(opt) if p in opt.state]
    return params, bufs


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


MODES = [("none", "O1", torch.float16), ("torch", "O1", torch.float16), ("torch", "O1", torch.bfloat16),
         ("apex", "O0", torch.float16), ("apex", "O1", torch.float16), ("apex", "O1", torch.bfloat16),
         ("apex", "O2", torch.float16), ("apex", "O2", torch.bfloat16), ("apex", "O3", torch.float16),
         ("apex", "O3", torch.bfloat16)]

# -----------------------------------------------------------------------------
# the scaler rule, number by number (amp_spec §2.5)


def test_loss_scaler_defaults_and_growth_window():
    s = LossScaler()  # apex defaults: 2**16, window 2000, cap 2**24
    assert s.loss_scale == 65536.0 and s.unskipped == 0
    for i in range(1999):
        assert s.update(False) is False
    assert s.loss_scale == 65536.0 and s.unskipped == 1999
    s.update(False)  # the 2000th clean backward doubles and resets the counter
    assert s.loss_scale == 131072.0 and s.unskipped == 0


def test_loss_scaler_halving_resets_window():
    s = LossScaler(scale_window=3)
    s.update(False), s.update(False)
    assert s.update(True) is True  # overflow: skip, halve, reset
    assert s.loss_scale == 32768.0 and s.unskipped == 0
    s.update(False), s.update(False)
    assert s.loss_scale == 32768.0  # the window restarted at the overflow
    s.update(False)
    assert s.loss_scale == 65536.0


def test_loss_scaler_cap_and_floor():
    assert LossScaler(init_scale=2.**30).loss_scale == 2.**24  # start = min(max, init)
    s = LossScaler(init_scale=2.**23, scale_window=1)
    s.update(False)
    assert s.loss_scale == 2.**24
    s.update(False)
    assert s.loss_scale == 2.**24  # capped at max_loss_scale
    s = LossScaler(init_scale=4.0, min_loss_scale=2.0)
    s.update(True)
    assert s.loss_scale == 2.0
    s.update(True)
    assert s.loss_scale == 2.0  # floored at min_loss_scale
    s = LossScaler(init_scale=4.0, min_loss_scale=None)
    for _ in range(4):
        s.update(True)
    assert s.loss_scale == 0.25  # no floor: keeps halving below 1 (apex does too)


def test_loss_scaler_static_never_changes():
    s = LossScaler(init_scale=1.0, dynamic=False)
    assert s.update(True) is False and s.update(False) is False
    assert s.state_dict() == {"loss_scale": 1.0, "unskipped": 0}


def _torch_rule(flags, init, window):
    """torch's own update kernel (what GradScaler.update runs) over a sequence of overflow flags."""
    scale, tracker = torch.full((1,), init), torch.zeros(1, dtype=torch.int32)
    out = []
    for f in flags:
        torch._amp_update_scale_(scale, tracker, torch.full((1,), float(f)), 2.0, 0.5, window)
        out.append((scale.item(), int(tracker.item())))
    return out


def test_apex_rule_matches_torch_rule_below_the_cap():
    flags = [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    s = LossScaler(init_scale=2.**16, scale_window=3)
    apex = [(s.update(bool(f)), s.loss_scale, s.unskipped)[1:] for f in flags]
    assert apex == _torch_rule(flags, 2.**16, 3)


def test_apex_rule_differs_from_torch_at_the_cap():
    flags = [0] * 6
    s = LossScaler(init_scale=2.**23, scale_window=2)
    apex = [(s.update(False), s.loss_scale)[1] for _ in flags]
    torch_scales = [sc for sc, _ in _torch_rule(flags, 2.**23, 2)]
    assert apex == [2.**23, 2.**24, 2.**24, 2.**24, 2.**24, 2.**24]
    assert torch_scales == [2.**23, 2.**24, 2.**24, 2.**25, 2.**25, 2.**26]  # GradScaler has no cap

# -----------------------------------------------------------------------------
# the step, mode by mode


def test_none_is_bit_identical_to_plain_fp32_step():
    model, opt, amp = make("none")
    torch.manual_seed(0)
    ref = TinyNet()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for i in range(3):
        x, y = batch(i)
        assert train_step(model, opt, amp, x, y) is False
        ref_opt.zero_grad()
        F.cross_entropy(ref(x)["out"], y).backward()
        ref_opt.step()
    assert same(list(model.parameters()), list(ref.parameters()))
    assert same(snapshot(model, opt)[1], snapshot(ref, ref_opt)[1])
    assert same(list(model.buffers()), list(ref.buffers()))


def test_apex_O0_equals_none_bitwise():
    a, b = make("none"), make("apex", "O0")
    for i in range(2):
        x, y = batch(i)
        train_step(*a, x, y), train_step(*b, x, y)
    assert same(list(a[0].parameters()), list(b[0].parameters()))


@pytest.mark.parametrize("kind,opt_level,dtype", MODES)
def test_overflow_skips_step_and_leaves_weights_and_momentum(kind, opt_level, dtype):
    model, opt, amp = make(kind, opt_level, dtype, scale_window=1000)
    for i in range(2):  # momentum buffers exist from here on
        assert train_step(model, opt, amp, *batch(i)) is False
    before, scale = snapshot(model, opt), amp.loss_scale
    assert len(before[1]) == len(list(model.parameters()))
    skipped = train_step(model, opt, amp, *batch(5), poison=model.conv2.weight)
    assert skipped is True
    after = snapshot(model, opt)
    assert same(before[0], after[0]) and same(before[1], after[1])
    assert all(p.grad is None for p in amp_mod._optimizer_params(opt))
    dynamic = (kind, dtype) == ("torch", torch.float16) or (kind == "apex" and opt_level in ("O1", "O2")
                                                             and dtype == torch.float16)
    assert amp.loss_scale == (scale / 2 if dynamic else 1.0)
    assert train_step(model, opt, amp, *batch(6)) is False  # and training goes on
    assert not same(after[0], snapshot(model, opt)[0])


def test_natural_fp16_overflow_in_O2_halves_until_clean():
    # a scale far too big for fp16 grads (max 65504): every backward overflows until the scale comes down
    model, opt, amp = make("apex", "O2", init_scale=2.**30, max_loss_scale=2.**30)
    skips = [train_step(model, opt, amp, *batch(i)) for i in range(20)]
    assert skips[0] and not skips[-1]
    n = skips.index(False)
    assert all(skips[:n]) and not any(skips[n:]) and amp.loss_scale == 2.**30 / 2 ** n
    assert amp.state_dict() == {"loss_scaler0": {"loss_scale": 2.**30 / 2 ** n, "unskipped": 20 - n}}


def test_apex_O1_and_torch_skip_and_scale_alike():
    # same window, same poisoned steps: our apex scaler and torch's GradScaler take the same decisions
    runs = []
    for kind in ("apex", "torch"):
        model, opt, amp = make(kind, "O1", scale_window=2)
        out = []
        for i in range(8):
            poison = model.conv1.weight if i in (2, 5) else None
            out.append((train_step(model, opt, amp, *batch(i), poison=poison), amp.loss_scale))
        runs.append(out)
    assert runs[0] == runs[1]
    assert [s for s, _ in runs[0]] == [False, False, True, False, False, True, False, False]


def test_torch_kind_tells_a_skip_without_reading_the_scale_back(monkeypatch):
    # on CUDA, get_scale() after update() would make the host wait for the optimizer's kernels every iteration
    model, opt, amp = make("torch", "O1")
    real, reads = torch.amp.GradScaler.get_scale, []
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: reads.append(1) or real(self))
    assert train_step(model, opt, amp, *batch(0)) is False
    assert train_step(model, opt, amp, *batch(1), poison=model.conv2.weight) is True
    assert reads == []
    assert float(amp.grad_scaler._scale) == 2.**15  # the skip still backed the scale off


def test_torch_kind_with_a_fused_optimizer_skips_inside_its_step():
    # fused=True takes GradScaler's found_inf and always runs step(): a step hook cannot tell a skip there
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    assert opt._step_supports_amp_scaling
    amp = Amp("torch", dtype=torch.float16, device="cpu")
    model, opt = amp.initialize(model, opt)
    for i in range(2):
        assert train_step(model, opt, amp, *batch(i)) is False
    before = snapshot(model, opt)
    assert train_step(model, opt, amp, *batch(5), poison=model.conv2.weight) is True
    assert same(before[0], snapshot(model, opt)[0]) and same(before[1], snapshot(model, opt)[1])
    assert amp.loss_scale == 2.**15 and train_step(model, opt, amp, *batch(6)) is False


# -----------------------------------------------------------------------------
# O2 invariants


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bn", ["standin", "BatchNormAct2d"])
def test_O2_invariants(dtype, bn):
    bn_cls = BNAct if bn == "standin" else layers.BatchNormAct2d
    model, opt, amp = make("apex", "O2", dtype, bn=bn_cls)
    for i in range(3):
        assert train_step(model, opt, amp, *batch(i)) is False
    # convs are half; affine BNs (subclasses included) keep fp32 params and running stats
    assert model.conv1.weight.dtype == dtype and model.cls.bias.dtype == dtype
    for m in (model.bn1, model.bn2):
        assert all(t.dtype == torch.float32 for t in (m.weight, m.bias, m.running_mean, m.running_var))
    # the optimizer holds fp32 only, and every half weight is exactly its master cast down
    assert all(p.dtype == torch.float32 for p in amp_mod._optimizer_params(opt))
    assert len(amp._pairs) == 4  # conv1, conv2, cls.weight, cls.bias
    for p, m in amp._pairs:
        assert torch.equal(p, m.to(dtype)) and p.grad is None
    # BN ran on half activations with fp32 weights (the mixed path), and outputs come back fp32
    seen = {}
    h = model.bn1.register_forward_hook(lambda mod, i, o: seen.update(i=i[0].dtype, o=o.dtype))
    out = model(batch(0)[0])["out"]
    h.remove()
    assert seen == {"i": dtype, "o": dtype} and out.dtype == torch.float32
    # a checkpoint holds the fp32 masters as the model weights
    sd = model.state_dict()
    assert all(v.dtype == torch.float32 for k, v in sd.items() if "num_batches" not in k)
    masters = dict(amp._pairs)
    assert torch.equal(sd["conv1.weight"], masters[model.conv1.weight])


def test_O2_masters_keep_fp32_bits_of_initial_weights():
    torch.manual_seed(0)
    ref = TinyNet()
    model, opt, amp = make("apex", "O2")
    masters = dict(amp._pairs)
    assert torch.equal(masters[model.conv1.weight], ref.conv1.weight)  # not the fp16-rounded value
    assert not torch.equal(ref.conv1.weight.half().float(), ref.conv1.weight)


def test_O3_is_pure_half():
    model, opt, amp = make("apex", "O3")
    assert all(p.dtype == torch.float16 for p in model.parameters())  # all fp16, BN included ...
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())  # saved fp32
    assert model.bn1.running_mean.dtype == torch.float16
    assert train_step(model, opt, amp, *batch(0)) is False and amp.loss_scale == 1.0


def test_O2_casts_a_non_affine_bn():
    """apex's convert_network keeps only affine BNs in fp32; a non-affine one is cast with the rest (amp_spec §2.2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = Amp("apex", opt_level="O2", dtype=torch.bfloat16, device="cpu").initialize(model, opt)
    assert model[1].running_mean.dtype == model[1].running_var.dtype == torch.bfloat16
    assert model[2].weight.dtype == model[2].running_mean.dtype == torch.float32


@pytest.mark.parametrize("opt_level,state_dtype", [("O2", torch.float32), ("O3", torch.bfloat16)])
def test_initialize_carries_the_optimizer_state_onto_what_it_steps(opt_level, state_dtype):
    """An optimizer that already stepped (momentum) keeps its state through initialize: O2 moves it onto the fp32
    masters, O3 casts it with the model."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    opt.step()
    saved = opt.state[model.weight]["momentum_buffer"].clone()
    amp = Amp("apex", opt_level=opt_level, dtype=torch.bfloat16, device="cpu")
    model, opt = amp.initialize(model, opt)
    (p,) = [q for q in amp_mod._optimizer_params(opt) if q.shape == saved.shape]
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == state_dtype and torch.equal(buf.float(), saved.to(state_dtype).float())


def test_torch_fp16_skip_by_the_caller_keeps_the_grad_scaler_usable():
    """A step the caller skips (a non-finite BN buffer, common.guard) must still close GradScaler's iteration: the next
    backward/step would otherwise raise "unscale_() has already been called"; a finite backward keeps the scale."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Amp("torch", dtype=torch.float16, device="cpu")
    model, opt = amp.initialize(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    for skip, expect in ((True, True), (False, False)):
        opt.zero_grad()
        with amp.autocast():
            loss = model(torch.randn(3, 4)).float().pow(2).mean()
        amp.backward(loss, opt)
        assert amp.step(opt, skip=skip) is expect
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert amp.loss_scale == 65536.0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -----------------------------------------------------------------------------
# autocast casts


@pytest.mark.parametrize("kind", ["torch", "apex"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_O1_autocast_casts_on_cpu(kind, dtype):
    model, opt, amp = make(kind, "O1", dtype)
    x, y = batch(0)
    with amp.autocast():
        conv = model.conv1(x)
        bn = model.bn1(conv)
        ce = F.cross_entropy(model(x)["out"], y)
        cat = torch.cat([conv, torch.zeros_like(conv, dtype=torch.float32)], 1)
    assert conv.dtype == dtype and bn.dtype == dtype  # conv lower precision; BN follows its input (no list)
    assert ce.dtype == torch.float32 and cat.dtype == torch.float32  # losses fp32; mixed cat promotes
    assert model.conv1.weight.dtype == torch.float32  # O1 never casts weights
    with make("none")[2].autocast():
        assert model.conv1(x).dtype == torch.float32
    with make("apex", "O2")[2].autocast():  # O2 casts the model instead
        assert model.conv1(x).dtype == torch.float32


@pytest.mark.cuda
def test_O1_autocast_casts_on_cuda():
    model = TinyNet().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Amp("apex", "O1", device="cuda")
    amp.initialize(model, opt)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with amp.autocast():
        conv = model.conv1(x)
        sm, up = conv.softmax(1), F.interpolate(conv, scale_factor=2, mode="bilinear", align_corners=False)
        ce = F.cross_entropy(conv[:, :5], torch.zeros(2, 8, 8, dtype=torch.long, device="cuda"))
    assert conv.dtype == torch.float16
    assert sm.dtype == up.dtype == ce.dtype == torch.float32  # apex O1's FP32 list and torch CUDA autocast agree

@pytest.mark.cuda
@pytest.mark.parametrize("kind,opt_level,dtype", MODES)
def test_modes_on_cuda(kind, opt_level, dtype):
    """The CPU step tests' core, on the GPU: clean steps, an injected overflow skipped, O2 masters in sync."""
    torch.manual_seed(0)
    model = TinyNet(layers.BatchNormAct2d).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = Amp(kind, opt_level=opt_level, dtype=dtype, device="cuda")
    model, opt = amp.initialize(model, opt)
    x, y = (t.cuda() for t in batch(0))
    assert [train_step(model, opt, amp, x, y) for _ in range(2)] == [False, False]
    before, scale = snapshot(model, opt), amp.loss_scale
    assert train_step(model, opt, amp, x, y, poison=model.conv2.weight) is True
    after = snapshot(model, opt)
    assert same(before[0], after[0]) and same(before[1], after[1])
    assert amp.loss_scale in (scale / 2, 1.0)
    assert train_step(model, opt, amp, x, y) is False
    for p, m in amp._pairs:
        assert torch.equal(p, m.to(dtype))


# -----------------------------------------------------------------------------
# config, state, errors


def test_from_fp16_cfg_both_shapes():
    a = Amp.from_fp16_cfg({"type": "apex", "initialize": {"opt_level": "O1"}, "scale_loss": {}}, "cpu")
    assert (a.kind, a.opt_level, a.dtype, a.loss_scale) == ("apex", "O1", torch.float16, 65536.0)
    t = Amp.from_fp16_cfg({"type": "pytorch", "autocast": {"dtype": torch.float16}, "grad_scaler": {}}, "cpu")
    assert (t.kind, t.dtype) == ("torch", torch.float16) and t.grad_scaler is not None
    assert Amp.from_fp16_cfg({"type": "pytorch", "autocast": {"dtype": torch.bfloat16}}, "cpu").grad_scaler is None
    assert Amp.from_fp16_cfg({"is_on": True, "opts": {"opt_level": "O2"}}, "cpu").opt_level == "O2"  # 2021 form
    for bare in ({"type": "apex"}, {"is_on": True}):  # apex's own default opt level
        assert Amp.from_fp16_cfg(bare, "cpu").opt_level == "O1"
    for empty in (None, {}, {"is_on": False}, {"type": "none"}):
        assert Amp.from_fp16_cfg(empty, "cpu").kind == "none"
    with pytest.raises(ValueError, match="keep_batchnorm_fp32"):
        Amp.from_fp16_cfg({"type": "apex", "initialize": {"opt_level": "O1", "keep_batchnorm_fp32": True}}, "cpu")
    with pytest.raises(ValueError, match="type"):
        Amp.from_fp16_cfg({"type": "deepspeed"}, "cpu")
    t = Amp.from_fp16_cfg({"type": "pytorch", "grad_scaler": {"init_scale": 1024.0, "growth_interval": 100}}, "cpu")
    assert (t.init_scale, t.scale_window) == (1024.0, 100)
    with pytest.raises(ValueError, match="growth_factor"):
        Amp.from_fp16_cfg({"type": "pytorch", "grad_scaler": {"growth_factor": 4.0}}, "cpu")


@pytest.mark.parametrize("kind,opt_level,dtype", MODES)
def test_resume_is_exact(kind, opt_level, dtype):
    """model + optimizer + amp state after N steps, loaded into fresh objects, continue exactly like the original."""
    model, opt, amp = make(kind, opt_level, dtype, scale_window=2)
    for i in range(3):
        train_step(model, opt, amp, *batch(i), poison=model.conv1.weight if i == 1 else None)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "amp": amp.state_dict()})
    model2, opt2, amp2 = make(kind, opt_level, dtype, seed=123, scale_window=2)  # different init, then load
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    amp2.load_state_dict(ckpt["amp"])
    assert amp2.state_dict() == amp.state_dict()
    for i in range(3, 6):
        assert train_step(model, opt, amp, *batch(i)) == train_step(model2, opt2, amp2, *batch(i))
    assert same(list(model.parameters()), list(model2.parameters()))
    assert same(snapshot(model, opt)[1], snapshot(model2, opt2)[1])
    assert same(amp_mod._optimizer_params(opt), amp_mod._optimizer_params(opt2))  # O2: the masters too
    assert amp2.loss_scale == amp.loss_scale


def test_resume_O2_loading_fp32_weights_before_initialize():
    # the trainer's order: fp32 model.load_state_dict, then initialize, then optimizer/amp state
    model, opt, amp = make("apex", "O2", scale_window=2)
    for i in range(3):
        train_step(model, opt, amp, *batch(i))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "amp": amp.state_dict()})
    torch.manual_seed(7)
    model2 = TinyNet()
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp2 = Amp("apex", "O2", device="cpu", scale_window=2)
    model2, opt2 = amp2.initialize(model2, opt2)
    opt2.load_state_dict(ckpt["opt"])
    amp2.load_state_dict(ckpt["amp"])
    for i in range(3, 5):
        train_step(model, opt, amp, *batch(i)), train_step(model2, opt2, amp2, *batch(i))
    assert same(amp_mod._optimizer_params(opt), amp_mod._optimizer_params(opt2))


def test_state_dict_formats_and_mismatch_errors():
    sd = make("apex", "O1")[2].state_dict()
    assert sd == {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}  # apex.amp.state_dict() format
    assert isinstance(sd["loss_scaler0"]["unskipped"], int)
    assert set(make("torch")[2].state_dict()) >= {"scale", "_growth_tracker"}
    assert make("none")[2].state_dict() == {} and make("torch", dtype=torch.bfloat16)[2].state_dict() == {}
    with pytest.raises(AmpStateError, match="loss_scaler0.*another --amp kind"):
        make("apex", "O1")[2].load_state_dict(make("torch")[2].state_dict())
    with pytest.raises(AmpStateError, match="GradScaler"):
        make("torch")[2].load_state_dict(sd)
    with pytest.raises(AmpStateError, match="has none"):
        make("none")[2].load_state_dict(sd)
    # a dynamic scale must not become a static one that never backs off (O3, O0, bf16 scale nothing)
    for opt_level, dtype in (("O3", torch.float16), ("O0", torch.float16), ("O1", torch.bfloat16)):
        amp = make("apex", opt_level, dtype)[2]
        with pytest.raises(AmpStateError, match="loss scale 65536 comes from dynamic loss scaling.*--opt_level"):
            amp.load_state_dict(sd)
        assert amp.loss_scale == 1.0
        amp.load_state_dict(amp.state_dict())  # its own state loads


@pytest.mark.parametrize("inv_scale", [1.0, 2.0 ** -10])
def test_composed_unscale_matches_the_fused_kernel(monkeypatch, inv_scale):
    """The path CUDA bf16 gradients take (O3 in bf16: torch's fused kernel has no CUDA bf16) against the kernel."""
    assert not amp_mod._fused_unscale(torch.device("cuda"), torch.bfloat16)
    assert amp_mod._fused_unscale(torch.device("cuda"), torch.float16)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 3, generator=g) * 1e3 for _ in range(4)]
    for poison in (None, math.inf, math.nan):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            grads = [b.to(dtype) for b in base]
            if poison is not None:
                grads[2][1, 1] = poison
            fused = [t.clone() for t in grads]
            found_fused = amp_mod._unscale_and_check(fused, inv_scale)
            monkeypatch.setattr(amp_mod, "_fused_unscale", lambda device, dtype: False)
            composed = [t.clone() for t in grads]
            found_composed = amp_mod._unscale_and_check(composed + [None], inv_scale)
            monkeypatch.undo()
            assert found_fused is found_composed is (poison is not None), (poison, dtype)
            for a, b in zip(fused, composed):
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_gradient_accumulation_unscales_each_backward():
    # apex semantics: two backward passes before one step give the sum of the true gradients
    torch.manual_seed(0)
    ref = TinyNet()
    model, opt, amp = make("apex", "O1")
    for i in range(2):
        x, y = batch(i)
        amp.backward(F.cross_entropy(model(x)["out"], y), opt)  # outside autocast: fp32 grads, exact scaling
        F.cross_entropy(ref(x)["out"], y).backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)
    assert amp.state_dict()["loss_scaler0"]["unskipped"] == 2  # apex counts backward passes


def test_nvidia_apex_adapter_wiring(monkeypatch):
    """_NvidiaApex against a fake apex.amp with apex's API and scaler attributes (apex/amp/scaler.py names).

    CI has neither apex nor a GPU, so this checks only our adapter's calls, not apex itself.
    """
    import contextlib
    import sys
    import types

    class FakeScaler:  # the attributes the adapter touches on apex's LossScaler
        def __init__(self):
            self._loss_scale, self._scale_seq_len, self._unskipped, self.dynamic = 2.**16, 2000, 0, True
            self._has_overflow = False

        def loss_scale(self):
            return self._loss_scale

    state = types.SimpleNamespace(loss_scalers=[])
    fake_amp = types.ModuleType("apex.amp")
    calls = []

    def initialize(model, optimizer, opt_level, verbosity, min_loss_scale, max_loss_scale):
        calls.append(("initialize", opt_level, max_loss_scale))
        state.loss_scalers[:] = [FakeScaler()]
        return model, optimizer

    @contextlib.contextmanager
    def scale_loss(loss, optimizer):
        s = state.loss_scalers[0]
        yield loss * s._loss_scale
        grads = [p.grad for p in amp_mod._optimizer_params(optimizer)]
        s._has_overflow = amp_mod._unscale_and_check(grads, 1.0 / s._loss_scale)
        if s._has_overflow:  # apex halves at scale_loss exit and makes the next step() a no-op
            s._loss_scale /= 2
            real_step = optimizer.step
            optimizer.step = lambda: setattr(optimizer, "step", real_step)

    fake_amp.initialize, fake_amp.scale_loss = initialize, scale_loss
    fake_amp.state_dict = lambda: {"loss_scaler0": {"loss_scale": state.loss_scalers[0]._loss_scale,
                                                    "unskipped": state.loss_scalers[0]._unskipped}}
    fake_amp.load_state_dict = lambda sd: calls.append(("load", sd))
    fake_state_mod = types.ModuleType("apex.amp._amp_state")
    fake_state_mod._amp_state = state
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.amp", fake_amp)
    monkeypatch.setitem(sys.modules, "apex.amp._amp_state", fake_state_mod)
    assert amp_mod._probe_nvidia_apex()[0] is fake_amp

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp = Amp("apex", "O1", device="cpu", init_scale=2.**10, scale_window=7)  # CPU: ours ...
    amp.nvidia = amp_mod._NvidiaApex(fake_amp, amp)  # ... so plug the adapter in by hand
    amp.initialize(model, opt)
    assert calls[0] == ("initialize", "O1", 2.**24)
    assert state.loss_scalers[0]._loss_scale == 2.**10 and state.loss_scalers[0]._scale_seq_len == 7
    assert train_step(model, opt, amp, *batch(0)) is False
    before = snapshot(model, opt)
    assert train_step(model, opt, amp, *batch(1), poison=model.conv1.weight) is True
    assert same(before[0], snapshot(model, opt)[0]) and amp.loss_scale == 2.**9
    assert train_step(model, opt, amp, *batch(2)) is False and not same(before[0], snapshot(model, opt)[0])
    assert amp.state_dict() == {"loss_scaler0": {"loss_scale": 2.**9, "unskipped": 0}}
    amp.load_state_dict(amp.state_dict())
    assert calls[-1][0] == "load"


def test_nvidia_apex_autocast_only_after_initialize_and_eval_labels():
    """Before initialize() NVIDIA's apex has patched nothing: an eval-only Amp (--eval --eval_amp) must autocast
    itself, not run fp32 under a label that says half. O2's patched model runs half weights, not autocast."""
    from common import infer
    for level, label in (("O1", "bf16 autocast"), ("O2", "bf16 weights (apex O2)")):
        amp = Amp("apex", level, device="cpu", dtype=torch.bfloat16)
        amp.nvidia = amp_mod._NvidiaApex(None, amp)  # plugged in by hand: CI has no apex
        assert infer.precision(amp) == label
        if level == "O1":
            with amp.autocast():
                assert torch.is_autocast_enabled("cpu")
            amp.model = TinyNet()  # what initialize() sets: from now on apex's patches do the casting
            with amp.autocast():
                assert not torch.is_autocast_enabled("cpu")


def test_foreign_apex_is_not_nvidia_apex(monkeypatch):
    # PyPI's 'apex' (a 2013 Pyramid toolkit, amp_spec §1.3) or apex >= May 2025: no apex.amp -> our implementation
    import sys
    import types
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.delitem(sys.modules, "apex.amp", raising=False)
    monkeypatch.setattr(amp_mod, "PREFER_NVIDIA_APEX", True)
    mod, why = amp_mod._probe_nvidia_apex()
    assert mod is None and why.startswith("ImportError: cannot import name 'amp' from 'apex'")  # as users saw it
    amp = Amp("apex", device="cpu")
    assert amp.nvidia is None and "apex.amp not importable (ImportError" in amp.describe()


def test_describe_and_errors():
    assert make("none")[2].describe().startswith("amp=none")
    d = make("apex", "O1")[2].describe()
    assert d.startswith("amp=apex O1 (") and "fp16" in d and "dynamic loss scale 65536" in d
    assert "our implementation of apex.amp semantics" in d
    assert "bf16" in make("torch", dtype="bfloat16")[2].describe()
    assert amp_mod.cpu_half_dtype() in (torch.bfloat16, torch.float16)
    model, opt, amp = make("apex", "O1")
    with pytest.raises(RuntimeError, match="without a preceding"):
        amp.step(opt)
    with pytest.raises(RuntimeError, match="already"):
        amp.initialize(model, opt)
    with pytest.raises(ValueError, match="letter O"):
        Amp("apex", opt_level="01", device="cpu")
    with pytest.raises(ValueError, match="fp32 model"):
        Amp("apex", "O2", device="cpu").initialize(TinyNet().half(), opt)
    with pytest.raises(RuntimeError, match="initialize"):
        Amp("none", device="cpu").backward(torch.zeros(()), opt)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            Amp("torch", device="cuda")


# -----------------------------------------------------------------------------
# gradient accumulation, describe() per mode, apex's scale bounds


@pytest.mark.parametrize("kind,opt_level,dtype", [("none", "O1", torch.float16), ("apex", "O1", torch.float16),
                                                  ("apex", "O2", torch.float16), ("apex", "O3", torch.bfloat16)])
def test_gradient_accumulation_an_overflow_in_an_earlier_backward_still_skips(kind, opt_level, dtype):
    """apex accumulates: an inf/NaN in the first of two backward passes must skip the step even though the second
    one was clean (its inf is in the summed gradient)."""
    model, opt, amp = make(kind, opt_level, dtype)
    assert train_step(model, opt, amp, *batch(0)) is False  # momentum buffers exist from here on
    before = snapshot(model, opt)
    opt.zero_grad()
    for i, poison in ((1, model.conv1.weight), (2, None)):
        handle = poison.register_hook(lambda g: torch.full_like(g, float("inf"))) if poison is not None else None
        with amp.autocast():
            loss = F.cross_entropy(model(batch(i)[0])["out"], batch(i)[1])
        amp.backward(loss, opt)
        if handle is not None:
            handle.remove()
    assert amp.step(opt) is True
    after = snapshot(model, opt)
    assert same(before[0], after[0]) and same(before[1], after[1])
    assert all(p.grad is None for p in amp_mod._optimizer_params(opt))


def test_describe_says_what_each_mode_casts_and_scales():
    """The log's amp line, mode by mode (amp_spec §2.1): only fp16 apex O1/O2 and torch fp16 scale the loss."""
    for opt_level, dtype, how in (("O0", torch.float16, "fp32"), ("O3", torch.float16, "pure half"),
                                  ("O3", torch.bfloat16, "pure half"), ("O1", torch.bfloat16, "as the O1 cast policy")):
        d = make("apex", opt_level, dtype)[2].describe()
        assert d.startswith(f"amp=apex {opt_level} (") and how in d and d.endswith("no loss scaling"), d
        assert "dynamic" not in d, d
    for dtype in (torch.float16, torch.bfloat16):  # O0 runs fp32: the log names no half type
        d = make("apex", "O0", dtype)[2].describe()
        assert d.endswith("fp32), fp32, no loss scaling") and "fp16" not in d and "bf16" not in d, d
    d = make("apex", "O2")[2].describe()
    assert "half model, fp32 BatchNorm, fp32 master weights" in d and d.endswith("fp16, dynamic loss scale 65536"), d
    d = make("torch", dtype=torch.bfloat16)[2].describe()
    assert d.endswith("bf16, no loss scaling (bf16))") and "GradScaler" not in d, d
    d = make("torch", dtype=torch.float16)[2].describe()
    assert "torch.amp.GradScaler('cpu') init scale 65536" in d and "no loss scaling" not in d, d


def test_from_fp16_cfg_takes_apex_scale_bounds_and_refuses_a_static_scale():
    """apex's initialize() keys we honour (min/max_loss_scale) reach the scaler; a static loss_scale, which we do not
    implement, is an error naming it, never silently turned into dynamic scaling (ssseg_spec §9, amp_spec §2.2)."""
    a = Amp.from_fp16_cfg({"type": "apex", "initialize": {"opt_level": "O1", "min_loss_scale": 2.0,
                                                          "max_loss_scale": 2.**10}}, "cpu")
    assert (a.scaler.min_loss_scale, a.scaler.max_loss_scale, a.loss_scale) == (2.0, 2.**10, 2.**10)
    assert Amp.from_fp16_cfg({"type": "apex", "initialize": {"loss_scale": "dynamic"}}, "cpu").scaler.dynamic
    for static in (128.0, 1.0):
        with pytest.raises(amp_mod.Fp16CfgError, match="loss_scale"):
            Amp.from_fp16_cfg({"type": "apex", "initialize": {"opt_level": "O1", "loss_scale": static}}, "cpu")
