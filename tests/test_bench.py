"""The two benches run end to end in their --quick form (what CI runs) and write the rows and columns they promise.

Timings on a CI box mean nothing, so the checks are on structure and on the arithmetic around the timings: the
FLOP counts against torch's own FlopCounterMode, the derived columns against the raw ones.
"""
import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, out, **env):
    # one intra-op thread: on a shared 2-core box OpenMP's spinning threads cost ~5x the CPU time and timings are not
    # what is tested here
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    r = subprocess.run([sys.executable] + args + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _bench(name):
    """bench/<name>.py as a module (bench/ is no package), under its own name bench_<name>."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def forward_flops(model, crop):
    """FLOPs of one training forward of one image, counted by torch (independent of common.summary)."""
    model = model.to("meta").train()  # shapes are all a counter needs
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.empty(2, 3, crop, crop, device="meta"))  # 2 images: BN in training mode; halved below
    return fc.get_total_flops() / 2


@pytest.fixture(scope="module")
def train_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    stdout = run(["bench/train.py", "--quick"], out)
    with open(out / "train.json") as f:
        return json.load(f), (out / "train.md").read_text(), stdout


def test_train_quick_rows(train_out):
    res, md, _ = train_out
    head, rows = res["header"], res["rows"]
    for key in ("card", "torch", "cuda", "commit", "date", "peak_fp16_tflops", "crop", "steps", "warmup"):
        assert key in head, key
    assert head["torch"] == torch.__version__ and head["crop"] == 32
    got = [(r["model"], r["mode"], r["kernels"], r["format"], r["batch"]) for r in rows]
    assert got == [("fcn", "fp32", "torch", "nchw", 2), ("fcn", "bf16", "torch", "nchw", 2),
                   ("tv_fcn", "autocast", "torch", "nhwc", 2)]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3)
        assert r["tflop_per_s"] == pytest.approx(r["img_per_s"] * r["gflop_per_img"] / 1e3)
        if head["peak_fp16_tflops"] is None:  # the CPU: no MFU, no allocator peak
            assert r["mfu"] is None
    fp32, bf16, peer = rows
    assert fp32["vs_fp32"] == pytest.approx(1.0)
    assert bf16["vs_fp32"] == pytest.approx(bf16["img_per_s"] / fp32["img_per_s"])
    assert bf16["vs_peer"] == pytest.approx(bf16["img_per_s"] / peer["img_per_s"])
    assert "vs_fp32" not in peer  # a peer is the reference, not compared with our fp32
    assert "amp=torch" in bf16["amp"] and "bfloat16" in bf16["amp"]


def test_train_quick_flops_match_torch_counter(train_out):
    import fcn
    from torchvision.models.segmentation import fcn_resnet50
    res, _, _ = train_out
    ours, peer = res["rows"][0], res["rows"][2]
    torch.manual_seed(0)
    # bench: 3 x 2 x MACs of a training forward (fwd + bwd-data + bwd-weight); torch counts 2 FLOPs per MAC
    assert ours["gflop_per_img"] * 1e9 == pytest.approx(3 * forward_flops(fcn.build_model(), 32), rel=1e-6)
    tv = fcn_resnet50(weights=None, weights_backbone=None, num_classes=150, aux_loss=True)
    assert peer["gflop_per_img"] * 1e9 == pytest.approx(3 * forward_flops(tv, 32), rel=1e-6)


def test_train_quick_markdown(train_out):
    _, md, stdout = train_out
    lines = md.splitlines()
    assert lines[0].startswith("# Training-step throughput: ")
    assert "commit" in md and "torch " + torch.__version__ in md
    table = [line for line in lines if line.startswith("|")]
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    assert cols == ["model", "mode", "kernels", "format", "compile", "batch", "img/s", "step ms", "compile s",
                    "peak GiB", "TFLOP/s", "MFU", "vs fp32", "mem vs fp32", "vs tv", "note"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [row[:2] for row in body] == [["fcn", "fp32"], ["fcn", "bf16"], ["tv_fcn", "autocast"]]
    assert all(len(row) == len(cols) for row in body)
    assert body[0][cols.index("vs fp32")] == "1.00"
    assert {row[cols.index("compile")] for row in body} == {"none"} and body[0][cols.index("compile s")] == "-"
    assert md in stdout  # the table is printed too
    assert lines[-1].startswith("Goals: not judged here") and "crop 32" in lines[-1]  # a CPU at crop 32
    assert stdout.rstrip().splitlines()[-1].endswith("; goals not judged")  # the VERDICT line


def test_train_goals_judge_the_fastest_eager_pspnet_fp16_row_at_batch_16():
    bench = _bench("train")
    head = {"card": "NVIDIA H100 80GB HBM3 (79 GiB)", "crop": 512}

    def row(img_s, kernels="fused", batch=16, compile="none", status="ok", **ratios):
        return dict(model="pspnet", mode="fp16", kernels=kernels, format="nhwc", batch=batch, compile=compile,
                    status=status, img_per_s=img_s, **ratios)
    rows = [row(250.0, "torch", vs_peer=1.1, vs_fp32=3.0, mem_vs_fp32=0.45),
            row(320.0, vs_peer=1.4, vs_fp32=4.5, mem_vs_fp32=0.6),
            row(900.0, batch=2), row(999.0, compile="default"), row(990.0, status="OOM"),
            dict(row(800.0), mode="fp32"), dict(row(700.0), model="deeplabv3")]
    lines = bench.goal_lines(head, rows)
    assert lines[0].startswith("Goals, judged on the fastest PSPNet fp16 row at batch 16 (fused kernels, nhwc)")
    assert lines[1:] == ["- img/s 320.00 (goal >= 300): met", "- vs tv 1.40 (goal >= 1.3): met",
                         "- vs fp32 4.50 (goal >= 4): met", "- mem vs fp32 0.60 (goal <= 0.5): MISSED"]
    lines = bench.goal_lines(head, [row(250.0)])  # no fp32 base, no peer: the ratios are not measured
    assert lines[1:3] == ["- img/s 250.00 (goal >= 300): MISSED", "- vs tv - (goal >= 1.3): not measured"]
    assert all(line.endswith("not measured") for line in lines[2:])
    assert bench.goal_lines(head, rows[2:])[0].startswith("Goals: not judged (no PSPNet fp16 row at batch 16")
    assert bench.goals_verdict(head, rows) == "goals not met: mem vs fp32"
    assert bench.goals_verdict(head, [row(301.0, vs_peer=1.3, vs_fp32=4.0, mem_vs_fp32=0.5)]) == "goals all met"
    assert bench.goal_lines(dict(head, crop=256), rows)[0].startswith("Goals: not judged here")


def test_add_ratios_by_hand():
    """The ratios a card's table publishes, on rows whose answers are worked out by hand: against our eager fp32 NCHW
    row at the same batch, against the torchvision peer at the same batch (compiled against compiled), MFU."""
    bench = _bench("train")

    def row(model, mode, img_s, gib=None, batch=16, compile="none", kernels="fused", fmt="nhwc", tflops=None):
        return dict(model=model, mode=mode, kernels=kernels, format=fmt, batch=batch, compile=compile, status="ok",
                    img_per_s=img_s, peak_gib=gib, tflop_per_s=tflops if tflops is not None else img_s / 10)
    rows = [row("pspnet", "fp32", 100.0, 10.0, kernels="torch", fmt="nchw", tflops=50.0),
            row("pspnet", "fp32", 30.0, 2.0, batch=2, kernels="torch", fmt="nchw"),
            row("pspnet", "fp16", 400.0, 4.0, tflops=200.0),
            row("pspnet", "fp16", 500.0, 5.0, compile="default"),
            row("pspnet", "fp16", 60.0, 1.0, batch=2),
            row("tv_deeplabv3", "fp16", 200.0), row("tv_deeplabv3", "fp16", 250.0, compile="default"),
            row("tv_deeplabv3", "fp16", 20.0, batch=2), row("tv_fcn", "fp16", 1000.0)]
    bench.add_ratios(rows, 1000.0)
    eager, compiled, small = rows[2], rows[3], rows[4]
    assert (eager["vs_fp32"], eager["mem_vs_fp32"], eager["vs_peer"], eager["mfu"]) == (4.0, 0.4, 2.0, 0.2)
    assert (compiled["vs_fp32"], compiled["vs_peer"], compiled["mem_vs_fp32"]) == (5.0, 2.0, 0.5)
    assert (small["vs_fp32"], small["vs_peer"], small["mem_vs_fp32"]) == (2.0, 3.0, 0.5)
    assert rows[0]["vs_fp32"] == 1.0 and rows[0]["mfu"] == 0.05
    assert rows[5]["mfu"] == 0.02 and "vs_fp32" not in rows[5]  # a peer has an MFU too, and no ratios of ours


def test_train_goals_verdict_counts_an_unmeasured_goal_as_not_met():
    bench = _bench("train")
    head = {"card": "NVIDIA H100 80GB HBM3 (79 GiB)", "crop": 512}
    row = dict(model="pspnet", mode="fp16", kernels="fused", format="nhwc", batch=16, compile="none", status="ok",
               img_per_s=400.0, vs_peer=None, vs_fp32=None, mem_vs_fp32=None)  # no fp32 base, no peer ran
    assert bench.goals_verdict(head, [row]) == "goals not met: vs tv, vs fp32, mem vs fp32"


def test_train_main_goes_on_past_a_failing_row(tmp_path, monkeypatch, capsys):
    """A row that raises is an error row and the rows after it still run; an OOM row is no failure; the exit is
    non-zero; the table, its ratios and the VERDICT line cover every row (timings faked: their arithmetic only)."""
    bench = _bench("train")
    ms = {"fp32": 100.0, "fp16": 50.0, "tv_fcn": 10.0}

    def fake_time_steps(step, images, labels, warmup, steps, device):
        if step == "bf16":
            raise ValueError("cuDNN cannot do this")
        if step == "apex-O1":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return ms[step], ms[step], ms[step], None, 1.0
    monkeypatch.setattr(bench, "construct", lambda name: None)
    monkeypatch.setattr(bench, "train_flops", lambda name, crop, model: 1e9)
    monkeypatch.setattr(bench, "build_ours", lambda model, mode, *rest: (mode, None, f"amp {mode}"))
    monkeypatch.setattr(bench, "build_peer", lambda name, *rest: (name, None, "torchvision"))
    monkeypatch.setattr(bench, "time_steps", fake_time_steps)
    with pytest.raises(SystemExit, match=r"^1 row\(s\) failed"):
        bench.main(["--quick", "--device", "cpu", "--modes", "fp32,bf16,apex-O1,fp16", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert [(r["model"], r["mode"], r["status"]) for r in rows] == [
        ("fcn", "fp32", "ok"), ("fcn", "bf16", "error: ValueError: cuDNN cannot do this"), ("fcn", "apex-O1", "OOM"),
        ("fcn", "fp16", "ok"), ("tv_fcn", "autocast", "ok")]
    assert rows[3]["img_per_s"] == 40.0 and rows[3]["vs_fp32"] == 2.0 and rows[3]["vs_peer"] == 0.2
    md = (tmp_path / "train.md").read_text()
    assert "| fcn | bf16 | torch | nchw | none | 2 | - |" in md and "| error: ValueError: cuDNN cannot do this |" in md
    assert md.rstrip().splitlines()[-1].startswith("Goals: not judged here")  # the goals' line closes the table
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == (
        "VERDICT: 3/5 rows ok, 1 failed, 1 OOM; fastest ours: fcn fp16 torch nchw b2 40.0 img/s (vs fp32 2.00, "
        "vs tv 0.20, MFU -); goals not judged")


def test_time_steps_reports_milliseconds():
    import time as clock
    bench = _bench("train")
    med, lo, hi, peak, first = bench.time_steps(lambda *a: clock.sleep(0.05), None, None, 1, 3, torch.device("cpu"))
    assert 45 <= lo <= med <= hi < 500 and peak is None and first >= 0.045


def test_run_row_converts_step_time_and_peak_memory(monkeypatch):
    """img/s from the median step in ms, peak memory in GiB (2**30), TFLOP/s from GFLOP per image."""
    bench = _bench("train")
    monkeypatch.setattr(bench, "construct", lambda name: None)
    monkeypatch.setattr(bench, "train_flops", lambda name, crop, model: 3e12)
    monkeypatch.setattr(bench, "build_ours", lambda *a: (None, None, "amp"))
    monkeypatch.setattr(bench, "synthetic_batch", lambda *a: (None, None))
    monkeypatch.setattr(bench, "time_steps", lambda *a: (10.0, 9.0, 11.0, 3 * 2**30, 0.5))
    args = bench.parse_args(["--out", "x", "--quick"])
    r = bench.run_row(dict(model="pspnet", mode="fp16", kernels="torch", format="nchw", batch=2, compile="none"),
                      args, torch.device("cpu"))
    assert r["status"] == "ok" and r["img_per_s"] == 200.0 and r["peak_gib"] == 3.0
    assert r["gflop_per_img"] == 3000.0 and r["tflop_per_s"] == 600.0 and r["compile_s"] is None


def test_train_flags(capsys):
    bench = _bench("train")
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "fp32,fp8"])
    assert "fp8" in capsys.readouterr().err
    args = bench.parse_args(["--quick", "--models", "pspnet", "--steps", "3"])  # explicit flags beat --quick's
    assert (args.models, args.steps, args.crop, args.modes) == (["pspnet"], 3, 32, ["fp32", "bf16"])
    args = bench.parse_args(["--peers", "none", "--batch", "16"])
    assert args.peers == [] and args.batch == [16] and args.crop == 512 and len(args.modes) == 5
    # the grid: the reference fp32 row is added in front when the selection lacks it, and the peers close each batch
    plan = bench.plan(bench.parse_args(["--models", "fcn", "--modes", "fp16", "--kernels", "fused", "--formats",
                                        "nhwc", "--batch", "16,2", "--peers", "tv_fcn"]))
    expected = [(m, mode, k, f, b) for b in (16, 2) for m, mode, k, f in (
        ("fcn", "fp32", "torch", "nchw"), ("fcn", "fp16", "fused", "nhwc"), ("tv_fcn", "autocast", "torch", "nhwc"))]
    assert [(r["model"], r["mode"], r["kernels"], r["format"], r["batch"]) for r in plan] == expected
    assert bench.card_peak("NVIDIA H100 80GB HBM3") == 989.4 and bench.card_peak("NVIDIA H100 PCIe") == 756.0
    assert bench.card_peak("NVIDIA H200") == 989.4 and bench.card_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.card_peak("NVIDIA H100 NVL") is None and bench.card_peak("NVIDIA GeForce RTX 4090") is None


def test_tables_name_the_device_checks_commit_where_the_tree_has_no_git(monkeypatch):
    bench = _bench("train")  # numerics, step_profile, eval and eval_sizes take their header's commit from it
    monkeypatch.setattr(bench, "ROOT", "/")  # no repository there: git alone would say unknown
    assert bench.git_commit() == "unknown"
    monkeypatch.setenv("DEVICE_CHECK_COMMIT", "abc1234")
    assert bench.git_commit() == "abc1234"


def test_train_rows_time_the_trainers_step_with_its_bn_guard():
    """A row's step is the trainer's (common.train.train_step): an inf pixel skips the step AND puts BatchNorm's
    running stats back, so a row times the guard's snapshot and check too."""
    bench = _bench("train")
    step, model, _ = bench.build_ours(bench.construct("fcn"), "fp32", "torch", "nchw", torch.device("cpu"))
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 150, (2, 32, 32))
    step(images, labels)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images[0, :, 5, 7] = float("inf")
    step(images, labels)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights, running stats, counts
    step(images[1:], labels[1:])  # a clean batch steps again
    assert not torch.equal(before["backbone_net.stem.0.weight"], model.state_dict()["backbone_net.stem.0.weight"])


