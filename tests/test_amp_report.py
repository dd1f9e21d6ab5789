"""--amp_report and the skipped-step diagnosis (common/amp_report.py, issue 20).

The shares against a brute-force count; a planted forward overflow and a planted backward overflow named as the
first non-finite module; the automatic report on the first skipped step and on the stop; training bit-identical
with and without reports (hooked steps and replays); the picture drawn from the jsonl, checked pixel by pixel.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from common import amp_report, config, data, dist, layers, train
from common.amp import Amp
from test_faults import Toy  # 8 seeded 16x16 images (the loader reseeds its transform)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------------
# shares against a brute-force count


def _brute(values, k):
    """The module docstring's rules, element by element in Python floats (v = x * 2^k)."""
    n = len(values)
    c = dict(of=0, uf=0, sub=0, bf_of=0, bf_uf=0, bf_sub=0)
    for x in values:
        if math.isnan(x):
            continue
        a, ab = abs(x) * 2.0 ** k, abs(x)
        if math.isinf(a) or a >= 65520:
            c["of"] += 1
        elif 0 < a < 2.0 ** -25:
            c["uf"] += 1
        elif 2.0 ** -25 <= a < 2.0 ** -14:
            c["sub"] += 1
        if math.isinf(ab) or ab >= (2 - 2 ** -8) * 2.0 ** 127:
            c["bf_of"] += 1
        elif 0 < ab < 2.0 ** -134:
            c["bf_uf"] += 1
        elif 2.0 ** -134 <= ab < 2.0 ** -126:
            c["bf_sub"] += 1
    return {key: v / n for key, v in c.items()}


def _known_tensor():
    g = np.random.default_rng(0)
    v = np.exp2(g.uniform(-150, 128, 3000)) * g.choice([-1, 1], 3000)  # log-uniform over all of fp32's range
    v = np.concatenate([v, np.exp2(g.uniform(-30, 17, 3000))])  # and dense around fp16's
    edges = [0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 2.0 ** -25, 2.0 ** -25 * 0.99999, 2.0 ** -14,
             2.0 ** -14 * 0.99999, 2.0 ** -24, 2.0 ** -149, 2.0 ** -134, 2.0 ** -126, 3.3e38, 3.4e38, math.inf,
             -math.inf, math.nan]
    return torch.tensor(np.concatenate([v, edges]), dtype=torch.float32)


@pytest.mark.parametrize("k", [0, 7, -3])
def test_shares_equal_a_brute_force_count(k):
    x = _known_tensor()
    stats = amp_report.tensor_stats(x).tolist()
    vals = x.tolist()
    assert stats[:4] == [len(vals), 3, 1, 2]  # numel, inf/NaN, NaN, zeros
    assert stats[4] == max(abs(v) for v in vals if math.isfinite(v))
    got = amp_report.shares(stats, k)
    want = _brute(vals, k)
    if k != 0:  # the what-if scale reads overflow off the histogram: |v| >= 2^16, plus the infs
        want["of"] = sum(1 for v in vals if math.isinf(v) or (math.isfinite(v) and abs(v) * 2.0 ** k >= 65536))
        want["of"] /= len(vals)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["of"] > 0 and got["uf"] > 0 and got["sub"] > 0 and got["bf_uf"] > 0 and got["bf_sub"] > 0


def test_fp16_shares_agree_with_a_real_cast():
    """The rules against numpy's float16 rounding, away from the half-ulp bands where the rounding decides."""
    x = _known_tensor()
    v = x.numpy().astype(np.float64)
    a = np.abs(v)
    away = np.isfinite(v) & ~((a > 2.0 ** -25 * 0.999) & (a < 2.0 ** -25 * 1.001)) & \
        ~((a > 2.0 ** -14 * 0.999) & (a < 2.0 ** -14)) & ~((a > 65500) & (a < 65536))
    x = x[torch.from_numpy(away)]
    with np.errstate(over="ignore"):
        h = x.numpy().astype(np.float16)
    got = amp_report.shares(amp_report.tensor_stats(x).tolist())
    n = len(h)
    assert got["of"] == pytest.approx(np.isinf(h).sum() / n)
    assert got["uf"] == pytest.approx(((h == 0) & (x.numpy() != 0)).sum() / n)
    assert got["sub"] == pytest.approx(((h != 0) & (np.abs(h) < 2.0 ** -14)).sum() / n)


