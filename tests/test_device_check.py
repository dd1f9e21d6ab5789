"""tools/device_check.sh: the sum of limits its summary states, and (every stage a stub) its summary rows, exit status,
budget, stage selection and the files it leaves; tools/check_env.py, its first two stages."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run only when the prebuilt extension fails (build) or with DEVICE_CHECK_COMPILE_TESTS (the compile rows and tests)
NOT_IN_A_PLAIN_RUN = {"build", "extension_after_build", "bench_train_compile", "pytest_compile"}


def test_the_stated_limit_sum_is_the_limits_sum():
    with open(os.path.join(ROOT, "tools", "device_check.sh")) as f:
        text = f.read()
    limits = {}
    for name, limit in re.findall(r"^\s*stage (\w+) (\d+) ", text, re.M):
        assert limits.setdefault(name, int(limit)) == int(limit), f"{name}: the CPU and CUDA forms differ"
    smoke = re.findall(r"^limit=\$\(fit (\d+)\)", text, re.M)  # the eight smoke runs share one limit
    assert len(smoke) == 1
    total = sum(v for k, v in limits.items() if k not in NOT_IN_A_PLAIN_RUN) + int(smoke[0])
    stated = re.search(r"^LIMITS_SUM=(\d+)", text, re.M)
    assert stated and int(stated.group(1)) == total
    budget = re.search(r"DEVICE_CHECK_BUDGET:-(\d+)", text)
    assert int(budget.group(1)) <= 570  # the device tool's 600 s per command, less packing and transfer
    assert {"pytest_cuda", "numerics", "bench_train", "profile", "bench_kernels_conv"} <= set(limits)


# ---- the script itself, every stage's command replaced by a stub (PY=the stub): what the summary, the exit status,
# OUT and the archive say about stages that pass, fail, time out or are skipped, in a second or two per run

STUB = r'''
import json, os, sys
args = sys.argv[1:]
if args[0] == "-c":  # the CUDA probe, the demo data
    sys.exit((0 if os.environ.get("FAKE_CUDA") == "1" else 1) if "is_available" in args[1] else 0)
if args[0] == "-":  # the header's versions
    sys.stdin.read()
    print("python 3, torch stub  ")
    sys.exit(0)
if args[0] == "-m" and args[1] == "torch.distributed.run":
    script = [a for a in args if a.endswith(".py")][0][:-3]
    amp = args[args.index("--amp") + 1]
    key = f"smoke_{script}_{amp}"
elif args[0] == "-m":
    key = args[1]
else:
    key = os.path.basename(args[0])[:-3]
    key = args[1] if key == "check_env" else key
with open(f"/proc/{os.getppid()}/cmdline") as f:
    parent = f.read().split("\0")
archive = os.path.join(os.environ["FAKE_OUT"], "logs.tar.gz")
members = []
if os.path.exists(archive):
    import tarfile
    with tarfile.open(archive) as t:
        members = t.getnames()
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(dict(key=key, parent=parent, archive=members)) + "\n")
spec = json.loads(os.environ.get("FAKE_SPEC", "{}")).get(key, {})
if "--out" in args:
    out = args[args.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    stem = {"step_profile": "profile", "setup": "build"}.get(key, key)
    for ext in ("md", "json") + (("png", "jsonl") if key == "numerics" else ()):
        with open(os.path.join(out, f"{stem}.{ext}"), "w") as f:
            f.write(key)
if key.startswith("smoke_"):
    print(f"2026-12-06 INFO amp: amp={'apex O1' if key.endswith('apex') else 'torch'} float16")
    print("done in 1.0 s, mIoU 1.00")
print(spec.get("out", f"VERDICT: {key} fine"))
sys.exit(spec.get("rc", 0))
'''


def device_check(tmp_path, spec=None, **env):
    """tools/device_check.sh with PY=a stub: (exit status, summary rows {name: (exit, verdict)} in order, summary.md,
    the stub's calls {key: (its parent's argv, the archive's members then)}, OUT's files, the archive's members)."""
    stub = tmp_path / "py"
    stub.write_text(f"#!{sys.executable}\n" + STUB)
    stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    run_env = dict(os.environ, PY=str(stub), DEVICE_CHECK_WORK=str(work), DEVICE_CHECK_COMMIT="abc1234",
                   FAKE_OUT=str(out), FAKE_CALLS=str(tmp_path / "calls.jsonl"), FAKE_SPEC=json.dumps(spec or {}))
    for k in ("DEVICE_CHECK_STAGES", "DEVICE_CHECK_BUDGET", "DEVICE_CHECK_LIMIT_SCALE", "DEVICE_CHECK_COMPILE_TESTS"):
        run_env.pop(k, None)
    run_env.update(env)
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "device_check.sh"), str(out)], env=run_env,
                       capture_output=True, text=True, timeout=120)
    summary = (out / "summary.md").read_text()
    rows = {}
    for line in summary.splitlines()[summary.splitlines().index("|---|---|---|---|") + 1:]:
        if line.startswith("| "):
            name, code, _, verdict = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[name] = (code, verdict)
    calls = {}
    if (tmp_path / "calls.jsonl").exists():
        for line in (tmp_path / "calls.jsonl").read_text().splitlines():
            c = json.loads(line)
            calls[c["key"]] = (c["parent"], c["archive"])
    with tarfile.open(out / "logs.tar.gz") as t:
        members = set(t.getnames())
    return r.returncode, rows, summary, calls, {p.name for p in out.iterdir()}, members


