"""Every script x every --amp kind trains a few iterations on the demo data, as a user runs it (a subprocess);
plus --eval and --predict of a checkpoint. Tiny crops and 2 iterations, so the full ResNet-50-D8 stays cheap."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from common import checkpoint, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("fcn.py", "pspnet.py", "deeplabv3.py", "deeplabv3plus.py")
TINY = ["--data", "demo", "--device", "cpu", "--crop_size", "(64, 64)", "--scale", "(256, 64)", "--batch_size", "2",
        "--num_workers", "0", "--num_train_images", "4", "--num_val_images", "1", "--max_iters", "2",
        "--log_interval", "1", "--eval_interval_epochs", "0", "--save_interval_epochs", "0",
        "--save_predictions", "0"]


def run(script, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{script} {' '.join(flags)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.parametrize("amp", ["none", "torch", "apex"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_trains(tmp_path, script, amp):
    out = run(script, *TINY, "--amp", amp, "--work_dir", str(tmp_path))
    assert f"amp: amp={amp}" in out and "it 2/2" in out
    (folder,) = runs.runs(str(tmp_path))  # the run's own folder under the work dir
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["iteration"] for r in recs] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)
    assert not [f for f in os.listdir(folder) if f.endswith(".pth")]  # --save_interval_epochs 0: none written
    assert os.listdir(tmp_path) == [os.path.basename(folder)]  # and so no latest pointer either


def test_eval_and_predict(tmp_path):
    run("pspnet.py", *TINY, "--amp", "none", "--max_iters", "1", "--save_interval_epochs", "1", "--work_dir",
        str(tmp_path))
    ckpt = checkpoint.resolve("auto", str(tmp_path))
    assert os.path.basename(ckpt) == "checkpoint-final.pth"
    # no --data demo / --scale: --eval takes them from the checkpoint's config
    out = run("pspnet.py", "--device", "cpu", "--num_val_images", "2", "--num_workers", "0", "--eval", ckpt,
              "--work_dir", str(tmp_path / "eval"))
    assert "from the checkpoint's config: data 'demo', scale 256,64" in out
    assert "eval: 2 images" in out and "mIoU" in out
    # --eval writes no run folder and no log; only its pictures (the demo preset's 4), beside the run folders
    assert sorted(os.listdir(tmp_path / "eval")) == ["pred"]
    from common.data import PALETTE, demo_root, read_image
    images = os.path.join(demo_root(), "ADEChallengeData2016", "images", "validation")
    first = sorted(os.listdir(images))[0]
    run("pspnet.py", "--data", "demo", "--device", "cpu", "--scale", "(256, 64)", "--predict",
        os.path.join(images, first), "--ckpt", ckpt, "--out", str(tmp_path / "pred"))
    mask = cv2.cvtColor(cv2.imread(str(tmp_path / "pred" / (first[:-4] + ".png"))), cv2.COLOR_BGR2RGB)
    assert mask.shape == read_image(os.path.join(images, first)).shape  # the image's own size
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in PALETTE}  # every pixel is a class colour
