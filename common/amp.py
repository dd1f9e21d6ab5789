"""Mixed precision behind one object, so the training loop has one code path for `--amp none|torch|apex`.

    amp = Amp('apex', opt_level='O1', dtype=torch.float16, device='cuda')
    model, optimizer = amp.initialize(model, optimizer)   # before any DDP wrap
    for x, y in loader:
        optimizer.zero_grad()                             # the trainer's; grads are .grad of the optimizer's params
        with amp.autocast():
            loss = criterion(model(x), y)
        amp.backward(loss, optimizer)    # scale, backward, unscale (into fp32 masters for O2), non-finite check
        skipped = amp.step(optimizer)    # optimizer.step() unless a gradient was inf/NaN

After backward() the optimizer's params hold true (unscaled) gradients in every mode, so clipping, if ever wanted,
goes between backward() and step() (amp_spec §2.4: apex unscaled at scale_loss exit too). zero_grad stays the
trainer's: optimizer.zero_grad() clears the fp32 master grads too (for O2 the masters *are* the optimizer's params).
A successful step() leaves the grads alone; a skipped one sets them all to None, so an inf/NaN can never leak into
a later step. With kind='torch' in fp16 call backward() once per step (GradScaler unscales once); the other modes
(apex, none, torch bf16) accumulate.

kind='none'   plain fp32. backward() is loss.backward(); step() is optimizer.step(). Bit-identical to the hand-written
              step: the only extra is a non-finite check that multiplies the grads by exactly 1.0.
kind='torch'  torch.autocast(device, dtype) + torch.amp.GradScaler(device) for fp16 (CPU included; amp_spec §3.5).
              bf16 has fp32's exponent range, so it gets no scaler (amp_spec §3.4), only the non-finite check.
kind='apex'   NVIDIA's apex.amp if it is importable (a thin adapter, see _NvidiaApex), else our implementation of
              its semantics (apex.amp was deleted from apex in May 2025, amp_spec §1.1):
  O0  fp32 everything, loss scale 1.0.
  O1  per-op casting + apex's dynamic LossScaler. The cast policy is torch.autocast; see "O1 cast policy" below.
  O2  model cast to half except affine BatchNorms (kept fp32), fp32 master weights in the optimizer, fp16 grads
      unscaled into fp32 master grads, step in fp32, masters copied back into the half model; floating inputs
      are cast to half and outputs back to fp32 by forward hooks (no branch in the loop). Dynamic scaling.
  O3  everything half (BatchNorm too), no loss scaling.

O1 cast policy (amp_spec §2.3, §3.3, §6). apex O1 monkey-patched torch functions with three lists; torch.autocast
is the same idea done in the dispatcher, so we use it and do not patch anything. On CUDA the two agree on every op
our segmentors run: conv/linear/matmul -> fp16; softmax, log_softmax, cross_entropy/nll_loss, interpolate -> fp32;
batch_norm on no list in either (fp16 activations with fp32 weights, cuDNN's mixed BN); add/mul/cat of mixed
fp16+fp32 -> fp32 (apex "promote", torch native type promotion: same result). Where the lists differ (not hit by
our models): apex casts gelu, std, var, local_response_norm, multilabel_soft_margin_loss, ctc_loss to fp32 and torch
leaves them in the input dtype; torch casts rms_norm, logsumexp, huber_loss, pdist/cdist to fp32 and apex does not;
apex bans F.binary_cross_entropy (torch too on CUDA); apex caches fp16 weight casts until scale_loss exit, torch until
autocast exit. We correct none of these: nothing we run is affected on CUDA, and correcting them would mean
monkey-patching torch, the thing apex was deleted for. On CPU (which apex never supported) torch's CPU policy runs
softmax, sum, layer_norm and upsample in the half type (amp_spec §3.4, trap 6); cross_entropy stays fp32. Our custom
ops (common.ops, --kernels fused) register no autocast rule: they run in their input's dtype and accumulate in fp32
(see common/ops.py), under either kind. One divergence follows on CUDA: the fused upsample_concat interpolates fp16
activations in fp16, where apex O1 and torch's CUDA autocast both interpolate in fp32 (amp_spec §2.3, trap 5).

Deviations from apex, on purpose: (1) bf16 is allowed (no scaling, like torch); (2) modes without a dynamic scaler
(none, O0, O3, bf16) still check for inf/NaN gradients and skip the step (apex O0/O3 did not check), so a
non-finite gradient never reaches the weights or the momentum buffers in any mode; (3) O2 masters are the fp32
weights as they were before the cast (apex cloned them from the already-halved model, losing the low mantissa bits
of pretrained weights); (4) a skipped step also drops the grads of every param (apex dropped only master grads);
(5) init_scale and scale_window are settable (apex hard-coded 2**16 and 2000 in its public API).

Checkpoints: model.state_dict() of an O2/O3 model holds fp32 tensors (for O2 the fp32 masters themselves, so a
resume is exact), like apex's state-dict hook; loading one copies the fp32 values into the masters and casts them
down into the half model. amp.state_dict() is apex's {'loss_scaler0': {'loss_scale', 'unskipped'}} for kind='apex',
GradScaler's own dict for kind='torch' (empty when bf16), {} for kind='none'.
"""
import contextlib

