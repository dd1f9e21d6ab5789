"""Builds one extension, common._C, from csrc/.

    pip install --no-build-isolation -e .        # CPU always; CUDA too when torch has CUDA and nvcc is found
    SEG_CPU_ONLY=1 pip install --no-build-isolation -e .   # C++ (CPU) kernels only
    FORCE_CUDA=1 ...                             # fail instead of skipping CUDA when nvcc is missing
    TORCH_CUDA_ARCH_LIST="8.0;9.0" (default)     # the cards we target: A100, H100/H200
    DEBUG=1                                      # -O0 -g (and -lineinfo for nvcc)
    MAX_JOBS=N                                   # parallel compile jobs (ninja)
    SEG_BUILD_TEMP=DIR                           # object directory (default build/temp.<platform>-<python>)
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup


def find_cuda_home():
    # torch guesses CUDA_HOME as dirname(dirname(which nvcc)); on our machines `nvcc` on PATH is a wrapper script
    # in /usr/local/bin, so that guess gives /usr/local. nvcc itself knows its real install dir (TOP in --dryrun).
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
        top = re.search(r"^#\$ TOP=(.+)$", out, re.M)
        if top:
            return os.path.realpath(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported: it reads it at import time
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
debug = os.environ.get("DEBUG", "0") == "1"
cpu_only = os.environ.get("SEG_CPU_ONLY", "0") == "1"
force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
have_nvcc = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
if force_cuda and not (torch.version.cuda and have_nvcc):
    raise RuntimeError(f"FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={cuda_home}")
with_cuda = not cpu_only and torch.version.cuda is not None and have_nvcc

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cxx = ["-O0", "-g"] if debug else ["-O3"]
# -ffp-contract=off: no FMA contraction, so the per-ISA variants of the CPU loops (csrc/bn_relu_cpu.h) give the same bits
extra = {"cxx": cxx + ["-fopenmp", "-ffp-contract=off"]}
include_dirs = []
if with_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # ATen's CUDA headers include cuSPARSE/cuBLAS headers. A minimal toolkit (ours: nvcc + runtime only) lacks them,
    # but torch's CUDA wheels ship them in the pip `nvidia` packages: add those include dirs, after the toolkit's.
    if not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        try:
            import nvidia
            include_dirs = sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "include")))
        except ImportError:
            pass
    # no --use_fast_math: the kernels are memory-bound (it buys nothing measurable) and its __expf / __logf, flush-to-zero
    # and FMA contraction cost parity with the CPU twins; tests/test_cuda_host.py checks both flavours' tolerances
    extra["nvcc"] = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
    ext = CUDAExtension("common._C", sources, extra_compile_args=extra, define_macros=[("WITH_CUDA", None)],
                        include_dirs=include_dirs, extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("common._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
print(f"[setup.py] building common._C: {'CPU + CUDA (archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ', CUDA_HOME ' + cuda_home + ')' if with_cuda else 'CPU only'}"
      f"{' (debug)' if debug else ''}; torch {torch.__version__}", flush=True)


class PersistentBuildExt(BuildExtension):
    """torch's BuildExtension with a fixed object directory, build/temp.<platform>-<python>, so that ninja's
    incremental build applies across installs. `pip install -e .` otherwise compiles in a fresh temp folder each
    time (setuptools' editable_wheel sets one), i.e. everything from scratch; ninja still recompiles what changed
    (sources, included headers via the depfiles, and any changed compile command). SEG_BUILD_TEMP names another
    one (tools/build_for_device.sh: its CUDA objects do not overwrite those of a CPU-only build for the same Python)."""

    def finalize_options(self):
        super().finalize_options()
        plat = sysconfig.get_platform()
        self.build_temp = (os.environ.get("SEG_BUILD_TEMP")
                           or os.path.join(here, "build", f"temp.{plat}-{sys.implementation.cache_tag}"))


setup(
    name="segfp16",
    version="0.1.0",
    packages=["common"],
    ext_modules=[ext],
    cmdclass={"build_ext": PersistentBuildExt},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "opencv-python-headless", "pillow"],
)
