"""Faults: nothing lost, nothing poisoned (issue 12).

1. A skipped step leaves every tensor of the model as it was (BN running stats and num_batches_tracked included),
   in every AMP mode and with both kernel sets; a non-finite BN buffer is a skipped step; no checkpoint with a
   non-finite tensor is written or pointed to; the overflow stop names a checkpoint that evaluates normally.
2. Run folders, the lock, `latest`, temp-file clean-up, --resume auto / finished runs / changed schedules.
3. The corpus: generated broken files, each must give one line naming the file and the cause.
4. kill -9 of a real training process while it writes a checkpoint, then a bit-exact resume.
"""
import copy
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common import checkpoint, config, data, layers, runs, train
from common.amp import Amp
from common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------------
# 1. skipped steps and BatchNorm statistics


class Toy(Dataset):
    """8 random 16x16 images, labels a fixed function of the image."""

    class T:
        def reseed(self, seed):
            self.g = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))

    def __init__(self):
        self.transform = Toy.T()

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.randn(3, 16, 16, generator=self.transform.g)
        return x, (x[0] > 0).long()


class BNNet(nn.Module):
    """conv-BN-ReLU, conv-BN(+residual)-ReLU, heads: the units our segmentors are made of (common.layers)."""

    def __init__(self):
        super().__init__()
        self.backbone_net = nn.Sequential(*layers.conv_bn_relu(3, 8, 3, stride=2))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = layers.BatchNormAct2d(8)
        self.decoder, self.auxiliary_decoder = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.backbone_net(x)
        f = self.bn2(self.conv2(f), residual=f)
        return {"out": self.decoder(f), "aux": self.auxiliary_decoder(f)}


class Inject:
    """Forward pre-hook on one BN: at its `at`-th training call, replace its input by `make(x)` (inf, huge, ...)."""

    def __init__(self, at, make):
        self.at, self.make, self.n = at, make, 0

    def __call__(self, module, args):
        if not module.training:
            return None
        self.n += 1
        if self.n == self.at:
            return (self.make(args[0]),) + tuple(args[1:])
        return None


def with_inf(x):
    x = x.clone()
    x.view(-1)[5] = float("inf")
    return x


def _fit(tmp_path, amp, model, **over):
    cfg = dict(config.DEFAULTS, num_classes=2, max_iters=4, batch_size=2, num_workers=0, log_interval=1,
               eval_interval_epochs=0, save_interval_epochs=1, work_dir=str(tmp_path), kernels="torch",
               max_skipped_steps=3, lr=0.01)
    cfg.update(over)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    model, opt = amp.initialize(model, opt)
    loader = data.train_loader(Toy(), 2, 0, seed=0, num_items=4)  # 2 iterations per epoch
    log = train.Logger(str(tmp_path))
    train.fit(cfg, model, opt, amp, loader, None, 0, "cpu", log)
    return model, opt


def _records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line]


AMP_MODES = [("none", "O1", "float16"), ("torch", "O1", "float16"), ("torch", "O1", "bfloat16"),
             ("apex", "O1", "float16"), ("apex", "O2", "float16"), ("apex", "O3", "float16"),
             ("apex", "O2", "bfloat16")]