def test_whatif_scale_is_the_largest_safe_power_of_two():
    assert amp_report.whatif_scale_log2(1.0) == 15  # 2^15 < 65520 <= 2^16
    assert amp_report.whatif_scale_log2(65520 / 2 ** 10) == 9  # exactly at the inf boundary: one lower
    assert amp_report.whatif_scale_log2(1e-9) == 24  # capped at apex's max_loss_scale
    assert amp_report.whatif_scale_log2(1e6) == -4
    assert amp_report.whatif_scale_log2(0.0) == 24

# ----------------------------------------------------------------------------------------------------------------
# planted overflows are named


class Amplify(nn.Module):
    def __init__(self, factor=1.0):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class _BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class BadBackward(nn.Module):
    """Identity forward; its backward turns the gradient into inf (a planted backward overflow)."""

    def forward(self, x):
        return _BadGrad.apply(x)


class Chain(nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.backbone_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layers.BatchNormAct2d(4))
        self.middle = middle
        self.decoder, self.auxiliary_decoder = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.middle(self.backbone_net(x))
        return {"out": self.decoder(f), "aux": self.auxiliary_decoder(f)}


def _one_step(model, amp, scale=1.0):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    with amp_report.Recorder(model) as rec:
        with amp.autocast():
            out = model(x)
            loss = nn.functional.cross_entropy(out["out"].float(), y) + nn.functional.cross_entropy(
                out["aux"].float(), y)
        (loss * scale).backward()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # all hooks gone
    return amp_report.build_record(rec, 1, scale, amp, "test")


def test_a_planted_forward_overflow_in_fp16_is_named():
    torch.manual_seed(0)
    model = Chain(Amplify(1e5))  # BN output (|x| ~ 1) x 1e5 > 65504: inf in fp16
    amp = Amp("torch", dtype=torch.float16, device="cpu")
    rec = _one_step(model, amp, scale=1024.0)
    first = rec["first_nonfinite"]
    assert (first["name"], first["phase"], first["dtype"], first["by"]) == ("middle", "fwd", "float16", ["middle"])
    assert first["nan"] == 0 and first["nonfinite"] > 0
    line = amp_report.describe_culprit(rec)
    assert line.startswith("first inf in forward: output of middle (float16")
    rows = {(e["name"], e["phase"]): e for e in rec["entries"]}
    assert rows[("backbone_net.0", "fwd")]["dtype"] == "float16"  # the autocast conv output, as computed
    assert rows[("backbone_net.0", "fwd")]["nonfinite"] == 0
    mid = rows[("middle", "fwd")]
    assert mid["of"] == pytest.approx(mid["nonfinite"] / (2 * 4 * 64), rel=1e-3)  # 4 digits in the jsonl
    # the same model in fp32: finite everywhere, but the what-if says fp16 would overflow there
    torch.manual_seed(0)
    rec = _one_step(Chain(Amplify(1e5)), Amp("none", device="cpu"))
    assert rec["first_nonfinite"] is None and rec["whatif"]
    rows = {(e["name"], e["phase"]): e for e in rec["entries"]}
    assert rows[("middle", "fwd")]["of"] > 0.1 and rows[("backbone_net.1", "fwd")]["of"] == 0


def test_a_bf16_mode_run_in_fp32_arithmetic_is_reported_as_fp32_with_the_fp16_what_if():
    # a CPU without native bf16 runs --amp torch with autocast off (common/cpu.py): the record must not say bf16
    amp = Amp("torch", dtype=torch.bfloat16, device="cpu", fp32_math="no native bf16 (test)")
    torch.manual_seed(0)
    rec = _one_step(Chain(Amplify(1e5)), amp)
    assert rec["dtype"] == "float32" and rec["whatif"]
    rows = {(e["name"], e["phase"]): e for e in rec["entries"]}
    assert rows[("backbone_net.0", "fwd")]["dtype"] == "float32" and rows[("middle", "fwd")]["of"] > 0.1


