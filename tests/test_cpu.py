"""common/cpu.py: the native-bf16 probe (CPU flags, oneDNN, ONEDNN_MAX_CPU_ISA) and the CPU AMP plan it drives."""
import pytest
import torch
import torch.nn as nn

from common import cpu, train
from common.amp import Amp


@pytest.fixture
def probe(monkeypatch):
    """Set what the probe sees: probe(flags, onednn, isa=None, x86=True); returns native_bf16()'s answer."""
    def run(flags, onednn, isa=None, x86=True):
        cpu.native_bf16.cache_clear()
        monkeypatch.setattr(cpu, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(cpu, "_onednn_bf16", lambda: onednn)
        monkeypatch.setattr(cpu, "_x86", lambda: x86)
        for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(var, raising=False)
        if isa:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        return cpu.native_bf16()
    yield run
    cpu.native_bf16.cache_clear()  # the next test sees this machine again


def test_native_bf16_needs_the_instructions_and_onednn_allowed_to_use_them(probe):
    avx2, bf16, amx = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_bf16"}, {"avx2", "amx_tile", "amx_bf16"}
    assert probe(bf16, True) == (True, "this CPU has avx512_bf16")
    assert probe(amx, True) == (True, "this CPU has amx_bf16")
    ok, why = probe(avx2, True)  # oneDNN says yes on AVX512_CORE too (emulated bf16): the flags decide on x86
    assert not ok and "no AVX512-BF16 or AMX-BF16" in why
    ok, why = probe({"avx512f", "avx512bw"}, True)  # Skylake-X: AVX-512 without BF16
    assert not ok
    for isa in ("AVX2", "avx512_core", "AVX512_CORE_VNNI", "AVX2_VNNI_2"):  # the emulation variable is honoured
        ok, why = probe(bf16, False if "AVX2" in isa.upper() else True, isa)
        assert not ok and f"ONEDNN_MAX_CPU_ISA={isa}" in why, isa
    for isa in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL"):
        assert probe(bf16, True, isa)[0], isa
    ok, why = probe(bf16, False)
    assert not ok and "oneDNN reports no bf16" in why
    assert probe(None, True)[0] and "not readable" in probe(None, True)[1]  # no /proc/cpuinfo: oneDNN decides
    assert not probe(None, False)[0]
    assert probe(None, True, x86=False)[0] and not probe(None, False, x86=False)[0]  # ARM: oneDNN's answer


def test_native_bf16_off_without_onednn(probe, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    ok, why = probe({"avx512_bf16"}, True)
    assert not ok and "mkldnn" in why


def test_probe_runs_on_this_machine():
    cpu.native_bf16.cache_clear()
    ok, why = cpu.native_bf16()
    assert isinstance(ok, bool) and why
    assert cpu._onednn_bf16() in (True, False, None)


@pytest.mark.parametrize("native", [True, False])
def test_amp_plan(monkeypatch, native):
    why = "this CPU has avx512_bf16" if native else "no AVX512-BF16 or AMX-BF16 in this CPU's flags"
    monkeypatch.setattr(cpu, "native_bf16", lambda: (native, why))
    bf16, fp16 = torch.bfloat16, torch.float16
    # GPUs: fp16 (the reference) unless asked; never fp32 arithmetic
    assert cpu.amp_plan("auto", "cuda", "torch", "O1") == (fp16, None, None)
    assert cpu.amp_plan("bfloat16", "cuda", "apex", "O2") == (bf16, None, None)
    # fp32 modes: nothing to say
    assert cpu.amp_plan("auto", "cpu", "none", "O1") == (bf16, None, None)
    assert cpu.amp_plan("auto", "cpu", "apex", "O0") == (bf16, None, None)
    for kind, level in (("torch", "O1"), ("apex", "O1")):
        dtype, fp32_math, note = cpu.amp_plan("auto", "cpu", kind, level)
        assert dtype == bf16
        if native:  # today's behaviour: bf16 autocast, and the log says why
            assert fp32_math is None and note == f"cpu: --amp_dtype auto is bf16 ({why})"
        else:  # the AMP code path in fp32 arithmetic; the reason goes into the amp line
            assert note is None and why in fp32_math and "--amp_dtype bfloat16" in fp32_math
        # an explicit dtype is honoured; bf16 without native support says it is slow
        dtype, fp32_math, note = cpu.amp_plan("bfloat16", "cpu", kind, level)
        assert (dtype, fp32_math) == (bf16, None)
        assert (note is None) if native else (note.startswith("WARNING: --amp_dtype bfloat16") and why in note)
        assert cpu.amp_plan("float16", "cpu", kind, level) == (fp16, None, None)
    for level in ("O2", "O3"):  # a half model by definition: kept, with a warning where bf16 is slow
        dtype, fp32_math, note = cpu.amp_plan("auto", "cpu", "apex", level)
        assert (dtype, fp32_math) == (bf16, None)
        assert note.startswith("cpu:") if native else note.startswith(f"WARNING: --amp apex {level} casts")


def test_fp32_math_keeps_the_amp_path_without_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    amp = Amp("torch", dtype=torch.bfloat16, device="cpu", fp32_math="test: no bf16")
    amp.initialize(net, opt)
    x = torch.randn(2, 3, 8, 8)
    with amp.autocast():
        out = net(x)
    assert out.dtype == torch.float32 and not amp.use_autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16  # what the same mode computes without fp32_math
    amp.backward(out.float().sum(), opt)
    assert not amp.step(opt)
    net[0].weight.grad = None
    with amp.autocast():
        loss = net(x).sum() * float("inf")
    amp.backward(loss, opt)
    assert amp.step(opt)  # the non-finite check and the skipped step are still there
    d = amp.describe()
    assert d.startswith("amp=torch (bf16 mode with torch.autocast('cpu') off: fp32 arithmetic") and "test: no bf16" in d
    assert amp.state_dict() == {} and amp.loss_scale == 1.0  # bf16's: no scaler, so checkpoints move between CPUs
    d = Amp("apex", "O1", dtype=torch.bfloat16, device="cpu", fp32_math="test").describe()
    assert d.startswith("amp=apex O1 (our implementation") and "fp32 arithmetic" in d
    for bad in (dict(kind="apex", opt_level="O2", dtype=torch.bfloat16), dict(kind="torch", dtype=torch.float16),
                dict(kind="none")):
        with pytest.raises(ValueError, match="fp32_math"):
            Amp(device="cpu", fp32_math="x", **bad)


class _Tiny(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.backbone_net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.decoder, self.auxiliary_decoder = nn.Conv2d(4, num_classes, 1), nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        f = self.backbone_net(x)
        return {'out': self.decoder(f), 'aux': self.auxiliary_decoder(f)}


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_main_log_names_what_ran_on_a_cpu_without_bf16(tmp_path, monkeypatch, capsys, dtype):
    """The demo's command on a CPU without native bf16: one line says fp32 arithmetic and why; the eval line agrees.
    An explicit --amp_dtype bfloat16 still runs bf16, after a one-line warning."""
    from test_train import _seg_cfg
    monkeypatch.setattr(cpu, "native_bf16", lambda: (False, "no AVX512-BF16 or AMX-BF16 in this CPU's flags"))
    argv = ['--data', 'demo', '--amp', 'torch', '--amp_dtype', dtype, '--device', 'cpu', '--kernels', 'torch',
            '--crop_size', '(32, 32)', '--scale', '(128, 32)', '--batch_size', '2', '--num_workers', '0',
            '--num_train_images', '2', '--num_val_images', '1', '--max_iters', '1', '--save_predictions', '0',
            '--work_dir', str(tmp_path)]
    metrics = train.main(_seg_cfg(), lambda cfg=None, num_classes=150: _Tiny(num_classes), argv, name='tiny')
    out = capsys.readouterr().out
    amp_lines = [line for line in out.splitlines() if ' amp: ' in line]
    warnings = [line for line in out.splitlines() if 'WARNING: --amp_dtype bfloat16' in line]
    assert len(amp_lines) == 1
    if dtype == "auto":
        assert "fp32 arithmetic" in amp_lines[0] and "no AVX512-BF16 or AMX-BF16" in amp_lines[0]
        assert not warnings and metrics["precision"] == "fp32"
        # --eval --eval_amp asks for the half type: the same choice, and a line that says so
        metrics = train.main(_seg_cfg(), lambda cfg=None, num_classes=150: _Tiny(num_classes),
                             argv + ['--eval', str(tmp_path), '--eval_amp'], name='tiny')
        out = capsys.readouterr().out
        assert "eval_amp: amp=torch (bf16 mode with torch.autocast('cpu') off: fp32 arithmetic" in out
        assert metrics["precision"] == "fp32"
    else:
        assert "torch.autocast('cpu', torch.bfloat16)" in amp_lines[0] and len(warnings) == 1
        assert "no AVX512-BF16 or AMX-BF16" in warnings[0] and metrics["precision"] == "bf16 folded weights"