import torch
import torch.nn as nn

from .errors import UserError

KINDS = ("none", "torch", "apex")
OPT_LEVELS = ("O0", "O1", "O2", "O3")
PREFER_NVIDIA_APEX = True  # use NVIDIA's apex.amp when importable; tests set False to exercise our implementation

# -----------------------------------------------------------------------------
# which half type runs well on CPU

# Measured on our 2-core dev box (Intel Xeon with avx512_bf16 and avx512_fp16, load average ~10 from the other
# engineers' jobs), torch 2.14.1, one SGD training step (forward + CE + backward + step) of a torchvision ResNet-18
# under torch.autocast('cpu'), median of interleaved rounds:
#   batch 2 at 96x96, process CPU seconds (robust to the load): fp32 3.1, bf16 1.3, fp16 15.3
#   batch 4 at 128x128, wall seconds (noisy, 4 rounds):         fp32 14.2, bf16 9.3 (channels_last: 11.4 / 12.5)
#   batch 4 at 128x128, wall, one round:                         fp16 100 (NCHW) and 169 (channels_last)
# So bf16 is the CPU half type (~1.5-2.4x faster than fp32); fp16 autocast works on CPU but is 5-25x slower than
# fp32 (no fast fp16 conv kernels on this path), fine for a 3-iteration test, useless for the demo run.
# On the R50-D8 segmentors themselves bf16 does not pay on this CPU (bench/results/2026-11-27-cpu-2core-train.md,
# crop 128, batch 2: PSPNet 0.7x and DeepLabV3 0.14x of fp32; the dilated ASPP convs have a slow bf16 path), but it
# is still the only usable half type here, so --amp torch|apex on CPU means bf16. That box had bf16 instructions
# (AVX512-BF16); without them bf16 convolutions are ~12x slower than fp32, so common/cpu.py runs the autocast modes
# in fp32 arithmetic on such a CPU (see there).
CPU_HALF_DTYPE = torch.bfloat16


def cpu_half_dtype():
    """The CPU's half type for --amp torch|apex with --amp_dtype auto (measured above; common/cpu.py decides whether
    it runs natively or as fp32 arithmetic)."""
    return CPU_HALF_DTYPE


def _parse_dtype(dtype):
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"common/amp.py: amp dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"common/amp.py: amp dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _dtype_name(dtype):
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


class AmpStateError(UserError, ValueError):
    """A checkpoint's AMP state that this run's --amp / --opt_level / --amp_dtype cannot take (it was saved by another
    mode): one line for the user, a ValueError to older callers."""


_RESUME_HINT = ("resume with the flags it was trained with (--amp, --opt_level, --amp_dtype; on a CPU --amp_dtype auto "
                "is bf16), or start a new schedule from its weights with --init CHECKPOINT")


# -----------------------------------------------------------------------------
# apex's dynamic loss scaler