def test_a_planted_backward_overflow_is_named():
    torch.manual_seed(0)
    model = Chain(BadBackward())
    rec = _one_step(model, Amp("none", device="cpu"))
    first = rec["first_nonfinite"]
    # the gradient of the BN output is the first inf; it came out of the planted module's backward
    assert (first["name"], first["phase"], first["by"]) == ("backbone_net.1", "grad", ["middle"])
    assert "from the backward of middle" in amp_report.describe_culprit(rec)
    order = [(e["name"], e["phase"]) for e in rec["entries"] if e["phase"] == "grad"]
    # backward order: the heads' gradients (finite) before the planted module's, the BN's after it
    assert order.index(("middle", "grad")) < order.index(("backbone_net.1", "grad"))
    assert all(e["nonfinite"] == 0 for e in rec["entries"] if e["phase"] == "fwd")


class _BadWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum((0, 2, 3), keepdim=True) * float("inf")


class BadWeightGrad(nn.Module):
    """x * w per channel; its weight's gradient overflows, the input's does not (fp16's common case: a weight
    gradient sums over every pixel of the batch)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return _BadWeightGrad.apply(x, self.w)


def test_a_weight_gradient_overflow_is_named_as_the_parameters():
    torch.manual_seed(0)
    rec = _one_step(Chain(BadWeightGrad()), Amp("none", device="cpu"))
    first = rec["first_nonfinite"]
    assert (first["name"], first["phase"], first["by"]) == ("middle.w", "pgrad", ["middle"])
    assert amp_report.describe_culprit(rec).startswith("first inf in backward: gradient of the parameter middle.w "
                                                       "(4 of 4 elements; max finite |g|")
    grads = {e["name"]: e for e in rec["entries"] if e["phase"] == "grad"}
    assert grads["backbone_net.1"]["nonfinite"] == 0  # the input's gradient stayed finite


def test_a_container_own_op_and_the_loss_are_named():
    torch.manual_seed(0)

    class Scaled(Chain):  # the overflow is in the container's own arithmetic, not in a child module
        def forward(self, x):
            out = super().forward(x)
            return {"out": out["out"] * float("inf"), "aux": out["aux"]}
    rec = _one_step(Scaled(nn.Identity()), Amp("none", device="cpu"))
    assert (rec["first_nonfinite"]["name"], rec["first_nonfinite"]["phase"]) == ("model[out]", "fwd")

# ----------------------------------------------------------------------------------------------------------------
# the loop: automatic report on the first skipped step and at the stop; bit-identical training


class Net(nn.Module):
    """conv-BN-ReLU, a plantable layer, dropout (RNG draws) and the two heads."""

    def __init__(self):
        super().__init__()
        self.backbone_net = nn.Sequential(*layers.conv_bn_relu(3, 8, 3, stride=2))
        self.planted = Amplify()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = layers.BatchNormAct2d(8)
        self.decoder = nn.Sequential(nn.Dropout2d(0.3), nn.Conv2d(8, 2, 1))
        self.auxiliary_decoder = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.planted(self.backbone_net(x))
        f = self.bn2(self.conv2(f), residual=f)
        return {"out": self.decoder(f), "aux": self.auxiliary_decoder(f)}


class PlantAt:
    """Forward pre-hook: the planted layer multiplies by inf while the lr is the lr of iteration `at` (1-based).
    Keyed on the lr, not on a call count, so a replay of that step sees the same overflow."""

    def __init__(self, opt_ref, lrs):
        self.opt_ref, self.lrs = opt_ref, lrs

    def __call__(self, module, args):
        module.factor = float("inf") if self.opt_ref and self.opt_ref[0].param_groups[0]["lr"] in self.lrs else 1.0


class PlantOnce(PlantAt):
    """The real step overflows and its replay does not (what GPU non-determinism can do to a marginal overflow)."""
    planted = False

    def __call__(self, module, args):
        super().__call__(module, args)
        if module.factor != 1.0:
            module.factor = 1.0 if self.planted else module.factor
            self.planted = True


def _fit(tmp_path, amp, skip_iters=(), plant=PlantAt, **over):
    torch.manual_seed(0)
    cfg = dict(config.DEFAULTS, num_classes=2, max_iters=4, batch_size=2, num_workers=0, log_interval=1,
               eval_interval_epochs=0, save_interval_epochs=0, work_dir=str(tmp_path), kernels="torch",
               max_skipped_steps=3, lr=0.01)
    cfg.update(over)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    opt_ref = []
    lrs = {train.poly_lr(i - 1, cfg["max_iters"], cfg["lr"], cfg["power"], cfg["min_lr"]) for i in skip_iters}
    model.planted.register_forward_pre_hook(plant(opt_ref, lrs))
    model, opt = amp.initialize(model, opt)
    opt_ref.append(opt)
    loader = data.train_loader(Toy(), 2, 0, seed=0, num_items=4)
    log = train.Logger(str(tmp_path))
    err = None
    try:
        train.fit(cfg, model, opt, amp, loader, None, 0, "cpu", log)
    except train.TooManySkippedSteps as e:
        err = e
    return model, opt, err


def _log(tmp_path):
    with open(tmp_path / "log.txt") as f:
        return f.read()


def _reports(tmp_path):
    return amp_report.read_records(str(tmp_path / "amp_report.jsonl"))


def test_the_first_skipped_step_is_diagnosed_and_names_the_planted_layer(tmp_path):
    _, _, err = _fit(tmp_path, Amp("none", device="cpu"), skip_iters=(2,))
    assert err is None
    log = _log(tmp_path)
    assert "skipped step at it 2 (loss scale 1 -> 1): first inf/NaN in forward: output of planted (float32" in log
    recs = _reports(tmp_path)
    assert [(r["iteration"], r["trigger"], r["skipped"]) for r in recs] == [(2, "first skipped step (replayed)", True)]
    assert recs[0]["first_nonfinite"]["by"] == ["planted"]
    assert os.path.getsize(tmp_path / "amp_report.png") > 5000


def test_a_skip_whose_replay_stays_finite_says_it_did_not_reproduce(tmp_path):
    _, _, err = _fit(tmp_path, Amp("none", device="cpu"), skip_iters=(2,), plant=PlantOnce)
    assert err is None
    assert ("skipped step at it 2 (loss scale 1 -> 1): the replay of this batch stayed finite, so the overflow did "
            "not reproduce (amp_report.jsonl") in _log(tmp_path)  # (the CUDA note only on CUDA)
    assert _reports(tmp_path)[0]["first_nonfinite"] is None


def test_summary_scalars_reach_tensorboard(tmp_path):
    got = []

    class FakeWriter:  # the tensorboard package is optional; common.tboard.Writer.record's interface
        def record(self, kv):
            got.append(kv)
    log = train.Logger()
    log.work_dir, log.tb = str(tmp_path), FakeWriter()
    rec = _one_step(Chain(nn.Identity()), Amp("none", device="cpu"))
    rep = amp_report.AmpReport({"amp_report": 1}, nn.Linear(1, 1), Amp("none", device="cpu"), None, str(tmp_path),
                               log, None)
    rep.write(rec)
    assert [g["kind"] for g in got] == ["amp_report"]
    s = got[0]
    assert s["iteration"] == 1 and s["nonfinite"] == 0 and s["grad_scale"] == rec["grad_scale"]
    assert s["fwd_max_log2"] == pytest.approx(max(math.log2(e["max"]) for e in rec["entries"] if e["phase"] == "fwd"),
                                              abs=1e-5)
    assert 0 <= s["grad_underflow"] < 1 and s["fwd_overflow"] == 0


def test_the_stop_for_too_many_skipped_steps_is_diagnosed(tmp_path):
    # apex O2 bf16: a half model; steps 2, 3, 4 all overflow in the planted layer -> stop after the 3rd skip
    _, _, err = _fit(tmp_path, Amp("apex", opt_level="O2", dtype=torch.bfloat16, device="cpu"), skip_iters=(2, 3, 4),
                     max_iters=5)
    assert err is not None and "last 3 steps were all skipped" in str(err)
    recs = _reports(tmp_path)
    assert [(r["iteration"], r["trigger"]) for r in recs] == [
        (2, "first skipped step (replayed)"), (4, "stop: too many skipped steps (replayed)")]
    assert all(r["first_nonfinite"]["name"] == "planted" and r["first_nonfinite"]["dtype"] == "bfloat16"
               for r in recs)
    log = _log(tmp_path)
    assert log.index("skipped step at it 4") < log.index("stopping at iteration 4")


def _state(model, opt):
    out = {f"m.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out[f"o.{i}"] = s["momentum_buffer"].clone()
    return out


def _losses(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [(r["loss"], r["skipped"], r["loss_scale"]) for r in map(json.loads, f) if r["kind"] == "train"]


MODES = [("none", "O1", torch.float32, "torch"), ("torch", "O1", torch.bfloat16, "torch"),
         ("apex", "O2", torch.bfloat16, "torch"), ("torch", "O1", torch.float16, "torch"),
         ("apex", "O1", torch.float16, "torch"), ("apex", "O2", torch.float16, "torch"),
         ("apex", "O3", torch.float16, "torch"), ("none", "O1", torch.float32, "fused"),
         ("torch", "O1", torch.bfloat16, "fused"), ("apex", "O2", torch.float16, "fused")]


@pytest.mark.parametrize("kind,opt_level,dtype,kernels", MODES,
                         ids=[f"{k}-{o}-{str(d)[6:]}-{n}" for k, o, d, n in MODES])
def test_training_is_bit_identical_with_and_without_reports(tmp_path, monkeypatch, kind, opt_level, dtype, kernels):
    """Three runs with a skipped step at it 3: no report at all (the replay switched off), the automatic replay
    only, and --amp_report 1 (hooks on every step). Same losses, weights, BN buffers, momentum, loss scale."""
    if kernels == "fused":
        import common
        if not common.extension_loaded():
            pytest.skip("common._C is not built")
    layers.set_kernels(kernels)
    try:
        runs = {}
        for name, every in (("plain", 0), ("replay", 0), ("hooks", 1)):
            folder = tmp_path / name
            with monkeypatch.context() as mp:
                if name == "plain":
                    mp.setattr(amp_report.AmpReport, "replay", lambda self, *a: amp_report.Recorder(self.raw))
                dt = "float16" if dtype == torch.float32 else dtype
                model, opt, err = _fit(folder, Amp(kind, opt_level=opt_level, dtype=dt, device="cpu",
                                                   init_scale=2.0 ** 8), skip_iters=(3,), amp_report=every)
            assert err is None
            runs[name] = (_state(model, opt), _losses(folder))
        assert [s for _, s, _ in runs["plain"][1]] == [0, 0, 1, 1]  # (the running total)
        assert len(_reports(tmp_path / "hooks")) == 4 and len(_reports(tmp_path / "replay")) == 1
        conv2 = next(e for e in _reports(tmp_path / "hooks")[0]["entries"] if e["name"] == "conv2")
        assert conv2["dtype"] == str(dtype)[6:]  # what the mode computes: fp32, autocast's or the half model's type
        for name in ("replay", "hooks"):
            assert runs[name][1] == runs["plain"][1], name
            for k, v in runs["plain"][0].items():
                assert torch.equal(runs[name][0][k], v), (name, k)
    finally:
        layers.set_kernels("torch")

# ----------------------------------------------------------------------------------------------------------------
# the picture and the command


def _entry(name, phase, mx, uf=0.0, nonfinite=0):
    return dict(name=name, phase=phase, order=0, type="Conv2d", dtype="float16", numel=100, max=mx, nonfinite=nonfinite,
                nan=0, zero=0.0, of=0.0, uf=uf, sub=0.0, bf_of=0.0, bf_uf=0.0, bf_sub=0.0)


def _records():
    recs = []
    for it, (a, b) in ((10, (2.0 ** 3, 2.0 ** 17)), (20, (2.0 ** -20, 2.0 ** 5))):
        recs.append(dict(kind="amp_report", iteration=it, trigger="every 10", amp="amp=torch (test)", dtype="float16",
                         loss_scale=2.0 ** 10, grad_scale=2.0 ** 10, whatif=False, first_nonfinite=None, skipped=False,
                         entries=[_entry("stem.conv", "fwd", a), _entry("head.conv", "fwd", b, uf=0.5, nonfinite=3),
                                  _entry("head.conv", "grad", 2.0 ** 12), _entry("stem.conv", "grad", 2.0 ** -20,
                                                                                 uf=1e-3)]))
    return recs


def test_the_picture_is_drawn_from_the_jsonl(tmp_path):
    pytest.importorskip("matplotlib")
    import cv2
    from matplotlib.colors import Normalize
    path = tmp_path / "amp_report.jsonl"
    with open(path, "w") as f:
        for r in _records():
            f.write(json.dumps(r) + "\n")
        f.write('{"kind": "amp_re')  # a run killed mid-write
    r = subprocess.run([sys.executable, "-m", "common.amp_report", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "1 line(s) not JSON, skipped (line 3)" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("the 4 closest to fp16 overflow")  # 2 names x (output, grad of output)
    assert "head.conv" in lines[2] and "inf/NaN" in lines[2]  # the one holding an inf comes first
    assert "head.conv" in lines[3] and "grad of output" in lines[3] and "max 4.1e+03" in lines[3]
    assert "stem.conv" in lines[4] and "max 8 (2^  3.00" in lines[4]
    img = cv2.imread(str(tmp_path / "amp_report.png"))[:, :, ::-1]  # RGB
    layout = amp_report.draw(_records(), str(tmp_path / "again.png"), layout=True)
    assert (cv2.imread(str(tmp_path / "again.png"))[:, :, ::-1] == img).all()

    def cell(panel, i, j):  # the centre pixel of row i, column j of a panel
        x0, y0, x1, y1 = layout[panel]
        return img[int(y0 + (i + 0.5) * (y1 - y0) / 2), int(x0 + (j + 0.3) * (x1 - x0) / 2)].astype(int)

    cmap, norm = amp_report._cmap(), Normalize(*amp_report.LOG2_LIM)

    def rgb(v):
        return np.array([round(255 * c) for c in cmap(norm(v))[:3]])
    assert np.abs(cell("fmax", 0, 0) - rgb(3.0)).max() <= 3        # stem.conv at it 10: 2^3, the normal range
    assert np.abs(cell("fmax", 0, 1) - rgb(-20.0)).max() <= 3      # stem.conv at it 20: 2^-20, subnormal (blue)
    assert np.abs(cell("fmax", 1, 0) - rgb(17.0)).max() <= 3       # head.conv at it 10: 2^17, over fp16's max (red)
    assert cell("fmax", 1, 0)[0] > 120 and cell("fmax", 1, 0)[2] < 60
    assert np.abs(cell("gmax", 0, 0) - rgb(-20.0)).max() <= 3      # stem grad 2^-20 (as computed: x S already)
    assert np.abs(cell("gmax", 1, 1) - rgb(12.0)).max() <= 3
    purple = cell("fuf", 1, 0)                                      # 50% underflow: dark purple; 0%: white
    assert purple[1] < 150 and (cell("fuf", 0, 0) > 250).all()
    x0, y0, x1, y1 = layout["fmax"]  # the inf marker sits on the centre of head.conv's cells
    centre = img[int(y0 + 1.5 * (y1 - y0) / 2), int(x0 + 0.5 * (x1 - x0) / 2)].astype(int)
    assert centre.max() < 80


def test_the_loss_scale_strip_has_its_points_over_the_gradient_columns(tmp_path):
    pytest.importorskip("matplotlib")
    layout = amp_report.draw(_records(), str(tmp_path / "a.png"), layout=True)
    # the strip's x axis is the report columns (-0.5 .. n - 0.5), as the panel's: the same left and right edges
    assert layout["scale"][0] == pytest.approx(layout["gmax"][0], abs=1)
    assert layout["scale"][2] == pytest.approx(layout["gmax"][2], abs=1)


def test_a_long_amp_description_wraps_inside_the_picture(tmp_path):
    pytest.importorskip("matplotlib")
    import cv2
    recs = _records()[:1]  # one column and short names: the narrowest picture
    recs[0]["amp"] = ("amp=apex O1 (ours, apex semantics; bf16 mode with torch.autocast('cpu') off: fp32 arithmetic, "
                      "no loss scaling, non-finite steps skipped; this CPU has no native bf16 matmul, so fp32 ran)")
    layout = amp_report.draw(recs, str(tmp_path / "a.png"), layout=True)
    h, w = cv2.imread(str(tmp_path / "a.png")).shape[:2]
    x0, y0, x1, y1 = layout["header"]
    assert 0 <= x0 and x1 <= w and 0 <= y0
    assert y1 < layout["scale"][1]  # above the loss-scale panel, not over it
    assert y1 - y0 > 3 * 8  # it did wrap: three lines or more at 8 pt


def test_command_errors_and_the_flag(tmp_path):
    r = subprocess.run([sys.executable, "-m", "common.amp_report", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    # a run that has not reported yet, and a file that is not text: one line each, exit 1
    for content, says in ((b"", "holds no report yet"), (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "is not a text file")):
        (tmp_path / "amp_report.jsonl").write_bytes(content)
        r = subprocess.run([sys.executable, "-m", "common.amp_report", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 1 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    with pytest.raises(SystemExit):
        config.parse(None, ["--amp_report", "-1"], "x")
    assert config.parse(None, ["--amp_report", "50"], "x")["amp_report"] == 50
    assert config.DEFAULTS["amp_report"] == 0

# ----------------------------------------------------------------------------------------------------------------
# --compile (the report step is an eager replay before the compiled step) and DDP (each rank records, rank 0 writes)


def _compiled_check(tmp_path):
    from pathlib import Path
    tmp_path = Path(tmp_path)
    from common.compile import compile_module
    runs = {}
    for every in (0, 2):
        torch.manual_seed(0)
        cfg = dict(config.DEFAULTS, num_classes=2, max_iters=4, batch_size=2, num_workers=0, log_interval=1,
                   eval_interval_epochs=0, save_interval_epochs=0, work_dir=str(tmp_path / str(every)),
                   kernels="torch", amp_report=every)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        amp = Amp("none", device="cpu")
        model, opt = amp.initialize(model, opt)
        compile_module(model, "default", log=lambda *a: None, backend="aot_eager")
        loader = data.train_loader(Toy(), 2, 0, seed=0, num_items=4)
        train.fit(cfg, model, opt, amp, loader, None, 0, "cpu", train.Logger(cfg["work_dir"]))
        assert model._compiled_call_impl is not None  # still compiled after the replays
        runs[every] = (_state(model, opt), _losses(tmp_path / str(every)))
    recs = _reports(tmp_path / "2")
    assert [(r["iteration"], r["trigger"]) for r in recs] == [(2, "every 2, eager replay (--compile)"),
                                                              (4, "every 2, eager replay (--compile)")]
    assert any(e["name"] == "bn2" and e["phase"] == "grad" for e in recs[0]["entries"])
    assert runs[2][1] == runs[0][1]
    for k, v in runs[0][0].items():
        assert torch.equal(runs[2][0][k], v), k


def test_compiled_model_reports_by_an_eager_replay_and_trains_identically(tmp_path):
    # in a child process: a backward through a compiled graph starts autograd threads, after which the fork-based
    # 2-rank tests (here and in tests/test_dist.py) could not fork
    code = f"import test_amp_report as t; t._compiled_check({str(tmp_path)!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_ranks_each_record_rank_0_writes_and_training_is_unchanged(tmp_path):
    from test_dist import _argv, _free_port, _worker_trainer, spawn
    root = str(tmp_path / "ade")
    data.make_demo_ade20k(root, num_train=8, num_val=5, seed=0)
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    runs = [_argv(root, off, "--eval_interval_epochs", "0"), _argv(root, on, "--eval_interval_epochs", "0",
                                                                   "--amp_report", "2")]
    spawn(_worker_trainer, tmp_path, [_free_port() for _ in runs], runs)
    from common import runs as run_folders
    (off,), (on,) = run_folders.runs(off), run_folders.runs(on)
    recs = _reports(__import__("pathlib").Path(on))
    assert [r["iteration"] for r in recs] == [2, 4]  # written once (rank 0), not once per rank
    a = torch.load(os.path.join(off, "checkpoint-final.pth"), weights_only=False)["model"]
    b = torch.load(os.path.join(on, "checkpoint-final.pth"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _worker_planted(port, argv):
    from test_dist import TinySeg

    class Planted(TinySeg):  # rank 1 only: inf logits in its 3rd training forward and the replay of that step
        calls = 0

        def forward(self, x):
            out = super().forward(x)
            if self.training:
                Planted.calls += 1
                if dist.rank() == 1 and Planted.calls in (3, 4):
                    out = dict(out, out=out["out"] * float("inf"))
            return out
    os.environ["MASTER_PORT"] = str(port)
    train.main({}, lambda cfg=None, num_classes=150: Planted(num_classes), argv, name="tiny")


def test_two_ranks_the_skipped_step_line_names_the_rank_that_overflowed(tmp_path):
    from test_dist import _argv, _free_port, spawn
    root = str(tmp_path / "ade")
    data.make_demo_ade20k(root, num_train=8, num_val=5, seed=0)
    spawn(_worker_planted, tmp_path, _free_port(), _argv(root, str(tmp_path / "w"), "--eval_interval_epochs", "0"))
    from common import runs as run_folders
    (run,) = run_folders.runs(str(tmp_path / "w"))
    with open(os.path.join(run, "log.txt")) as f:
        log = f.read()
    assert "skipped step at it 3 (loss scale 1 -> 1): rank 1: first" in log
    assert "in forward: output of model[out]" in log
    (rec,) = _reports(__import__("pathlib").Path(run))
    assert rec["first_nonfinite"]["rank"] == 1 and rec["ranks_first_nonfinite"][1]["name"] == "model[out]"


def test_summary_scalars_by_hand():
    """fwd_underflow weights each tensor's flushed + subnormal shares by its size; the gradient's max is read at the
    scale the report asks about (grad_scale), not the one its backward ran at (loss_scale)."""
    def e(phase, numel, mx, uf=0.0, sub=0.0):
        return dict(phase=phase, numel=numel, max=mx, uf=uf, sub=sub, of=0.0, nonfinite=0)
    rec = dict(loss_scale=256.0, grad_scale=1024.0,
               entries=[e("fwd", 100, 8.0, uf=0.1, sub=0.2), e("fwd", 300, 1024.0, sub=0.1), e("grad", 100, 128.0)])
    s = amp_report.summary(rec)
    assert s["fwd_underflow"] == 0.15 and s["fwd_max_log2"] == 10.0 and s["grad_max_log2"] == 9.0  # log2(128 * 4)
    assert s["grad_scale"] == 1024.0 and s["nonfinite"] == 0
    # the parameters' gradients count too (the scaler skips a step for theirs): the largest and the shares of both
    rec["entries"] += [e("pgrad", 300, 4096.0, uf=0.5), e("param", 10, 2.0 ** 20)]
    s = amp_report.summary(rec)
    assert s["grad_max_log2"] == 14.0 and s["grad_underflow"] == 0.375 and s["fwd_max_log2"] == 10.0
