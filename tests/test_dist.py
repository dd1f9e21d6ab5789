"""Distributed training on CPU: 2 gloo processes must reproduce 1 process with the whole batch.

Each test starts 2 processes (torch.multiprocessing, fork) that join a gloo group through common.dist.init(),
exactly as torchrun would set them up (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*), and writes its results to a
file that the test compares against an independent single-process run.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from common import dist, layers
from common.layers import BatchNormAct2d

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, port, out_dir, args):
    # what torchrun puts in each worker's environment
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 processes on 2 cores
    try:
        result = fn(*args)
    finally:
        if fn is not _worker_timeout:
            dist.shutdown()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(fn, tmp_path, *args):
    """Run fn(*args) on WORLD gloo ranks; -> [result of rank 0, result of rank 1, ...]."""
    import torch._dynamo  # noqa: F401  DDP's constructor imports it (~15 s on a busy box): once here, not per child
    # fork, not spawn: the children inherit the imported torch instead of paying ~10 s each to import it again on
    # our busy 2-core CI box (the DataLoader forks its workers the same way)
    mp.start_processes(_entry, args=(fn, _free_port(), str(tmp_path), args), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def fused_available():
    """--kernels fused needs KERNELS-I's split ops; in CI (env CI set) the extension is built, so never skip there."""
    have = all(hasattr(torch.ops.segfp16, n) for n in ("bn_stats", "bn_apply", "bn_backward_reduce",
                                                       "bn_backward_apply", "bn_relu_train"))
    if not have and os.environ.get("CI"):
        pytest.fail("CI is set but common._C lacks the bn_relu split ops: the extension should be built there")
    return have


# ---- a small model with every kind of BN our segmentors use: BN+ReLU, BN+residual+ReLU, BN alone, plain BN2d

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*layers.conv_bn_relu(3, 8, 3))
        self.conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.bn = BatchNormAct2d(8, relu=True)  # used with a residual (the bottleneck's bn3)
        self.proj = nn.Sequential(*layers.conv_bn_relu(8, 6, 1, relu=False))
        self.plain = nn.BatchNorm2d(6)  # not built by our layers, but convert_sync_bn must handle it
        self.cls = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        h = self.stem(x)
        h = self.bn(self.conv(h), residual=h)
        return self.cls(self.plain(self.proj(h)))


def _batches(iters, batch):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 9, 11, generator=g) * 2 + 1, torch.randint(0, 5, (batch, 9, 11), generator=g))
            for _ in range(iters)]


def _train(model, batches, kernels):
    """K SGD steps as the trainer does them (momentum 0.9, wd 5e-4 on everything); -> the final state dict."""
    layers.set_kernels(kernels)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()  # per-rank mean; DDP averages = the global mean (equal counts)
            opt.step()
    finally:
        layers.set_kernels("torch")
    return {k: v.detach().clone() for k, v in dist.unwrap(model).state_dict().items()}


def _worker_train(iters, batch, kernels_list):
    rank, world, _ = dist.init(device="cpu")
    out = {}
    for kernels in kernels_list:
        for sync in (True, False):
            torch.manual_seed(0)
            model = Tiny()
            if sync:
                dist.convert_sync_bn(model)
            model = dist.wrap_ddp(model, "cpu", "none")
            shard = [(x[rank::world], y[rank::world]) for x, y in _batches(iters, WORLD * batch)]
            out[kernels, sync] = _train(model, shard, kernels)
    return out


def _reference(iters, batch, kernels):
    torch.manual_seed(0)
    return _train(Tiny(), _batches(iters, WORLD * batch), kernels)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    iters, batch = 3, 2
    kernels_list = ["torch"] + (["fused"] if fused_available() else [])
    results = spawn(_worker_train, tmp_path, iters, batch, kernels_list)
    for kernels in kernels_list:
        ref = _reference(iters, batch, kernels)
        for rank, res in enumerate(results):
            synced = res[kernels, True]
            assert synced.keys() == ref.keys()  # convert_sync_bn kept every state-dict key
            for k in ref:
                torch.testing.assert_close(synced[k], ref[k], rtol=1e-4, atol=2e-5,
                                           msg=lambda m: f"kernels {kernels}, rank {rank}, {k}: {m}")
            # the control: per-rank BN statistics (no SyncBN) must visibly differ, or this test could not fail
            assert _max_diff(res[kernels, False], ref) > 1e-3
        assert _max_diff(results[0][kernels, True], results[1][kernels, True]) == 0  # ranks stay bit-identical


