"""Builds the host flavour of the CUDA ops: csrc/bn_relu_cuda.cu and csrc/upsample_cuda.cu compiled as C++ against
the host runner (csrc/cuda_host/), registered as torch.ops.segfp16_cudahost.* (ieee) or
torch.ops.segfp16_cudahost_fast.* (fast: FMA contraction, __expf / __logf models, flush-to-zero, as nvcc
--use_fast_math), torch.ops.segfp16_cudahost_asan.* (AddressSanitizer + UndefinedBehaviorSanitizer: the host's
compute-sanitizer memcheck) or torch.ops.segfp16_cudahost_tsan.* (ThreadSanitizer: its racecheck) on CPU and meta
tensors. No GPU, driver or CUDA headers are needed; the sanitizer flavours load only in a process started with
sanitizer_env().

The build directory persists (SEG_CUDAHOST_BUILD, default ~/.cache/segfp16-cudahost/<flavour>): ninja rebuilds only
what changed, so a repeated test run pays nothing.
"""
import os
import subprocess
import time

import torch

import jit_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = [os.path.join(CSRC, "cuda_host", f) for f in ("library.cpp", "runner.cpp", "bn_relu_cuda.cpp",
                                                        "upsample_cuda.cpp")]
FLAVOURS = {
    # -O1: the kernels' code is small, the build is dominated by ATen's headers; -O1 vs -O2 changes no result
    "ieee": ["-O1", "-ffp-contract=off"],
    "fast": ["-O1", "-ffp-contract=fast", "-mfma", "-DSEGFP16_HOST_FAST_MATH"],
    # the host's memcheck and racecheck (UBSan would print and go on: -fno-sanitize-recover ends the process)
    "asan": ["-O1", "-ffp-contract=off", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-ffp-contract=off", "-fsanitize=thread"],
}


def sanitizer_env(flavour):
    """The environment of a process that loads the asan or tsan flavour, or None where GCC lacks that runtime.
    Python is not instrumented, so the runtime is preloaded ahead of it, with libstdc++ (ASan intercepts its
    __cxa_throw, and our ops throw). The first report ends the process. asan: no leak check (Python and torch keep
    their allocations until exit). tsan: one OpenMP thread, since torch's own parallel loops synchronise inside
    libgomp, which TSan cannot see (it would report races in TensorIterator that are not there)."""
    libs = []
    for name in (f"lib{flavour}.so", "libstdc++.so"):
        try:
            path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        except OSError:
            return None
        if not os.path.isabs(path):  # gcc echoes the bare name when it has no such library
            return None
        libs.append(path)
    env = dict(os.environ, LD_PRELOAD=" ".join(libs), SEGFP16_CUDAHOST_FLAVOUR=flavour)
    if flavour == "asan":
        env.update(ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    else:
        env.update(TSAN_OPTIONS="halt_on_error=1", OMP_NUM_THREADS="1")
    return env


def load(flavour="ieee"):
    """Builds (or reuses) the flavour's library and returns its op namespace (torch.ops.<lib>)."""
    lib = "segfp16_cudahost" if flavour == "ieee" else f"segfp16_cudahost_{flavour}"
    if hasattr(torch.ops, lib) and hasattr(getattr(torch.ops, lib), "flavour"):
        return getattr(torch.ops, lib)
    base = os.environ.get("SEG_CUDAHOST_BUILD", os.path.join(os.path.expanduser("~"), ".cache", "segfp16-cudahost"))
    build = os.path.join(base, flavour)
    t0 = time.time()
    jit_build.load(build, name=lib, sources=SOURCES, is_python_module=False,
                   extra_cflags=["-std=c++20", "-pthread", "-DSEGFP16_CUDA_HOST", f"-DSEGFP16_HOST_LIB={lib}",
                                 *FLAVOURS[flavour]],
                   extra_ldflags=["-pthread", *(f for f in FLAVOURS[flavour] if f.startswith("-fsanitize"))],
                   extra_include_paths=[CSRC])
    print(f"[cuda_host] {lib} ready in {time.time() - t0:.1f} s ({build})")
    ns = getattr(torch.ops, lib)
    assert ns.flavour() == flavour
    return ns
