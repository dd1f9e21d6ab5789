"""`--amp_report N`: where half precision overflows or underflows, per layer, and who made the first inf/NaN.

Every N iterations one training step runs with hooks and records, per module in execution order, its forward output
and the gradient with respect to it (and each parameter and its gradient): the largest finite |x|, the inf/NaN
count, and the shares of elements that overflow, underflow to zero or land in the subnormal range of fp16 (and of
bf16). With the flag or without it, the same one-step report also runs by itself at the first skipped step of a
run and at the step that stops a run for too many skipped steps (a replay of that batch, below), and the log names
the culprit in one line. Each report is one line of RUN_DIR/amp_report.jsonl, RUN_DIR/amp_report.png is redrawn
from that file, and

    python -m common.amp_report RUN_DIR     # redraws the picture, prints the 10 layers closest to overflow and
                                            # the 10 with the most underflow

What is measured: the tensors as the step really has them (fp16/bf16 autocast outputs, O2/O3 half activations and
weights, the fused kernels' outputs, fp32 where the mode keeps fp32); gradients as backward computes them, i.e.
multiplied by the loss scale S, which is where underflow happens. For runs that are not fp16 (fp32, bf16) the fp16
columns are a what-if: forward values as they are, gradients times S* = the loss scale an fp16 dynamic scaler would
settle at for this step (the largest power of two <= 2^24 that keeps every gradient below fp16's overflow). The
rules, by the unrounded value v (x or x * S):
    fp16 overflow  |v| >= 65520 (rounds to inf) or already inf      bf16 overflow  |v| >= (2 - 2^-8) * 2^127
    fp16 zero      0 < |v| < 2^-25 (rounds to 0)                    bf16 zero      0 < |v| < 2^-134
    fp16 subnormal 2^-25 <= |v| < 2^-14                             bf16 subnormal 2^-134 <= |v| < 2^-126
(within half an ulp of 2^-25 and 2^-14 the real rounding can go the other way; a value that is already half cannot
be below its type's smallest subnormal, so for half tensors the zero share is 0 and the harm shows as subnormals).
"underflow" below = zero + subnormal. A value that is exactly 0 (ReLU) is neither.

First non-finite: the first forward output (execution order) holding an inf/NaN, else the first gradient. A
gradient w.r.t. module P's output is computed by the backward of the modules that consumed that output, so the
report names those (recorded by forward pre-hooks); a gradient of the model's own outputs comes from the loss.

Cost: no hook exists outside report steps. Every step copies the RNG state (5 KB) and the loss scale, so that a
skipped step can be replayed exactly; nothing else. A replay (the automatic report, and every report with
--compile, which replays eagerly before the compiled step) runs forward + backward again on the same batch with the
same RNG state and loss scale, then puts back the BatchNorm buffers, the RNG state and the gradients and never
touches the loss scaler, so training goes on exactly as without it. DDP: each rank records its own step (its own
batch, gradients before the all-reduce); every report gathers every rank's first non-finite tensor, and rank 0
writes its own record, naming the rank whose inf/NaN came earliest (forward before backward, then execution order;
on a tie the lowest rank) when that is not rank 0.
"""
import argparse
import json
import math
import os
import statistics
import textwrap
import time

import torch

from . import dist
from .guard import BufferGuard
from .plot import cli_paths, read_jsonl

FP16_MAX = 65504.0
FP16_INF_AT = 65520.0  # 65504 + half an ulp: rounds to inf (ties to even)
BF16_INF_AT = (2 - 2 ** -8) * 2.0 ** 127
FP16_LOG2_MAX = math.log2(FP16_MAX)
_HEAD = 8  # numel, nonfinite, nan, zero, max finite |x|, fp16 overflow (finite), bf16 overflow (finite), bf16 zero

# ----------------------------------------------------------------------------------------------------------------
# per-tensor statistics (on the tensor's device; fetched once per report)