def _fused_available():
    import common
    if not common.extension_loaded():
        return False
    try:
        layers.set_kernels("fused")
        return True
    except Exception:
        return False
    finally:
        layers.set_kernels("torch")


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("kind,opt_level,dtype", AMP_MODES)
def test_inf_in_a_bn_input_skips_the_step_and_leaves_every_tensor(tmp_path, kind, opt_level, dtype, kernels):
    if kernels == "fused" and not _fused_available():
        pytest.skip("common._C is not built")
    torch.manual_seed(0)
    model = BNNet()
    inject = Inject(3, with_inf)  # the 3rd training forward: step 3 of 4
    model.bn2.register_forward_pre_hook(inject)
    before = {}

    def snap(mod, args):  # the whole state just before the poisoned forward (after step 2)
        if inject.n == 2 and not before:
            before["model"] = copy.deepcopy(mod.state_dict())
            before["opt"] = copy.deepcopy(opt_ref[0].state_dict()["state"])
    opt_ref = []
    model.register_forward_pre_hook(snap)
    amp = Amp(kind, opt_level=opt_level, dtype=getattr(torch, dtype), device="cpu")
    layers.set_kernels(kernels)
    try:
        orig_init = amp.initialize

        def init(m, o):
            out = orig_init(m, o)
            opt_ref.append(o)
            return out
        amp.initialize = init
        # max_iters 3: the poisoned step is the last one, so the final state is the state after it
        model, opt = _fit(tmp_path, amp, model, max_iters=3)
    finally:
        layers.set_kernels("torch")
    recs = _records(tmp_path)
    assert [r["skipped"] for r in recs] == [0, 0, 1], recs  # step 3 was skipped
    after = model.state_dict()
    assert set(after) == set(before["model"])
    for k, v in before["model"].items():  # weights, running_mean, running_var, num_batches_tracked: all unchanged
        assert torch.equal(after[k], v), k
    assert "bn2.num_batches_tracked" in after and int(after["bn2.num_batches_tracked"]) == 2
    for i, s in before["opt"].items():  # the momentum too
        assert torch.equal(opt.state_dict()["state"][i]["momentum_buffer"], s["momentum_buffer"]), i
    # the final checkpoint holds that state: finite, and it is what latest names
    ck = checkpoint.load(checkpoint.resolve("auto", str(tmp_path)))
    assert ck["iteration"] == 3
    for k, v in ck["model"].items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_buffer_guard_finds_each_non_finite_buffer_and_restores_every_bit(device):
    """BufferGuard directly: fp32 / fp16 / bf16 (O2, O3) and int64 buffers, a poison in any one of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(3), nn.BatchNorm2d(5)).to(device)
    model[1].half()
    model[2].bfloat16()
    for bn in model:
        bn.running_mean.normal_()
        bn.running_var.uniform_(1e-6, 1e4)
    guard = train.BufferGuard(model)
    assert len(guard.buffers) == 9 and len(guard.floating) == 6
    good = {k: v.clone() for k, v in model.named_buffers()}
    guard.snapshot()
    assert guard.finite()
    for name in ("0.running_mean", "1.running_var", "2.running_mean"):
        for poison in (float("inf"), float("-inf"), float("nan")):
            with torch.no_grad():
                for v in model.buffers():
                    v.add_(1)  # every buffer moves, as a forward moves them
                model.get_buffer(name)[1] = poison
            assert not guard.finite(), (name, poison)
            guard.restore()
            for k, v in model.named_buffers():
                assert torch.equal(v, good[k]), (name, poison, k)
            assert guard.finite()
    empty = train.BufferGuard(nn.Conv2d(1, 1, 1))  # no buffers at all
    empty.snapshot()
    empty.restore()
    assert empty.finite()


@pytest.mark.parametrize("kind,dtype", [("none", "float16"), ("torch", "bfloat16")])
def test_a_huge_finite_input_that_overflows_running_var_is_a_skipped_step(tmp_path, kind, dtype):
    """fp32 / bf16: a 1e30 activation gives a finite loss (BN normalises it) but an inf running_var."""
    torch.manual_seed(0)
    model = BNNet()
    model.bn2.register_forward_pre_hook(Inject(2, lambda x: x.float() * 0 + torch.where(
        torch.arange(x.numel()).view_as(x) % 2 == 0, 1e30, -1e30).to(x.dtype)))
    amp = Amp(kind, dtype=getattr(torch, dtype), device="cpu")
    model, _ = _fit(tmp_path, amp, model, max_iters=4)
    recs = _records(tmp_path)
    assert [r["skipped"] for r in recs] == [0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in recs[:2])  # the loss said nothing was wrong
    for k, v in model.state_dict().items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path):
    sd = BNNet().state_dict()
    good = checkpoint.save(str(tmp_path / "checkpoint-epoch-1.pth"), {"model": sd, "iteration": 1})
    bad = dict(sd, **{"bn2.running_var": torch.full((8,), float("nan"))})
    with pytest.raises(checkpoint.NonFiniteState, match=r"bn2\.running_var"):
        checkpoint.save(str(tmp_path / "checkpoint-epoch-2.pth"), {"model": bad, "iteration": 2})
    momentum = {"state": {0: {"momentum_buffer": torch.tensor([float("inf")])}}}
    with pytest.raises(checkpoint.NonFiniteState, match=r"optimizer\.state\.0\.momentum_buffer"):
        checkpoint.save(str(tmp_path / "checkpoint-epoch-3.pth"), {"model": sd, "optimizer": momentum})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-epoch-1.pth", "latest"]  # no file, no temp file
    assert checkpoint.resolve("auto", str(tmp_path)) == good


def build_bnnet(cfg=None, num_classes=150):
    net = BNNet()
    net.decoder, net.auxiliary_decoder = nn.Conv2d(8, num_classes, 1), nn.Conv2d(8, num_classes, 1)
    return net


TINY = ["--data", "demo", "--device", "cpu", "--kernels", "torch", "--crop_size", "(32, 32)", "--scale", "(128, 32)",
        "--batch_size", "2", "--num_workers", "0", "--num_train_images", "4", "--num_val_images", "1",
        "--eval_interval_epochs", "0", "--save_interval_epochs", "1", "--save_predictions", "0",
        "--log_interval", "1", "--amp", "none"]


def main(work_dir, *flags, build=build_bnnet):
    """train.main on the tiny BN net; returns (result, stdout lines). A one-line error comes back as SystemExit."""
    return train.main(config.segmentor_cfg(num_classes=150), build, [*TINY, "--work_dir", str(work_dir), *flags],
                      name="tiny")


def test_overflow_storm_stop_names_a_checkpoint_that_evaluates_normally(tmp_path, capsys):
    # the issue's reproduction, shrunk: lr 1e6 blows the weights up until every step overflows
    with pytest.raises(SystemExit) as e:
        main(tmp_path, "--amp", "apex", "--amp_dtype", "float16", "--max_iters", "40", "--max_skipped_steps", "4",
             "--keep_checkpoints", "0", "--lr", "1e6")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tiny: error: stopping at iteration"), msg
    named = re.search(r"last good checkpoint is (\S+\.pth)", msg).group(1)
    # every checkpoint written, the one named and the one latest names, holds finite tensors only
    (folder,) = runs.runs(str(tmp_path))
    written = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pth")]
    assert named in written and checkpoint.resolve("auto", str(tmp_path)) == named
    for path in written:
        for k, v in checkpoint.load(path)["model"].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (path, k)
    capsys.readouterr()
    res = main(tmp_path / "eval", "--eval", named, "--num_val_images", "2")
    assert np.isfinite(res["aAcc"]) and np.isfinite(res["mIoU"])
    assert not os.path.exists(tmp_path / "eval")


class ScriptedAmp:
    """An Amp stand-in whose steps follow a script of (skipped, loss scale after the step): the counting rule alone."""

    def __init__(self, script):
        self.script, self.i, self.loss_scale = script, 0, script[0][1] * 2 if script[0][0] else script[0][1]

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def backward(self, loss, optimizer):
        loss.backward()

    def step(self, optimizer, skip=False):
        skipped, self.loss_scale = self.script[self.i]
        self.i += 1
        if not skipped:
            optimizer.step()
        return skipped


def _scripted(tmp_path, script, max_skipped, start=0.0, start_iter=0):
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    amp = ScriptedAmp(script)
    amp.loss_scale = start or amp.loss_scale
    cfg = dict(config.DEFAULTS, num_classes=2, max_iters=start_iter + len(script), batch_size=2, num_workers=0,
               log_interval=1, eval_interval_epochs=0, save_interval_epochs=0, work_dir=str(tmp_path),
               max_skipped_steps=max_skipped)
    loader = data.train_loader(Toy(), 2, 0, seed=0, num_items=4)
    try:
        train.fit(cfg, model, opt, amp, loader, None, start_iter, "cpu", train.Logger(str(tmp_path)))
    except train.TooManySkippedSteps as e:
        return amp.i, str(e)
    return amp.i, None


def test_max_skipped_steps_ignores_the_loss_scale_warm_up(tmp_path):
    # fp16 warm-up: 65536 -> 32768 -> 16384 -> 8192 -> 4096 (4 skips), then clean steps: not a reason to stop
    warm = [(True, 32768.), (True, 16384.), (True, 8192.), (True, 4096.)] + [(False, 4096.)] * 2
    assert _scripted(tmp_path / "a", warm, max_skipped=2, start=65536.) == (6, None)
    # after the first clean step every skip counts: 3 in a row stop a --max_skipped_steps 3 run at once
    storm = [(True, 32768.), (False, 32768.), (True, 16384.), (True, 8192.), (True, 4096.), (False, 4096.)]
    n, msg = _scripted(tmp_path / "b", storm, max_skipped=3, start=65536.)
    assert n == 5 and "last 3 steps were all skipped" in msg
    # a scale that never settles: once it falls below 1 the skips count (no endless warm-up)
    never = [(True, 2.0 ** (15 - i)) for i in range(24)]
    n, msg = _scripted(tmp_path / "c", never, max_skipped=3, start=65536.)
    assert n == 16 + 3 and "last 3 steps" in msg  # 16 halvings reach 1.0, then 0.5, 0.25, 0.125 count
    # no dynamic scale (fp32, bf16, O3): the scale does not move, so every skip counts from the first
    static = [(True, 1.0)] * 4
    assert _scripted(tmp_path / "d", static, max_skipped=2, start=1.0)[0] == 2


def test_a_clean_step_resets_the_count_of_consecutive_skips(tmp_path):
    """--max_skipped_steps counts skips in a row: two runs of 2 skips split by a clean step never stop a
    --max_skipped_steps 3 run (the storm above has no counted skip before its clean step)."""
    script = [(False, 1.0), (True, 1.0), (True, 1.0), (False, 1.0), (True, 1.0), (True, 1.0)]
    assert _scripted(tmp_path, script, max_skipped=3, start=1.0) == (6, None)


def test_a_resumed_run_has_no_loss_scale_warm_up(tmp_path):
    """a resumed run's loss scale comes from its checkpoint, already settled, so its skips count from the
    first one even while they halve a scale >= 1 (fit: settled = start_iter > 0)."""
    halving = [(True, 32768.), (True, 16384.), (True, 8192.), (True, 4096.)]
    n, msg = _scripted(tmp_path, halving, max_skipped=2, start=65536., start_iter=2)
    assert n == 2 and "stopping at iteration 4: the last 2 steps were all skipped" in msg  # (fresh: 4 steps, above)


# ----------------------------------------------------------------------------------------------------------------
# 2. a run never overwrites another run


def _tree(folder):
    """{relative path: (size, mtime_ns)} of everything under folder: 'wrote nothing' means this does not change."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_runs_get_their_own_folders_and_latest_moves_only_on_a_checkpoint(tmp_path, capsys):
    main(tmp_path, "--max_iters", "4")
    (first,) = runs.runs(str(tmp_path))
    kept = _tree(first)
    main(tmp_path, "--max_iters", "2")  # a second run: a new folder; the first one is untouched
    main(tmp_path, "--max_iters", "1", "--save_interval_epochs", "0")  # writes no checkpoint: latest stays
    folders = runs.runs(str(tmp_path))
    assert len(folders) == 3 and folders[0] == first and _tree(first) == kept
    assert checkpoint.resolve("auto", str(tmp_path)) == os.path.join(folders[1], "checkpoint-final.pth")
    assert checkpoint.load(checkpoint.resolve("auto", str(tmp_path)))["iteration"] == 2
    for f in folders:  # each run's log is its own
        assert open(os.path.join(f, "log.txt")).read().count(" config:\n") == 1
    # --eval / --predict / --summary write nothing anywhere under the work dir
    before = _tree(tmp_path)
    main(tmp_path, "--eval", "auto")
    main(tmp_path, "--summary")
    image = os.path.join(data.demo_root(), "ADEChallengeData2016", "images", "validation")
    image = os.path.join(image, sorted(os.listdir(image))[0])
    main(tmp_path, "--predict", image, "--out", str(tmp_path.parent / (tmp_path.name + "-pred")))
    assert _tree(tmp_path) == before


