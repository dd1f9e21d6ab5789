"""Does this CPU run bf16 fast? The answer decides what `--amp torch|apex` with `--amp_dtype auto` computes in on CPU.

bf16 convolutions are fast only where oneDNN has bf16 kernels that use bf16 instructions: AVX512-BF16 or AMX on
x86. Elsewhere (AVX2, the instruction set of most laptops and many servers) a bf16 convolution falls back to a slow
reference path: the demo's 250 iterations took hours instead of minutes (issue 21: 0.1-0.3 img/s vs ~7). So we ask
  - the CPU: its flags (/proc/cpuinfo) name avx512_bf16 or amx_bf16;
  - oneDNN as torch built it: torch.ops.mkldnn._is_mkldnn_bf16_supported() (torch 2.11 and 2.14 both have it; it
    honours ONEDNN_MAX_CPU_ISA, but also says yes for AVX512_CORE, where oneDNN only emulates bf16);
  - the environment: ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA naming an ISA below AVX512_CORE_BF16 keeps oneDNN off the
    bf16 instructions even where the CPU has them (that is how we emulate an AVX2 CPU on a bf16 one);
and say why when the answer is no. Only x86 on Linux is probed through its flags; elsewhere oneDNN's answer stands.
"""
import functools
import os
import platform

import torch

# oneDNN's ONEDNN_MAX_CPU_ISA values below AVX512_CORE_BF16 (oneDNN's cpu_isa_t order); any other value (the bf16
# ones, the AMX / AVX10 ones above them, ALL, or a name oneDNN ignores) leaves the bf16 instructions usable
_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 where oneDNN cannot use bf16 instructions, against fp32: the demo's PSPNet training step (batch 4, 64x64, one
# thread, process CPU time, median) on our AMD EPYC with AVX512-BF16, torch 2.14.1: fp32 0.99 s, bf16 autocast 0.79 s
# natively; with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2: fp32 1.31 s, bf16 15.3 s; with
# ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI (AVX-512 without BF16, where oneDNN emulates bf16): fp32 1.08 s, bf16 1.56 s.
# So fp32 is the faster choice on every CPU without bf16 instructions, by 1.4x to 12x.
SLOW = "a bf16 training step took ~12x fp32's time on AVX2"


def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _onednn_bf16():
    """oneDNN's own answer (None: this torch has no such query)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def _x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.lru_cache(maxsize=None)
def native_bf16():
    """(True, what) where bf16 convolutions run on bf16 instructions here; else (False, why), one phrase each."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False, "oneDNN (mkldnn) is off in this torch, so convolutions take ATen's reference path"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    onednn = _onednn_bf16()
    if not _x86():
        return (True, f"oneDNN reports bf16 support on this {platform.machine()} CPU") if onednn else \
            (False, f"oneDNN reports no bf16 support on this {platform.machine()} CPU")
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo: only oneDNN to go by (it says yes on AVX512_CORE without BF16 too)
        return (True, "oneDNN reports bf16 support (CPU flags not readable here)") if onednn else \
            (False, "oneDNN reports no bf16 support (CPU flags not readable here)")
    have = [f for f in _BF16_FLAGS if f in flags]
    if not have:
        return False, "no AVX512-BF16 or AMX-BF16 in this CPU's flags"
    if isa and isa.strip().upper() in _BELOW_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN below AVX512_CORE_BF16 (the CPU has {'/'.join(have)})"
    if onednn is False:
        return False, f"this torch's oneDNN reports no bf16 support (the CPU has {'/'.join(have)})"
    return True, f"this CPU has {'/'.join(have)}"


def amp_plan(requested, device_type, kind, opt_level):
    """(dtype, fp32_math, note) for Amp: its half type, the reason to run it with autocast off (or None), and one
    line for the log (or None).

    requested: --amp_dtype ('auto' | 'float16' | 'bfloat16'). CUDA: fp16 for auto (the reference). CPU: bf16 (the
    one half type with fast kernels there, common/amp.py) where the CPU runs it natively. Without native bf16 an
    autocast mode (--amp torch, apex O1) keeps bf16's AMP code path (no loss scale, the non-finite check, skipped
    steps) with autocast off, i.e. fp32 arithmetic: its bf16 convolutions would take hours there, fp32 ones take
    minutes, and the half type's rounding is all such a run would add. Not an autocast in bf16 "where it is cheap":
    on these networks the convolutions are the work, and they are exactly what is slow. apex O2/O3 *are* a half
    model, so they keep bf16 and warn. An explicit --amp_dtype is always honoured, with a warning where it is slow.
    """
    if device_type != "cpu":
        return (torch.float16 if requested == "auto" else getattr(torch, requested)), None, None
    from .amp import cpu_half_dtype
    dtype = cpu_half_dtype() if requested == "auto" else getattr(torch, requested)
    if kind == "none" or (kind == "apex" and opt_level == "O0") or dtype != torch.bfloat16:
        return dtype, None, None  # fp32 arithmetic anyway, or fp16 (asked for: never fast on CPU, common/amp.py)
    native, why = native_bf16()
    if requested == "bfloat16" and not native:
        return dtype, None, (f"WARNING: --amp_dtype bfloat16 on a CPU without native bf16 ({why}): bf16 "
                             f"convolutions take a slow path ({SLOW}); --amp_dtype auto runs fp32 arithmetic")
    if requested != "auto":
        return dtype, None, None
    if native:
        return dtype, None, f"cpu: --amp_dtype auto is bf16 ({why})"
    if kind == "torch" or opt_level == "O1":
        return dtype, f"no native bf16 here: {why}; --amp_dtype bfloat16 forces bf16 ({SLOW})", None
    return dtype, None, (f"WARNING: --amp apex {opt_level} casts the model to bf16 and this CPU has no native bf16 "
                         f"({why}): {SLOW}; --amp torch runs fp32 arithmetic here")
