"""Builds the host flavour of the CUDA ops: csrc/bn_relu_cuda.cu and csrc/upsample_cuda.cu compiled as C++ against
the host runner (csrc/cuda_host/), registered as torch.ops.segfp16_cudahost.* (ieee) or
torch.ops.segfp16_cudahost_fast.* (fast: FMA contraction, __expf / __logf models, flush-to-zero, as nvcc
--use_fast_math) on CPU and meta tensors. No GPU, driver or CUDA headers are needed.

The build directory persists (SEG_CUDAHOST_BUILD, default ~/.cache/segfp16-cudahost/<flavour>): ninja rebuilds only
what changed, so a repeated test run pays nothing.
"""
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = [os.path.join(CSRC, "cuda_host", f) for f in ("library.cpp", "runner.cpp", "bn_relu_cuda.cpp",
                                                        "upsample_cuda.cpp")]
FLAVOURS = {
    # -O1: the kernels' code is small, the build is dominated by ATen's headers; -O1 vs -O2 changes no result
    "ieee": ["-O1", "-ffp-contract=off"],
    "fast": ["-O1", "-ffp-contract=fast", "-mfma", "-DSEGFP16_HOST_FAST_MATH"],
}


def load(flavour="ieee"):
    """Builds (or reuses) the flavour's library and returns its op namespace (torch.ops.<lib>)."""
    lib = "segfp16_cudahost" if flavour == "ieee" else f"segfp16_cudahost_{flavour}"
    if hasattr(torch.ops, lib) and hasattr(getattr(torch.ops, lib), "flavour"):
        return getattr(torch.ops, lib)
    from torch.utils.cpp_extension import load as jit_load
    base = os.environ.get("SEG_CUDAHOST_BUILD", os.path.join(os.path.expanduser("~"), ".cache", "segfp16-cudahost"))
    build = os.path.join(base, flavour)
    os.makedirs(build, exist_ok=True)
    t0 = time.time()
    jit_load(name=lib, sources=SOURCES, build_directory=build, is_python_module=False,
             extra_cflags=["-std=c++20", "-pthread", "-DSEGFP16_CUDA_HOST", f"-DSEGFP16_HOST_LIB={lib}",
                           *FLAVOURS[flavour]],
             extra_ldflags=["-pthread"], extra_include_paths=[CSRC])
    print(f"[cuda_host] {lib} ready in {time.time() - t0:.1f} s ({build})")
    ns = getattr(torch.ops, lib)
    assert ns.flavour() == flavour
    return ns
