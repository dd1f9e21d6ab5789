"""--resume continues exactly: N iterations + resume + N iterations == 2N straight, bit for bit (CPU)."""
import os

import pytest
import torch
import torch.nn as nn

from common import checkpoint, runs, train
from common.config import segmentor_cfg


class Tiny(nn.Module):
    """A few-thousand-parameter segmentor with everything that carries state: BN running stats, dropout (global
    RNG), momentum, and the {'out', 'aux'} training contract (spec §5)."""

    def __init__(self, num_classes):
        super().__init__()
        self.backbone_net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False), nn.BatchNorm2d(8),
                                          nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.decoder = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(8, num_classes, 1))
        self.auxiliary_decoder = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        f = self.backbone_net(x)  # (B, 8, H/8, W/8)
        out = {"out": self.decoder(f)}
        if self.training:
            out["aux"] = self.auxiliary_decoder(f)
        return out


def build_tiny(cfg=None, num_classes=150):
    return Tiny(num_classes)


def run(work_dir, *flags):
    argv = ["--data", "demo", "--crop_size", "(32, 32)", "--scale", "(128, 32)", "--batch_size", "2",
            "--num_train_images", "6", "--num_val_images", "1", "--eval_interval_epochs", "0",
            "--save_interval_epochs", "1", "--save_predictions", "0", "--log_interval", "1", "--device", "cpu",
            "--kernels", "torch", "--work_dir", str(work_dir), *flags]
    train.main(segmentor_cfg(num_classes=150), build_tiny, argv, name="tiny")
    return checkpoint.load(checkpoint.resolve("auto", str(work_dir)))


def test_resume_under_another_amp_mode_is_one_line_naming_the_flags(tmp_path, capsys):
    common = ["--amp_dtype", "float16", "--max_iters", "4", "--num_workers", "0"]
    run(tmp_path, "--amp", "apex", *common, "--stop_iters", "2")
    for other in (["--amp", "torch"], ["--amp", "apex", "--opt_level", "O3"]):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, *other, *common, "--resume", "auto")
        assert e.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("tiny: error: --resume ") and "checkpoint-iter-2.pth" in line and "--opt_level" in line


def test_an_amp_flag_the_resumed_runs_amp_would_ignore_is_one_line(tmp_path, capsys):
    """--resume takes --amp from the checkpoint: the check that --amp_dtype has a half type to pick runs after that."""
    run(tmp_path, "--amp", "none", "--max_iters", "4", "--stop_iters", "2", "--num_workers", "0")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--amp_dtype", "float16", "--resume", "auto", "--num_workers", "0")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("tiny: error: --amp_dtype float16: --amp none trains in fp32")


# 3 batches per epoch: stopping at 4 resumes mid-epoch (batch 1 of epoch 1), after an epoch-end checkpoint.
# fp16 for apex/torch, so that the loss scaler's state (apex's LossScaler, torch's GradScaler) is in play.
@pytest.mark.parametrize("amp,workers", [("none", 0), ("none", 1), ("apex", 0), ("torch", 0)])
def test_resume_is_exact(tmp_path, amp, workers):
    common = ["--amp", amp, *(["--amp_dtype", "float16"] if amp != "none" else []), "--max_iters", "6",
              "--num_workers", str(workers)]
    straight = run(tmp_path / "straight", *common)
    part = run(tmp_path / "split", *common, "--stop_iters", "4")
    assert part["iteration"] == 4 and os.path.basename(checkpoint.resolve("auto", str(tmp_path / "split"))) == \
        "checkpoint-iter-4.pth"
    resumed = run(tmp_path / "split", *common, "--resume", "auto")
    # the resumed run continued in its own folder: one run folder, holding both checkpoints
    (folder,) = runs.runs(str(tmp_path / "split"))
    assert {"checkpoint-iter-4.pth", "checkpoint-final.pth"} <= set(os.listdir(folder))
    assert straight["iteration"] == resumed["iteration"] == 6
    assert straight["amp"] == resumed["amp"]
    for k, v in straight["model"].items():  # weights and BN running stats
        assert torch.equal(v, resumed["model"][k]), k
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])
    if amp == "none" and workers == 0:
        # the comparison can fail: the same run with the augmentation of another data seed ends elsewhere
        moved = run(tmp_path / "other", *common, "--seed", "1")
        assert any(not torch.equal(v, moved["model"][k]) for k, v in straight["model"].items())


def test_resume_takes_the_runs_flags_from_its_checkpoint_and_keeps_a_finished_final(tmp_path, capsys):
    common = ["--amp", "torch", "--amp_dtype", "float16", "--max_iters", "6", "--lr", "0.005", "--seed", "3"]
    straight = run(tmp_path / "straight", *common, "--num_workers", "0")
    run(tmp_path / "split", *common, "--num_workers", "0", "--stop_iters", "4")
    # only the resume and where: data, crop, amp, schedule, lr, seed ... come from the checkpoint's config
    train.main(segmentor_cfg(num_classes=150), build_tiny,
               ["--resume", "auto", "--work_dir", str(tmp_path / "split"), "--num_workers", "0"], name="tiny")
    out = capsys.readouterr().out
    assert "from the checkpoint's config: amp 'torch', amp_dtype 'float16', data 'demo'," in out
    resumed = checkpoint.load(checkpoint.resolve("auto", str(tmp_path / "split")))
    assert resumed["iteration"] == 6 and resumed["config"]["lr"] == 0.005
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    # the finished run resumed for a longer schedule: its final checkpoint stays, under its iteration
    final = checkpoint.resolve("auto", str(tmp_path / "split"))
    assert os.path.basename(final) == "checkpoint-final.pth"
    train.main(segmentor_cfg(num_classes=150), build_tiny, ["--resume", os.path.join(str(tmp_path / "split"), "latest"),
               "--num_workers", "0", "--max_iters", "7"], name="tiny")
    kept = checkpoint.load(os.path.join(os.path.dirname(final), "checkpoint-iter-6.pth"))
    assert kept["iteration"] == 6
    assert torch.equal(kept["model"]["decoder.1.weight"], resumed["model"]["decoder.1.weight"])
    assert checkpoint.load(checkpoint.resolve("auto", str(tmp_path / "split")))["iteration"] == 7


