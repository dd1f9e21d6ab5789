"""Checkpoints that survive a crash mid-write and resume a run exactly.

A checkpoint is one torch.save'd dict of tensors, containers and primitives only, so that it loads with
torch.load(weights_only=True) (no pickled code runs at load):
    model      the unwrapped module's state_dict (fp32; for apex O2 the fp32 master weights)
    optimizer  optimizer.state_dict()      amp  amp.state_dict() (apex's {'loss_scaler0': ...} format for apex)
    iteration  finished iterations (a skipped step counts)    epoch  the epoch the next iteration belongs to
    max_iters  the schedule's length (so --resume can tell a finished run and a changed schedule)
    rng        a list, one per rank: python / numpy / torch CPU / CUDA generator states
    config     the resolved run config (common.config.parse)
ssseg's own checkpoints ({'model': sd, 'optimizer': ..., 'cur_epoch': ...}) and bare state dicts load for
--eval / --predict / --init through model_state(); `ssseg:NAME` names a published one (common/zoo.py). A state
holding an inf/NaN tensor is never written. A file that cannot be used raises BadFileError with one line naming it,
the cause and what to do (never "weights_only=False").

Exact resume needs every random draw to be a pure function of (seed, epoch, position in the epoch). The model's
draws (dropout) come from torch's global generator, which we save. The data's come from common.data.train_loader,
whose order and augmentation are a pure function of (seed, epoch, rank, position), so the sampler alone resumes it.
Bit-exact on the CPU; on a GPU the arithmetic after the resume is only as reproducible as cuDNN's autotuned
algorithms and atomic-add kernels (docs/reliability.md).
"""
import errno
import os
import pickle
import random
import shutil
import tempfile

import numpy as np
import torch

from .errors import BadFileError, UserError

LATEST = "latest"  # a one-line text file naming the newest complete checkpoint (in a run folder and the work dir)
BEST = "checkpoint-best.pth"  # a run folder's second name for the checkpoint of its best evaluation (never pruned)


class DiskFullError(UserError, OSError):
    pass


class NoCheckpointError(UserError, FileNotFoundError):
    pass


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
        # one state per GPU the saving machine had: a machine with fewer GPUs restores those it has
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------------------------
# atomic save, the latest pointers, load

_open = os.fdopen  # how the temp file is opened (a test swaps in a file that fills up, to check the disk-full line)


class NonFiniteState(RuntimeError):
    """save() refused a state with an inf/NaN tensor: such a checkpoint is never written nor pointed to."""


class _Recording:
    """The temp file, remembering the OSError a write hit: torch.save reports a failed write as its own RuntimeError
    ('unexpected pos'), which does not say that the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _nbytes(tree):
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0


def _size(n):
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{max(n, 1) / 2**10:.0f} KB"


def link_or_copy(src, dst):
    """dst as a second name of the checkpoint src: a hard link (no copy, no disk), else an atomic copy."""
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        with open(src, "rb") as f:
            _replace_atomically(lambda out: shutil.copyfileobj(f, out), dst, os.path.getsize(src))


def keep_as_best(path):
    """Name the checkpoint `path` also <its folder>/checkpoint-best.pth, replacing the previous best's name; the old
    file keeps its own name until pruned, and pruning never takes this one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{BEST}.tmp-{os.getpid()}")  # temp_files() finds it if we die here
    if os.path.exists(tmp):
        os.remove(tmp)
    link_or_copy(path, tmp)
    os.replace(tmp, os.path.join(folder, BEST))
    return os.path.join(os.path.dirname(path), BEST)  # spelled as `path` is (the log's other paths are relative)


