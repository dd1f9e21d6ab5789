"""ssseg's published FP16 ADE20k checkpoints by name: `--eval ssseg:pspnet` (also --ckpt and --init).

The four files of ssseg's FP16 model zoo (spec §9: docs/modelzoo/fp16/README.md's model links) are downloaded once
into torch's hub cache (torch.hub.get_dir()/checkpoints, where torchvision's weights and our --pretrained ones go),
with torch.hub's progress bar. ssseg publishes them trimmed to {'model': state_dict}
(scripts/ckpts/clean_ckpts_for_publish.py), the segmentor unwrapped from DDP, with the module names our models use
(spec §5; the 2021 code that trained them has the same names), so no key is renamed:
common.checkpoint.model_state unwraps the dict and load_weights checks every key and shape against the model.
A download is checked before it enters the cache (a complete torch.save file holding a state dict of that model's
tensor count; the size and sha256 where SIZES / SHA256 record them); a failed or rejected one leaves nothing there.
"""
import hashlib
import http.client
import os
import tempfile

import torch

from . import dist
from .errors import BadFileError, UserError

PREFIX = "ssseg:"
RELEASE = "https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_fp16/"

# name (= our script) -> (ssseg config name = the release file's stem, segmentor type, state-dict tensors at 150
# classes: spec §5's key counts)
MODELS = {
    "fcn": ("fcn_resnet50os8_apexfp16_ade20k", "FCN", 352),
    "pspnet": ("pspnet_resnet50os8_apexfp16_ade20k", "PSPNet", 370),
    "deeplabv3": ("deeplabv3_resnet50os8_apexfp16_ade20k", "Deeplabv3", 376),
    "deeplabv3plus": ("deeplabv3plus_resnet50os8_apexfp16_ade20k", "Deeplabv3Plus", 424),
}
URLS = {name: f"{RELEASE}{stem}.pth" for name, (stem, _, _) in MODELS.items()}  # tests point these at file:// copies
# Byte sizes and sha256 (or a prefix of it) of the release files, checked where an entry exists. Empty: the files could
# not be downloaded where this was written (no internet), so nothing is recorded rather than something guessed.
SIZES = {}
SHA256 = {}


def is_name(spec):
    return isinstance(spec, str) and spec.startswith(PREFIX)


def known():
    return ", ".join(PREFIX + n for n in MODELS)


def lookup(spec, flag):
    """'ssseg:pspnet' (or ssseg's config name, 'ssseg:pspnet_resnet50os8_apexfp16_ade20k') -> 'pspnet'."""
    key = spec[len(PREFIX):]
    for name, (stem, _, _) in MODELS.items():
        if key in (name, stem):
            return name
    raise UserError(f"{flag} {spec}: no such model in ssseg's FP16 zoo; known: {known()}")


def by_tensor_count(n):
    """The script whose model has n state-dict tensors (each of the four has its own count), else None."""
    return next((name for name, (_, _, count) in MODELS.items() if count == n), None)


def check_flags(cfg, seg_type=None):
    """Before anything runs: every ssseg:NAME in the checkpoint flags is known and fits this script's model."""
    for flag in ("eval", "ckpt", "init", "resume"):
        spec = cfg.get(flag)
        if not is_name(spec):
            continue
        name = lookup(spec, f"--{flag}")
        if flag == "resume":  # published weights carry no optimizer / iteration state
            raise UserError(f"--resume {spec}: a published model, not a training checkpoint; use --init {spec} to "
                            f"start a new schedule from its weights")
        typ = MODELS[name][1]
        if seg_type is not None and seg_type != typ:
            raise UserError(f"--{flag} {spec}: ssseg's {typ} checkpoint does not fit this script's model "
                            f"({seg_type}); run it with {name}.py")


def cache_path(name):
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URLS[name]))


def _problem(path, name):
    """Why the file at path is not ssseg's checkpoint of `name` (None: it is, as far as we can tell)."""
    _, typ, tensors = MODELS[name]
    size = os.path.getsize(path)
    if name in SIZES and size != SIZES[name]:
        return f"{size} bytes, the release file has {SIZES[name]}"
    if name in SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if not h.hexdigest().startswith(SHA256[name]):
            return f"sha256 {h.hexdigest()[:16]}..., the release file's starts {SHA256[name][:16]}"
    from .checkpoint import model_state
    try:  # mmap: the check reads the archive's index and maps the tensors, it does not copy 200 MB
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        sd = model_state(ckpt, path)
    except Exception as e:  # a cut-short zip, an HTML error page, a pickle of other things ...
        return f"not a complete PyTorch checkpoint of a state dict ({size} bytes; {str(e).splitlines()[0][:120]})"
    if len(sd) != tensors:
        return f"{len(sd)} tensors in its state dict, ssseg's {typ} has {tensors}"
    return None


def fetch(spec, flag, log=print):
    """The local file of ssseg:NAME: the hub cache's copy, else downloaded (progress bar), checked, then cached."""
    with dist.local_main_first():  # under torchrun one rank per machine downloads; the others find it cached
        return _fetch(spec, flag, log)


def _fetch(spec, flag, log):
    name = lookup(spec, flag)
    url, dst = URLS[name], cache_path(name)
    if os.path.isfile(dst):
        log(f"{flag} {spec}: {dst} (cached)")
        return dst
    folder = os.path.dirname(dst)
    os.makedirs(folder, exist_ok=True)
    log(f"{flag} {spec}: downloading {url} into torch's hub cache ({folder})")
    # into a temp file beside dst, renamed only once checked: a broken download never looks like a cached one
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".download", dir=folder)
    os.close(fd)
    try:
        try:
            torch.hub.download_url_to_file(url, tmp, progress=True)
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, refused, cut short, bad URL
            reason = getattr(e, "reason", None) or e
            raise UserError(f"{flag} {spec}: could not download {url} ({reason}); without internet, download it "
                            f"elsewhere and pass the file: {flag} PATH/{os.path.basename(dst)} (or copy it to "
                            f"{dst})") from None
        problem = _problem(tmp, name)
        if problem:
            raise BadFileError(f"{flag} {spec}: the download of {url} is not ssseg's {MODELS[name][1]} checkpoint "
                               f"({problem}); not cached. Try again, or download it elsewhere and pass the file: "
                               f"{flag} PATH")
        os.replace(tmp, dst)  # atomic within the folder: concurrent ranks each rename a complete file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"{flag} {spec}: {dst} ({os.path.getsize(dst) / 2**20:.0f} MB, checked)")
    return dst