def tensor_stats(x):
    """x -> one float64 vector on x's device: [numel, #inf/NaN, #NaN, #zeros, max finite |x|, #finite |x| >= 65520,
    #finite |x| >= bf16's overflow, #nonzero |x| < 2^-134, then 512 counts by the top 10 bits of |x| as fp32 (its
    biased exponent e and the first mantissa bit)]: floor(log2 |x|) = e - 127 for e in 1..254; e = 0 holds the zeros
    and fp32's subnormals; e = 255 the infs (first mantissa bit 0) and NaNs (1: the quiet NaNs arithmetic makes).
    A few light passes over the tensor (the report step's cost is mostly these, on the parameters)."""
    a = x.detach().abs()
    if a.dtype != torch.float32:
        a = a.float()  # fp16 and bf16 are exact in fp32
    a = a.reshape(-1)
    hist = torch.bincount(a.view(torch.int32) >> 22, minlength=512)  # the sign bit is 0 after abs
    zero = a.numel() - torch.count_nonzero(a)
    inf = hist[510]
    head = torch.stack([hist.new_full((), a.numel()), inf + hist[511], hist[511], zero,  # (no host-to-device copy)
                        torch.nan_to_num(a, nan=0.0, posinf=0.0).max(), a.ge(FP16_INF_AT).sum() - inf,
                        a.ge(BF16_INF_AT).sum() - inf, a.lt(2.0 ** -134).sum() - zero])
    return torch.cat([head, hist]).double()


def _log2_counts(stats):
    """{floor(log2 |x|): count} over the finite nonzero elements (fp32 subnormals: one bin each side of 2^-134)."""
    hist = stats[_HEAD:]
    out = {}
    for key in range(2, 510):
        if hist[key]:
            f = (key >> 1) - 127
            out[f] = out.get(f, 0) + hist[key]
    tiny = hist[0] + hist[1] - stats[3]  # fp32 subnormals
    out[-140] = stats[7]                 # below 2^-134
    out[-130] = tiny - stats[7]
    return out


def shares(stats, k=0):
    """Shares of the elements (stats: tensor_stats, as numbers) at scale 2^k: {'of', 'uf', 'sub'} for fp16 and
    {'bf_of', 'bf_uf', 'bf_sub'} for bf16 (bf16 at scale 1: it needs no scaling). k != 0 is the what-if scale S*,
    chosen so that nothing finite overflows; its overflow is read off the exponents (|v| >= 2^16)."""
    n, nonfinite, nan, _, _, of16, ofbf = stats[:7]
    counts = _log2_counts(stats)
    n = max(n, 1)
    inf = nonfinite - nan

    def band(lo, hi, shift):  # elements with lo <= floor(log2 |x|) + shift < hi
        return float(sum(c for f, c in counts.items() if lo <= f + shift < hi))

    over16 = of16 if k == 0 else band(16, 10 ** 6, k)
    return dict(of=(over16 + inf) / n, uf=band(-10 ** 6, -25, k) / n, sub=band(-25, -14, k) / n,
                bf_of=(ofbf + inf) / n, bf_uf=band(-10 ** 6, -134, 0) / n, bf_sub=band(-134, -126, 0) / n)


def whatif_scale_log2(max_abs, cap=24):
    """log2 of S*: the largest power of two <= 2^cap with max_abs * S* < 65520 (what fp16's dynamic scaler would
    settle at: it halves on overflow and doubles after a clean window); cap for no gradient at all."""
    if not max_abs > 0 or not math.isfinite(max_abs):
        return cap
    k = min(cap, math.floor(math.log2(FP16_INF_AT / max_abs)))
    while max_abs * 2.0 ** k >= FP16_INF_AT:
        k -= 1
    return k


# ----------------------------------------------------------------------------------------------------------------
# the hooks of one report step


