"""The command line around common.config.DEFAULTS: --help read from DEFAULTS's own comments, tuple flags in every
spelling a user tries, up-front value checks, and the config printed once in a few lines.

Every mistake is one argparse-style line, `<script>: error: --flag value: what is wrong / what to do`, exit 2.
"""
import argparse
import difflib
import io
import math
import os
import re
import sys
import tokenize

import torch

from .errors import Exit, UserError


def flag_docs(source_file, name='DEFAULTS'):
    """{key: (group, help)} from the `name = dict(...)` block of source_file: a `# --- title` comment line opens a
    group, a key's trailing comment is its help (else the comment lines right above the key)."""
    with open(source_file) as f:
        src = f.read()
    block = src[src.index(f'\n{name} = dict(') + 1:]
    docs, group, pending, key, key_line, depth, prev = {}, 'other', [], None, -1, 0, None
    for t in tokenize.generate_tokens(io.StringIO(block).readline):
        if t.type == tokenize.OP and t.string in '([{':
            depth += 1
        elif t.type == tokenize.OP and t.string in ')]}':
            depth -= 1
            if depth == 0:
                break
        elif t.type == tokenize.OP and t.string == '=' and depth == 1 and prev.type == tokenize.NAME:
            key, key_line = prev.string, prev.start[0]
            docs[key], pending = (group, ' '.join(pending)), []
        elif t.type == tokenize.COMMENT:
            text = t.string.lstrip('#').strip()
            if t.start[0] == key_line:
                docs[key] = (docs[key][0], text)  # a trailing comment wins over the lines above
            elif text.startswith('--- '):
                group, pending = text[4:], []
            else:
                pending.append(text)
        if t.type not in (tokenize.NL, tokenize.COMMENT):
            prev = t
    return docs


# ----------------------------------------------------------------------------------------------------------------
# parsing


def parse_tuple(text, n=2):
    """`512`, `512,512`, `512x512`, `512 512`, `(512, 512)`, `[512, 512]` -> (512, 512); one number = all n equal."""
    parts = re.split(r'\s*[,xX]\s*|\s+', text.strip().strip('()[]').strip())
    try:
        v = tuple(int(p) for p in parts)  # an empty part (`64x`, `,64`, `64,,64`) is a mistake too
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {n} integers like 512,512 or 512x512 (or one for a square), "
                                         f"got {text!r}") from None
    if len(v) == 1:
        v = v * n
    if len(v) != n:
        raise argparse.ArgumentTypeError(f"expected {n} integers (or one for a square), got {len(v)} in {text!r}")
    if min(v) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return v


def parse_bool(text):
    if text.lower() in ('true', '1', 'yes', 'on'):
        return True
    if text.lower() in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _TupleAction(argparse.Action):
    """nargs='+': `--crop_size 512 512` arrives as two words, `--crop_size "512 512"` as one; both join here."""

    def __init__(self, *args, arity=2, **kw):
        super().__init__(*args, **kw)
        self.arity = arity

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_tuple(' '.join(values), self.arity))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


class _Formatter(argparse.HelpFormatter):
    def _format_args(self, action, default_metavar):
        if isinstance(action, _TupleAction):  # `H,W`, not argparse's `H,W [H,W ...]` for nargs='+'
            return self._metavar_formatter(action, default_metavar)(1)[0]
        return super()._format_args(action, default_metavar)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own would print the whole (60-flag) usage block first
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:  # a misspelled flag: name the closest one
            known = [o[2:] for a in self._actions for o in a.option_strings if o.startswith("--")]
            for token in unknown.group(1).split():
                word = token.split("=")[0][2:] if token.startswith("--") else ""
                close = difflib.get_close_matches(word, known, n=1, cutoff=0.75) if word else []
                if close:
                    message += f" (did you mean --{close[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")

    def exit(self, status=0, message=None):
        if message and os.environ.get("RANK", "0") == "0":  # under torchrun every rank parses alike: say it once
            self._print_message(message, sys.stderr)
        if status == 2 and message:  # a mistake: its line travels with the exit, as common.train.main's own do
            raise Exit(message.strip())
        sys.exit(status)


