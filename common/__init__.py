"""Shared pieces of the four segmentors: data, backbone, AMP loop, metrics, checkpoints, kernel wrappers."""
import os

import torch

try:  # the compiled kernels (csrc/); missing means `pip install --no-build-isolation -e .` has not been run
    from . import _C  # noqa: F401  (loading it registers torch.ops.segfp16.*)
    _C_ERROR = None
except ImportError as e:  # kept, so that the error can be shown where a kernel is actually asked for
    # with no .so at all, Python's message ("partially initialized module ... circular import") misleads; say it plainly
    import importlib.util
    _C_ERROR = e if importlib.util.find_spec(f"{__name__}._C") is not None else ImportError("common._C is not built")

BUILD_COMMAND = "pip install --no-build-isolation -e ."


def extension_loaded():
    return _C_ERROR is None


def build_info():
    """Which backends the installed extension holds and which CPU loop variant runs (csrc/bn_relu_cpu.h), e.g.
    'common._C: cpu+cuda (torch 2.14.1, CUDA 13.0, GPU no, CPU loops avx512)'."""
    if _C_ERROR is not None:
        return f"common._C: unavailable ({_C_ERROR}); build it with `{BUILD_COMMAND}`"
    # a checkout without its own build can load another one's through that one's editable install: say whose
    here = os.path.dirname(os.path.abspath(__file__))
    elsewhere = "" if os.path.dirname(os.path.abspath(_C.__file__)) == here else (
        f"; loaded from {_C.__file__}, another checkout's build: run `{BUILD_COMMAND}` here to use this one's csrc/")
    return (f"common._C: {torch.ops.segfp16.build_info()} (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda or 'none'}, GPU {'yes' if torch.cuda.is_available() else 'no'}, "
            f"CPU loops {torch.ops.segfp16.bn_cpu_isa()}{elsewhere})")