def _tensors(obj, key=""):
    """(suffix, tensor) for every floating tensor in nested outputs/inputs ('' for a lone tensor, '[out]', '[1]')."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{key}[{k}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{key}[{i}]")


class Recorder:
    """with Recorder(model) as rec: <forward + backward>; rec.entries, rec.consumers. Hooks observe only: every hook
    returns None, nothing is drawn from an RNG, no tensor of the step is touched. All hooks go away on exit."""

    def __init__(self, model):
        self.model = model
        self.names = {m: (n or "model") for n, m in model.named_modules()}
        self.entries = []      # dicts: name, phase (fwd|grad|param|pgrad), order, type, dtype, numel, stats (tensor)
        self.consumers = {}    # producer output name -> [names of the modules that took it as input]
        self._seen = {}        # id(output tensor) -> (tensor, _version, name): aliases (Identity, containers) skip
        self._calls = {}
        self._params = set()
        self._handles = []
        self._order = 0

    def __enter__(self):
        for m in self.names:
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._seen = [], {}
        return False

    def _add(self, name, phase, kind, t):
        if t.numel() == 0:
            return
        self.entries.append(dict(name=name, phase=phase, order=self._order, type=kind,
                                 dtype=str(t.dtype).replace("torch.", ""), numel=t.numel(), stats=tensor_stats(t)))
        self._order += 1

    def _pre(self, module, args, kwargs):
        me = self.names[module]
        for _, t in _tensors((args, kwargs)):
            seen = self._seen.get(id(t))
            if seen is not None and seen[0] is t:
                users = self.consumers.setdefault(seen[2], [])
                if me not in users:
                    users.append(me)
        return None

    def _post(self, module, args, out):
        base = self.names[module]
        n = self._calls[module] = self._calls.get(module, 0) + 1
        if n > 1:
            base = f"{base}#{n}"  # a module run twice in one step gets one row per call
        kind = type(module).__name__
        for suffix, t in _tensors(out):
            seen = self._seen.get(id(t))
            if seen is not None and seen[0] is t and seen[1] == t._version:
                continue  # the same values another module already recorded (Identity, a container's last child)
            name = base + suffix
            self._seen[id(t)] = (t, t._version, name)
            self._add(name, "fwd", kind, t)
            if t.requires_grad and torch.is_grad_enabled():
                self._handles.append(t.register_hook(self._grad_hook(name, kind)))
        for pname, p in module.named_parameters(recurse=False):
            if p in self._params:
                continue
            self._params.add(p)
            full = f"{self.names[module]}.{pname}" if module is not self.model else pname
            self._add(full, "param", kind, p)
            if p.requires_grad and torch.is_grad_enabled():
                self._handles.append(p.register_hook(self._grad_hook(full, kind, "pgrad")))
        if module is self.model:
            self._seen = {}  # the forward is over: let go of the outputs (backward keeps what it needs)
        return None

    def _grad_hook(self, name, kind, phase="grad"):
        def hook(g):
            self._add(name, phase, kind, g)
            return None
        return hook


# ----------------------------------------------------------------------------------------------------------------
# one report: entries + scale -> a jsonl record


def build_record(rec, iteration, scale, amp, trigger, **extra):
    """The Recorder's raw statistics (one device-to-host copy) -> the jsonl record (a dict)."""
    entries = rec.entries
    stats = torch.stack([e["stats"] for e in entries]).cpu().tolist() if entries else []
    kind, dtype = getattr(amp, "kind", "none"), getattr(amp, "dtype", torch.float32)  # (tests pass stand-ins)
    if kind == "none" or getattr(amp, "fp32_math", None):  # (a bf16 mode run in fp32 arithmetic: common/cpu.py)
        kind, dtype = "none", torch.float32
    fp16_run = dtype == torch.float16 and kind != "none"
    grads = [s for e, s in zip(entries, stats) if e["phase"] in ("grad", "pgrad")]
    gmax = max((s[4] for s in grads), default=0.0)
    k = 0 if fp16_run else whatif_scale_log2(gmax)  # fp16 runs: the scale they use; others: what fp16 would use
    out, first = [], None
    for e, s in zip(entries, stats):
        grad = e["phase"] in ("grad", "pgrad")
        row = dict(name=e["name"], phase=e["phase"], order=e["order"], type=e["type"], dtype=e["dtype"],
                   numel=int(s[0]), max=_r(s[4]), nonfinite=int(s[1]), nan=int(s[2]), zero=_r(s[3] / max(s[0], 1)))
        row.update({key: _r(v) for key, v in shares(s, k if grad else 0).items()})
        out.append(row)
        if first is None and row["nonfinite"] and e["phase"] in ("fwd", "param"):
            first = row
    if first is None:  # backward in the order the hooks fired
        first = next((r for r in out if r["nonfinite"]), None)
    culprit = None
    if first is not None:
        culprit = dict(name=first["name"], phase=first["phase"], order=first["order"], max=first["max"],
                       nonfinite=first["nonfinite"],
                       nan=first["nan"], numel=first["numel"], dtype=first["dtype"],
                       by=_producers(first, rec.consumers))
    return dict(kind="amp_report", iteration=iteration, trigger=trigger,
                amp=amp.describe() if hasattr(amp, "describe") else type(amp).__name__,
                dtype=str(dtype).replace("torch.", ""),
                loss_scale=float(scale), grad_scale=float(scale) * 2.0 ** k, whatif=not fp16_run,
                first_nonfinite=culprit, entries=out, **extra)


def _producers(first, consumers):
    """Who computed the first non-finite tensor: the module itself (forward, parameter grad) or, for the gradient of
    an output, the deepest modules that consumed that output (their backward made it); [] = the loss."""
    if first["phase"] in ("fwd", "param"):
        return [first["name"].split("[")[0].split("#")[0]] if first["phase"] == "fwd" else [first["name"]]
    if first["phase"] == "pgrad":
        return [first["name"].rsplit(".", 1)[0]]
    users = consumers.get(first["name"], [])
    # a container that passed the tensor on to one of its children: name the child
    return [u for u in users if not any(v != u and (v.startswith(u + ".") or u == "model") for v in users)]