def show(v):
    """A value as --help, the error lines and the config lines print it: (h, w) as h,w, strings quoted."""
    return f"{v[0]},{v[1]}" if isinstance(v, tuple) and len(v) == 2 else repr(v) if isinstance(v, str) else str(v)


def build_parser(prog, defaults, choices, docs, shown, preset=None, description=''):
    """One flag per key of defaults, in docs' groups; `shown` are the defaults to print (recipe applied)."""
    p = Parser(prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS, description=description,
               usage=f"{prog} [--flag VALUE ...]   (`{prog} --help` for the list)", formatter_class=_Formatter)
    groups = {}
    for key, default in defaults.items():
        group, text = docs.get(key, ('other', ''))
        title, _, blurb = group.partition(': ')
        if title not in groups:
            groups[title] = p.add_argument_group(title, blurb or None)
        help_ = f"{text} (default {show(shown[key])}" + (
            f"; --data demo: {show(preset[key])})" if preset and key in preset else ")")
        help_ = help_.replace('%', '%%')
        kw = dict(help=help_, choices=choices.get(key))
        if isinstance(default, bool):
            kw.update(type=parse_bool, nargs='?', const=True, metavar='BOOL')  # `--tf32` alone means true
        elif isinstance(default, tuple):
            m = re.match(r'\((\w+), (\w+)\)', text)  # "(h, w) ..." -> metavar H,W
            kw.update(action=_TupleAction, nargs='+', arity=len(default),
                      metavar=f"{m[1].upper()},{m[2].upper()}" if m else 'A,B')
            del kw['choices']
        elif isinstance(default, int):
            kw.update(type=int, metavar='N')
        elif isinstance(default, float):
            kw.update(type=float, metavar='X')
        else:
            kw.update(type=str, metavar=None if key in choices else 'VALUE')
        groups[title].add_argument(f'--{key}', **kw)
    return p


# ----------------------------------------------------------------------------------------------------------------
# checks


def world_size():
    return int(os.environ.get('WORLD_SIZE', '1'))  # torchrun sets it in every rank's environment