def limit_of(call):
    """The time limit `timeout` was given for a stubbed command (its parent's argv), None when not under timeout."""
    parent = call[0]
    return int(parent[2]) if os.path.basename(parent[0]) == "timeout" and parent[1] == "--kill-after=5" else None


def test_a_passing_dry_run_its_rows_files_and_archive(tmp_path):
    (tmp_path / "work" / "logs").mkdir(parents=True)
    (tmp_path / "work" / "logs" / "stale.log").write_text("a previous visit's")
    rc, rows, summary, calls, files, members = device_check(tmp_path)
    assert rc == 0, summary  # skips are not failures
    assert list(rows) == ["modules", "extension", "pytest_cuda", "pytest_cuda_fold", "smoke_fcn_apex",
                          "smoke_fcn_torch", "smoke_pspnet", "smoke_deeplabv3", "smoke_deeplabv3plus", "numerics",
                          "bench_train", "profile", "bench_kernels", "sanitizer_memcheck", "sanitizer_racecheck",
                          "bench_eval", "bench_eval_sizes", "bench_kernels_conv", "bench_eval_compiled"]
    assert rows["modules"] == ("0", "modules fine") and rows["numerics"] == ("0", "numerics fine")
    assert rows["pytest_cuda"][0] == "skip" and rows["sanitizer_memcheck"][0] == "skip"
    assert rows["smoke_fcn_torch"] == ("0", "amp=torch, done in 1.0 s, mIoU 1.00")
    assert rows["smoke_fcn_apex"] == ("0", "amp=apex O1, done in 1.0 s, mIoU 1.00")
    # no card: every limit x3, and so the budget (540 x 3)
    assert "run budget 1620 s" in summary
    assert (limit_of(calls["modules"]), limit_of(calls["numerics"]), limit_of(calls["smoke_fcn_apex"]),
            limit_of(calls["train"])) == (45, 300, 225, 300)
    assert files == {"summary.md", "train.md", "numerics.md", "numerics.png", "profile.md", "logs.tar.gz"}
    assert {"logs/" + name + ".log" for name in rows} <= members
    assert {"logs/summary.md", "logs/numerics/numerics.md", "logs/numerics/numerics.jsonl", "logs/train/train.json",
            "logs/profile/profile.json"} <= members and "logs/stale.log" not in members
    # re-packed after each stage: what the numerics stage logged is in the archive before the next stage starts
    assert "logs/numerics.log" in calls["train"][1] and "logs/train.log" not in calls["train"][1]


def test_an_out_dir_holding_a_run_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.md").write_text("a previous run's table")
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "device_check.sh"), str(out)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PY="/nonexistent/python"))
    assert r.returncode == 2 and r.stderr == f"device_check: {out} already holds a run's train.md; give a new or " \
                                             "empty OUT_DIR\n"
    assert [p.name for p in out.iterdir()] == ["train.md"] and (out / "train.md").read_text() == "a previous run's table"


def test_failed_and_timed_out_stages_and_the_exit_status(tmp_path):
    spec = {"numerics": dict(rc=1, out="VERDICT: first\nVERDICT: 4/6 modes pass; failing: fp16 | bf16"),
            "train": dict(rc=124, out="VERDICT: 3/5 rows ok"), "step_profile": dict(rc=137, out="profiling"),
            "smoke_fcn_apex": dict(rc=2, out="Traceback\nValueError: bad\n\n"), "kernels": dict(rc=3, out="x")}
    rc, rows, summary, calls, files, _ = device_check(tmp_path, spec, DEVICE_CHECK_STAGES="num,bench_tr,prof,smoke")
    assert rc == 1
    assert list(rows) == ["smoke_fcn_apex", "smoke_fcn_torch", "smoke_pspnet", "smoke_deeplabv3",
                          "smoke_deeplabv3plus", "numerics", "bench_train", "profile"]
    assert rows["numerics"] == ("1", "FAILED: 4/6 modes pass; failing: fp16 / bf16")
    assert rows["bench_train"] == ("124", "TIMED OUT after 300 s; last: 3/5 rows ok")
    assert rows["profile"] == ("137", "TIMED OUT after 150 s; last: profiling")
    assert rows["smoke_fcn_apex"] == ("2", "FAILED: ValueError: bad")
    assert rows["smoke_fcn_torch"][0] == "0" and "only: num,bench_tr,prof,smoke" in summary
    # a time-out alone is a failure too
    (tmp_path / "b").mkdir()
    rc, rows, _, _, _, _ = device_check(tmp_path / "b", spec, DEVICE_CHECK_STAGES="bench_train")
    assert rc == 1 and list(rows) == ["bench_train"] and rows["bench_train"][0] == "124"


