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
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common import checkpoint, config, data, layers, runs, train
from common.amp import Amp
from common.errors import BadFileError, UserError

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