def test_two_runs_started_together_never_share_a_folder(tmp_path):
    a, b = runs.new_run_dir(str(tmp_path)), runs.new_run_dir(str(tmp_path))  # same second
    assert a != b and os.path.basename(b).startswith(os.path.basename(a))


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_lock_names_its_holder_and_stale_locks_are_taken_over(tmp_path):
    main(tmp_path, "--max_iters", "4", "--stop_iters", "2")
    (folder,) = runs.runs(str(tmp_path))
    assert not os.path.exists(os.path.join(folder, runs.LOCK))  # released at the end of the run
    holder = _sleeper()
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "start": runs._start_time(holder.pid),
                "since": "2026-12-01 10:00:00"}
        with open(os.path.join(folder, runs.LOCK), "w") as f:
            json.dump(lock, f)
        before = _tree(folder)
        with pytest.raises(SystemExit) as e:
            main(tmp_path, "--max_iters", "4", "--resume", "auto")
        msg = str(e.value)
        assert re.fullmatch(rf"tiny: error: run folder {re.escape(folder)} is in use by pid {holder.pid} on "
                            rf"{re.escape(socket.gethostname())} .*lock {re.escape(folder)}/\.lock.*", msg), msg
        assert _tree(folder) == before  # the second process wrote nothing there
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now (and a pid that came back as another process is told apart by its start time)
    main(tmp_path, "--max_iters", "4", "--resume", "auto")
    log = open(os.path.join(folder, "log.txt")).read()
    assert "removing the stale lock" in log and checkpoint.load(checkpoint.latest(folder))["iteration"] == 4
    lock["pid"], lock["start"] = os.getpid(), -1  # our own live pid, but another start time: a reused pid
    assert runs.RunLock._stale(lock)
    lock["start"] = runs._start_time(os.getpid())
    assert not runs.RunLock._stale(lock)


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    """A pid on another machine (a shared file system) cannot be checked here, so its lock holds."""
    path = tmp_path / runs.LOCK
    path.write_text(json.dumps({"pid": 999999, "host": socket.gethostname() + "-other", "start": 1,
                                "since": "2026-12-01 10:00:00"}))
    before = path.read_text()
    with pytest.raises(runs.RunLockedError, match="-other"):
        runs.RunLock(str(tmp_path)).acquire(log=lambda *a: None)
    assert path.read_text() == before