def _r(v, digits=4):
    return float(f"{v:.{digits}g}") if isinstance(v, float) else v


def describe_culprit(record):
    """One phrase: where the first inf/NaN was, for the log line."""
    c = record.get("first_nonfinite")
    if c is None:
        return "no inf/NaN in any module output, gradient or parameter on this batch"
    what = "NaN" if c["nan"] == c["nonfinite"] else "inf" if c["nan"] == 0 else "inf/NaN"
    where = f"rank {c['rank']}: " if c.get("rank") is not None else ""  # DDP: another rank's inf/NaN came first
    share = f"{c['nonfinite']} of {c['numel']} elements"
    if c["phase"] == "fwd":
        return (f"{where}first {what} in forward: output of {c['name']} ({c['dtype']}, {share}; "
                f"max finite |x| {c['max']:.3g})")
    if c["phase"] == "param":
        return f"{where}first {what} in a parameter: {c['name']} ({share})"
    scale = record["loss_scale"]
    g = f"max finite |g| {c['max']:.3g}" + (f" (gradients x loss scale {scale:g})" if scale != 1 else "")
    if c["phase"] == "pgrad":
        return f"{where}first {what} in backward: gradient of the parameter {c['name']} ({share}; {g})"
    by = " or ".join(c["by"]) if c["by"] else "the loss"
    return f"{where}first {what} in backward: grad of {c['name']} output, from the backward of {by} ({share}; {g})"


def summary(record):
    """Scalars for metrics.jsonl / TensorBoard: the extremes of one report."""
    fwd = [e for e in record["entries"] if e["phase"] == "fwd"]
    grads = [e for e in record["entries"] if e["phase"] in ("grad", "pgrad")]  # pgrad: what the scaler checks

    def tot(rows, key):
        n = sum(e["numel"] for e in rows)
        return sum(e[key] * e["numel"] for e in rows) / n if n else 0.0

    gs = record["grad_scale"] / record["loss_scale"]
    out = dict(fwd_max_log2=max((_log2(e["max"]) for e in fwd), default=float("nan")),
               fwd_overflow=tot(fwd, "of"), fwd_underflow=tot(fwd, "uf") + tot(fwd, "sub"),
               grad_max_log2=max((_log2(e["max"] * gs) for e in grads), default=float("nan")),
               grad_overflow=tot(grads, "of"), grad_underflow=tot(grads, "uf") + tot(grads, "sub"),
               grad_scale=record["grad_scale"], nonfinite=sum(e["nonfinite"] for e in record["entries"]))
    return {k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in out.items()}


def _log2(v):
    return math.log2(v) if v > 0 else float("-inf")