def _replace_atomically(write, path, size_hint=0):
    """write(file) into a temp file next to `path`, fsync it, then rename over `path`: readers see old or new."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=folder)
    f = None
    try:
        with _open(fd, "wb") as raw:
            f = _Recording(raw)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system (hence the temp file in the same folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        error = e if isinstance(e, OSError) else getattr(f, "error", None)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            prev = latest(folder)
            raise DiskFullError(
                f"no space left on device writing {path} (about {_size(size_hint)} needed); "
                + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint in this folder")
                + "; free some space (or --keep_checkpoints N) and --resume auto") from e
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data itself is already on disk


def _write_pointer(folder, target):
    line = target.encode() + b"\n"
    _replace_atomically(lambda f: f.write(line), os.path.join(folder, LATEST), size_hint=len(line))


def save(path, state, root=None):
    """Write `state` to `path` atomically, then point <its folder>/latest (and root/latest, if given) at it.

    Refuses (NonFiniteState, nothing written, pointers unchanged) a state holding an inf/NaN tensor.
    """
    from .guard import non_finite_tensors
    bad = non_finite_tensors(state.get("model", {})) + non_finite_tensors(state.get("optimizer", {}), "optimizer")
    if bad:
        raise NonFiniteState(f"{len(bad)} non-finite tensor(s), e.g. {', '.join(bad[:3])}")
    state = _on_cpu(state)
    _replace_atomically(lambda f: torch.save(state, f), path, size_hint=_nbytes(state))
    folder = os.path.dirname(os.path.abspath(path))
    _write_pointer(folder, os.path.basename(path))
    if root is not None:  # the work dir's pointer names the newest run's checkpoint, relative to the work dir
        _write_pointer(root, os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    return path


def _on_cpu(tree):
    """Every tensor on the CPU (as mmcv saves weights), so that a plain torch.load works on a machine without that
    GPU; CPU tensors are returned as they are, and a state dict keeps its _metadata (module versions)."""
    if torch.is_tensor(tree):
        return tree.cpu()
    if isinstance(tree, dict):
        out = type(tree)((k, _on_cpu(v)) for k, v in tree.items())
        if hasattr(tree, "_metadata"):
            out._metadata = tree._metadata
        return out
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_on_cpu(v) for v in tree)
    return tree


def older_than_newest(work_dir, keep):
    """Our checkpoint files in work_dir (a run folder) except the `keep` newest and the best; [] for keep <= 0 (keep
    all). Newest by modification time: a run folder's checkpoints are written in iteration order (a resume continues
    in place only from the newest), and their names mix epochs and iterations (epoch-9, iter-1200, final), so they
    cannot be compared."""
    if keep <= 0:
        return []
    mine = [f for f in os.listdir(work_dir) if f.startswith("checkpoint-") and f.endswith(".pth") and f != BEST]
    mine.sort(key=lambda f: os.path.getmtime(os.path.join(work_dir, f)))
    return [os.path.join(work_dir, f) for f in mine[:-keep]]


def temp_files(folder):
    """The temp files a killed save left in folder (.checkpoint-*.tmp-*, .latest.tmp-*)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith(".") and ".tmp-" in f and (f.startswith(".checkpoint-") or f.startswith(".latest")))


def _read_pointer(pointer, flag):
    """The checkpoint a `latest` file names, or a BadFileError saying what is wrong with the pointer."""
    folder = os.path.dirname(pointer)
    with open(pointer, "rb") as f:
        raw = f.read(4096)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    what = ("empty" if not raw.strip() else "not a file name" if name is None or "\n" in name or "\x00" in name
            else None)
    if what is None:
        target = os.path.join(folder, name)
        if os.path.isfile(target):
            return target
        what = f"names {name!r}, which does not exist"
    found = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
    hint = f"; pass {flag} {os.path.join(folder, found[-1])} (or another .pth there)" if found else ""
    raise BadFileError(f"{pointer}: the latest-checkpoint pointer is {what}{hint}")


def latest(folder):
    """The checkpoint folder/latest names, or None when there is none (or it is broken)."""
    try:
        return _read_pointer(os.path.join(folder, LATEST), "--resume")
    except (OSError, BadFileError):
        return None


def weights_path(spec, flag, log=print):
    """ssseg:NAME -> its file in torch's hub cache, downloaded once (common/zoo.py); anything else unchanged."""
    from . import zoo
    return zoo.fetch(spec, flag, log) if zoo.is_name(spec) else spec


def resolve(path, work_dir, flag="--resume", log=print):
    """'auto' -> the checkpoint work_dir/latest names; a folder (or its latest file) -> its latest; ssseg:NAME -> the
    published model (common/zoo.py); a file -> itself."""
    path = weights_path(path, flag, log)
    if os.path.basename(path) == LATEST and os.path.isfile(path):  # the pointer itself, for its folder
        return _read_pointer(path, flag)
    if path == "auto" or os.path.isdir(path):
        folder = work_dir if path == "auto" else path
        pointer = os.path.join(folder, LATEST)
        if not os.path.isfile(pointer):
            raise NoCheckpointError(f"{flag} {path}: no {pointer} (no checkpoint written in {folder} yet)")
        return _read_pointer(pointer, flag)
    if not os.path.isfile(path):
        raise NoCheckpointError(f"{flag} {path}: checkpoint {path!r} does not exist")
    return path