def test_a_lock_of_another_users_live_process_holds(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: it is alive, so its lock holds."""
    path = tmp_path / runs.LOCK
    path.write_text(json.dumps({"pid": 4242, "host": socket.gethostname(), "start": None,
                                "since": "2026-12-01 10:00:00"}))
    before = path.read_text()

    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(runs.os, "kill", kill)
    with pytest.raises(runs.RunLockedError, match="pid 4242"):
        runs.RunLock(str(tmp_path)).acquire(log=lambda *a: None)
    assert path.read_text() == before



def test_a_lock_is_never_seen_half_written(tmp_path, monkeypatch):
    """Another process that finds the lock must read it whole: an empty or half-written one is taken for a dead
    process's and removed, so it must never exist while its holder is still writing it."""
    path, dumped = tmp_path / runs.LOCK, []
    real = runs.json.dump

    def dump(obj, f):
        dumped.append(path.exists())
        real(obj, f)
    monkeypatch.setattr(runs.json, "dump", dump)
    lock = runs.RunLock(str(tmp_path)).acquire(log=lambda *a: None)
    assert dumped == [False] and json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path)) == [runs.LOCK]  # no temp file left
    lock.release()
    assert os.listdir(tmp_path) == []




@pytest.mark.parametrize("pid", ["abc", None, -1, 0, 1.5])
def test_a_lock_on_this_host_without_a_pid_is_taken_over(tmp_path, pid):
    """Not a lock our processes write (theirs hold a positive int): as an unreadable one, it is taken over; -1 or 0
    must not reach kill(), which would ask about a whole process group."""
    (tmp_path / runs.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": 1}))
    lines = []
    runs.RunLock(str(tmp_path)).acquire(log=lines.append).release()
    assert len(lines) == 1 and "removing the stale lock" in lines[0]


@pytest.mark.parametrize("text", ["", '{"pid": 12', "[1, 2]", "null", "\xff\xfe"])
def test_an_empty_half_written_or_foreign_lock_is_taken_over_as_unreadable(tmp_path, text):
    """Empty or cut: a process killed inside the O_EXCL fallback's create-then-write; other JSON or bytes: not a lock
    a run wrote. None names a holder, so none can hold the folder."""
    (tmp_path / runs.LOCK).write_bytes(text.encode("latin-1"))
    lines = []
    lock = runs.RunLock(str(tmp_path)).acquire(log=lines.append)
    assert len(lines) == 1 and "removing the stale lock" in lines[0] and "(unreadable:" in lines[0]
    assert json.loads((tmp_path / runs.LOCK).read_text())["pid"] == os.getpid()  # ours now
    lock.release()


def _contend(folder, barrier, rounds):  # one of the processes below: a file per lock it took
    try:
        for r in range(rounds):
            barrier.wait(timeout=30)  # all start each round together
            try:
                runs.RunLock(os.path.join(folder, str(r))).acquire(log=lambda *a: None)
                open(os.path.join(folder, f"won-{r}-{os.getpid()}"), "w").close()
            except runs.RunLockedError:
                pass
    except BaseException:
        traceback.print_exc()
        barrier.abort()  # the others stop too, instead of waiting for this one
        os._exit(1)
    os._exit(0)  # a forked copy of pytest: no teardown


@pytest.mark.parametrize("stale", [False, True])
# Python 3.12 warns about fork() in a threaded process; the children touch no torch, nothing another thread holds
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_processes_racing_for_a_lock_get_one_holder(tmp_path, stale):
    """Processes started together (two `--resume auto` at once): exactly one holds each lock. A lock created empty
    and written after was read by the others as a dead process's, removed and taken (most rounds); two processes
    that found one stale lock both removed it, the second one the first one's new lock (~5% of rounds)."""
    import multiprocessing as mp
    ctx, rounds = mp.get_context("fork"), 300
    dead = subprocess.Popen(["true"])
    dead.wait()
    for r in range(rounds):
        os.mkdir(tmp_path / str(r))
        if stale:
            (tmp_path / str(r) / runs.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                                   "start": 1, "since": "2026-12-01 10:00:00"}))
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, rounds), daemon=True) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * 4
    wins = sorted(int(f.split("-")[1]) for f in os.listdir(tmp_path) if f.startswith("won-"))
    assert wins == list(range(rounds)), wins  # each round: one holder

