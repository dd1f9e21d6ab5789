"""The first two stages of tools/device_check.sh: what the machine has, and whether our extension runs on it.

    python tools/check_env.py modules      # every module / tool a stage uses: version or MISSING (exit 1 if a required module is)
    python tools/check_env.py extension    # import common._C, print build_info, one fused launch on a card; exit 3
                                           # when it does not import, has no CUDA kernels on a card, or the launch
                                           # fails (device_check.sh then builds) or gives wrong values (no build)
Never raises: a missing piece is a line of the report, so that the stages which do not need it still run.
"""
import importlib
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# module -> the stages that need it (a missing one fails those, not the others)
MODULES = {
    "torch": "all",
    "torchvision": "bench_train's peers, tests",
    "numpy": "training (smoke, numerics), tests",
    "cv2": "training (smoke, numerics), tests",
    "PIL": "tests (picture checks)",
    "matplotlib": "numerics.png, the runs' curves.png",
    "pytest": "pytest_cuda, sanitizer",
    "setuptools": "the build (only when the prebuilt extension is unusable)",
    "ninja": "the build (only when the prebuilt extension is unusable; without it: a slow serial build)",
}
OPTIONAL = ("setuptools", "ninja")  # needed only for a build
TOOLS = {
    "nvidia-smi": "the summary's card and driver",
    "nvcc": "the build (only when the prebuilt extension is unusable)",
    "compute-sanitizer": "sanitizer_memcheck, sanitizer_racecheck",
}


def find_tool(name):
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = shutil.which(name)
    if path is None and os.path.exists(os.path.join(cuda_home, "bin", name)):
        path = os.path.join(cuda_home, "bin", name)
    return path


def modules():
    missing = []
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    for name, used_by in MODULES.items():
        try:
            mod = importlib.import_module(name)
            print(f"  {name:<18} {getattr(mod, '__version__', 'present')}")
        except Exception as e:  # ImportError, or a broken install that fails at import
            print(f"  {name:<18} MISSING ({type(e).__name__}: {e}); needed by {used_by}")
            missing.append(name)
    for name, used_by in TOOLS.items():
        path = find_tool(name)
        print(f"  {name:<18} {path or 'MISSING; needed by ' + used_by}")
        if path is None:
            missing.append(name)
    try:
        import torch
        cuda = torch.cuda.is_available()
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
              f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, device: "
              f"{torch.cuda.get_device_name() if cuda else 'no CUDA device'}")
    except Exception as e:
        print(f"torch: {type(e).__name__}: {e}")
    required = [m for m in missing if m not in OPTIONAL and m not in TOOLS]
    print(f"VERDICT: {'missing: ' + ', '.join(missing) if missing else 'every module and tool present'}")
    return 1 if required else 0


def extension():
    import torch

    import common
    print(common.build_info())
    if not common.extension_loaded():
        print("VERDICT: common._C does not import (prebuilt for another Python / torch?)")
        return 3
    backends = torch.ops.segfp16.build_info()
    if not torch.cuda.is_available():
        print(f"VERDICT: {backends} build; no CUDA device here, so no CUDA build is needed or attempted")
        return 0
    if "cuda" not in backends:
        print(f"VERDICT: the extension has no CUDA kernels ({backends}); a CUDA device is here")
        return 3
    props = torch.cuda.get_device_properties(0)
    # a kernel launch, not only the import: a .so built for another arch imports fine and fails at the first launch
    from common import ops
    x = torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.float16)
    w, b = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    y = ops.bn_relu(x, w, b, rm, rv, True, 0.1, 1e-5)
    torch.cuda.synchronize()
    ok = bool(torch.isfinite(y).all()) and bool((y >= 0).all())
    print(f"VERDICT: {backends} build, sm_{props.major}{props.minor}; a fused bn_relu launch "
          f"{'ran' if ok else 'gave wrong values'}")
    return 0 if ok else 3


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("modules", "extension"):
        sys.exit("usage: python tools/check_env.py modules|extension")
    try:
        sys.exit(modules() if what == "modules" else extension())
    except Exception as e:  # e.g. torch itself missing, or the kernel launch raising: still one verdict line
        import traceback
        traceback.print_exc()
        print(f"VERDICT: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        sys.exit(3)