class LossScaler:
    """apex.amp's LossScaler (apex/amp/scaler.py at e13873de, amp_spec §2.5), rule for rule.

    Dynamic: overflow -> scale / 2 (floored at min_loss_scale), unskipped <- 0, skip the step; clean backward ->
    unskipped += 1, and at scale_window clean backwards in a row -> scale * 2 (capped at max_loss_scale) and
    unskipped <- 0.
    The counter counts backward passes, not optimizer steps. Static: the scale never changes.
    """

    def __init__(self, init_scale=2.**16, scale_window=2000, min_loss_scale=None, max_loss_scale=2.**24,
                 dynamic=True):
        self.dynamic = dynamic
        self.scale_window = scale_window
        self.min_loss_scale = min_loss_scale
        self.max_loss_scale = max_loss_scale
        self.loss_scale = float(min(max_loss_scale, init_scale) if dynamic else init_scale)  # apex: min(max, init)
        self.unskipped = 0

    def update(self, found_inf):
        """Apply one backward pass's outcome; returns True when the step must be skipped."""
        if not self.dynamic:
            return False  # apex's static mode never checks (Amp still skips non-finite grads itself)
        if found_inf:
            self.loss_scale = self.loss_scale / 2.
            if self.min_loss_scale:  # apex tests truthiness, so min_loss_scale=0 means no floor, as None does
                self.loss_scale = max(self.min_loss_scale, self.loss_scale)
            self.unskipped = 0
        else:
            self.unskipped += 1
        if self.unskipped == self.scale_window:
            self.loss_scale = min(self.max_loss_scale, self.loss_scale * 2.)
            self.unskipped = 0
        return bool(found_inf)

    def state_dict(self):
        return {"loss_scale": self.loss_scale, "unskipped": self.unskipped}

    def load_state_dict(self, sd):
        self.loss_scale = float(sd["loss_scale"])
        self.unskipped = int(sd["unskipped"])

# -----------------------------------------------------------------------------
# gradient and model helpers


def _fused_unscale(device, dtype):
    """Whether torch's fused unscale kernel takes this group: its CUDA kernel has no bfloat16 (pytorch#127176), and
    O3 in bf16 makes bf16 gradients."""
    return not (device.type == "cuda" and dtype == torch.bfloat16)


def unscale_flags(tensors, inv_scale=1.0):
    """tensors *= inv_scale in place; one float32 (1,) flag per device, > 0 where an element was inf/NaN (before the
    multiply), no host sync. One fused call per (device, dtype) group; with inv_scale == 1.0 the multiply is exact,
    so this doubles as a bit-preserving non-finite check (common/guard.py's, over the BN buffers)."""
    groups = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t)
    flags = {}
    for (device, dtype), ts in groups.items():
        if _fused_unscale(device, dtype):
            found = torch.zeros(1, dtype=torch.float32, device=device)
            inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(ts, found, inv)  # the kernel GradScaler.unscale_ uses
        else:  # the same contract, composed: the flag before the multiply, every tensor multiplied
            found = torch.stack([(~torch.isfinite(t)).any() for t in ts]).any().float().reshape(1)
            if inv_scale != 1.0:
                torch._foreach_mul_(ts, inv_scale)
        flags[device] = flags[device] + found if device in flags else found
    return flags


def _unscale_and_check(grads, inv_scale):
    """grads *= inv_scale in place; True if any element was inf/NaN (one device-to-host sync per device)."""
    flags = [f.cpu() for f in unscale_flags(grads, inv_scale).values()]
    return bool(sum(flags).item()) if flags else False