# ---- the SyncBN function itself against autograd through F.batch_norm on the concatenated batch

def _syncbn_case(kernels, dtype, channels_last, split):
    rank = dist.rank()
    layers.set_kernels(kernels)
    g = torch.Generator().manual_seed(1)
    # uneven per-rank batches (3 and 1 images, or 4 and an empty rank) and a large mean: the merge must weight
    # ranks by their counts
    x = (torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64) * 3 + 40).to(dtype)
    r = torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64).to(dtype)
    part = slice(0, split) if rank == 0 else slice(split, 4)
    bn = dist.convert_sync_bn(nn.Sequential(BatchNormAct2d(6, relu=True)))[0].to(torch.float64 if dtype ==
                                                                                 torch.float64 else torch.float32)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, 6, dtype=torch.float64))
    calls = []  # which implementation of the split steps really ran (no silent fallback to the other one)
    saved = {}
    for impl in (dist._TorchBN, dist._FusedBN):
        for step in ("stats", "backward_apply"):
            f = saved[impl, step] = getattr(impl, step)
            setattr(impl, step, staticmethod(lambda *a, f=f, name=f"{impl.__name__}.{step}": calls.append(name)
                                             or f(*a)))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = x[part].clone().contiguous(memory_format=fmt).requires_grad_()
    rs = r[part].clone().contiguous(memory_format=fmt).requires_grad_()
    y = bn(xs, residual=rs)
    y.backward(dy[part])
    layers.set_kernels("torch")
    for (impl, step), f in saved.items():
        setattr(impl, step, staticmethod(f))
    return dict(calls=calls, y=y.detach(), dx=xs.grad, dr=rs.grad, dw=bn.weight.grad, db=bn.bias.grad,
                rm=bn.running_mean, rv=bn.running_var, n=bn.num_batches_tracked, x=x, r=r, dy=dy, part=part)


SYNCBN_CASES = [  # (kernels, dtype of x, channels_last, images on rank 0 of 4)
    ("torch", torch.float64, False, 3), ("torch", torch.float32, False, 3), ("torch", torch.float16, True, 3),
    ("torch", torch.float64, False, 4), ("fused", torch.float64, False, 3), ("fused", torch.float16, True, 3),
    ("fused", torch.float64, False, 4)]


def _worker_syncbn(cases):
    dist.init(device="cpu")
    return {case: _syncbn_case(*case) for case in cases}


@pytest.fixture(scope="module")
def syncbn_results(tmp_path_factory):
    # one pair of processes runs every case (starting processes is the slow part on a busy box)
    cases = [c for c in SYNCBN_CASES if c[0] == "torch" or fused_available()]
    return spawn(_worker_syncbn, tmp_path_factory.mktemp("syncbn"), cases)