def test_a_lock_where_hard_links_fail_and_on_a_full_disk(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(runs.os, "link", no_link)  # a file system without hard links: O_EXCL, then the write
    lock = runs.RunLock(str(tmp_path)).acquire(log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == [runs.LOCK] and json.loads((tmp_path / runs.LOCK).read_text())["host"]
    with pytest.raises(runs.RunLockedError, match=f"pid {os.getpid()}"):  # and it holds
        runs.RunLock(str(tmp_path)).acquire(log=lambda *a: None)
    lock.release()
    monkeypatch.undo()

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs.json, "dump", full)
    with pytest.raises(UserError, match=r"could not write the lock .*No space left on device.*is the disk full"):
        runs.RunLock(str(tmp_path)).acquire(log=lambda *a: None)
    assert os.listdir(tmp_path) == []  # neither a lock nor its temp file stays

def test_resume_auto_cleans_temp_files_finished_runs_and_changed_schedules(tmp_path, capsys):
    main(tmp_path, "--max_iters", "4", "--stop_iters", "3")
    (folder,) = runs.runs(str(tmp_path))
    for name in (".checkpoint-final.pth.tmp-k1ll3d", ".latest.tmp-x9"):  # what a kill -9 mid-save leaves
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\0" * 4096)
    capsys.readouterr()
    main(tmp_path, "--max_iters", "4", "--resume", "auto")
    out = capsys.readouterr().out
    assert "removed 2 temp file(s) a killed run left" in out and not checkpoint.temp_files(folder)
    assert runs.runs(str(tmp_path)) == [folder]  # continued in its own folder
    log = open(os.path.join(folder, "log.txt")).read()
    assert log.count(" config:\n") == 2 and "resume: " in log  # both runs' lines, the second marked as a resume
    # a finished run: says so and writes nothing
    before = _tree(tmp_path)
    main(tmp_path, "--max_iters", "4", "--resume", "auto")
    out = capsys.readouterr().out
    assert re.search(r"resume: \S+checkpoint-final\.pth already finished at iteration 4; nothing to do", out), out
    assert _tree(tmp_path) == before
    # a shorter schedule than the one it finished: also nothing to do, and the line names the flag that would go on
    main(tmp_path, "--max_iters", "3", "--resume", "auto")
    out = capsys.readouterr().out
    assert re.search(r"resume: \S+checkpoint-final\.pth is at iteration 4, the end of this schedule is 3; nothing to "
                     r"do \(raise --max_iters / --max_epochs to train further\)", out), out
    assert _tree(tmp_path) == before
    # another schedule: the lr curve changes, and the warning says so
    main(tmp_path, "--max_iters", "6", "--resume", "auto")
    out = capsys.readouterr().out
    assert re.search(r"WARNING: resuming .* with another schedule \(--max_iters 4 -> 6; 4 -> 6 iterations\): the lr "
                     r"curve changes from iteration 4 on", out), out
    main(tmp_path, "--max_iters", "8", "--batch_size", "4", "--resume", "auto")
    out = capsys.readouterr().out
    assert "--batch_size 2 -> 4" in out and "the lr curve changes from iteration 6 on" in out, out


# ----------------------------------------------------------------------------------------------------------------
# 3. the corpus: every bad file gets one line naming the file and the cause (generated here, none committed)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real training checkpoint of the tiny net (iteration 2 of 4), and one of the same net with 3 classes."""
    d = tmp_path_factory.mktemp("good")
    main(d / "a", "--max_iters", "4", "--stop_iters", "2")
    path = checkpoint.resolve("auto", str(d / "a"))
    other = dict(checkpoint.load(path), model=build_bnnet(num_classes=3).state_dict())
    return path, _torch_save(d / "three-classes.pth", other)


class Code:  # pickled as a class instance: weights_only=True refuses to build it (it could run code)
    pass


def _write(path, content):
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def _torch_save(path, obj):
    torch.save(obj, path)
    return str(path)


def _cut(fraction):
    def make(path, good):
        raw = open(good[0], "rb").read()
        return _write(path, raw[:int(len(raw) * fraction)])
    return make


NOT_TRAINING = r"not a training checkpoint \(no optimizer/iteration state.*use --init .* to start"
FILE_CASES = {  # name: (make(path, good) -> path, {flag: expected cause}); flags --resume, --eval, --init, --pretrained
    "zero-byte": (lambda p, g: _write(p, b""), dict.fromkeys(("--resume", "--eval", "--init", "--pretrained"),
                                                             r"empty file \(0 bytes\), not a checkpoint")),
    "random-bytes": (lambda p, g: _write(p, np.random.default_rng(0).bytes(5000)),
                     dict.fromkeys(("--resume", "--eval", "--init", "--pretrained"),
                                   r"not a PyTorch checkpoint \(5000 bytes")),
    "text": (lambda p, g: _write(p, b"model weights: see README\n"),
             dict.fromkeys(("--resume", "--eval"), r"not a PyTorch checkpoint")),
    "truncated-half": (_cut(0.5), {**dict.fromkeys(("--resume", "--eval", "--init"),
                                                   r"truncated or corrupt checkpoint .*use an earlier checkpoint"),
                                   "--pretrained": r"truncated or corrupt checkpoint .*download it again"}),
    "truncated-tail": (_cut(0.995), dict.fromkeys(("--resume", "--eval"), r"truncated or corrupt checkpoint")),
    "zip-header-only": (_cut(0.0005), {"--resume": r"truncated or corrupt checkpoint"}),
    "pickled-code": (lambda p, g: _torch_save(p, {"model": Code()}),
                     dict.fromkeys(("--resume", "--eval", "--pretrained"),
                                   r"holds Python objects other than tensors.*re-save it")),
    "ssseg-weights-only": (lambda p, g: _torch_save(p, {"model": checkpoint.load(g[0])["model"], "cur_epoch": 130}),
                           {"--resume": NOT_TRAINING}),
    "bare-state-dict": (lambda p, g: _torch_save(p, checkpoint.load(g[0])["model"]), {"--resume": NOT_TRAINING}),
    "no-state-dict": (lambda p, g: _torch_save(p, {"epoch": 3, "note": "hello"}),
                      {"--eval": r"holds no state dict", "--init": r"holds no state dict",
                       "--pretrained": r"holds no state dict", "--resume": NOT_TRAINING}),
    "another-model": (lambda p, g: _torch_save(p, {"model": nn.Linear(3, 2).state_dict()}),
                      {**dict.fromkeys(("--eval", "--init"), r"does not match this model .*missing \d+ \(backbone_net"
                                                             r".*unexpected 2 \(weight, bias\)"),
                       "--pretrained": r"does not match this model \(not the ResNet-50 v1c ImageNet weights\? .*"
                                       r"missing 5 \(0\.weight, 1\.weight.*unexpected 2 \(weight, bias\)"}),
    "wrong-shapes": (lambda p, g: g[1], dict.fromkeys(
        ("--resume", "--eval", "--init"),
        r"does not match this model .*mismatched shapes \(file vs model\) 4 \(decoder\.weight \(3, 8, 1, 1\) vs "
        r"\(150, 8, 1, 1\)")),
    # only the classifiers differ: another --num_classes; a fine-tuner (--init) is pointed to --pretrained
    "another-num-classes": (lambda p, g: g[1], {
        "--eval": r"it predicts 3 classes, the model 150: --num_classes 3 for this file\)",
        "--init": r"it predicts 3 classes, the model 150: --num_classes 3 for this file; to fine-tune it on 150 "
                  r"classes, pass it as --pretrained .*three-classes\.pth"}),
    "missing": (lambda p, g: str(p), {**dict.fromkeys(("--resume", "--eval", "--init"), r"does not exist"),
                                      "--pretrained": r"neither a file, a URL nor a key of PRETRAINED_URLS"}),
}
CASES = [(name, flag) for name, (_, flags) in FILE_CASES.items() for flag in flags]


def _one_line_error(e, path, cause):
    msg = str(e.value)
    assert msg.startswith("tiny: error: ") and "\n" not in msg, msg
    assert path in msg, (path, msg)
    assert re.search(cause, msg), (cause, msg)
    assert "weights_only=False" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.parametrize("name,flag", CASES, ids=[f"{n}{f}" for n, f in CASES])
def test_corpus_bad_checkpoint_files(tmp_path, good, name, flag):
    make, flags = FILE_CASES[name]
    path = make(tmp_path / f"{name}.pth", good)
    with pytest.raises(SystemExit) as e:
        main(tmp_path / "work", "--max_iters", "4", flag, path)
    _one_line_error(e, path, flags[flag])
    if flag != "--resume":  # --init and --eval fail before any folder exists; --resume from elsewhere too
        assert not os.path.exists(tmp_path / "work")


POINTERS = {"empty": (b"", r"the latest-checkpoint pointer is empty"),
            "whitespace": (b"\n \n", r"the latest-checkpoint pointer is empty"),
            "garbage": (bytes(range(128, 256)), r"the latest-checkpoint pointer is not a file name"),
            "dangling": (b"20261201_000000/checkpoint-final.pth\n", r"names '20261201_000000/checkpoint-final\.pth', "
                                                                    r"which does not exist")}


@pytest.mark.parametrize("flag", ["--resume", "--eval"])
@pytest.mark.parametrize("kind", sorted(POINTERS))
def test_corpus_bad_latest_pointers(tmp_path, kind, flag):
    content, cause = POINTERS[kind]
    os.makedirs(tmp_path / "work")
    pointer = _write(tmp_path / "work" / "latest", content)
    with pytest.raises(SystemExit) as e:
        main(tmp_path / "work", "--max_iters", "4", flag, "auto" if flag == "--resume" else str(tmp_path / "work"))
    _one_line_error(e, pointer, cause)
    assert os.listdir(tmp_path / "work") == ["latest"]  # nothing written


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ade"))
    data.make_demo_ade20k(root, num_train=4, num_val=2, seed=0)
    return root


DATA_CASES = [  # (split folder, images|annotations, file index, mode, workers, content)
    ("training", "images", 1, "train", 0, "empty"), ("training", "annotations", 2, "train", 0, "empty"),
    ("training", "images", 0, "train", 1, "empty"), ("validation", "images", 0, "eval", 0, "empty"),
    ("validation", "annotations", 1, "eval", 0, "empty"), ("training", "images", 3, "train", 0, "garbage"),
    ("training", "images", 2, "train", 0, "truncated"), ("validation", "annotations", 0, "eval", 0, "garbage"),
]
DATA_CAUSES = {"empty": r"is an empty file \(0 bytes\): replace it", "garbage": r"not a decodable",
               "truncated": r"truncated"}  # OpenCV 5 refuses it; older ones pad it grey, and data.py checks


@pytest.mark.parametrize("split,kind,index,mode,workers,content", DATA_CASES)
def test_corpus_broken_images_and_annotations(tmp_path, ade, good, split, kind, index, mode, workers, content):
    import shutil
    root = str(tmp_path / "ade")
    shutil.copytree(ade, root)
    folder = os.path.join(root, "ADEChallengeData2016", kind, split)
    path = os.path.join(folder, sorted(os.listdir(folder))[index])
    raw = open(path, "rb").read()
    _write(path, {"empty": b"", "garbage": np.random.default_rng(1).bytes(300), "truncated": raw[:len(raw) // 2]}
           [content])
    flags = ["--data", "ade20k", "--data_root", root, "--num_workers", str(workers), "--num_val_images", "2",
             "--pretrained", "none"]
    with pytest.raises(SystemExit) as e:
        if mode == "train":
            main(tmp_path / "work", "--max_iters", "2", *flags)
        else:
            main(tmp_path / "work", "--eval", good[0], *flags)
    _one_line_error(e, path, DATA_CAUSES[content])


class _FillsUp:
    """A file that takes `room` bytes and then fails as a full disk does (errno 28)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("target", ["checkpoint", "latest"])
def test_corpus_disk_full_while_saving(tmp_path, monkeypatch, target):
    real = checkpoint._open

    def opener(fd, mode):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        full = name.startswith(".checkpoint-final.pth.tmp-" if target == "checkpoint" else ".latest.tmp-") and \
            (target == "checkpoint" or os.path.exists(os.path.join(os.path.dirname(
                os.readlink(f"/proc/self/fd/{fd}")), "checkpoint-final.pth")))
        return _FillsUp(real(fd, mode), (1000 if target == "checkpoint" else 0) if full else 1 << 40)
    monkeypatch.setattr(checkpoint, "_open", opener)
    with pytest.raises(SystemExit) as e:
        main(tmp_path, "--max_iters", "4")  # epoch 1 saves fine; the final save hits the full disk
    (folder,) = runs.runs(str(tmp_path))
    first = os.path.join(folder, "checkpoint-epoch-1.pth")
    written = os.path.join(folder, "checkpoint-final.pth" if target == "checkpoint" else "latest")
    msg = _one_line_error(e, written, rf"no space left on device writing \S+ \(about \d+ [KM]B needed\); the previous "
                                      rf"checkpoint {re.escape(first)} is intact")
    assert checkpoint.latest(folder) == first and checkpoint.load(first)["iteration"] == 2
    assert not checkpoint.temp_files(folder) and "enforce fail" not in msg


class _OverQuota(_FillsUp):
    def write(self, b):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_a_quota_exceeded_while_saving_is_the_disk_full_line(tmp_path, monkeypatch):
    real = checkpoint._open
    monkeypatch.setattr(checkpoint, "_open", lambda fd, mode: _OverQuota(real(fd, mode), 0))
    with pytest.raises(checkpoint.DiskFullError, match=r"no space left on device writing \S+c\.pth"):
        checkpoint.save(str(tmp_path / "c.pth"), {"model": {"w": torch.ones(1)}})
    assert os.listdir(tmp_path) == []  # no temp file left


def test_a_training_checkpoint_without_its_rng_state_is_one_line(tmp_path):
    ckpt = {"model": {"w": torch.ones(1)}, "optimizer": {}, "amp": {}, "iteration": 2}
    path = checkpoint.save(str(tmp_path / "c.pth"), ckpt)
    with pytest.raises(checkpoint.BadFileError, match=r"c\.pth: not a training checkpoint"):
        checkpoint.load_training(path)


def test_corpus_a_script_prints_one_line_and_no_traceback(tmp_path):
    bad = _write(tmp_path / "empty.pth", b"")
    p = subprocess.run([sys.executable, "pspnet.py", "--data", "demo", "--device", "cpu", "--resume", bad,
                        "--work_dir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"pspnet: error: {bad}: empty file (0 bytes), not a checkpoint (a copy or save "
                                             f"that never finished?); use an earlier checkpoint"]


# ----------------------------------------------------------------------------------------------------------------
# 4. kill -9 while a checkpoint is being written, then a bit-exact resume

DRIVER = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import torch, torch.nn as nn
from common import config, train
from test_faults import BNNet, TINY

class Ballast(BNNet):
    # 16M extra weights (64 MB, and as much momentum): the checkpoint write lasts long enough to be killed in
    def __init__(self, num_classes):
        super().__init__()
        self.decoder, self.auxiliary_decoder = nn.Conv2d(8, num_classes, 1), nn.Conv2d(8, num_classes, 1)
        self.ballast = nn.Parameter(torch.zeros(16 * 2**20))

    def forward(self, x):
        out = super().forward(x)
        out["out"] = out["out"] + 0 * self.ballast[:1].sum()  # in the graph, so it has a grad and momentum
        return out

train.main(config.segmentor_cfg(num_classes=150), lambda cfg=None, num_classes=150: Ballast(num_classes),
           [*TINY, *sys.argv[1:]], name="tiny")
"""


def _driver(tmp_path, work, *flags):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    return subprocess.Popen([sys.executable, str(script), "--max_iters", "4", "--work_dir", str(work), *flags],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow  # ~60 s on the 2-core box: three training processes
def test_kill_9_during_a_checkpoint_write_then_resume_bit_exactly(tmp_path):
    straight = _driver(tmp_path, tmp_path / "straight")
    victim = _driver(tmp_path, tmp_path / "victim")
    folder, tmp, t0 = None, None, time.time()
    while tmp is None and victim.poll() is None and time.time() - t0 < 240:  # wait for the final save's temp file
        folder = folder or (runs.runs(str(tmp_path / "victim")) or [None])[0]
        if folder:
            tmp = next((os.path.join(folder, f) for f in os.listdir(folder)
                        if f.startswith(".checkpoint-final.pth.tmp-")), None)
        time.sleep(0.001)
    assert tmp is not None, f"never saw the final checkpoint being written:\n{victim.communicate()[0][-3000:]}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert os.path.exists(tmp) and not os.path.exists(os.path.join(folder, "checkpoint-final.pth"))
    assert os.path.exists(os.path.join(folder, runs.LOCK))  # the dead process's lock: stale
    assert checkpoint.load(checkpoint.resolve("auto", str(tmp_path / "victim")))["iteration"] == 2  # intact
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]
    resumed = _driver(tmp_path, tmp_path / "victim", "--resume", "auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "removing the stale lock" in out and "removed 1 temp file(s) a killed run left" in out, out
    assert not checkpoint.temp_files(folder) and not os.path.exists(os.path.join(folder, runs.LOCK))
    a = checkpoint.load(checkpoint.resolve("auto", str(tmp_path / "straight")))
    b = checkpoint.load(checkpoint.resolve("auto", str(tmp_path / "victim")))
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), i
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