def validate(cfg, num_palette=150):
    """Raise UserError for the first value a run cannot use, naming the flag and what to do."""
    def need(ok, key, msg):
        if not ok:
            raise UserError(f"--{key} {show(cfg[key])}: {msg}")

    need(cfg['batch_size'] >= 1, 'batch_size', "must be at least 1")
    world = world_size()
    need(cfg['batch_size'] % world == 0, 'batch_size', f"is the total over all ranks and does not split over the "
         f"{world} ranks torchrun started (WORLD_SIZE={world}); use a multiple of {world}")
    for key in ('lr', 'min_lr', 'power', 'momentum', 'weight_decay', 'aux_weight'):
        need(math.isfinite(cfg[key]), key, "must be a finite number")
    need(cfg['lr'] > 0, 'lr', "must be > 0")
    need(0 <= cfg['min_lr'] <= cfg['lr'], 'min_lr', f"must be between 0 and --lr {cfg['lr']:g}")
    need(cfg['power'] > 0, 'power', "must be > 0")
    for key in ('momentum', 'weight_decay', 'aux_weight'):
        need(cfg[key] >= 0, key, "must be >= 0")
    need(cfg['max_iters'] > 0 or cfg['max_epochs'] >= 1, 'max_epochs', "must be at least 1 (or set --max_iters)")
    for key in ('max_iters', 'stop_iters', 'num_workers', 'num_train_images', 'num_val_images',
                'eval_interval_epochs', 'save_interval_epochs', 'keep_checkpoints', 'save_predictions'):
        need(cfg[key] >= 0, key, "must be >= 0 (0 = " + ("never" if 'interval' in key else "off / all") + ")")
    need(cfg.get('amp_report', 0) >= 0, 'amp_report', "must be >= 0 (0 = off; N = a report every N iterations)")
    for key in ('log_interval', 'max_skipped_steps'):
        need(cfg[key] >= 1, key, "must be at least 1")
    need(0 <= cfg['seed'] < 2**32, 'seed', "must be 0 .. 2**32 - 1 (numpy's seed range)")
    need(1 <= cfg['num_classes'] <= num_palette, 'num_classes', f"must be 1..{num_palette} (ADE20k's classes)")
    # the keep-ratio resize fits an image's long side into max(scale) and its short side into min(scale), in
    # either orientation; a crop beyond that at ratio 1 is mostly padding (only training crops)
    (ch, cw), (long_, short) = cfg['crop_size'], sorted(cfg['scale'], reverse=True)
    training = not (cfg['eval'] or cfg['predict'] or cfg['summary'])
    need(not training or (min(ch, cw) <= short and max(ch, cw) <= long_), 'crop_size',
         f"is larger than --scale {show(cfg['scale'])}: the scale is (long, short), so resized images are at most "
         f"{short} pixels on their short side (x the 0.5-2.0 ratio) and the (h, w) crop's shorter side must be <= "
         f"{short} and its longer side <= {long_}; lower --crop_size or raise --scale")
    need(all(s <= c for s, c in zip(cfg['slide_stride'], cfg['slide_crop'])), 'slide_stride',
         f"is larger than --slide_crop {show(cfg['slide_crop'])}: pixels between windows would get no prediction")
    check_device(cfg['device'])
    check_torchrun_env(cfg['device'])
    # checkpoint flags (--eval/--ckpt/--init/--resume: a file, a work or run folder, or auto) are checked where
    # they are read (common.checkpoint), which names the file and what is wrong with it
    need(not cfg['predict'] or os.path.exists(cfg['predict']), 'predict', "no such image file or folder")
    modes = [f"--{k}" for k in ('eval', 'predict', 'summary', 'resume') if cfg[k]]
    if len(modes) > 1:  # one would be silently ignored, or take the other's checkpoint config
        raise UserError(f"{' and '.join(modes)}: give one (--resume continues training; --eval, --predict and "
                        "--summary train nothing)")
    need(not cfg['ckpt'] or cfg['predict'], 'ckpt', "is --predict's checkpoint: evaluate one with --eval CKPT, "
         "start training from its weights with --init CKPT")
    need(not (cfg['init'] and (cfg['eval'] or cfg['predict'])), 'init', "starts a training run from a checkpoint's "
         "weights: --predict takes its checkpoint as --ckpt CKPT, --eval as --eval CKPT")
    need(not cfg['out'] or cfg['eval'] or cfg['predict'], 'out', "is where --eval and --predict write their pictures; "
         "a training run writes them into its run folder (pred/), under --work_dir")
    need(not (cfg['out'] and cfg['eval'] and not cfg['save_predictions']), 'out', "would stay empty: --eval draws "
         "pictures of the first --save_predictions val images, and that is 0; pass --save_predictions N or drop --out")
    need(not (cfg['init'] and cfg['resume']), 'init', "and --resume both give the weights: --resume continues a "
         "run, --init starts a new one from a checkpoint's weights")


def check_torchrun_env(device):
    """What torchrun and the user put in the environment, checked before the process group starts."""
    t = os.environ.get('SEG_DIST_TIMEOUT_S')
    if t is not None:
        try:
            ok = 0 < float(t) < math.inf
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"SEG_DIST_TIMEOUT_S={t!r}: must be a number of seconds > 0 (the default is 1800)")
    local, gpus = os.environ.get('LOCAL_RANK'), torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = device.startswith('cuda') or (device == 'auto' and gpus > 0)
    if cuda and local is not None and local.isdigit() and int(local) >= gpus:
        raise UserError(f"LOCAL_RANK={local}: torchrun started more processes on this machine than the {gpus} GPU(s) "
                        f"visible; use --nproc_per_node {gpus} or fewer")


def check_device(name):
    if name == 'auto':
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UserError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N")
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible (use --device cpu, or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")


# ----------------------------------------------------------------------------------------------------------------
# the config, once, in the log


def format_config(cfg, docs, width=100):
    """A few lines: one per --help group, `key=value` pairs wrapped at width."""
    by_group = {}
    for key, value in cfg.items():
        by_group.setdefault(docs.get(key, ('other',))[0].partition(': ')[0], []).append(f"{key}={show(value)}")
    lines = []
    for title, items in by_group.items():
        line = f"  {title}:"
        for item in items:
            if len(line) + 1 + len(item) > width:
                lines.append(line)
                line = " " * (len(title) + 3)
            line += " " + item
        lines.append(line)
    return lines