@pytest.mark.parametrize("kernels,dtype,channels_last,split", SYNCBN_CASES)
def test_syncbn_forward_backward_against_whole_batch_autograd(syncbn_results, kernels, dtype, channels_last, split):
    if kernels == "fused" and not fused_available():
        pytest.skip("common._C with the bn_relu split ops is not built (CI builds it)")
    res = [r[kernels, dtype, channels_last, split] for r in syncbn_results]
    x, r, dy = (res[0][k].double().requires_grad_() for k in ("x", "r", "dy"))
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-0.2, 0.3, 6, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    y = F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r)  # the whole batch, one process, autograd
    dx, dr, dw, db = torch.autograd.grad(y, (x, r, w, b), dy.detach())
    # fp16 x with fp32 weights is what BN sees under autocast / apex O1: fp32 statistics, fp16 outputs
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
           torch.float16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    impl = "_FusedBN" if kernels == "fused" else "_TorchBN"
    for rank in range(WORLD):
        o, p = res[rank], res[rank]["part"]
        # (an empty rank has no statistics to compute, but still joins both all-reduces)
        assert o["calls"] == [f"{impl}.stats"] * bool(o["y"].numel()) + [f"{impl}.backward_apply"], o["calls"]
        torch.testing.assert_close(o["y"].double(), y[p].detach(), **tol)
        torch.testing.assert_close(o["dx"].double(), dx[p], **tol)
        torch.testing.assert_close(o["dr"].double(), dr[p], **tol)
        torch.testing.assert_close(o["rm"].double(), rm, **tol)
        torch.testing.assert_close(o["rv"].double(), rv, **tol)
        assert o["n"].item() == 1
    # dweight / dbias are per-rank sums (DDP averages them later); their sum over ranks is the whole-batch gradient
    torch.testing.assert_close(sum(o["dw"].double() for o in res), dw, **tol)
    torch.testing.assert_close(sum(o["db"].double() for o in res), db, **tol)


# ---- convert_sync_bn keeps the model's identity; the helpers

def test_convert_sync_bn_keeps_keys_parameters_and_single_process_behaviour():
    torch.manual_seed(0)
    model = Tiny()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 9, 11)
    ref_model = Tiny()
    ref_model.load_state_dict(model.state_dict())
    dist.convert_sync_bn(model)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert isinstance(model.stem[1], dist.SyncBatchNormAct2d) and model.stem[1].relu
    assert isinstance(model.plain, dist.SyncBatchNorm2d)
    torch.testing.assert_close(model(x), ref_model(x), rtol=0, atol=0)  # no process group: the plain unit, bit-exact
    with pytest.raises(TypeError, match="BatchNorm1d"):
        dist.convert_sync_bn(nn.Sequential(nn.BatchNorm1d(3)))


def test_single_process_helpers_are_no_ops(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist.init() == (0, 1, 0)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.tensor([3.0])
    assert dist.all_reduce(t) is t and t.item() == 3.0
    dist.barrier()
    model = nn.Linear(2, 2)
    assert dist.wrap_ddp(model, "cpu", "torch") is model and dist.unwrap(model) is model
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        dist.init()


def test_collective_device_follows_the_backend(monkeypatch):
    assert dist.collective_device() == torch.device("cpu")  # no group
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in [("gloo", "cpu"), ("nccl", "cuda:3"), ("cpu:gloo,cuda:nccl", "cuda:3")]:
        monkeypatch.setattr(dist.dist, "get_backend", lambda group=None, b=backend: b)
        assert dist.collective_device() == torch.device(want), backend


# ---- a rank that hangs ends the job with a clear error within the timeout

def _worker_timeout():
    rank, _, _ = dist.init(device="cpu", timeout_s=2)
    t0 = time.time()
    if rank == 1:
        time.sleep(5)  # "hung": never reaches the barrier in time
        return {"rank": 1}
    try:
        dist.barrier()
        return {"error": None, "seconds": time.time() - t0}
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.time() - t0}


def test_hung_rank_fails_the_barrier_within_the_timeout(tmp_path):
    res = spawn(_worker_timeout, tmp_path)[0]
    assert res["error"] is not None and "1" in res["error"], res  # monitored barrier names the missing rank
    assert res["seconds"] < 4.5, res


# ---- a per-machine cache (download, demo dataset) is filled by local rank 0 while the others wait, then found