def test_the_run_budget_cuts_the_limits_then_skips(tmp_path):
    # 20 s x3 = 60 s: 55 s left, less the seconds already gone
    rc, rows, summary, calls, _, _ = device_check(tmp_path, DEVICE_CHECK_BUDGET="20",
                                                  DEVICE_CHECK_STAGES="modules,numerics,smoke")
    assert rc == 0 and "run budget 60 s" in summary
    assert limit_of(calls["modules"]) == 45 and 50 <= limit_of(calls["numerics"]) <= 55
    assert 50 <= limit_of(calls["smoke_fcn_torch"]) <= 55
    # 14 s with no stretch: 9 s left, under the 10 s a stage needs: every stage is skipped, none is run
    (tmp_path / "b").mkdir()
    rc, rows, _, calls, _, _ = device_check(tmp_path / "b", DEVICE_CHECK_BUDGET="14", DEVICE_CHECK_LIMIT_SCALE="1",
                                            DEVICE_CHECK_STAGES="modules,numerics,smoke")
    assert rc == 0 and calls == {}
    for name in ("modules", "smoke", "numerics"):
        assert rows[name] == ("skip", "SKIP: out of the run budget (14 s)")


def test_device_check_stages_match_names_by_prefix(tmp_path):
    rc, rows, _, calls, _, _ = device_check(tmp_path, DEVICE_CHECK_STAGES="num,train,bench_eval_s")
    assert rc == 0 and list(rows) == ["numerics", "bench_eval_sizes"]  # "train" is no prefix of bench_train
    assert set(calls) == {"numerics", "eval_sizes"}


def test_on_a_card_the_extension_is_built_only_when_its_launch_failed(tmp_path):
    ran = "VERDICT: cpu,cuda build, sm_90; a fused bn_relu launch ran"
    rc, rows, summary, calls, _, _ = device_check(tmp_path, {"extension": dict(out=ran)}, FAKE_CUDA="1",
                                                  DEVICE_CHECK_STAGES="ext,build")
    assert rc == 0 and list(rows) == ["extension"] and "x1; run budget 540 s" in summary
    assert limit_of(calls["extension"]) == 15  # a card: the limits as written
    (tmp_path / "b").mkdir()
    rc, rows, _, calls, _, _ = device_check(tmp_path / "b", {"extension": dict(rc=3, out="VERDICT: no CUDA kernels")},
                                            FAKE_CUDA="1", DEVICE_CHECK_STAGES="ext,build")
    assert rc == 1 and list(rows) == ["extension", "build", "extension_after_build"]
    assert limit_of(calls["setup"]) == 120
    (tmp_path / "c").mkdir()  # it ran, with wrong values: a kernel defect that a rebuild would not change
    wrong = "VERDICT: cpu,cuda build, sm_90; a fused bn_relu launch gave wrong values"
    rc, rows, _, calls, _, _ = device_check(tmp_path / "c", {"extension": dict(rc=3, out=wrong)}, FAKE_CUDA="1",
                                            DEVICE_CHECK_STAGES="ext,build")
    assert rc == 1 and list(rows) == ["extension"] and "setup" not in calls


# ---- tools/check_env.py, the first two stages: what counts as missing, what fails the stage

def _check_env():
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_env", os.path.join(ROOT, "tools", "check_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_env_modules_fails_only_on_a_missing_required_module(monkeypatch, capsys):
    import types
    env = _check_env()
    real = env.importlib.import_module
    broken = set()

    def import_module(name):
        if name in broken:
            raise OSError(f"{name}: a broken install")  # not only ImportError: any failure at import
        return real(name)
    monkeypatch.setattr(env, "importlib", types.SimpleNamespace(import_module=import_module))  # its own name only
    monkeypatch.setattr(env, "find_tool", lambda name: None)  # no nvidia-smi, nvcc, compute-sanitizer
    broken.update({"ninja"})  # an optional module and the tools: reported, not fatal
    assert env.modules() == 0
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict == "VERDICT: missing: ninja, nvidia-smi, nvcc, compute-sanitizer"
    broken.update({"matplotlib"})
    assert env.modules() == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("VERDICT: missing: matplotlib, ninja, nvidia-smi")


def test_check_env_extension_exit_3_asks_for_a_build(monkeypatch, capsys):
    import torch

    import common
    env = _check_env()
    monkeypatch.setattr(common, "extension_loaded", lambda: False)
    assert env.extension() == 3 and "does not import" in capsys.readouterr().out
    monkeypatch.undo()
    if not common.extension_loaded():
        pytest.skip("the extension is not built here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a card, and a build without CUDA kernels
    monkeypatch.setattr(torch.ops.segfp16, "build_info", lambda: "cpu")
    assert env.extension() == 3
    assert capsys.readouterr().out.splitlines()[-1] == (
        "VERDICT: the extension has no CUDA kernels (cpu); a CUDA device is here")