def _optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _map_tensors(obj, fn):
    """Apply fn to every floating tensor inside nested tuples/lists/dicts (apex's applier, for model in/outputs)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        mapped = [_map_tensors(o, fn) for o in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)  # namedtuples too
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    return obj


def _is_kept_bn(module):
    # apex's convert_network skips exactly the affine _BatchNorm subclasses (SyncBatchNorm and our BatchNormAct2d
    # included); a non-affine BN is cast like everything else (amp_spec §2.2)
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine


def _module_tensors_to_cast(model, keep_bn_fp32):
    """[(module, kind, name, tensor)] for every floating param/buffer that O2/O3 cast to half."""
    out = []
    for m in model.modules():
        if keep_bn_fp32 and _is_kept_bn(m):
            continue
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                out.append((m, "param", name, p))
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                out.append((m, "buffer", name, b))
    return out

# -----------------------------------------------------------------------------
# the one object the trainer talks to


class Amp:
    """See the module docstring. API: initialize, autocast, backward, step, loss_scale, state_dict, load_state_dict,
    describe."""

    def __init__(self, kind, opt_level="O1", dtype=torch.float16, device="cuda", init_scale=2.**16,
                 scale_window=2000, min_loss_scale=None, max_loss_scale=2.**24, fp32_math=None):
        if kind not in KINDS:
            raise ValueError(f"common/amp.py: amp kind must be one of {KINDS}, got {kind!r}")
        if opt_level not in OPT_LEVELS:
            hint = " (the prefix is the letter O, not zero)" if str(opt_level).startswith("0") else ""
            raise ValueError(f"common/amp.py: opt_level must be one of {OPT_LEVELS}, got {opt_level!r}{hint}")
        self.kind, self.opt_level, self.dtype = kind, opt_level, _parse_dtype(dtype)
        self.device_type = torch.device(device).type
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"common/amp.py: amp device must be 'cuda' or 'cpu', got {device!r}")
        if kind != "none" and self.device_type == "cuda" and not torch.cuda.is_available():
            # torch.amp.GradScaler('cuda') would silently disable itself here (amp_spec trap 7); we refuse instead
            raise RuntimeError(f"common/amp.py: --amp {kind} on device 'cuda' but CUDA is not available; "
                               f"pass --device cpu")
        self.init_scale, self.scale_window = float(init_scale), int(scale_window)
        self.min_loss_scale, self.max_loss_scale = min_loss_scale, max_loss_scale
        fp16 = self.dtype == torch.float16

        # per-mode switches: what autocasts, what the model is cast to, who scales
        self.use_autocast = kind == "torch" or (kind == "apex" and opt_level == "O1")
        # fp32_math (a reason, common/cpu.py): an autocast mode with autocast off, on a CPU without fast bf16; the
        # rest of the mode (its dtype's scaling, the non-finite check, skipped steps) is unchanged
        self.fp32_math = fp32_math
        if fp32_math:
            if not self.use_autocast or self.device_type != "cpu" or self.dtype != torch.bfloat16:
                raise ValueError("common/amp.py: fp32_math applies to the CPU bf16 autocast modes (torch, apex O1)")
            self.use_autocast = False
        self.cast_model = self.dtype if kind == "apex" and opt_level in ("O2", "O3") else None
        self.keep_bn_fp32 = kind == "apex" and opt_level == "O2"
        self.master_weights = kind == "apex" and opt_level == "O2"
        self.grad_scaler = None  # torch.amp.GradScaler (kind='torch', fp16)
        self.scaler = None       # our LossScaler (kind='apex'; static 1.0 where apex has no dynamic scale)
        if kind == "torch" and fp16:
            self.grad_scaler = torch.amp.GradScaler(self.device_type, init_scale=init_scale, growth_factor=2.0,
                                                    backoff_factor=0.5, growth_interval=self.scale_window)
        if kind == "apex":
            dynamic = fp16 and opt_level in ("O1", "O2")  # O0/O3 use a static 1.0 (amp_spec §2.1); bf16 needs none
            self.scaler = LossScaler(init_scale if dynamic else 1.0, self.scale_window, min_loss_scale,
                                     max_loss_scale, dynamic=dynamic)

        # NVIDIA's apex.amp when it exists (it needs CUDA and fp16); otherwise ours, and describe() says why
        self.nvidia = None
        self.impl_note = ""
        if kind == "apex":
            apex_amp, why = _probe_nvidia_apex()
            if apex_amp is not None and PREFER_NVIDIA_APEX and self.device_type == "cuda" and fp16:
                self.nvidia = _NvidiaApex(apex_amp, self)
                self.impl_note = "NVIDIA apex.amp"
            else:
                if apex_amp is None:
                    why = f"apex.amp not importable ({why})"
                elif not PREFER_NVIDIA_APEX:
                    why = "apex.amp importable but common.amp.PREFER_NVIDIA_APEX is False"
                elif self.device_type != "cuda":
                    why = "apex.amp needs CUDA"
                else:
                    why = "apex.amp has no bf16"
                self.impl_note = f"our implementation of apex.amp semantics; {why}"

        self.model = self.optimizer = None
        self._pairs = []           # O2: [(half model param, fp32 master)]
        self._pending = False      # backward() ran, step() not yet
        self._found_inf = False    # a non-finite grad was seen since the last step()

    @classmethod
    def from_fp16_cfg(cls, fp16_cfg, device):
        """Map ssseg's SEGMENTOR_CFG['fp16_cfg'] (any shape, ssseg_spec §1 and §9) onto an Amp; None/{} -> 'none'."""
        kind, kw = fp16_cfg_args(fp16_cfg)
        return cls(kind, device=device, **kw)

    # --- set-up

    def initialize(self, model, optimizer):
        """Cast the model / make fp32 masters as the mode says; returns (model, optimizer), the same objects."""
        if self.model is not None:
            raise RuntimeError("common/amp.py: Amp.initialize() was already called")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise RuntimeError("common/amp.py: call Amp.initialize() before wrapping the model in DDP/DataParallel")
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                raise ValueError(f"common/amp.py: Amp.initialize() expects an fp32 model, but {name} is {p.dtype} "
                                 f"(do not call .half() yourself; opt_level O2/O3 casts)")
            if self.kind != "none" and p.device.type != self.device_type:
                raise ValueError(f"common/amp.py: {name} is on {p.device} but amp device is {self.device_type!r}; "
                                 f"move the model first")
        self.model, self.optimizer = model, optimizer
        if self.nvidia is not None:
            return self.nvidia.initialize(model, optimizer)
        if self.cast_model is not None:
            self._cast(model, optimizer)
        return model, optimizer

    def _cast(self, model, optimizer):
        """O2/O3: half model (BN kept fp32 for O2), fp32 masters for O2, in/out casting hooks, fp32 state dicts."""
        half = self.cast_model
        to_cast = _module_tensors_to_cast(model, self.keep_bn_fp32)
        cast_ids = {id(t) for _, kind, _, t in to_cast if kind == "param"}
        masters = {}
        if self.master_weights:
            # masters are fp32 clones taken *before* the cast, so pretrained/resumed weights keep every bit
            for p in _optimizer_params(optimizer):
                if p.requires_grad and id(p) in cast_ids:
                    masters[p] = nn.Parameter(p.detach().clone())
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # DDP will broadcast rank 0's half weights; the masters must agree with them on every rank
                for m in masters.values():
                    torch.distributed.broadcast(m.data, src=0)
        with torch.no_grad():
            for module, kind, name, t in to_cast:
                if kind == "param":
                    src = masters[t] if t in masters else t
                    t.data = src.data.to(half)  # same Parameter object, so the optimizer/DDP references stay valid
                else:
                    module._buffers[name] = t.to(half)
        if self.master_weights:
            # swap each half param for its master in the optimizer; move any existing state along with it
            for group in optimizer.param_groups:
                group["params"] = [masters.get(p, p) for p in group["params"]]
            for p, m in masters.items():
                if p in optimizer.state:
                    optimizer.state[m] = optimizer.state.pop(p)
            self._pairs = list(masters.items())
        # recast the optimizer state to its params' dtypes (apex did the same state_dict round trip)
        optimizer.load_state_dict(optimizer.state_dict())

        # forward: floating inputs -> half, outputs -> fp32 (apex's patched forward, as hooks so DDP keeps them)
        model.register_forward_pre_hook(
            lambda mod, args, kwargs: (_map_tensors(args, lambda t: t.to(half)),
                                       _map_tensors(kwargs, lambda t: t.to(half))), with_kwargs=True)
        model.register_forward_hook(lambda mod, args, out: _map_tensors(out, lambda t: t.float()))

        # state dicts: save fp32 (the master where there is one), load fp32 into the master then down into the model
        by_module = {}
        for module, kind, name, t in to_cast:
            by_module.setdefault(module, []).append(name)
        name_to_master = {}
        for module, kind, name, t in to_cast:
            if kind == "param" and t in masters:
                name_to_master[(module, name)] = masters[t]
        for module, names in by_module.items():
            module.register_state_dict_post_hook(_make_save_hook(names, name_to_master))
            module.register_load_state_dict_pre_hook(_make_load_hook(names, name_to_master))

    # --- the training step

    def autocast(self):
        """Context for forward + loss: torch.autocast for 'torch' and apex O1 (unless fp32_math), else a no-op."""
        if self.nvidia is not None and self.model is not None:
            return contextlib.nullcontext()  # NVIDIA's O1 patches torch globally, once initialize() has run
        if self.use_autocast:
            return torch.autocast(self.device_type, dtype=self.dtype)
        return contextlib.nullcontext()

    def backward(self, loss, optimizer):
        """Scaled backward; afterwards the optimizer's params hold unscaled grads and overflow is known."""
        self._check(optimizer)
        if self.nvidia is not None:
            self._found_inf |= self.nvidia.backward(loss, optimizer)
            self._pending = True
            return
        if self.grad_scaler is not None:
            if self._pending:
                raise RuntimeError("common/amp.py: kind='torch' unscales once per step (GradScaler); call step() "
                                   "between backward() calls (gradient accumulation is only supported with apex)")
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(optimizer)  # grads are true grads from here on, as in the other modes
            self._pending = True
            return
        scale = self.loss_scale
        params = _optimizer_params(optimizer)  # for O2 these are the fp32 masters
        # apex: new grads land in fresh buffers, are unscaled, then added to the (already unscaled) earlier ones
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        if scale == 1.0:
            loss.backward()  # exactly the hand-written fp32 step
        else:
            (loss.float() * scale).backward()
        for model_p, master in self._pairs:  # O2: fp16 grads -> fp32 master grads
            if model_p.grad is not None:
                master.grad = model_p.grad.float()
                model_p.grad = None  # apex left them scaled; we free them
        found = _unscale_and_check([p.grad for p in params], 1.0 / scale)
        for p, old in zip(params, stash):
            if old is not None:
                p.grad = old if p.grad is None else p.grad.add_(old)
        if self.scaler is not None:
            self.scaler.update(found)  # apex updates the scale at every backward, before the step
        self._found_inf |= found
        self._pending = True

    def step(self, optimizer, skip=False):
        """optimizer.step() (then masters -> half model for O2), or nothing if a grad was inf/NaN; returns skipped.

        skip=True: the caller found another reason not to step (a non-finite BN buffer, common.guard); the loss
        scale then moves only as the gradients say (a finite backward does not back it off).
        """
        self._check(optimizer)
        if not self._pending:
            raise RuntimeError("common/amp.py: Amp.step() called without a preceding Amp.backward()")
        if self.nvidia is not None:
            skipped = self.nvidia.step(optimizer, self._found_inf, skip)
        elif self.grad_scaler is not None:
            skipped = self._grad_scaler_step(optimizer, skip)
        else:
            skipped = self._found_inf or skip
            if not skipped:
                optimizer.step()
                if self._pairs:
                    with torch.no_grad():
                        torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])
        if skipped:
            # the non-finite grads must not leak into a later step if the caller forgets zero_grad
            for p in _optimizer_params(optimizer):
                p.grad = None
            for p, _ in self._pairs:
                p.grad = None
        self._pending, self._found_inf = False, False
        return bool(skipped)

    def _grad_scaler_step(self, optimizer, skip):
        """GradScaler's step (unless skip) and update(); returns whether optimizer.step() was left out.

        A step hook tells whether GradScaler called optimizer.step() (it does only when every gradient is finite), so
        the host never waits for the optimizer's kernels. Reading the scale after update() would: one sync per
        iteration that apex mode does not have, and the next forward could not queue meanwhile. An optimizer that
        takes the scaler's flags itself (fused=True) always runs step() and skips inside it; there the halved scale
        tells (backoff happens exactly on inf/NaN), at the cost of that sync.
        """
        gs = self.grad_scaler
        if skip:
            gs.update()  # moves the scale as the gradients say: a finite backward does not back it off
            return True
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            before = gs.get_scale()
            gs.step(optimizer)
            gs.update()
            return gs.get_scale() < before
        stepped = []
        handle = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
        try:
            gs.step(optimizer)
        finally:
            handle.remove()
        gs.update()  # uses the inf/NaN flags unscale_ recorded in backward()
        return not stepped

    def _check(self, optimizer):
        if self.model is None:
            raise RuntimeError("common/amp.py: call Amp.initialize(model, optimizer) first")
        if optimizer is not self.optimizer:
            raise ValueError("common/amp.py: pass the optimizer given to Amp.initialize()")

    # --- state and logging

    @property
    def loss_scale(self):
        if self.nvidia is not None:
            return self.nvidia.loss_scale()
        if self.grad_scaler is not None:
            return float(self.grad_scaler.get_scale())
        return self.scaler.loss_scale if self.scaler is not None else 1.0

    def state_dict(self):
        if self.nvidia is not None:
            return self.nvidia.state_dict()
        if self.kind == "apex":
            return {"loss_scaler0": self.scaler.state_dict()}  # apex.amp.state_dict()'s format (amp_spec §2.7)
        if self.grad_scaler is not None:
            return self.grad_scaler.state_dict()
        return {}

    def load_state_dict(self, sd):
        sd = dict(sd)
        if self.nvidia is not None:
            return self.nvidia.load_state_dict(sd)
        if self.kind == "apex":
            if set(sd) != {"loss_scaler0"}:
                raise AmpStateError(f"the checkpoint's AMP state (keys {sorted(sd)}) is not --amp apex's "
                                    f"{{'loss_scaler0': ...}}: saved by another --amp kind; {_RESUME_HINT}")
            saved = float(sd["loss_scaler0"]["loss_scale"])
            if not self.scaler.dynamic and saved != self.scaler.loss_scale:  # a static scale never moves: not ours
                raise AmpStateError(f"the checkpoint's loss scale {saved:g} comes from dynamic loss scaling (--amp "
                                    f"apex O1/O2 in fp16); this run ({self._flags()}) has none; {_RESUME_HINT}")
            self.scaler.load_state_dict(sd["loss_scaler0"])
        elif self.grad_scaler is not None:
            if "scale" not in sd:
                raise AmpStateError(f"the checkpoint's AMP state (keys {sorted(sd)}) is not --amp torch fp16's "
                                    f"GradScaler state: saved by another --amp kind or dtype; {_RESUME_HINT}")
            self.grad_scaler.load_state_dict(sd)
        elif sd:
            raise AmpStateError(f"the checkpoint holds AMP state (keys {sorted(sd)}), but this run ({self._flags()}) "
                                f"has none: saved by another --amp kind or dtype; {_RESUME_HINT}")

    def _flags(self):
        if self.kind == "none":
            return "--amp none"
        level = f" --opt_level {self.opt_level}" if self.kind == "apex" else ""
        return f"--amp {self.kind}{level}, {_dtype_name(self.dtype)}"

    def describe(self):
        """One line for the log: which implementation, backend, dtype and scaling ran."""
        if self.kind == "none":
            return "amp=none (fp32, no autocast, no loss scaling)"
        dt = _dtype_name(self.dtype)
        if self.fp32_math:  # the one line that says what ran instead of the half type, and why
            what = f"amp=torch ({dt} mode" if self.kind == "torch" else f"amp=apex O1 ({self.impl_note}; {dt} mode"
            return (f"{what} with torch.autocast('{self.device_type}') off: fp32 arithmetic, no loss scaling, "
                    f"non-finite steps skipped; {self.fp32_math})")
        if self.kind == "torch":
            scaling = (f"torch.amp.GradScaler('{self.device_type}') init scale {self.loss_scale:g}"
                       if self.grad_scaler is not None else "no loss scaling (bf16)")
            return f"amp=torch (torch.autocast('{self.device_type}', {self.dtype}), {dt}, {scaling})"
        if self.scaler.dynamic or self.nvidia is not None:
            scaling = f"dynamic loss scale {self.loss_scale:g}"
        else:
            scaling = "no loss scaling"
        how = {"O0": "fp32", "O1": f"torch.autocast('{self.device_type}') as the O1 cast policy",
               "O2": "half model, fp32 BatchNorm, fp32 master weights", "O3": "pure half"}[self.opt_level]
        dt = "fp32" if self.opt_level == "O0" else dt  # O0 casts nothing: its half type never runs
        return f"amp=apex {self.opt_level} ({self.impl_note}; {how}), {dt}, {scaling}"