def test_kernels_conv_quick(tmp_path):
    import pspnet
    run(["bench/kernels.py", "--quick", "--only", "conv"], tmp_path)
    with open(tmp_path / "kernels.json") as f:
        rows = json.load(f)["conv"]
    md = (tmp_path / "kernels.md").read_text()
    assert "| # | C x H x W -> K |" in md and "fwd NHWC" in md and "wgrad NCHW" in md
    problems = {r["id"]: r for r in rows}
    # every problem once per dtype
    assert sorted(r["dtype"] for r in rows) == sorted(["fp32", "tf32", "fp16", "bf16"] * len(problems))
    kinds = {(p["R"], p["dilation"], p["groups"] > 1) for p in problems.values()}
    assert {(1, 1, False), (3, 1, False), (3, 2, False), (3, 4, False)} <= kinds  # dilated layer3/layer4 included
    # uses per forward, against the model's own module list (each Conv2d runs once in pspnet's forward)
    convs = [m for m in pspnet.build_model().modules() if isinstance(m, torch.nn.Conv2d)]
    for p in problems.values():
        n = sum(1 for m in convs if (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.dilation[0],
                                     m.groups) == (p["C"], p["K"], p["R"], p["stride"], p["dilation"], p["groups"]))
        assert p["count"] == p["models"]["pspnet"] == n, p
    for r in rows:
        # FLOPs per pass against torch's counter on meta tensors
        x = torch.empty(r["N"], r["C"], r["H"], r["W"], device="meta")
        w = torch.empty(r["K"], r["C"] // r["groups"], r["R"], r["S"], device="meta")
        with FlopCounterMode(display=False) as fc:
            F.conv2d(x, w, None, r["stride"], r["pad"], r["dilation"], r["groups"])
        assert r["flops"] == fc.get_total_flops()
        if r["dtype"] in ("tf32", "fp16") and not torch.cuda.is_available():
            assert r["note"].startswith("skipped") and "fwd_nchw_ms" not in r
            continue
        for p in ("fwd", "dgrad", "wgrad"):
            for fmt in ("nchw", "nhwc"):
                assert r[f"{p}_{fmt}_ms"] > 0
                assert r[f"{p}_{fmt}_tflops"] == pytest.approx(r["flops"] / r[f"{p}_{fmt}_ms"] / 1e9)


def test_kernels_upsample_and_bn_sections_quick(tmp_path):
    # the sections the device check runs first on the card (there at full size); here every row must measure
    out = run(["bench/kernels.py", "--quick", "--only", "upsample,bn_relu_demo"], tmp_path)
    assert "VERDICT: upsample 6 rows, bn_relu_demo" in out and "none failed" in out
    rows = json.loads((tmp_path / "kernels.json").read_text())
    ups = rows["upsample"]
    assert sorted({r["layout"] for r in ups}) == ["channels_last", "contiguous"]
    assert sorted({r["op"].split()[0] for r in ups}) == ["upsample_concat", "upsample_cross_entropy"]
    for r in ups + rows["bn_relu_demo"]:
        assert "error" not in r and all(r[k] > 0 for k in r if k.endswith("_ms")), r
    md = (tmp_path / "kernels.md").read_text()
    assert "### upsample family, fwd+bwd (CPU" in md and "### bn_relu family" in md


def test_kernels_conv_top_keeps_the_most_step_time(tmp_path):
    run(["bench/kernels.py", "--quick", "--only", "conv"], tmp_path / "all", CONV_DTYPES="fp32")
    run(["bench/kernels.py", "--quick", "--only", "conv"], tmp_path / "top", CONV_DTYPES="fp32", CONV_TOP="2")
    rows = {}
    for name in ("all", "top"):
        with open(tmp_path / name / "kernels.json") as f:
            rows[name] = json.load(f)["conv"]
    cost = sorted((r["flops"] * r["count"] for r in rows["all"]), reverse=True)
    assert len(rows["all"]) > 2 and [r["flops"] * r["count"] for r in rows["top"]] == cost[:2]
    # the per-model step totals then sum the measured problems only, and the table says so
    note = f"(CONV_TOP=2: the 2 of {len(rows['all'])} distinct convolutions with the most FLOPs x uses"
    assert note in (tmp_path / "top" / "kernels.md").read_text()
    assert "CONV_TOP" not in (tmp_path / "all" / "kernels.md").read_text()


def test_eval_quick_rows(tmp_path):
    run(["bench/eval.py", "--quick", "--variants", "unfolded,folded,folded_plain"], tmp_path)
    with open(tmp_path / "eval.json") as f:
        res = json.load(f)
    rows = res["rows"]
    assert [(r["model"], r["size"], r["dtype"], r["variant"]) for r in rows] == [
        ("fcn", "32x48", "float32", "unfolded"), ("fcn", "32x48", "float32", "folded"),
        ("fcn", "32x48", "float32", "folded_plain")]
    for r in rows:
        assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["img_per_s"] == pytest.approx(1e3 / r["ms"])
    assert rows[0]["vs_unfolded"] == pytest.approx(1.0)
    assert rows[1]["vs_unfolded"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])
    assert "load average" in (tmp_path / "eval.md").read_text()


