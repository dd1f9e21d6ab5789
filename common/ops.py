"""Python wrappers of the csrc kernels (torch.ops.segfp16.*): typed entry points, fake kernels, autograd.

These always run our kernels. The choice between them and the plain PyTorch composition is made in
common/layers.py (`--kernels fused|torch`); nothing here falls back silently.
"""
import torch

from . import BUILD_COMMAND, _C_ERROR


def require(*names):
    """Raise a clear error when the extension (or one of the named ops) is not built."""
    lib = getattr(torch.ops, "segfp16")
    missing = [n for n in names or ("build_info",) if not hasattr(lib, n)]
    if missing:
        why = f" ({_C_ERROR})" if _C_ERROR is not None else ""
        raise RuntimeError(f"--kernels fused needs the compiled extension common._C, which lacks {missing}{why}. "
                           f"Build it with `{BUILD_COMMAND}`, or run with --kernels torch.")


# ---- bn_relu family (Kernels I)

# ---- upsample family (Kernels II)