class Fp16CfgError(UserError, ValueError):
    """A SEGMENTOR_CFG['fp16_cfg'] we cannot honour: one line naming the key (a ValueError to older callers)."""


def fp16_cfg_args(fp16_cfg):
    """ssseg's fp16_cfg (any shape, ssseg_spec §1 and §9) as (kind, Amp keyword arguments); a key we do not implement
    is an error naming it, never silently dropped. None, {} or type 'none' -> ('none', {})."""
    if not fp16_cfg:
        return "none", {}
    cfg = dict(fp16_cfg)
    if "is_on" in cfg:  # the 2021 form {'is_on': True, 'opts': {'opt_level': 'O1'}} meant apex (ssseg_spec §1)
        if not cfg.pop("is_on"):
            _reject_keys("fp16_cfg", {k: v for k, v in cfg.items() if k != "opts"})
            return "none", {}
        cfg = {"type": "apex", "initialize": cfg.pop("opts", {}), **cfg}
    kind, kw = cfg.pop("type", None), {}
    if kind in (None, "none"):
        kind = "none"
    elif kind == "apex":
        init = dict(cfg.pop("initialize", {}) or {})
        kw["opt_level"] = init.pop("opt_level", "O1")  # apex's own default
        for k in ("min_loss_scale", "max_loss_scale"):
            if k in init:
                kw[k] = init.pop(k)
        if init.get("loss_scale", "dynamic") == "dynamic":
            init.pop("loss_scale", None)
        _reject_keys("fp16_cfg['initialize']", init)  # keep_batchnorm_fp32, static loss_scale, ...: not supported
        _reject_keys("fp16_cfg['scale_loss']", dict(cfg.pop("scale_loss", {}) or {}))  # delay_unscale etc.
    elif kind in ("pytorch", "torch"):
        kind = "torch"
        autocast = dict(cfg.pop("autocast", {}) or {})
        kw["dtype"] = autocast.pop("dtype", torch.float16)
        if autocast.pop("enabled", True) is False:
            raise Fp16CfgError("fp16_cfg['autocast']['enabled']=False: use fp16_cfg=None instead")
        scaler = dict(cfg.pop("grad_scaler", {}) or {})
        if "init_scale" in scaler:
            kw["init_scale"] = scaler.pop("init_scale")
        if "growth_interval" in scaler:
            kw["scale_window"] = scaler.pop("growth_interval")
        if scaler.pop("growth_factor", 2.0) != 2.0 or scaler.pop("backoff_factor", 0.5) != 0.5:
            raise Fp16CfgError("fp16_cfg['grad_scaler'] growth_factor/backoff_factor other than 2.0/0.5 are not "
                               "supported")
        _reject_keys("fp16_cfg['autocast']", autocast)
        _reject_keys("fp16_cfg['grad_scaler']", scaler)
    else:
        raise Fp16CfgError(f"fp16_cfg['type'] must be 'apex', 'pytorch' or 'none', got {kind!r}")
    _reject_keys("fp16_cfg", cfg)
    return kind, kw