# ----------------------------------------------------------------------------------------------------------------
# the loop's side: one `with reporter.step(...)` per iteration


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class AmpReport:
    """The training loop's handle: `with reporter.step(it, images, targets) as s: <step>; s.outcome(skipped, stop)`.

    criterion(out, targets) -> (loss, ...) is the loop's own loss, used when a batch is replayed."""

    def __init__(self, cfg, model, amp, optimizer, folder, log, criterion):
        self.every = int(cfg.get("amp_report") or 0)
        self.model, self.raw, self.amp, self.optimizer = model, dist.unwrap(model), amp, optimizer
        self.folder, self.log, self.criterion = folder, log, criterion
        self.skips_seen, self.clean_seen = 0, False
        self.step_times = []  # wall seconds of recent normal steps (for the overhead line)
        self._guard = None

    def step(self, it, images, targets):
        return _Step(self, it, images, targets)

    # --- a replay: the same batch, RNG state and loss scale, with hooks; nothing of it stays

    def replay(self, images, targets, rng, scale):
        raw = self.raw
        device = images.device
        if self._guard is None:
            self._guard = BufferGuard(raw)
        self._guard.snapshot()
        now = _rng_state(device)
        params = list(raw.parameters()) + [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        compiled = getattr(raw, "_compiled_call_impl", None)
        try:
            raw._compiled_call_impl = None  # eager (--compile): hooks need the module calls
            for p in params:
                p.grad = None
            _set_rng_state(rng, device)
            with Recorder(raw) as rec:
                with self.amp.autocast():
                    loss = self.criterion(raw(images), targets)[0]
                (loss if scale == 1 else loss.float() * scale).backward()
            return rec
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            raw._compiled_call_impl = compiled
            _set_rng_state(now, device)
            self._guard.restore()

    # --- writing

    def write(self, record, step_s=None):
        """Gather the ranks' culprits, append the record, redraw the picture, log a line and the scalars."""
        if dist.world_size() > 1:
            # the earliest over the ranks (forward before backward, then execution order): with SyncBN one rank's
            # inf reaches the others' statistics, so rank 0's own first inf may be a consequence
            firsts = dist.all_gather_object(record["first_nonfinite"])
            record["ranks_first_nonfinite"] = firsts
            found = [(f["phase"] not in ("fwd", "param"), f["order"], r) for r, f in enumerate(firsts) if f]
            if found and min(found)[2] != dist.rank():
                r = min(found)[2]
                record["first_nonfinite"] = dict(firsts[r], rank=r)
        if step_s is not None:
            normal = statistics.median(self.step_times) if self.step_times else None
            record.update(step_s=round(step_s, 4), normal_step_s=round(normal, 4) if normal else None)
        if not dist.is_main():
            return
        path = os.path.join(self.folder, "amp_report.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        s = summary(record)
        if hasattr(self.log, "record"):
            self.log.record(kind="amp_report", iteration=record["iteration"], **s,
                            **({"step_s": record["step_s"]} if record.get("step_s") else {}))
        timing = ""
        if record.get("step_s") and record.get("normal_step_s"):
            timing = (f" | report step {record['step_s']:.2f} s vs {record['normal_step_s']:.2f} s normal "
                      f"({record['step_s'] / record['normal_step_s']:.2f}x)")
        view = "fp16" + (" what-if" if record["whatif"] else "")

        def p2(v):
            return "-" if v is None else f"2^{v:.1f}"
        self.log(f"amp report it {record['iteration']} ({record['trigger']}): {view}: largest output "
                 f"{p2(s['fwd_max_log2'])} (fp16 max 2^{FP16_LOG2_MAX:.1f}), gradients x {record['grad_scale']:g}: "
                 f"largest {p2(s['grad_max_log2'])}, {100 * s['grad_underflow']:.2g}% of gradient elements "
                 f"underflow | {describe_culprit(record)}{timing}")
        try:
            draw(read_records(path), os.path.join(self.folder, "amp_report.png"))
        except ImportError:
            self.log("amp report: amp_report.png not drawn, matplotlib is not installed")
        except ValueError as e:
            self.log(f"amp report: amp_report.png not drawn ({e})")


class _Step:
    def __init__(self, rep, it, images, targets):
        self.rep, self.it, self.images, self.targets = rep, it, images, targets
        self.n = it + 1  # the iteration number the log and metrics.jsonl use
        self.scheduled = rep.every > 0 and self.n % rep.every == 0
        self.rec = self.replayed = self.skipped = self.stop = None

    def outcome(self, skipped, stop=False):
        self.skipped, self.stop = bool(skipped), bool(stop)

    def __enter__(self):
        rep = self.rep
        self.t0 = time.perf_counter()
        self.rng = _rng_state(self.images.device)
        gs = getattr(rep.amp, "grad_scaler", None)
        # the scale this step uses, without a host sync (GradScaler keeps it on the device)
        self.scale = gs._scale.clone() if gs is not None and gs._scale is not None else None
        if self.scale is None:
            self.scale = rep.amp.loss_scale
        if self.scheduled:
            if getattr(rep.raw, "_compiled_call_impl", None) is not None:
                # --compile: an eager replay of this batch now, then the compiled step as usual
                rec = rep.replay(self.images, self.targets, self.rng, float(self.scale))
                self.replayed = build_record(rec, self.n, float(self.scale), rep.amp, f"every {rep.every}, eager "
                                             "replay (--compile)")
            else:
                self.rec = Recorder(rep.raw).__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        rep = self.rep
        if self.rec is not None:
            self.rec.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return False
        seconds = time.perf_counter() - self.t0
        if not self.scheduled:
            rep.step_times = (rep.step_times + [seconds])[-20:]
        first = self.skipped and rep.skips_seen == 0
        rep.skips_seen += int(bool(self.skipped))
        rep.clean_seen |= self.skipped is False
        why = " and ".join(w for w, on in (("first skipped step", first), ("stop: too many skipped steps", self.stop))
                           if on)
        record = None
        if self.scheduled:
            record = self.replayed
            if record is None:
                record = build_record(self.rec, self.n, float(self.scale), rep.amp, f"every {rep.every}")
            record.update(trigger=record["trigger"] + (f"; {why}" if why else ""), skipped=self.skipped)
            rep.write(record, seconds)
        elif why:
            rec = rep.replay(self.images, self.targets, self.rng, float(self.scale))
            record = build_record(rec, self.n, float(self.scale), rep.amp, why + " (replayed)", skipped=True)
            rep.write(record)
        if record is not None and self.skipped and why:
            after = rep.amp.loss_scale
            warm = "; before any clean step: the loss scale may still be looking for its level" \
                if not rep.clean_seen and 1 <= after < float(self.scale) else ""
            culprit = describe_culprit(record)
            from_replay = not self.scheduled or self.replayed is not None  # the record is a replay, not the live step
            if record.get("first_nonfinite") is None and from_replay:
                culprit = ("the replay of this batch stayed finite, so the overflow did not reproduce"
                           + (" (CUDA kernels are not bit-reproducible: cuDNN's autotuned algorithms, atomic-add "
                              "backward passes)" if self.images.device.type == "cuda" else ""))
            rep.log(f"skipped step at it {self.n} (loss scale {float(self.scale):g} -> {after:g}): "
                    f"{culprit}{warm} (amp_report.jsonl / amp_report.png in {rep.folder})")
        return False


# ----------------------------------------------------------------------------------------------------------------
# the picture and the command line


def read_records(path):
    """amp_report.jsonl -> records in file order (a partial last line of a killed run is skipped, with a note)."""
    return read_jsonl(path, "common/amp_report.py")


LOG2_LIM = (-30.0, 20.0)  # colour range of the log2 max |x| panels
SHARE_LIM = (-6.0, 0.0)   # log10 of the underflow share


def _cmap():
    """log2 |x| -> colour, with fp16's landmarks where the colours change: flushed to zero (dark blue), subnormal
    (light blue), the normal range (near-white, then greens, then yellow), near overflow (orange), overflow (red); inf
    (magenta)."""
    from matplotlib.colors import LinearSegmentedColormap
    lo, hi = LOG2_LIM

    def at(v):
        return (v - lo) / (hi - lo)
    stops = [(0.0, "#08306b"), (at(-25), "#2171b5"), (at(-14), "#c6dbef"), (at(-13.9), "#f0f0f0"),
             (at(0), "#c7e9c0"), (at(6), "#41ab5d"), (at(10), "#fee08b"), (at(14), "#fdae61"), (at(15.99), "#f46d43"),
             (at(16), "#a50026"), (1.0, "#67001f")]
    return LinearSegmentedColormap.from_list("fp16", stops).with_extremes(over="#ff00ff", under="#000000",
                                                                          bad="#d9d9d9")


def grids(records):
    """(row names, {panel: values}, {'f' | 'g': inf/NaN flags}) for draw(), each a [rows, records] array: rows =
    forward outputs in execution order (union over records), one column per record. Panels: 'fmax' / 'gmax' the
    log2 max |x| of the output / of the gradient w.r.t. it (at the view scale), 'fuf' / 'guf' their underflow
    shares; 'f' / 'g' flag an inf/NaN in the output / its gradient."""
    import numpy as np
    names = []
    for r in records:
        for e in r["entries"]:
            if e["phase"] == "fwd" and e["name"] not in names:
                names.append(e["name"])
    row = {n: i for i, n in enumerate(names)}
    shape = (len(names), len(records))
    panels = {k: np.full(shape, np.nan) for k in ("fmax", "fuf", "gmax", "guf")}
    bad = {k: np.zeros(shape, bool) for k in ("f", "g")}
    for j, r in enumerate(records):
        gs = r["grad_scale"] / r["loss_scale"]
        for e in r["entries"]:
            i = row.get(e["name"])
            if i is None or e["phase"] not in ("fwd", "grad"):
                continue
            fwd = e["phase"] == "fwd"
            mx = e["max"] * (1 if fwd else gs)
            panels["fmax" if fwd else "gmax"][i, j] = math.log2(mx) if mx > 0 else LOG2_LIM[0] - 1
            panels["fuf" if fwd else "guf"][i, j] = e["uf"] + e["sub"]
            bad["f" if fwd else "g"][i, j] = e["nonfinite"] > 0
    return names, panels, bad


def draw(records, out_path, layout=False):
    """amp_report.png: rows = layers (forward order), columns = report steps; log2 max |x| of the outputs and of the
    gradients (at the view scale) against fp16's range, the underflow shares beside them, the loss scale on top.
    Returns out_path, or with layout=True {panel: (x0, y0, x1, y1)}: each panel's (and the loss scale's and the
    header's) pixels in the PNG (for tests)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize

    names, panels, bad = grids(records)
    if not names:
        raise ValueError("no forward outputs recorded")
    nr, nc = len(names), len(records)
    cell_w = 0.32
    panel_w = max(1.3, nc * cell_w)
    label_w = 0.075 * max(len(n) for n in names) + 0.3
    row_h = max(0.14, 4.0 / nr)  # a few rows: taller cells, so the colour bars beside them stay readable
    width = label_w + 4 * panel_w + 3 * 0.25 + 2.2
    last = records[-1]
    view = "fp16 what-if" if last["whatif"] else "fp16 as run"
    # a long AMP description (the fp32-math fallbacks) wraps to the figure's width instead of running off it
    per_line = int(width * 72 / (8 * 0.62))
    header = textwrap.wrap(f"amp report: {last['amp']}", per_line) + textwrap.wrap(
        f"{view}; x = inf/NaN in the tensor; grey = no gradient; columns: iteration (* = skipped step)", per_line)
    top_h, bottom_h = 1.6 + 0.15 * len(header), 1.2
    height = top_h + nr * row_h + bottom_h
    fig = plt.figure(figsize=(width, height), dpi=110)
    cmap, norm = _cmap(), Normalize(*LOG2_LIM)
    scmap = plt.get_cmap("Purples").with_extremes(bad="#ffffff", under="#ffffff")
    snorm = Normalize(*SHARE_LIM)
    y0, h = bottom_h / height, nr * row_h / height
    axes = []
    x = label_w / width
    for k, (key, title) in enumerate((("fmax", "outputs: log2 max |x|"), ("fuf", "outputs: underflow share"),
                                      ("gmax", "gradients x S: log2 max |g|"), ("guf", "gradients x S: underflow"))):
        ax = fig.add_axes([x, y0, panel_w / width, h])
        x += (panel_w + 0.25) / width
        data = panels[key]
        if key.endswith("max"):
            ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            flags = bad["f" if key == "fmax" else "g"]
            yy, xx = np.nonzero(flags)
            ax.scatter(xx, yy, marker="x", s=18, c="k", linewidths=1.2, label="inf/NaN")
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                shown = np.where(data > 0, np.log10(np.maximum(data, 1e-300)), SHARE_LIM[0] - 1)
            shown[np.isnan(data)] = np.nan
            ax.imshow(shown, cmap=scmap, norm=snorm, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(nc))
        ax.set_xticklabels([_col_label(r) for r in records], rotation=90, fontsize=6)
        ax.set_yticks(range(nr))
        ax.set_yticklabels(names if k == 0 else [], fontsize=6)
        ax.tick_params(length=1.5, pad=1)
        axes.append(ax)
    # the loss scale (S: the scale the gradients are shown at) above the gradient panel, one point per column
    sax = fig.add_axes([axes[2].get_position().x0, (bottom_h + nr * row_h + 0.35) / height,
                        axes[2].get_position().width, 0.8 / height])
    cols = np.arange(nc)
    sax.step(cols, [math.log2(r["grad_scale"]) for r in records], where="mid", color="C3", marker="o", ms=3,
             label="S (gradients shown at)")
    if any(r["whatif"] for r in records):
        sax.step(cols, [math.log2(r["loss_scale"]) for r in records], where="mid", color="C0", ls="--",
                 label="the run's loss scale")
    sax.set_xlim(-0.5, nc - 0.5)
    sax.set_xticks([])
    sax.set_ylabel("log2 S", fontsize=7)
    sax.tick_params(labelsize=6)
    sax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the strip: its lines stay visible
    sax.grid(alpha=0.3)
    # colour bars with fp16's range marked
    cax = fig.add_axes([(width - 1.8) / width, y0 + h * 0.45, 0.12 / width, h * 0.5])
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, extend="both")
    for v in (-25, -14, FP16_LOG2_MAX):
        cb.ax.axhline(v, color="k", lw=1.2)
    cb.set_ticks([-30, -25, -14, 0, 8, 16, 20])
    cb.set_ticklabels(["-30", "-25: fp16 zero below", "-14: fp16 subnormal below", "0", "8", "16: fp16 max 65504",
                       "20"])
    cb.ax.tick_params(labelsize=6)
    cb.set_label("log2 max |x|", fontsize=7)
    sc = fig.add_axes([(width - 1.8) / width, y0, 0.12 / width, h * 0.35])
    cb2 = fig.colorbar(matplotlib.cm.ScalarMappable(norm=snorm, cmap=scmap), cax=sc)
    cb2.set_ticks([-6, -4, -2, 0])
    cb2.set_ticklabels(["1e-6", "1e-4", "1%", "100%"])
    cb2.ax.tick_params(labelsize=6)
    cb2.set_label("underflow share: < 2^-14 in fp16 (zero or subnormal)", fontsize=6)
    text = fig.text(0.01, 1 - 0.2 / height, "\n".join(header), fontsize=8, va="top", linespacing=1.3)
    fig.savefig(out_path)
    H = fig.get_size_inches()[1] * fig.dpi
    boxes = {}
    for key, item in zip(("fmax", "fuf", "gmax", "guf", "scale", "header"), axes + [sax, text]):
        b = item.get_window_extent()
        boxes[key] = (b.x0, H - b.y1, b.x1, H - b.y0)
    plt.close(fig)
    return boxes if layout else out_path


def _col_label(r):
    return f"{r['iteration']}{'*' if r.get('skipped') else ''}"


def top_lists(records, n=10):
    """(closest to overflow, most underflow): the worst value over all records of each (name, phase)."""
    worst_max, worst_uf = {}, {}
    for r in records:
        gs = r["grad_scale"] / r["loss_scale"]
        for e in r["entries"]:
            key = (e["name"], e["phase"])
            mx = e["max"] * (gs if e["phase"] in ("grad", "pgrad") else 1)
            if e["nonfinite"]:
                mx = float("inf")
            if key not in worst_max or mx > worst_max[key][0]:
                worst_max[key] = (mx, r["iteration"])
            uf = e["uf"] + e["sub"]
            if key not in worst_uf or uf > worst_uf[key][0]:
                worst_uf[key] = (uf, r["iteration"])
    close = sorted(worst_max.items(), key=lambda kv: -kv[1][0])[:n]
    under = sorted(worst_uf.items(), key=lambda kv: -kv[1][0])[:n]
    return close, under


PHASES = {"fwd": "output", "grad": "grad of output", "param": "parameter", "pgrad": "parameter grad"}


def format_top(records, n=10):
    close, under = top_lists(records, n)
    last = records[-1]
    lines = [f"{len(records)} report(s) in this run, the last at iteration {last['iteration']} ({last['amp']}); "
             f"gradients at S = the loss scale{' fp16 would use (what-if)' if last['whatif'] else ''}",
             f"the {len(close)} closest to fp16 overflow (65504 = 2^{FP16_LOG2_MAX:.2f}):"]
    for (name, phase), (mx, it) in close:
        room = "inf/NaN" if math.isinf(mx) else f"2^{_log2(mx):6.2f}, headroom x{FP16_MAX / mx:.3g}" if mx > 0 \
            else "all zero"
        lines.append(f"  {name:<48} {PHASES[phase]:<15} max {mx:.3g} ({room}) at it {it}")
    lines.append(f"the {len(under)} with the most fp16 underflow (zero or subnormal, < 2^-14):")
    for (name, phase), (uf, it) in under:
        lines.append(f"  {name:<48} {PHASES[phase]:<15} {100 * uf:.3g}% at it {it}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m common.amp_report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run's folder (holding amp_report.jsonl), the amp_report.jsonl file, or a work "
                                   "dir (its newest run with a report)")
    p.add_argument("--out", default="", help="output PNG (default RUN_DIR/amp_report.png)")
    p.add_argument("--top", type=int, default=10, help="how many layers each list shows")
    args = p.parse_args(argv)
    path, out = cli_paths(p, args.run_dir, args.out, "amp_report.jsonl", "amp_report.png",
                          "train with --amp_report N, or wait for a skipped step")
    try:
        records = read_records(path)
    except ValueError as e:
        p.exit(1, f"python -m common.amp_report: {e}\n")
    if records and not all(isinstance(r, dict) and "grad_scale" in r for r in records):
        p.exit(1, f"python -m common.amp_report: {path} holds no AMP report records (pass a run's folder, or its "
                  "amp_report.jsonl)\n")
    if not records:
        p.exit(1, f"python -m common.amp_report: {path} holds no report yet\n")
    print(format_top(records, args.top))
    try:
        print(f"wrote {draw(records, out)}")
    except ImportError:
        p.exit(1, "python -m common.amp_report: matplotlib is not installed (pip install -r requirements.txt)\n")


if __name__ == "__main__":
    main()