def _worker_local_main_first(cache):
    from common import data
    rank, _, _ = dist.init(device="cpu")
    spans = {}
    with dist.local_main_first():
        t0 = time.time()
        if rank == 0:
            time.sleep(0.5)  # a slow download: rank 1 must not start before it ends
        spans["ok"] = (t0, time.time())
    try:
        with dist.local_main_first():
            if rank == 0:
                raise OSError("no internet")  # rank 1 is released all the same and tries itself
            spans["after_failure"] = True
    except OSError as e:
        spans["error"] = str(e)
    generated = []

    def fake_make(root, *args):  # the real generator takes ~10 s; only who generates matters here
        generated.append(rank)
        os.makedirs(os.path.join(root, "ADEChallengeData2016"))
    data.make_demo_ade20k = fake_make
    spans["root"], spans["generated"] = data.demo_root(cache, num_train=2, num_val=1), generated
    return spans


def test_local_main_first_runs_rank_0_first_and_the_demo_is_generated_once(tmp_path):
    r0, r1 = spawn(_worker_local_main_first, tmp_path, str(tmp_path / "cache"))
    assert r1["ok"][0] >= r0["ok"][1], (r0, r1)  # rank 1 entered after rank 0 left
    assert r0["error"] == "no internet" and r1["after_failure"] and "error" not in r1
    assert r0["root"] == r1["root"] and os.path.isdir(r0["root"])
    assert (r0["generated"], r1["generated"]) == ([0], []), (r0, r1)  # rank 1 found rank 0's copy


# ---- DDP after AMP initialisation (apex order), for every AMP kind; fp16 gradient compression for --amp torch

def _amp_run(kind, opt_level, sync_world):
    from common.amp import Amp
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(0)
    model = dist.convert_sync_bn(Tiny()) if world > 1 else Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = Amp(kind, opt_level=opt_level, dtype=torch.float16, device="cpu")
    model, opt = amp.initialize(model, opt)  # O2 halves the model here, so DDP must come after
    half = [n for n, p in model.named_parameters() if p.dtype == torch.float16]
    model = dist.wrap_ddp(model, "cpu", kind)
    skipped = []
    for x, y in _batches(3, sync_world * 2):
        x, y = x[rank::world], y[rank::world]
        opt.zero_grad()
        with amp.autocast():
            loss = F.cross_entropy(model(x), y)
        amp.backward(loss, opt)
        skipped.append(amp.step(opt))
    state = {k: v.detach().float().clone() for k, v in dist.unwrap(model).state_dict().items()}
    return dict(state=state, skipped=skipped, scale=amp.loss_scale, half=half,
                compress=getattr(model, "fp16_compress", None))


AMP_CASES = [("torch", "O1"), ("apex", "O1"), ("apex", "O2")]


def _worker_amp():
    dist.init(device="cpu")
    out = {case: _amp_run(*case, WORLD) for case in AMP_CASES}
    out["compress"] = [dist.wrap_ddp(nn.Linear(2, 2), "cpu", kind, flag, dtype).fp16_compress for kind, flag, dtype in
                       [("torch", None, torch.bfloat16), ("torch", "auto", torch.float16), ("apex", "true", None),
                        ("torch", "false", torch.float16), ("none", None, None)]]
    return out


def test_ddp_after_amp_initialisation_for_every_amp_kind(tmp_path):
    results = spawn(_worker_amp, tmp_path)
    # the hook: on for torch fp16 (the reference), off for bf16 (no loss scale: fp16 would flush small grads), flags
    assert results[0]["compress"] == [False, True, True, False, False]
    for case in AMP_CASES:
        ref = _amp_run(*case, WORLD)  # one process, the whole batch, no DDP
        r0, r1 = results[0][case], results[1][case]
        assert r0["compress"] == (case[0] == "torch"), case  # the reference's fp16_compress_hook: pytorch AMP only
        assert bool(r0["half"]) == (case[1] == "O2"), case  # O2: DDP all-reduced fp16 gradients of fp16 weights
        assert r0["skipped"] == r1["skipped"] == ref["skipped"] and r0["scale"] == r1["scale"] == ref["scale"]
        assert _max_diff(r0["state"], r1["state"]) == 0, case  # same gradients everywhere -> identical ranks
        for k in ref["state"]:  # fp16 convolutions and (for torch) fp16 all-reduce: half-precision tolerance
            torch.testing.assert_close(r0["state"][k], ref["state"][k], rtol=2e-3, atol=2e-3,
                                       msg=lambda m: f"{case} {k}: {m}")