def _reject_keys(where, d):
    if d:
        raise Fp16CfgError(f"unsupported key(s) {sorted(d)} in {where}")


def _make_save_hook(names, name_to_master):
    def hook(module, state_dict, prefix, local_metadata):
        for name in names:
            key = prefix + name
            if key in state_dict:
                m = name_to_master.get((module, name))
                state_dict[key] = m.detach() if m is not None else state_dict[key].float()
    return hook


def _make_load_hook(names, name_to_master):
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        with torch.no_grad():
            for name in names:
                m, v = name_to_master.get((module, name)), state_dict.get(prefix + name)
                if m is not None and v is not None and v.shape == m.shape:
                    m.copy_(v)  # the normal load then casts the same values down into the half param
    return hook

# -----------------------------------------------------------------------------
# NVIDIA apex.amp, when it exists


def _probe_nvidia_apex():
    """(apex.amp module, None) if NVIDIA's apex.amp imports, else (None, why)."""
    try:
        from apex import amp as apex_amp  # PyPI's 'apex' is a 2013 Pyramid toolkit (amp_spec §1.3): fails here too
        apex_amp.initialize, apex_amp.scale_loss, apex_amp.state_dict  # noqa: B018, the API we use
        return apex_amp, None
    except Exception as e:  # ImportError, or whatever a broken/foreign 'apex' raises
        return None, f"{type(e).__name__}: {e}"


