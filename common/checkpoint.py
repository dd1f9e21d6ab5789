"""Checkpoints that survive a crash mid-write and resume a run exactly.

A checkpoint is one torch.save'd dict of tensors, containers and primitives only, so that it loads with
torch.load(weights_only=True) (no pickled code runs at load):
    model      the unwrapped module's state_dict (fp32; for apex O2 the fp32 master weights)
    optimizer  optimizer.state_dict()      amp  amp.state_dict() (apex's {'loss_scaler0': ...} format for apex)
    iteration  finished optimizer steps    epoch  the epoch the next iteration belongs to
    rng        python / numpy / torch CPU / CUDA generator states
    config     the resolved run config (common.config.parse)
ssseg's own checkpoints ({'model': sd, 'optimizer': ..., 'cur_epoch': ...}) and bare state dicts load for
--eval / --predict through model_state().

Exact resume needs every random draw to be a pure function of (seed, epoch, position in the epoch). The model's
draws (dropout) come from torch's global generator, which we save. The data's come from common.data.train_loader,
whose order and augmentation are a pure function of (seed, epoch, rank, position), so the sampler alone resumes it.
"""
import os
import random
import tempfile

import numpy as np
import torch

LATEST = "latest"  # a one-line text file in the work dir naming the newest complete checkpoint


# ----------------------------------------------------------------------------------------------------------------
# RNG state, as weights_only-loadable containers

def rng_state():
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# atomic save, the latest pointer, load

def _replace_atomically(write, path):
    """write(file) into a temp file next to `path`, fsync it, then rename over `path`: readers see old or new."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system (hence the temp file in the same folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data itself is already on disk


def save(path, state):
    """Write `state` to `path` atomically, then point work_dir/latest at it."""
    _replace_atomically(lambda f: torch.save(state, f), path)
    _replace_atomically(lambda f: f.write(os.path.basename(path).encode() + b"\n"),
                        os.path.join(os.path.dirname(os.path.abspath(path)), LATEST))
    return path


def older_than_newest(work_dir, keep):
    """Our checkpoint files in work_dir except the `keep` newest (by iteration); [] for keep <= 0 (keep all)."""
    if keep <= 0:
        return []
    mine = [f for f in os.listdir(work_dir) if f.startswith("checkpoint-") and f.endswith(".pth")]
    mine.sort(key=lambda f: os.path.getmtime(os.path.join(work_dir, f)))
    return [os.path.join(work_dir, f) for f in mine[:-keep]]


def resolve(path, work_dir):
    """'auto' -> the checkpoint work_dir/latest names; a folder -> its latest; a file -> itself."""
    if path == "auto" or os.path.isdir(path):
        folder = work_dir if path == "auto" else path
        pointer = os.path.join(folder, LATEST)
        if not os.path.isfile(pointer):
            raise FileNotFoundError(f"--resume {path}: no {pointer} (no checkpoint written in {folder} yet)")
        with open(pointer) as f:
            path = os.path.join(folder, f.read().strip())
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def load(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # e.g. an old pickle holding numpy objects or code
        raise RuntimeError(f"common/checkpoint.py: cannot load {path!r} with weights_only=True ({e}); re-save it "
                           f"as a dict of tensors (torch.save({{'model': model.state_dict()}}, path))") from e


def model_state(ckpt):
    """The model's state dict from one of ours, ssseg's ({'model': sd, ...}), mmseg's ({'state_dict': sd}), or bare."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError("common/checkpoint.py: checkpoint holds no state dict ({'model': sd}, {'state_dict': sd} or "
                         "a bare {name: tensor} dict)")
    # a DDP-wrapped model saved without unwrapping carries 'module.' on every key
    if ckpt and all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


def load_weights(model, path, log=print):
    """Load a checkpoint's model weights into `model` strictly; errors list the mismatching keys."""
    sd = model_state(load(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path!r} does not match the model: missing {missing[:8]}"
                           f"{'...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
                           f"{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    log(f"loaded weights: {path} ({len(sd)} tensors)")
    return model