# ---- the trainer end to end on 2 ranks: train, exact distributed resume, sharded evaluation

class TinySeg(nn.Module):
    """A few conv-BN-ReLU units (one with a residual) with the segmentor contract of the four scripts."""

    def __init__(self, num_classes):
        super().__init__()
        self.backbone_net = nn.Sequential(*layers.conv_bn_relu(3, 8, 3, stride=4), *layers.conv_bn_relu(8, 8, 3))
        self.conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.bn = BatchNormAct2d(8)
        self.decoder = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(8, num_classes, 1))
        self.auxiliary_decoder = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        f = self.backbone_net(x)
        out = {"out": self.decoder(self.bn(self.conv(f), residual=f))}
        if self.training:
            out["aux"] = self.auxiliary_decoder(f)
        return out


def build_tiny(cfg=None, num_classes=150):
    return TinySeg(num_classes)


def _argv(root, work_dir, *extra):
    return ["--data", "ade20k", "--data_root", root, "--device", "cpu", "--work_dir", work_dir, "--amp", "none",
            "--kernels", "torch", "--batch_size", "4", "--crop_size", "(32, 32)", "--scale", "(64, 32)",
            "--num_workers", "0", "--num_train_images", "8", "--num_val_images", "5", "--max_iters", "4",
            "--log_interval", "1", "--eval_interval_epochs", "1000", "--save_predictions", "0", "--lr", "0.05",
            "--pretrained", "none", *extra]


def _worker_trainer(ports, runs):
    from common import train
    out = []
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)  # each main() builds (and tears down) its own process group
        out.append(train.main({}, build_tiny, argv, name="tiny"))
    return out


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from common import data
    root = str(tmp_path_factory.mktemp("ade"))
    data.make_demo_ade20k(root, num_train=8, num_val=5, seed=0)  # 5 val images: not a multiple of 2 ranks
    return root


def _assert_same_metrics(a, b):
    """Bit-equal metrics (IoU is NaN for classes absent from prediction and label, and NaN != NaN in a list)."""
    for k in ("aAcc", "mIoU", "IoU"):
        torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(b[k]), rtol=0, atol=0, equal_nan=True)


def _run_folders(root):
    from common import runs
    return runs.runs(root)


