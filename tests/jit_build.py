"""torch.utils.cpp_extension.load for the tests' own JIT builds, safe on every torch we support.

torch before 2.14 guards a build directory with a bare `lock` file (FileBaton) and waits, printing nothing, for as
long as that file exists: a build killed mid-way (kill -9, a CI or shell time-out) leaves it, and so does every
load by torch 2.14, whose lock is an flock on a file of the same name that stays. Either way each later load on the
older torch hangs for ever. There, each load here holds an flock of its own on the directory first, which the OS
drops when its holder dies: a live build in another process is waited for, and a `lock` file found while holding it
belongs to no live build of ours, so it is removed (with one line saying so).
"""
import contextlib
import fcntl
import os

from torch.utils import cpp_extension

BARE_LOCK_FILE = hasattr(cpp_extension, "FileBaton")  # torch < 2.14; 2.14 locks with filelock and needs none of this


@contextlib.contextmanager
def held(build):
    """Holds the build directory's flock; removes a `lock` file that no live build holds."""
    os.makedirs(build, exist_ok=True)
    with open(os.path.join(build, "segfp16.flock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes, or when this process dies
        stale = os.path.join(build, "lock")
        if os.path.exists(stale):
            print(f"[jit_build] removing {stale}: no live build holds it (torch < 2.14 would wait on it for ever)")
            os.remove(stale)
        yield


def load(build_directory, **kwargs):
    """cpp_extension.load(build_directory=..., **kwargs), under held(build_directory) where torch needs it."""
    os.makedirs(build_directory, exist_ok=True)
    with held(build_directory) if BARE_LOCK_FILE else contextlib.nullcontext():
        return cpp_extension.load(build_directory=build_directory, **kwargs)
