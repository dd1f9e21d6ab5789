"""Prediction pictures (common/visualize.py), curves.png (common/plot.py), --tensorboard (common/tboard.py)."""
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from common import data, plot, tboard, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(h=40, w=56, seed=0):
    g = np.random.default_rng(seed)
    image = g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[:, w // 3:] = 2  # wall | sky (the larger part)
    label[:5] = 255  # unlabelled rows
    pred = label.copy()
    pred[10:20, 10:20] = 12  # a "person" the label does not have
    pred[:5] = 0
    return image, label, pred


def test_colorize_and_overlay_blend():
    image, label, pred = _scene()
    mask = visualize.colorize(label)
    assert (mask[10, 0] == data.PALETTE[0]).all() and (mask[10, -1] == data.PALETTE[2]).all()
    assert (mask[0] == 0).all()  # ignore is black
    blended = visualize.overlay(image, pred).astype(int)
    ref = 0.5 * image + 0.5 * np.asarray(data.PALETTE, float)[pred]
    assert np.abs(blended - ref).max() <= 0.5 + 1e-9  # rounded to the nearest integer


def test_denormalize_inverts_the_input_normalisation_exactly():
    """The pictures show the input as the network saw it: (x - MEAN) / STD undone to the same uint8 pixels, every one
    (a truncating cast made 1% of them darker by one level)."""
    import torch
    img = np.random.default_rng(0).integers(0, 256, (37, 41, 3)).astype(np.uint8)
    x = (img.astype(np.float32) - np.array(data.MEAN, np.float32)) / np.array(data.STD, np.float32)
    t = torch.from_numpy(x.transpose(2, 0, 1).copy())
    assert np.array_equal(visualize.denormalize(t), img) and np.array_equal(visualize.denormalize(t[None]), img)
    piped = torch.from_numpy(np.stack([data._NORM[c][img[..., c]] for c in range(3)]))  # the loader's own table
    assert np.array_equal(visualize.denormalize(piped), img)


def test_legend_entries_count_pixels_without_ignore():
    _, label, pred = _scene()
    entries = visualize.legend_entries(label)
    valid = label[label != 255]
    assert [c for c, _, _ in entries] == [2, 0]  # largest share first
    for c, name, pct in entries:
        assert name == data.CLASSES[c].split(",")[0]
        assert pct == pytest.approx(100 * np.mean(valid == c))
    assert sum(p for _, _, p in visualize.legend_entries(pred)) == pytest.approx(100)
    assert visualize.legend_entries(pred)[-1][:2] == (12, "person")


def test_write_pictures_mask_overlay_and_compare(tmp_path):
    image, label, pred = _scene()
    paths = visualize.write(str(tmp_path), "a", image, pred, label)
    assert [os.path.basename(p) for p in paths] == ["a.png", "a_overlay.png", "a_compare.png"]
    read = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    assert np.array_equal(read[0], visualize.colorize(pred))  # the mask at the image's own size, lossless
    h, w = pred.shape
    # overlay picture: a title strip, then the blended image, legend on the right
    assert np.array_equal(read[1][26:26 + h, :w], visualize.overlay(image, pred))
    # compare: image | ground truth | prediction, 6-pixel gaps, then the legend
    for k, panel in enumerate((image, visualize.overlay(image, label), visualize.overlay(image, pred))):
        x = k * (w + 6)
        assert np.array_equal(read[2][26:26 + h, x:x + w], panel)
    assert read[2].shape[1] > 3 * w + 12 + 300  # two legend columns
    assert visualize.write(str(tmp_path), "b", image, pred)[-1].endswith("b_overlay.png")  # no truth, no compare
    assert not os.path.exists(tmp_path / "b_compare.png")


def test_legend_grows_with_many_classes():
    pred = np.repeat(np.arange(40, dtype=np.uint8), 4).reshape(8, 20)  # 40 classes in an 8-pixel-high image
    pic = visualize.overlay_picture(np.zeros((8, 20, 3), np.uint8), pred)
    assert pic.shape[0] >= 40 * 22  # every class gets a row: the picture is taller than the image


def _write_metrics(path, resumed=True):
    recs = [dict(kind="train", iteration=i, loss=3 - i / 50, loss_cls=2 - i / 80, loss_aux=2.5 - i / 60,
                 lr=0.01 * (1 - i / 100) ** 0.9, loss_scale=2.0 ** 16 / (1 + (i > 40)), skipped=int(i > 40))
            for i in range(10, 101, 10)]
    if resumed:  # a resume from iteration 60 repeats 70..100 with other numbers: the later ones count
        recs[6:] = [dict(r, loss=99.0) for r in recs[6:]]  # first pass: junk
        recs += [dict(r, loss=1.0) for r in recs[6:]]  # the resumed run
    recs += [dict(kind="eval", iteration=50, mIoU=0.3, mAcc=0.4, aAcc=0.6, IoU=[0.3]),
             dict(kind="eval", iteration=100, mIoU=0.5, mAcc=0.6, aAcc=0.8, IoU=[0.5])]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
        f.write('{"kind": "train", "iter')  # a run killed mid-write


def test_read_records_later_wins_and_partial_line(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    train, evals = plot.read_records(str(tmp_path / "metrics.jsonl"))
    assert [r["iteration"] for r in train] == list(range(10, 101, 10))
    assert [r["loss"] for r in train][6:] == [1.0] * 4
    assert [r["mIoU"] for r in evals] == [0.3, 0.5]
    assert plot.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no ramp from 0


def test_plot_command_writes_a_nonblank_png(tmp_path):
    pytest.importorskip("matplotlib")  # a dependency (requirements.txt); its absence is a broken install
    _write_metrics(tmp_path / "metrics.jsonl")
    r = subprocess.run([sys.executable, "-m", "common.plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "1 line(s) not JSON, skipped (line 17)" in r.stderr
    img = cv2.imread(str(tmp_path / "curves.png"))
    assert img is not None and img.shape[0] > 400 and img.shape[1] > 600
    non_white = (img < 240).any(2).mean()
    assert 0.03 < non_white < 0.6  # axes, text and curves drawn; not a blank or solid canvas
    c0 = np.array([180, 119, 31])  # matplotlib's first colour #1f77b4, in BGR: the total loss and mIoU lines
    assert (np.abs(img.astype(int) - c0).sum(2) < 30).sum() > 200


def test_curves_show_each_key_on_its_axis(tmp_path, monkeypatch):
    # the picture's data, read back from the figure: which key each line plots, smoothed or raw, and in which unit
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    figs, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), save(self, *a, **k))[1])
    _write_metrics(tmp_path / "metrics.jsonl", resumed=False)
    plot.plot(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    train, _ = plot.read_records(str(tmp_path / "metrics.jsonl"))
    loss_ax, lr_ax, _, eval_ax = figs[0].axes[:4]
    lines = [(line.get_label(), list(line.get_ydata())) for line in loss_ax.lines]
    for key, label in (("loss", "total"), ("loss_cls", "cls"), ("loss_aux", "aux (weighted)")):
        raw = [r[key] for r in train]
        assert (f"{label} (smoothed)", pytest.approx(plot.smooth(raw))) in lines and raw in [v for _, v in lines]
    assert list(lr_ax.lines[0].get_ydata()) == [r["lr"] for r in train]
    assert {line.get_label(): list(line.get_ydata()) for line in eval_ax.lines} == {  # fractions shown in percent
        "mIoU (last 50.00)": pytest.approx([30, 50]), "mAcc (last 60.00)": pytest.approx([40, 60]),
        "aAcc (last 80.00)": pytest.approx([60, 80])}
    assert plot.smooth([0.0, 1.0]) == pytest.approx([0.0, 0.625])  # TensorBoard's weight 0.6: 0.4 / (1 - 0.6**2)


def test_smoothing_leaves_a_non_finite_value_out():
    # a log window with an overflowed fp16 step records a NaN loss: TensorBoard's smoothing shows it as a gap and
    # averages the finite values only; one NaN must not blank the rest of the smoothed curve
    s = plot.smooth([2.0, math.nan, 4.0])
    assert math.isnan(s[1]) and s[::2] == pytest.approx([2.0, (0.6 * 0.4 * 2 + 0.4 * 4) / (1 - 0.6 ** 2)])


def test_plot_out_may_be_a_folder_or_an_upper_case_name(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "pics").mkdir()  # an existing folder, no trailing slash: the usual name inside it
    for out, want in ((tmp_path / "pics", tmp_path / "pics" / "curves.png"), (tmp_path / "C.PNG", tmp_path / "C.PNG")):
        assert plot.cli_paths(None, str(tmp_path), str(out), "metrics.jsonl", "curves.png", "") == \
            (str(tmp_path / "metrics.jsonl"), str(want))


def test_plot_command_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "common.plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "metrics.jsonl: no such file" in r.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    r = subprocess.run([sys.executable, "-m", "common.plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no train or eval records" in r.stderr
    lines = []
    plot.write_curves(str(tmp_path / "nowhere"), log=lines.append)  # the end-of-training hook never raises
    assert lines == ["curves: none (the run stopped before its first logged iteration)"]
    plot.write_curves(str(tmp_path), log=lines.append)  # the empty metrics.jsonl above
    assert len(lines) == 2 and lines[1].startswith("curves: not written") and "no train or eval records" in lines[1]


def test_plot_of_a_work_dir_takes_its_newest_run(tmp_path):
    for run in ("20261201_000000", "20261202_000000", "20261203_000000"):
        os.makedirs(tmp_path / run)
    for run in ("20261201_000000", "20261202_000000"):  # the newest folder has no metrics yet (a run just started)
        _write_metrics(tmp_path / run / "metrics.jsonl")
    path, out = plot.cli_paths(None, str(tmp_path), "", "metrics.jsonl", "curves.png", "")
    assert path == str(tmp_path / "20261202_000000" / "metrics.jsonl")
    assert out == str(tmp_path / "20261202_000000" / "curves.png")


def test_a_run_that_logged_once_still_shows_its_point(tmp_path):
    pytest.importorskip("matplotlib")
    rec = dict(kind="train", iteration=5, loss=3.0, loss_cls=2.0, loss_aux=1.0, lr=0.01, loss_scale=1.0, skipped=0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    img = cv2.imread(plot.plot(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png")))
    c1 = np.array([14, 127, 255])  # matplotlib's C1 (#ff7f0e, BGR): the cls loss, only in its marker and legend
    assert (np.abs(img.astype(int) - c1).sum(2) < 30).sum() > 60


def test_tensorboard_missing_package_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(tboard.MissingTensorBoard, match=r"^--tensorboard: the tensorboard package is not installed "
                                                        r"\(pip install tensorboard\)"):
        tboard.Writer(str(tmp_path))


def test_tensorboard_scalars_and_pictures(tmp_path):
    pytest.importorskip("tensorboard")  # optional: not in requirements.txt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from common.train import Logger
    log = Logger(str(tmp_path))
    w = log.tb = tboard.Writer(str(tmp_path))
    log.record(kind="train", iteration=10, epoch=1, loss=2.5, lr=0.01, skipped=0)  # the trainer's records go there
    w.record(dict(kind="eval", iteration=20, mIoU=0.5, IoU=[0.5, 0.4], precision="fp32"))
    w.pictures(20, [np.zeros((8, 12, 3), np.uint8)])
    w.close()
    acc = EventAccumulator(w.logdir).Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/skipped", "eval/mIoU"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 2.5)]
    img = acc.Images("val/0")[0]
    assert (img.step, img.width, img.height) == (20, 12, 8)


def test_tensorboard_scalars_keys_and_steps_without_the_package(tmp_path, monkeypatch):
    # what Writer hands SummaryWriter (the test above needs the optional package; this one runs everywhere)
    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass
    monkeypatch.setattr(tboard, "require", lambda: FakeSummaryWriter)
    w = tboard.Writer(str(tmp_path))
    w.record(dict(kind="train", iteration=10, epoch=1, loss=2.5, skipped=0, finished=True, IoU=[0.5], amp="fp32"))
    assert calls == [("train/loss", 2.5, 10), ("train/skipped", 0, 10)]


def test_a_picture_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from common.errors import UserError
    monkeypatch.setattr(visualize.cv2, "imwrite", lambda *a, **k: False)  # a full disk: OpenCV returns False
    img = np.zeros((4, 6, 3), np.uint8)
    with pytest.raises(UserError, match=r"could not write .*x\.png \(is the folder writable, the disk full\?\)"):
        visualize.write(str(tmp_path), "x", img, np.zeros((4, 6), np.int64))


def test_plot_and_amp_report_commands_on_the_wrong_file_or_out(tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "ck.pth").write_bytes(b"PK\x03\x04\xff\xfe binary")
    (tmp_path / "pics").mkdir()

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
        return r.returncode, (r.stderr.strip().splitlines() or [""])[-1], r.stdout.strip()

    assert cli("common.plot", str(tmp_path), "--out", str(tmp_path / "pics") + "/")[::2] == \
        (0, f"wrote {tmp_path / 'pics' / 'curves.png'}")  # a folder: the usual name inside it
    assert cli("common.plot", str(tmp_path), "--out", str(tmp_path / "c.txt"))[1].endswith(
        "give a .png (or .pdf, .svg, .jpg) file name")
    assert cli("common.plot", str(tmp_path), "--out", str(tmp_path / "new" / "c.png"))[::2] == \
        (0, f"wrote {tmp_path / 'new' / 'c.png'}")  # its folder is made
    assert cli("common.plot", str(tmp_path), "--out", str(tmp_path / "ck.pth" / "a.png"))[1].endswith(
        f"--out {tmp_path / 'ck.pth'}: cannot create this folder (a file is in the way): pass a writable folder")
    assert cli("common.plot", str(tmp_path / "ck.pth"))[:2] == \
        (1, f"python -m common.plot: {tmp_path / 'ck.pth'} is not a text file of JSON lines")
    code, line, _ = cli("common.amp_report", str(tmp_path / "metrics.jsonl"))
    assert code == 1 and line.endswith("metrics.jsonl holds no AMP report records (pass a run's folder, or its "
                                       "amp_report.jsonl)")