def _ckpt(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck["model"], ck["optimizer"]["state"], ck["iteration"]


def test_trainer_two_ranks_resume_exactly_and_shard_eval_exactly(tmp_path, demo_root):
    from common import train
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    runs = [_argv(demo_root, straight),  # 4 iterations, then the final evaluation on 5 sharded val images
            _argv(demo_root, split, "--stop_iters", "2"),  # stop after 2 (with a checkpoint) ...
            _argv(demo_root, split, "--resume", "auto"),  # ... and continue to 4
            _argv(demo_root, straight, "--eval", straight)]  # a work dir: the checkpoint its latest names
    res = spawn(_worker_trainer, tmp_path, [_free_port() for _ in runs], runs)

    # distributed resume continues exactly: bit-identical weights, buffers and momentum to the straight run
    (straight,), (split,) = _run_folders(straight), _run_folders(split)  # --resume continued in its own folder
    m_a, o_a, it_a = _ckpt(os.path.join(straight, "checkpoint-final.pth"))
    m_b, o_b, it_b = _ckpt(os.path.join(split, "checkpoint-final.pth"))
    assert it_a == it_b == 4
    assert _max_diff(m_a, m_b) == 0
    assert all(torch.equal(o_a[k]["momentum_buffer"], o_b[k]["momentum_buffer"]) for k in o_a)

    # sharded evaluation: both ranks report the metrics of the whole split, equal to one process evaluating it all
    for r in range(WORLD):
        _assert_same_metrics(res[r][0], res[0][0])
        _assert_same_metrics(res[r][3], res[0][0])  # in-training eval == --eval of the final checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks, so that the convolutions round the same way
    try:
        single = train.main({}, build_tiny, _argv(demo_root, str(tmp_path / "single"), "--eval",
                                                  os.path.join(straight, "checkpoint-final.pth")), name="tiny")
    finally:
        torch.set_num_threads(threads)
    _assert_same_metrics(single, res[0][3])  # 5 images on 1 process == 3 + 2 images on 2 ranks, exactly

    # a checkpoint written by 2 ranks resumes on 1 too, with a warning that the per-rank batch changed
    one = str(tmp_path / "one")
    train.main({}, build_tiny, _argv(demo_root, one, "--resume", os.path.join(split, "checkpoint-epoch-1.pth")),
               name="tiny")
    (one,) = _run_folders(one)  # a checkpoint from another work dir starts a new run folder here
    with open(os.path.join(one, "log.txt")) as f:
        log = f.read()
    assert "written by 2 rank(s) and this run has 1" in log and "from 2 to 4 images" in log, log
    assert _ckpt(os.path.join(one, "checkpoint-final.pth"))[2] == 4


def _worker_predict(argv):
    import contextlib
    import io

    from common import train
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # --predict logs to stdout only
        train.main({}, build_tiny, argv, name="tiny")
    return out.getvalue()


def test_predict_on_two_ranks_writes_each_picture_once(tmp_path, demo_root):
    from common import checkpoint
    ckpt = str(tmp_path / "net.pth")
    checkpoint.save(ckpt, {"model": build_tiny().state_dict()})
    images = os.path.join(demo_root, "ADEChallengeData2016", "images", "validation")
    out = spawn(_worker_predict, tmp_path, _argv(demo_root, str(tmp_path / "w"), "--predict", images, "--ckpt", ckpt))
    assert "rank 0: predict: wrote 3, skipped 0" in out[0] and "rank 1: predict: wrote 2, skipped 0" in out[0]
    assert out[1] == ""  # rank 0 logs for both
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(images))
    (folder,) = os.listdir(tmp_path / "w" / "pred")  # rank 0's new folder: both ranks write into it
    assert sorted(os.listdir(tmp_path / "w" / "pred" / folder)) == sorted(
        f"{n}{s}.png" for n in names for s in ("", "_overlay"))


# ---- under torchrun itself (slow: each run starts fresh interpreters)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG = """
import sys, time, torch
sys.path.insert(0, {root!r})
from common import dist
rank, world, _ = dist.init(device="cpu", timeout_s=3)
if rank == 1:
    time.sleep(120)  # hung, e.g. a stuck data loader: never reaches the collective
dist.all_reduce(torch.ones(1))
"""


@pytest.mark.slow
def test_torchrun_job_with_a_hung_rank_ends_with_a_timeout_error(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG.format(root=ROOT))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=100)
    assert p.returncode != 0 and "Timed out" in p.stdout + p.stderr, p.stderr[-3000:]
    assert time.time() - t0 < 90  # bounded: the timeout plus start-up and teardown, not the 120 s hang


@pytest.mark.slow
def test_torchrun_pspnet_demo_two_ranks(tmp_path):
    """The README's distributed command, shrunk: 2 CPU ranks train PSPNet 2 iterations, checkpoint, evaluate."""
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "pspnet.py", "--data", "demo",
           "--device", "cpu", "--max_iters", "2", "--batch_size", "2", "--crop_size", "(64, 64)", "--scale",
           "(128, 64)", "--num_val_images", "3", "--num_workers", "0", "--save_predictions", "0", "--amp", "none",
           "--work_dir", str(work)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "dist: gloo world 2" in out
    assert "eval: 2 images/rank" in out  # 3 val images sharded exactly: rank 0 gets 2, rank 1 gets 1
    assert (Path(_run_folders(str(work))[0]) / "checkpoint-final.pth").exists()
    assert out.count("eval:") == 1  # rank 0 logs; the other rank stays quiet