class _NvidiaApex:
    """Thin adapter onto NVIDIA's apex.amp (apex <= e13873de). Not exercised in our CI (no apex, no GPU there)."""

    def __init__(self, apex_amp, amp):
        self.apex_amp, self.amp = apex_amp, amp

    def _scaler(self):
        from apex.amp._amp_state import _amp_state
        return _amp_state.loss_scalers[0]

    def initialize(self, model, optimizer):
        a = self.amp
        model, optimizer = self.apex_amp.initialize(model, optimizer, opt_level=a.opt_level, verbosity=0,
                                                    min_loss_scale=a.min_loss_scale, max_loss_scale=a.max_loss_scale)
        s = self._scaler()
        if s.dynamic:  # apex's public API cannot set these; its LossScaler reads the attributes every update
            s._loss_scale = min(a.max_loss_scale, a.init_scale)
            s._scale_seq_len = a.scale_window
        a.model, a.optimizer = model, optimizer
        return model, optimizer

    def backward(self, loss, optimizer):
        with self.apex_amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()
        s = self._scaler()
        if s.dynamic:
            return bool(s._has_overflow)  # apex has already halved the scale and patched optimizer.step to skip
        # O0/O3: apex does not check; we do (module docstring, deviation 2)
        return _unscale_and_check([p.grad for p in _optimizer_params(optimizer)], 1.0)

    def step(self, optimizer, found_inf, skip=False):
        if (self._scaler().dynamic and found_inf) or not (found_inf or skip):
            optimizer.step()  # on overflow this is apex's one-shot skip_step, which must be consumed
        return bool(found_inf or skip)

    def loss_scale(self):
        return float(self._scaler().loss_scale())

    def state_dict(self):
        return dict(self.apex_amp.state_dict())

    def load_state_dict(self, sd):
        self.apex_amp.load_state_dict(sd)