def test_a_stop_iters_run_without_an_evaluation_does_not_blame_eval_interval_epochs(tmp_path, capsys):
    run(tmp_path, "--amp", "none", "--max_iters", "6", "--num_workers", "0", "--eval_interval_epochs", "2",
        "--stop_iters", "2")
    done = [line for line in capsys.readouterr().out.splitlines() if " done in " in line][-1]
    assert "--eval_interval_epochs 0" not in done and "--stop_iters 2" in done


def test_a_stop_iters_the_resumed_run_has_reached_is_one_line(tmp_path, capsys):
    run(tmp_path, "--amp", "none", "--max_iters", "6", "--num_workers", "0", "--stop_iters", "4")
    (folder,) = runs.runs(str(tmp_path))
    before = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--resume", "auto", "--num_workers", "0", "--stop_iters", "2")  # would train nothing
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tiny: error: --stop_iters 2: ") and "already at iteration 4" in line
    assert sorted(os.listdir(folder)) == before


def test_resuming_an_earlier_checkpoint_branches_into_a_new_run_folder(tmp_path, capsys):
    common = ["--amp", "none", "--max_iters", "6", "--num_workers", "0"]
    run(tmp_path, *common)  # epochs of 3 iterations: checkpoint-epoch-1.pth (iteration 3), checkpoint-final.pth
    (first,) = runs.runs(str(tmp_path))
    before = {f: open(os.path.join(first, f), "rb").read() for f in os.listdir(first) if f.endswith(".pth")}
    assert {"checkpoint-epoch-1.pth", "checkpoint-final.pth"} <= set(before)
    resumed = run(tmp_path, *common, "--lr", "0.005", "--resume", os.path.join(first, "checkpoint-epoch-1.pth"))
    assert "is not the newest checkpoint of" in capsys.readouterr().out
    second = [r for r in runs.runs(str(tmp_path)) if r != first]
    assert len(second) == 1 and resumed["iteration"] == 6 and resumed["config"]["lr"] == 0.005
    assert "checkpoint-final.pth" in os.listdir(second[0])
    # the first run is as it was: no checkpoint overwritten, pruned or added
    assert {f: open(os.path.join(first, f), "rb").read() for f in os.listdir(first) if f.endswith(".pth")} == before


def test_init_takes_a_folder_or_latest_file_as_resume_and_eval_do(tmp_path, capsys):
    common = ["--amp", "none", "--max_iters", "2", "--num_workers", "0"]
    first = run(tmp_path / "a", *common)
    (folder,) = runs.runs(str(tmp_path / "a"))
    for spec in (str(tmp_path / "a"), folder, os.path.join(folder, "latest")):
        run(tmp_path / "b", *common, "--max_iters", "1", "--init", spec)
        assert "loaded weights: " + os.path.join(folder, "checkpoint-final.pth") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(tmp_path / "b", *common, "--init", str(tmp_path / "b" / "nothing_here"))
    assert capsys.readouterr().err.startswith("tiny: error: --init ")
    assert first["iteration"] == 2


def test_a_missing_checkpoint_is_named_before_the_data_and_points_to_the_demo_runs(tmp_path, monkeypatch, capsys):
    from common import config
    monkeypatch.chdir(tmp_path)
    os.makedirs("work_dirs/tiny_demo")
    with open("work_dirs/tiny_demo/latest", "w") as f:
        f.write("x/checkpoint-final.pth\n")
    for argv, start in ((["--predict", "work_dirs"], "--predict needs a checkpoint: pass --ckpt PATH"),
                        (["--resume", "auto"], "--resume auto: no work_dirs/tiny/latest"),
                        (["--eval", "auto"], "--eval auto: no work_dirs/tiny/latest")):
        with pytest.raises(SystemExit) as e:  # no ./ADE20k here either: the checkpoint is what the user named
            config.parse(None, argv, "tiny")
        assert str(e.value).startswith(f"tiny: error: {start}") and e.value.code == 2, str(e.value)
        assert str(e.value).endswith("the demo runs' checkpoints are in work_dirs/tiny_demo: add --data demo")


def test_link_or_copy_links_else_copies_atomically(tmp_path, monkeypatch):
    src = tmp_path / "checkpoint-final.pth"
    torch.save({"w": torch.arange(5)}, src)
    checkpoint.link_or_copy(str(src), str(tmp_path / "linked.pth"))
    assert os.path.samefile(src, tmp_path / "linked.pth")

    def no_links(a, b):
        raise OSError("hard links not supported")
    monkeypatch.setattr(os, "link", no_links)
    checkpoint.link_or_copy(str(src), str(tmp_path / "copied.pth"))
    assert not os.path.samefile(src, tmp_path / "copied.pth")
    assert (tmp_path / "copied.pth").read_bytes() == src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-final.pth", "copied.pth", "linked.pth"]  # no temp file left