def load(path, map_location="cpu", instead="use an earlier checkpoint"):
    """torch.load(weights_only=True), with one line naming the file and the cause when it cannot be used; `instead`:
    what to do about a damaged one."""
    if not os.path.isfile(path):
        raise NoCheckpointError(f"checkpoint {path} does not exist" + (" (a folder: pass a .pth inside it)"
                                                                        if os.path.isdir(path) else ""))
    size = os.path.getsize(path)
    if size == 0:
        raise BadFileError(f"{path}: empty file (0 bytes), not a checkpoint (a copy or save that never finished?); "
                           f"{instead}")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip, is_pickle = head == b"PK\x03\x04", head[:1] == b"\x80"  # torch.save's zip format; a (legacy) pickle
    if not (is_zip or is_pickle):
        raise BadFileError(f"{path}: not a PyTorch checkpoint ({size} bytes, neither torch.save's zip format nor a "
                           f"pickle); pass a .pth file written by torch.save (ours, ssseg's or mmseg's)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # a pickle that would build arbitrary objects (run code) on load
            raise BadFileError(f"{path}: holds Python objects other than tensors and containers, which are not loaded "
                               f"(they could run code); re-save it as a dict of tensors "
                               f"(torch.save({{'model': model.state_dict()}}, path))") from e
        raise BadFileError(f"{path}: damaged checkpoint ({size} bytes that do not unpickle); {instead}") from e
    except Exception as e:
        raise BadFileError(f"{path}: truncated or corrupt checkpoint ({size} bytes; the "
                           f"{'zip archive' if is_zip else 'pickle'} is incomplete, e.g. a copy or save that was cut "
                           f"short); {instead}") from e


def load_training(path):
    """A checkpoint to --resume from: one of ours, with optimizer, AMP, iteration and RNG state."""
    ckpt = load(path)
    needed = ("model", "optimizer", "amp", "iteration", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in needed):
        raise BadFileError(f"{path}: not a training checkpoint (no optimizer/iteration state, e.g. a weights-only "
                           f"file); use --init {path} to start a new schedule from its weights")
    return ckpt


def model_state(ckpt, path="checkpoint"):
    """The model's state dict from one of ours, ssseg's ({'model': sd, ...}), mmseg's ({'state_dict': sd}), or bare."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not ckpt or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise BadFileError(f"{path}: holds no state dict ({{'model': sd}}, {{'state_dict': sd}} or a bare "
                           f"{{name: tensor}} dict)")
    # a DDP-wrapped model saved without unwrapping carries 'module.' on every key
    if ckpt and all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


def few(names, n=5):
    """'3 (a, b, c)', at most n names shown; '0' for none."""
    return f"{len(names)} ({', '.join(names[:n])}{', ...' if len(names) > n else ''})" if names else "0"


def check_matches(model, sd, path, hint=None, fine_tune=False):
    """Our key/shape report (before torch's 'Error(s) in loading state_dict'): BadFileError naming the file."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in sd and tuple(sd[k].shape) != tuple(v.shape)]  # (key, file's shape, model's shape)
    shapes = [f"{k} {a} vs {b}" for k, a, b in mismatched]
    if missing or unexpected or shapes:
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected
                 else "", f"mismatched shapes (file vs model) {few(shapes, 3)}" if shapes else ""]
        # (file's, model's) first dim of each mismatch that differs only there (a scalar has no [0])
        class_counts = {(a[0], b[0]) for _, a, b in mismatched if a and b and a[1:] == b[1:]}
        if hint is None and not (missing or unexpected) and len(class_counts) == 1 and len(shapes) <= 4:
            # only the classifiers (main and auxiliary, weight and bias) differ: another number of classes
            n_file, n_model = class_counts.pop()
            hint = (f"it predicts {n_file} classes, the model {n_model}: --num_classes {n_file} for this file"
                    + (f"; to fine-tune it on {n_model} classes, pass it as --pretrained {path} (its backbone; the "
                       "heads start fresh)" if fine_tune else ""))
        if hint is None:
            from .zoo import by_tensor_count
            other = by_tensor_count(len(sd)) if len(sd) != len(own) else None
            hint = f"its {len(sd)} tensors are {other}'s: run {other}.py" if other else "another model or --num_classes?"
        raise BadFileError(f"{path}: does not match this model ({hint}): "
                           + "; ".join(p for p in parts if p))


def load_weights(model, path, log=print, fine_tune=False):
    """Load a checkpoint's model weights into `model` strictly; errors list the mismatching keys and shapes
    (fine_tune: --init's, whose error for another number of classes names --pretrained)."""
    sd = model_state(load(path), path)
    check_matches(model, sd, path, fine_tune=fine_tune)
    model.load_state_dict(sd)
    log(f"loaded weights: {path} ({len(sd)} tensors)")
    return model