def test_eval_tables_are_written_as_rows_finish(tmp_path, monkeypatch):
    # the device check's time limit kills a stage (an inductor compile can be slow): what finished must be on disk
    ev = _bench("eval")
    real, calls = ev.time_variants, []

    def killed_at_the_second_size(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit(124)  # as `timeout` ends it: no handler of the script's runs
        return real(*a, **k)
    monkeypatch.setattr(ev, "time_variants", killed_at_the_second_size)
    with pytest.raises(SystemExit):
        ev.main(["--quick", "--sizes", "32x48,40x56", "--variants", "unfolded,folded", "--device", "cpu",
                 "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [(r["size"], r["variant"]) for r in rows] == [("32x48", "unfolded"), ("32x48", "folded")]
    assert "at end (not reached: the run was cut short)" in (tmp_path / "eval.md").read_text()


def test_eval_sizes_quick_and_its_break_even(tmp_path):
    out = run(["bench/eval_sizes.py", "--quick"], tmp_path)
    rows = json.loads((tmp_path / "eval_sizes.json").read_text())["rows"]
    assert [(r["benchmark"], r["widths"]) for r in rows] == [("off", "40-56"), ("on", "48-64")]  # disjoint sizes
    assert all(r["new_ms"] > 0 and r["repeat_ms"] > 0 for r in rows) and "VERDICT: new size on" in out
    verdict_line = _bench("eval_sizes").verdict_line
    # (new ms, repeat ms) with benchmark on, then off; cost(k) = new + (k - 1) repeat for a size seen k times
    assert verdict_line((900, 30), (60, 35)) == "benchmark on is faster from 169.0 images per size"
    assert verdict_line((50, 40), (60, 35)) == "benchmark on is faster up to 3.0 images per size"
    assert verdict_line((50, 30), (60, 35)) == "benchmark on is faster at any images per size"
    assert verdict_line((900, 40), (60, 35)) == "benchmark on is never faster"


# ---- bench/numerics.py: the check logic on made-up curves (each check can fail), then a tiny CPU run end to end

def _rec(mode, loss, skipped=None, miou=0.3, scale=None):
    n = len(loss)
    return dict(mode=mode, status="ok", seconds=1.0, amp="?", iteration=list(range(1, n + 1)), loss=loss,
                skipped=skipped or [0] * n, loss_scale=scale or [1.0] * n, mIoU=miou)


def test_numerics_checks():
    num = _bench("numerics")
    assert num.warmup_skips([1, 2, 3, 3, 3, 4]) == (3, 1) and num.warmup_skips([0, 0, 1]) == (0, 1)
    assert num.warmup_skips([1, 2]) == (2, 0)
    base = [5.0, 4.0, 3.0, 2.0]
    recs = [_rec("fp32", base),
            _rec("fp16", [5.01, 4.1, 3.1, 2.1], skipped=[1, 2, 2, 2]),  # 2 warm-up skips, tail +5%: passes
            _rec("apex-O1", [5.2, 4.0, 3.0, 2.0]),  # first loss +4% > 1%
            _rec("apex-O2", [5.0, 4.0, 3.0, 2.0], skipped=[1, 1, 2, 2]),  # a skip after the first clean step
            _rec("bf16", [5.05, 4.0, 3.0, 2.5], skipped=[0, 1, 1, 1]),  # tail +25% > 10%; a skip without a scale
            _rec("fp32-seed1", [6.0, 5.0, 4.0, 2.1])]  # yardstick: tail +5% -> band stays at the 10% floor
    band, spread = num.analyse(recs)
    assert spread == pytest.approx(0.05) and band == pytest.approx(0.10)
    checks = {r["mode"]: r["checks"] for r in recs}
    assert checks["fp32"] == [] and checks["fp16"] == [] and checks["fp32-seed1"] == []
    assert recs[1]["warmup_skips"] == 2 and recs[1]["skips_after"] == 0
    assert [c.split(" ")[:2] for c in checks["apex-O1"]] == [["first", "loss"]]
    assert checks["apex-O2"] == ["1 skipped after warm-up"]
    assert any(c.startswith("tail loss +25.0%") for c in checks["bf16"]) and \
        "1 skipped without a loss scale" in checks["bf16"]
    # a far yardstick widens the band to twice its spread: bf16's +25% then passes
    recs = [_rec("fp32", base), _rec("bf16", [5.0, 4.0, 3.0, 2.5]), _rec("fp32-seed1", [6.0, 5.0, 4.0, 2.3])]
    band, _ = num.analyse(recs)
    assert band == pytest.approx(0.30) and recs[1]["checks"] == []
    recs = [_rec("fp32", base), _rec("fp16", [5.0] * 4, skipped=[1, 2, 3, 4]), _rec("bf16", [5.0, math.nan, 1, 1])]
    num.analyse(recs)
    assert "no clean step at all" in recs[1]["checks"] and "non-finite loss" in recs[2]["checks"]
    # below fp32 fails as above it does; bf16's first-loss tolerance is 3%, the fp16 modes' 1%
    recs = [_rec("fp32", base), _rec("apex-O1", [4.8, 4.0, 3.0, 2.0]), _rec("bf16", [5.0, 4.0, 3.0, 1.5]),
            _rec("fp16", [5.0, 4.0, 3.0, 2.0], skipped=[0, 1, 2, 3])]  # only the first step clean
    num.analyse(recs)
    assert [c.split(" ")[:3] for c in recs[1]["checks"]] == [["first", "loss", "-4.00%"]]
    assert [c.split(" ")[:3] for c in recs[2]["checks"]] == [["tail", "loss", "-25.0%"]]
    assert recs[3]["checks"] == ["3 skipped after warm-up"]  # a clean first step is a clean step
    for first, ok in ((5.1, True), (5.2, False)):  # +2% / +4% against bf16's 3%
        recs = [_rec("fp32", base), _rec("bf16", [first, 4.0, 3.0, 2.0])]
        num.analyse(recs)
        assert (recs[1]["checks"] == []) is ok, recs[1]["checks"]


def test_numerics_plot_failed_modes(tmp_path):
    """On a card the picture is drawn whatever failed: no fp32 to compare with, or no fp16 mode finished."""
    num = _bench("numerics")
    failed = dict(_rec("fp32", []), status="failed")
    no_fp32 = [failed, _rec("fp16", [5.0, 4.0], scale=[65536.0] * 2)]
    no_fp16 = [_rec("fp32", [5.0, 4.0]), dict(failed, mode="apex-O2")]
    for recs in (no_fp32, no_fp16):
        num.plot(recs, 0.1, tmp_path / "n.png", "t")
        assert (tmp_path / "n.png").stat().st_size > 10000
        (tmp_path / "n.png").unlink()


def test_numerics_cpu_run(tmp_path):
    """The whole script on the CPU, tiny: fp32 and bf16 (CPU fp16 is a slow path), 2 iterations, crop 32."""
    out = run(["bench/numerics.py", "--device", "cpu", "--modes", "bf16,fp32", "--iters", "2", "--crop", "32",
               "--batch", "2", "--val_images", "1", "--num_workers", "0", "--work_dir", str(tmp_path / "runs")],
              tmp_path / "out")
    assert "VERDICT: 2/2 modes pass" in out
    recs = [json.loads(line) for line in (tmp_path / "out" / "numerics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "header" and recs[0]["torch"] == torch.__version__
    assert [r["mode"] for r in recs[1:]] == ["fp32", "bf16"]  # fp32 first, whatever the order asked
    args = _bench("numerics").parse_args(["--out", "x", "--device", "cpu", "--modes", "bf16,fp32-seed1,fp16,fp32"])
    order = args.modes
    assert order == ["fp32", "fp32-seed1", "bf16", "fp16"]  # then the yardstick: the band needs it
    for r in recs[1:]:
        assert r["status"] == "ok" and r["iteration"] == [1, 2] and r["checks"] == []
        assert 0 <= r["mIoU"] <= 1 and "amp=" in r["amp"]
    assert recs[2]["first_vs_fp32"] == pytest.approx(recs[2]["first_loss"] / recs[1]["first_loss"] - 1)
    md = (tmp_path / "out" / "numerics.md").read_text()
    assert "| fp32 | " in md and "| bf16 | " in md and "bfloat16" in md
    assert (tmp_path / "out" / "numerics.png").stat().st_size > 10000
    # --jobs: each mode a process of its own, both at once; the same runs, so the same numbers
    out = run(["bench/numerics.py", "--device", "cpu", "--modes", "bf16,fp32", "--iters", "2", "--crop", "32",
               "--batch", "2", "--val_images", "1", "--num_workers", "0", "--work_dir", str(tmp_path / "runs2"),
               "--jobs", "2"], tmp_path / "out2")
    assert "VERDICT: 2/2 modes pass" in out and "==== bf16 (its own process, exit 0)" in out
    again = [json.loads(line) for line in (tmp_path / "out2" / "numerics.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["loss"], r["mIoU"]) for r in again[1:]] == [(r["mode"], r["loss"], r["mIoU"])
                                                                       for r in recs[1:]]


def test_numerics_checks_tail_mean_mIoU_and_skips_by_hand():
    num = _bench("numerics")
    assert num.tail_mean([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]) == 1.5 and num.tail_mean([3.0]) == 3.0
    recs = [_rec("fp32", [5.0, 4.0, 3.0, 2.0]), _rec("bf16", [5.0, 4.0, 3.0, 2.0], skipped=[0, 1, 1, 1]),
            _rec("fp16", [5.0, 4.0, 3.0, 2.0], miou=math.nan), _rec("apex-O1", [], miou=None)]
    num.analyse(recs)
    assert recs[0]["tail_loss"] == 2.0 and "first_vs_fp32" not in recs[0]  # fp32 is not compared with itself
    assert recs[1]["checks"] == ["1 skipped without a loss scale"]  # said once, not again as a skip after warm-up
    assert recs[2]["checks"] == ["no finite mIoU"]
    assert recs[3]["checks"] == ["no training loss logged"]  # a run that logged nothing fails, and the rest still run
    recs = [_rec("fp32", [5.0, 4.0, 3.0, 2.0], miou=0.30), _rec("bf16", [5.0, 4.0, 3.0, 2.0], miou=0.25)]
    num.analyse(recs)
    assert recs[1]["miou_vs_fp32"] == pytest.approx(-0.05)  # below fp32's mIoU: negative


def test_numerics_markdown_by_hand():
    num = _bench("numerics")
    head = dict(model="pspnet", iters=4, seed=0, card="CPU: x", torch="t", commit="c", date="d", extension="e")
    recs = [_rec("fp32", [5.0, 4.0, 3.0, 2.0], miou=0.30),
            _rec("fp16", [5.01, 4.0, 3.0, 2.1], skipped=[1, 2, 2, 2], miou=0.25, scale=[32768.0, 16384.0, 512.0, 8.0]),
            _rec("bf16", [5.0, 4.0, 3.0, 2.5]), dict(mode="apex-O1", status="error: RuntimeError: boom")]
    band, spread = num.analyse(recs)
    lines = [line for line in num.markdown(head, recs, band, spread).splitlines() if line.startswith("|")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    body = {row[0]: row for row in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert all(len(row) == len(cols) for row in body.values())
    assert body["fp32"] == ["fp32", "5.0000", "-", "2.0000", "-", "0 / 0", "1", "30.00", "-", "1", "ok", "?"]
    assert body["fp16"] == ["fp16", "5.0100", "+0.20%", "2.1000", "+5.0%", "2 / 0", "8", "25.00", "-5.00", "1", "ok",
                            "?"]
    assert body["bf16"][cols.index("verdict")] == "FAIL: tail loss +25.0% of fp32 (band 10%)"
    assert body["apex-O1"][cols.index("verdict")] == "error: RuntimeError: boom" and body["apex-O1"][-1] == "-"


def test_numerics_main_judges_every_mode_and_exits_1_on_a_failed_check(tmp_path, monkeypatch, capsys):
    num = _bench("numerics")

    def fake_train_one(mode, args):
        if mode == "bf16":
            raise SystemExit("error: --crop_size 7: too small")  # a user error: one mode's failure, not the run's
        return _rec(mode, [5.0, 4.0, 3.0, 2.0], skipped=[0, 1, 1, 1] if mode == "fp16" else None)
    monkeypatch.setattr(num, "train_one", fake_train_one)
    with pytest.raises(SystemExit) as exit_:
        num.main(["--device", "cpu", "--modes", "fp32,fp16,bf16", "--work_dir", str(tmp_path / "runs"),
                  "--out", str(tmp_path)])
    assert exit_.value.code == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "VERDICT: 1/3 modes pass; failing: fp16, bf16"
    recs = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()[1:]]
    assert [(r["mode"], r["status"], r.get("checks")) for r in recs] == [
        ("fp32", "ok", []), ("fp16", "ok", ["1 skipped after warm-up"]),
        ("bf16", "error: SystemExit: error: --crop_size 7: too small", None)]
    monkeypatch.setattr(num, "train_one", lambda mode, args: _rec(mode, [5.0, 4.0, 3.0, 2.0]))
    # fp32 first, then its yardstick, whatever the order asked; and no run without fp32 to compare with
    assert num.parse_args(["--out", "x", "--device", "cpu", "--modes", "bf16,fp32-seed1,fp32"]).modes == [
        "fp32", "fp32-seed1", "bf16"]
    with pytest.raises(SystemExit):
        num.parse_args(["--out", "x", "--device", "cpu", "--modes", "bf16,fp16"])
    capsys.readouterr()
    num.main(["--device", "cpu", "--modes", "fp32,bf16", "--work_dir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "VERDICT: 2/2 modes pass"  # and no exit


def test_numerics_jobs_a_mode_whose_process_failed_is_an_error_row(tmp_path, monkeypatch):
    """--jobs: each mode's process (here a stub for this script) writes its record and exits 0; one that exits
    non-zero is that mode's error row with its last line, even when it had written its record first."""
    num = _bench("numerics")
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\n" + """import json, sys
mode, record = sys.argv[sys.argv.index("--one") + 1], sys.argv[sys.argv.index("--record") + 1]
if mode != "bf16":
    n = 4
    with open(record, "w") as f:
        json.dump(dict(mode=mode, status="ok", seconds=1.0, amp="?", iteration=list(range(1, n + 1)),
                       loss=[5.0, 4.0, 3.0, 2.0], skipped=[0] * n, loss_scale=[1.0] * n, mIoU=0.3), f)
if mode == "fp32":
    sys.exit(0)
print("Traceback (most recent call last):\\nRuntimeError: CUDA error: an illegal memory access\\n", flush=True)
sys.exit(1)
""")
    stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stub))
    args = num.parse_args(["--device", "cpu", "--modes", "fp32,fp16,bf16", "--jobs", "3", "--work_dir",
                           str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    head = dict(model="pspnet", iters=4, seed=0, card="CPU: x", torch="t", commit="c", date="d", extension="e")
    recs, md = num.train_all(args, [], head)
    assert [(r["mode"], r["status"]) for r in recs] == [
        ("fp32", "ok"), ("fp16", "error: exit 1: RuntimeError: CUDA error: an illegal memory access"),
        ("bf16", "error: exit 1: RuntimeError: CUDA error: an illegal memory access")]
    assert "| fp16 | " in md and "| fp32 | " in md


def test_numerics_train_one_reads_the_newest_run_and_its_first_amp_line(tmp_path, monkeypatch):
    num = _bench("numerics")
    from common import train as trainer
    args = num.parse_args(["--out", str(tmp_path / "out"), "--device", "cpu", "--seed", "3", "--work_dir",
                           str(tmp_path)])
    argv = dict(fp32=num.run_argv("fp32", args), seed1=num.run_argv("fp32-seed1", args))
    assert argv["fp32"][argv["fp32"].index("--seed") + 1] == "3"
    assert argv["seed1"][argv["seed1"].index("--seed") + 1] == "4"  # the yardstick: another seed

    def run_folder(name, losses):
        folder = tmp_path / "fp16" / name
        folder.mkdir(parents=True)
        with open(folder / "metrics.jsonl", "w") as f:
            for i, loss in enumerate(losses, 1):
                f.write(json.dumps(dict(kind="train", iteration=i, loss=loss, loss_scale=2.0 ** 16, skipped=0)) + "\n")
        (folder / "log.txt").write_text("x INFO amp: amp=torch float16, GradScaler\nx INFO kernels: fused\n"
                                        "x INFO amp: amp=torch (resumed)\n")
    run_folder("20261201_000000", [9.0, 9.0])  # an earlier visit's run of this mode

    def fake_main(cfg, build_model, argv, name):
        run_folder("20261206_000000", [5.0, 4.0])
        return {"mIoU": 0.5}
    monkeypatch.setattr(trainer, "main", fake_main)
    rec = num.train_one("fp16", args)
    assert (rec["loss"], rec["mIoU"], rec["amp"], rec["kernels"]) == (
        [5.0, 4.0], 0.5, "amp=torch float16, GradScaler", "fused")
    assert rec["run_dir"].endswith("20261206_000000")


# ---- bench/step_profile.py

def test_profile_kinds():
    prof = _bench("step_profile")
    names = {  # kernel names as CUDA profiles show them, and CPU operators
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "conv / GEMM",
        "void cudnn::bn_fw_tr_1C11_kernel_NCHW<__half, float, 512, true, 1>": "batch norm",
        "void segfp16::bn_apply_kernel<c10::Half, true>(...)": "ours (segfp16)",
        "void upsample_concat_fwd_kernel<c10::Half>": "ours (segfp16)",
        "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>": "copy / fill",
        "void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>": "elementwise",
        "Memcpy DtoD (Device -> Device)": "copy / fill", "aten::convolution_backward": "conv / GEMM",
        "Optimizer.step#SGD.step": "optimizer", "something new": "other"}
    assert {n: prof.kind_of(n) for n in names} == names


def test_profile_cpu(tmp_path):
    out = run(["bench/step_profile.py", "--device", "cpu", "--mode", "fp32", "--batch", "2", "--crop", "32",
               "--warmup", "1", "--steps", "1", "--top", "5", "--trace"], tmp_path)
    assert "VERDICT: CPU ms per step: torch" in out
    for kernels in ("torch", "fused"):  # --trace: one gzipped chrome trace per kernel set, nothing else left
        with gzip.open(tmp_path / f"trace-{kernels}.json.gz") as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert any(str(n).startswith("segfp16::") for n in names) == (kernels == "fused")
    assert not list(tmp_path.glob("trace-*.json"))
    res = json.loads((tmp_path / "profile.json").read_text())
    assert [r["kernels"] for r in res["results"]] == ["torch", "fused"]
    for r in res["results"]:
        assert sum(q["share"] for q in r["rows"]) == pytest.approx(1.0)
        assert sum(r["kinds"].values()) == pytest.approx(r["total_ms"]) and r["total_ms"] > 0
        assert any(q["name"].startswith("aten::convolution") for q in r["rows"][:5])  # convs dominate a step
    fused = {q["name"] for q in res["results"][1]["rows"]}
    assert any(n.startswith("segfp16::") for n in fused)  # the fused set really ran our ops
    md = (tmp_path / "profile.md").read_text()
    assert "## kernels torch" in md and "## kernels fused" in md and "Time per kind of work" in md
    assert md.count("| 5 | ") == 2  # --top 5: five rows in each set's table


def test_profile_numbers_are_per_step(monkeypatch):
    """--steps 3: calls, ms, launches and step ms are per step, the kinds add up to the total, the shares to 1."""
    prof = _bench("step_profile")
    a = torch.randn(64, 64)
    monkeypatch.setattr(prof.bench_train, "construct", lambda name: None)
    monkeypatch.setattr(prof.bench_train, "build_ours", lambda *a_: (lambda images, labels: torch.mm(a, a), None, "-"))
    clock = iter([10.0, 10.3])  # the profiled steps' wall time: 0.3 s for 3 steps
    monkeypatch.setattr(prof, "time", type("clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    args = prof.parse_args(["--device", "cpu", "--batch", "1", "--crop", "8", "--warmup", "1", "--steps", "3",
                            "--out", "unused"])
    r = prof.profile_one("torch", args, torch.device("cpu"))
    assert r["step_ms"] == pytest.approx(100.0)
    mm = [q for q in r["rows"] if q["name"] == "aten::mm"]
    assert len(mm) == 1 and mm[0]["calls"] == 1.0 and mm[0]["kind"] == "conv / GEMM"
    assert r["launches"] == pytest.approx(sum(q["calls"] for q in r["rows"]))
    assert sum(r["kinds"].values()) == pytest.approx(r["total_ms"]) and r["total_ms"] > 0
    assert sum(q["share"] for q in r["rows"]) == pytest.approx(1.0)
    assert [q["ms"] for q in r["rows"]] == sorted((q["ms"] for q in r["rows"]), reverse=True)


def test_profile_step_ms_leaves_out_the_profilers_start_and_stop(monkeypatch):
    """step ms is the profiled steps' wall time: the profiler's start (on a card CUPTI's set-up, paid by the first
    kernel set only) and its stop (collecting the trace) would otherwise add seconds to a few steps' time."""
    import torch.profiler
    prof = _bench("step_profile")
    now = [0.0]
    a = torch.randn(8, 8)

    def step(images, labels):
        now[0] += 0.1  # each step: 100 ms
        return torch.mm(a, a)

    class SlowStartStop(torch.profiler.profile):
        def __enter__(self):
            now[0] += 5.0
            return super().__enter__()

        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            now[0] += 5.0
            return out
    monkeypatch.setattr(torch.profiler, "profile", SlowStartStop)
    monkeypatch.setattr(prof.bench_train, "construct", lambda name: None)
    monkeypatch.setattr(prof.bench_train, "build_ours", lambda *a_: (step, None, "-"))
    monkeypatch.setattr(prof, "time", type("clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    args = prof.parse_args(["--device", "cpu", "--batch", "1", "--crop", "8", "--warmup", "1", "--steps", "3",
                            "--out", "unused"])
    assert prof.profile_one("torch", args, torch.device("cpu"))["step_ms"] == pytest.approx(100.0)


def test_profile_a_failing_kernel_set_is_shown_and_exits_non_zero(tmp_path, monkeypatch):
    prof = _bench("step_profile")

    def fake_profile_one(kernels, args, device):
        if kernels == "fused":
            raise ValueError("the fused kernels are not built")
        return dict(kernels=kernels, amp="amp=none", step_ms=10.0, total_ms=8.0, launches=5.0, kinds={
            "conv / GEMM": 6.0, "other": 2.0}, rows=[dict(name="aten::convolution", kind="conv / GEMM", calls=4.0,
                                                           ms=6.0, share=0.75)])
    monkeypatch.setattr(prof, "profile_one", fake_profile_one)
    with pytest.raises(SystemExit, match="kernel set.s. failed: fused"):
        prof.main(["--device", "cpu", "--out", str(tmp_path)])
    md = (tmp_path / "profile.md").read_text()
    assert "| torch | 10.0 | 8.0 | 5 | amp=none |" in md and "| conv / GEMM | 6.00 (75%) |" in md
    assert "## kernels fused\n\nfailed: ValueError: the fused kernels are not built" in md
    assert [r["kernels"] for r in json.loads((tmp_path / "profile.json").read_text())["results"]] == ["torch", "fused"]


# ---- bench/kernels.py: a failing row or section is logged and shown, the rest still runs, the exit is non-zero

def test_kernels_survive_failures(tmp_path, monkeypatch, capsys):
    kern = _bench("kernels")
    real_row = kern._bn_row

    def flaky_row(device, batch, C, *rest):
        if C == 24:  # the second quick shape
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_row(device, batch, C, *rest)

    def broken_section(args, device):
        raise ValueError("this section cannot start")
    monkeypatch.setattr(kern, "_bn_row", flaky_row)
    monkeypatch.setitem(kern.SECTIONS, "broken", broken_section)
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--quick", "--device", "cpu", "--only", "broken,bn_relu",
                                      "--out", str(tmp_path)])
    monkeypatch.setenv("DEVICE_CHECK_COMMIT", "abc1234")  # the device check's copy has no .git
    with pytest.raises(SystemExit) as exit_:
        kern.main()
    assert exit_.value.code == 1
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert rows["broken"] == [] and [("error" in r) for r in rows["bn_relu"]] == [False, True, False]
    assert rows["bn_relu"][2]["fused_fb_ms"] > 0  # the shape after the failing one was still measured
    assert rows["head"]["commit"] == "abc1234" and rows["head"]["card"].startswith("CPU")
    md = (tmp_path / "kernels.md").read_text()
    assert md.startswith("# bench/kernels.py: card CPU") and "| commit abc1234 |" in md
    assert "### broken: error: ValueError: this section cannot start" in md
    assert "error: RuntimeError: CUDA error: an illegal memory access" in md and "Slowest row" in md
    out = capsys.readouterr()
    assert "2 row(s) or section(s) failed" in out.out and "Traceback" in out.err


def test_eval_folded_plain_turns_only_the_cudnn_epilogue_off_for_its_own_calls(monkeypatch):
    # beside `folded` under --kernels fused, `folded_plain` must time the same copy with the plain epilogue: the
    # cuDNN call kept on ATen during its calls only (the variants' repetitions interleave), every other op as it was
    ev = _bench("eval")
    from common import fold, layers
    seen = []
    real = fold.folded_conv

    def spy(*a, **k):
        seen.append((layers.fused("cudnn_conv_relu"), layers.fused("bn_act")))
        return real(*a, **k)
    monkeypatch.setattr(fold, "folded_conv", spy)
    monkeypatch.setattr(layers, "KERNELS", "fused")  # no set_kernels(): on a CPU the folded copy runs no fused op
    monkeypatch.setattr(layers, "KEEP_ATEN", frozenset({"upsample_ce"}))
    fns = ev.build_variants(ev.construct("fcn"), ["folded", "folded_plain"], torch.float32, torch.contiguous_format,
                            torch.device("cpu"), "default", log=print)
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        a = fns["folded"](x)
        n = len(seen)
        b = fns["folded_plain"](x)
    assert n > 0 and set(seen[:n]) == {(True, True)} and set(seen[n:]) == {(False, True)}
    assert layers.KEEP_ATEN == frozenset({"upsample_ce"})  # put back after the call
    torch.testing.assert_close(a, b)  # on a CPU both are the plain form


def test_eval_survives_a_failing_row(tmp_path, monkeypatch):
    ev = _bench("eval")  # (it puts bench/ on sys.path itself: it imports bench/train.py as `train`)
    real = ev.time_variants

    def flaky(fns, x, *rest):
        if x.shape[-1] == 48:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
        return real(fns, x, *rest)
    monkeypatch.setattr(ev, "time_variants", flaky)
    with pytest.raises(SystemExit, match="1 row"):
        ev.main(["--quick", "--device", "cpu", "--variants", "unfolded", "--sizes", "32x48,32x32", "--out",
                 str(tmp_path)])
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [(r["size"], "error" in r) for r in rows] == [("32x48", True), ("32x32", False)]
    assert "error: RuntimeError: cuDNN error" in (tmp_path / "eval.md").read_text()
