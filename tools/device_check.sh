#!/usr/bin/env bash
# The one script for a visit to a GPU machine (a card, torch, no internet), stages in the order of what we most need
# to know:
#   bash tools/device_check.sh OUT_DIR
#    0 modules      every module / tool the stages use (tools/check_env.py): what is missing, never fatal
#    1 extension    import the prebuilt common/_C*.so (tools/build_for_device.sh makes it), build_info, one launch;
#                   only if that fails: build here (as tools/build_for_device.sh: setup.py build_ext --inplace,
#                   FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0), then check again
#    2 pytest_cuda  every GPU test (pytest_cuda_fold: cuDNN's fused epilogue on every unit of the four models)
#    3 smoke_*      1-GPU torchrun runs of the four scripts x --amp torch / apex on the demo data (all 8 at once)
#    4 numerics     PSPNet fp32 / fp16 / apex O1 / apex O2 / bf16 (+ fp32 seed 1), 200 iterations each, all six at
#                   once (bench/numerics.py --jobs 6): loss curves side by side, band, skipped steps, mIoU
#    5 bench_train  batch 16 at 512x512: ours fp16 fused / torch x NCHW (the trainer's default) / channels_last,
#                   our fp32 base (the reference's setting), the torchvision peer (img/s, memory, MFU)
#    6 profile      torch.profiler of fp16 PSPNet steps, torch vs fused kernels (bench/step_profile.py)
#    7 bench_kernels (our ops), 8 sanitizer_memcheck / racecheck (our kernels only), 9 bench_eval (unfolded, folded
#      with and without cuDNN's conv+ReLU call),
#      bench_eval_sizes (cudnn.benchmark on / off at new image sizes), bench_kernels_conv (PSPNet's convolutions),
#      bench_eval_compiled (an inductor compile: last)
#    DEVICE_CHECK_COMPILE_TESTS=1 adds the compiled training rows (bench_train_compile) and the compile tests: cold
#      inductor compiles of whole training steps take minutes, more than one visit's budget leaves them
# Every stage runs under `timeout`; a failing stage never stops the next. Each limit leaves room for what only a card
# costs (cudnn.benchmark searches, cuDNN fused-plan builds), so the limits add up to more than the run may take
# (LIMITS_SUM below, + 135 s only when the extension has to be built and checked again here): the run is held to
# DEVICE_CHECK_BUDGET seconds (default 540, under the device tool's 600 s per command), a stage that no longer fits
# gets the time that is left, or is skipped, so the stages at the end (the least needed) are the ones that give way.
#
# What comes back from the card is at most 8 files, so OUT_DIR holds only: summary.md (header + one line per stage,
# also printed last), train.md, numerics.md, numerics.png, profile.md, and logs.tar.gz (every stage's log and table,
# re-packed after each stage, so a run cut short keeps what finished). Caches (the demo dataset) and work folders
# live under DEVICE_CHECK_WORK (default /tmp/device_check), never in OUT_DIR.
#
# Without a CUDA device (our CPU box) this is a dry run: each stage runs a CPU-sized form where it has one (tiny
# numerics / profile / benches, two CPU smoke runs; limits and budget x3), and the CUDA-only ones record why they skip.
# DEVICE_CHECK_STAGES=numerics,smoke,bench_train (names or prefixes) runs only those stages: a rerun of what failed.
# Exit status: 1 when a stage failed (skips are not failures), else 0.
set -u
OUT=${1:?usage: tools/device_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# a run never overwrites another's files, and a stale train.md beside a new summary would mislead
for f in summary.md train.md numerics.md numerics.png profile.md logs.tar.gz; do
  if [ -e "$OUT/$f" ]; then
    echo "device_check: $OUT already holds a run's $f; give a new or empty OUT_DIR" >&2
    exit 2
  fi
done
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${DEVICE_CHECK_WORK:-/tmp/device_check}
LOGS=$WORK/logs
BUDGET=${DEVICE_CHECK_BUDGET:-540}
rm -rf "$LOGS" "$WORK/runs"  # this script's own folders: logs and run folders of a previous visit go
mkdir -p "$LOGS" "$WORK/runs"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SEG_DATA_CACHE=$WORK/cache  # the demo dataset, generated once, kept between visits of a warm machine
T_START=$(date +%s)
# the dry run (no CUDA) times nothing: its limits and budget stretch (x3 by default), so that a loaded CPU box shows
# whether each stage starts and ends, not whether it is fast
SCALE=${DEVICE_CHECK_LIMIT_SCALE:-1}
LIMITS_SUM=700  # the stage limits below, added up (a test checks it)
SUMMARY=$OUT/summary.md
FAILED=0

# the commit: DEVICE_CHECK_COMMIT when the tree came without its .git, else git's (+dirty: uncommitted changes)
COMMIT=${DEVICE_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -z "${DEVICE_CHECK_COMMIT:-}" ] && [ "$COMMIT" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then
  COMMIT=$COMMIT+dirty
fi
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then CUDA=1; else CUDA=0; fi
[ $CUDA = 0 ] && SCALE=${DEVICE_CHECK_LIMIT_SCALE:-3}
BUDGET=$(( BUDGET * SCALE ))
{
  echo "# device check $(date -u +'%Y-%m-%d %H:%M UTC'), commit $COMMIT"
  echo
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
      | sed 's/^/card, memory, driver: /; s/$/  /'
  else
    echo "card, memory, driver: unknown (no nvidia-smi)  "
  fi
  $PY - <<'EOF' 2>&1
import sys, torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, device: {dev}  ")
EOF
  [ $CUDA = 1 ] || echo "no CUDA device: a dry run (CPU-sized stages; the CUDA-only ones say why they skip)  "
  echo -n "stage limits sum to ${LIMITS_SUM} s (+135 s for a build and its re-check here), x${SCALE}; run budget ${BUDGET} s"
  echo "${DEVICE_CHECK_STAGES:+; only: $DEVICE_CHECK_STAGES}"
  echo
  echo "| stage | exit | seconds | verdict |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

pack() {  # every log and table so far -> OUT/logs.tar.gz (small: no caches, no run folders, no checkpoints)
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

verdict() {  # verdict RC LOG LIMIT: one line for the summary
  local rc=$1 log=$2 limit=$3 line
  line=$(grep -E '^(VERDICT|SKIP): ' "$log" | tail -n 1)
  [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
  line=${line#VERDICT: }
  case $rc in
    124|137) line="TIMED OUT after ${limit} s; last: $line" ;;
    0) ;;
    *) line="FAILED: $line" ;;
  esac
  echo "$line" | cut -c1-220 | tr '|' '/'
}

record() {  # record NAME RC SECONDS LIMIT: a summary row (and the console)
  local name=$1 rc=$2 secs=$3 limit=$4 log=$LOGS/$1.log v shown
  v=$(verdict "$rc" "$log" "$limit")
  shown=$rc
  case $v in SKIP:*) shown=skip ;; esac
  [ "$rc" = 0 ] || FAILED=1
  echo "| $name | $shown | $secs | $v |" >> "$SUMMARY"
  echo "== $name: exit $shown, ${secs} s: $v"
}

fit() {  # fit LIMIT: the limit (x SCALE) cut to what is left of the budget (0: nothing left)
  local want=$(( $1 * SCALE )) left=$(( BUDGET - ($(date +%s) - T_START) - 5 ))
  [ "$left" -lt 10 ] && left=0
  echo $(( want < left ? want : left ))
}

selected() {  # selected NAME: is NAME (or a prefix of it) in DEVICE_CHECK_STAGES (all when unset)?
  [ -z "${DEVICE_CHECK_STAGES:-}" ] && return 0
  local s
  for s in ${DEVICE_CHECK_STAGES//,/ }; do [[ $1 == "$s"* ]] && return 0; done
  return 1
}

stage() {  # stage NAME LIMIT CMD...: run CMD under a time limit, log to LOGS/NAME.log, record a summary row
  selected "$1" || return 0
  local name=$1 limit; limit=$(fit "$2"); shift 2
  local t0; t0=$(date +%s)
  if [ "$limit" = 0 ]; then
    echo "SKIP: out of the run budget (${BUDGET} s)" > "$LOGS/$name.log"
  else
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  fi
  record "$name" $? $(( $(date +%s) - t0 )) "$limit"
  pack
}

skip() {  # skip NAME WHY: a stage that cannot run here
  selected "$1" || return 0
  echo "SKIP: $2" > "$LOGS/$1.log"
  record "$1" 0 0 0
}

keep() {  # keep FILE...: copy a wanted table out of the archive too, as a file of its own
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  return 0
}

NO_CUDA="no CUDA device (torch.cuda.is_available() is False)"

# ---- 0, 1: the machine, the extension (build only when the prebuilt one cannot run here)
stage modules 15 $PY tools/check_env.py modules
stage extension 15 $PY tools/check_env.py extension
# (a launch that ran but gave wrong values is a kernel defect: the same sources built again would give it again)
if [ $CUDA = 1 ] && [ -f "$LOGS/extension.log" ] && ! grep -q '^VERDICT: .*launch \(ran\|gave wrong values\)' \
    "$LOGS/extension.log"; then
  # as tools/build_for_device.sh builds: in place (no pip, which an externally managed Python refuses), and CUDA or
  # nothing (FORCE_CUDA=1: a CPU-only build would spend the minutes and leave every fused CUDA stage without kernels)
  stage build 120 env FORCE_CUDA=1 $PY setup.py build_ext --inplace
  stage extension_after_build 15 $PY tools/check_env.py extension
fi

# ---- 2: every GPU test
if [ $CUDA = 1 ]; then
  # the slowest tests named; a hung one prints its stack before the stage's limit ends it. The fused-epilogue test
  # of every model unit gets a stage of its own: cuDNN may build (even compile) a plan per unit configuration, and
  # that must not starve the tests after it
  FOLD_ALL=tests/test_fold.py::test_every_unit_of_each_model_takes_cudnns_fused_call
  # -v: a run cut short still names every test that ended
  stage pytest_cuda 75 $PY -m pytest -v -p no:cacheprovider -m cuda --durations=15 -o faulthandler_timeout=60 \
    --deselect "$FOLD_ALL" tests
  stage pytest_cuda_fold 60 $PY -m pytest -v -p no:cacheprovider -m cuda --durations=5 "$FOLD_ALL"
else  # collection only: proves the selection the card would run
  stage pytest_cuda 75 sh -c '"$0" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests > "$2" &&
    cat "$2" && echo "SKIP: $1; collected only: $(tail -n 1 "$2")"' "$PY" "$NO_CUDA" "$WORK/collect.txt"
  skip pytest_cuda_fold "$NO_CUDA (collected above)"
fi

# ---- 3: 1-GPU torchrun smoke runs, all eight at once (a GPU has room; one limit for the lot)
smoke() {  # smoke SCRIPT AMP LIMIT [FLAGS...] in the background; its exit code and seconds go to LOGS/NAME.rc
  local name="smoke_${1}_$2" script=$1 amp=$2 limit=$3; shift 3
  ( t0=$(date +%s)
    timeout --kill-after=5 "$limit" $PY -m torch.distributed.run --standalone --nproc_per_node 1 "$script.py" \
      --data demo --amp "$amp" --work_dir "$WORK/runs/$name" "$@" > "$LOGS/$name.log" 2>&1
    echo "$? $(( $(date +%s) - t0 ))" > "$LOGS/$name.rc" ) &
}
# the demo dataset once here, not by eight runs at once
selected smoke && timeout 60 $PY -c "from common import data; print(data.demo_root())" > "$LOGS/demo_data.log" 2>&1
# 75 s: eight processes start CUDA at once, and cudnn.benchmark tunes every new shape (each val image has its own,
# and each folded unit's fused call builds a plan per shape)
limit=$(fit 75)
if ! selected smoke; then
  :
elif [ "$limit" = 0 ]; then
  skip smoke "out of the run budget (${BUDGET} s)"
elif [ $CUDA = 1 ]; then
  for script in fcn pspnet deeplabv3 deeplabv3plus; do
    for amp in torch apex; do smoke $script $amp "$limit" --device cuda --max_iters 10 --num_val_images 4; done
  done
else  # two tiny CPU runs prove the command line; the other six would only repeat it slower
  for amp in torch apex; do
    smoke fcn $amp "$limit" --device cpu --max_iters 1 --crop_size 32,32 --batch_size 2 --num_workers 0 \
      --num_val_images 1 --save_predictions 0
  done
fi
wait
for f in "$LOGS"/smoke_*.rc; do
  [ -f "$f" ] || continue  # none: the smoke stage was not selected
  name=$(basename "$f" .rc)
  read -r rc secs < "$f"
  rm -f "$f"
  if [ "$rc" = 0 ]; then  # the verdict: what the run's amp line says ran, and its closing line (time, mIoU)
    amp=$(grep -o 'amp: amp=[a-z]*\( O[0-3]\)\?' "$LOGS/$name.log" | head -n 1 | cut -c6-)
    echo "VERDICT: $amp, $(grep -o 'done in .*' "$LOGS/$name.log" | tail -n 1)" >> "$LOGS/$name.log"
  fi
  record "$name" "$rc" "$secs" "$limit"
done
[ $CUDA = 1 ] || ! selected smoke || for script in pspnet deeplabv3 deeplabv3plus; do
  skip "smoke_${script}" "$NO_CUDA; the fcn runs above check the command line on the CPU"
done
pack

# ---- 4: numerics of the precision modes on the card (PSPNet, demo data)
if [ $CUDA = 1 ]; then
  # 4 val images: every new eval size is a cudnn.benchmark search, and the check needs only a finite mIoU. The six
  # modes train at once, each a process of its own (nothing here is timed)
  stage numerics 100 $PY bench/numerics.py --iters 200 --val_images 4 --num_workers 2 --jobs 6 \
    --work_dir "$WORK/runs/numerics" --out "$LOGS/numerics"
else
  stage numerics 100 $PY bench/numerics.py --device cpu --modes fp32,bf16 --iters 2 --crop 32 --batch 2 \
    --val_images 1 --num_workers 0 --jobs 2 --work_dir "$WORK/runs/numerics" --out "$LOGS/numerics"
fi
keep "$LOGS/numerics/numerics.png" "$LOGS/numerics/numerics.md"

# ---- 5: the training table, batch 16 at 512x512: what the defaults are decided on (fused vs torch kernels, NCHW vs
# channels_last, all in fp16) and the goals' bases (our fp32 NCHW row, TF32 off: the reference's; torchvision's peer).
# One fp32 row only: it is the slowest, and fp32 is the yardstick here, not the product.
if [ $CUDA = 1 ]; then
  stage bench_train 100 $PY bench/train.py --models pspnet --modes fp16 --kernels torch,fused --formats nchw,nhwc \
    --peers tv_deeplabv3 --batch 16 --steps 8 --warmup 2 --out "$LOGS/train"
else
  stage bench_train 100 $PY bench/train.py --quick --out "$LOGS/train"
fi
keep "$LOGS/train/train.md"

# ---- 6: where the time of an fp16 step goes, torch vs fused kernels
if [ $CUDA = 1 ]; then
  stage profile 50 $PY bench/step_profile.py --out "$LOGS/profile"
else
  stage profile 50 $PY bench/step_profile.py --device cpu --mode bf16 --batch 2 --crop 32 --warmup 1 --steps 1 \
    --out "$LOGS/profile"
fi
keep "$LOGS/profile/profile.md"

# ---- 7: the kernel table of our ops (bn_relu, upsample); a failing row or section does not end it. Its conv section
# (cudnn.benchmark searches of every problem x pass x layout) is a stage of its own near the end.
if [ $CUDA = 1 ]; then
  stage bench_kernels 30 $PY bench/kernels.py --only bn_relu,bn_relu_demo,upsample --out "$LOGS/kernels"
else
  stage bench_kernels 30 $PY bench/kernels.py --quick --only bn_relu,bn_relu_demo,upsample --out "$LOGS/kernels"
fi

# ---- 8: compute-sanitizer on a small-shape subset: memcheck on every kernel family, racecheck on the bn
# reductions (the only kernels with shared memory and barriers). Only our kernels are instrumented (their names hold
# "segfp16"), and the CUDA API errors torch and cuDNN provoke and handle themselves while probing are not reported:
# both would make the stage about other people's code (and instrumenting cuDNN costs minutes). Exit 86 is a sanitizer
# finding, 1 a failed test (pytest's own code)
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ $CUDA = 0 ]; then
  skip sanitizer_memcheck "$NO_CUDA"; skip sanitizer_racecheck "$NO_CUDA"
elif [ ! -x "$SAN" ]; then
  skip sanitizer_memcheck "compute-sanitizer not found ($SAN)"; skip sanitizer_racecheck "compute-sanitizer not found"
else
  # no caching allocator: each tensor its own allocation, so a read past one is not inside the next one's block
  stage sanitizer_memcheck 35 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 86 \
    --kernel-name kns=segfp16 --report-api-errors no --leak-check no --print-limit 20 \
    $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_bn_relu.py tests/test_upsample_ops.py \
    -k "test_dtypes or test_split_halves or test_cuda_concat_matches_aten or test_cuda_ce_matches_aten"
  stage sanitizer_racecheck 25 "$SAN" --tool racecheck --error-exitcode 86 --kernel-name kns=segfp16 \
    --report-api-errors no --print-limit 20 \
    $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_bn_relu.py -k "test_dtypes or test_deterministic"
fi

# ---- 9: eval img/s unfolded / folded (fp16 first: the tables are written after each size's rows), what a new eval
# image size costs, the conv table, then the compiled folded eval copy (an inductor compile, tens of seconds: last)
if [ $CUDA = 1 ]; then
  stage bench_eval 25 $PY bench/eval.py --models pspnet --sizes 512x683 --dtypes half,fp32 \
    --variants unfolded,folded,folded_plain \
    --reps 5 --warmup 2 --kernels fused --out "$LOGS/eval"
  stage bench_eval_sizes 20 $PY bench/eval_sizes.py --sizes 4 --out "$LOGS/eval_sizes"
  # PSPNet's convolutions in fp16 only, the 12 with the most step time (all four models x four dtypes take minutes;
  # bench_train has the fp32 base)
  stage bench_kernels_conv 45 env CONV_MODELS=pspnet CONV_DTYPES=fp16 CONV_TOP=12 CONV_BUDGET_MS=10 \
    $PY bench/kernels.py --only conv --out "$LOGS/kernels_conv"
  stage bench_eval_compiled 30 $PY bench/eval.py --models pspnet --sizes 512x683 --dtypes half \
    --variants folded,compiled --reps 5 --warmup 2 --kernels fused --out "$LOGS/eval_compiled"
else
  stage bench_eval 25 $PY bench/eval.py --quick --variants unfolded,folded,folded_plain --out "$LOGS/eval"
  stage bench_eval_sizes 20 $PY bench/eval_sizes.py --quick --out "$LOGS/eval_sizes"
  stage bench_kernels_conv 45 env CONV_DTYPES=fp32 CONV_TOP=2 $PY bench/kernels.py --quick --only conv \
    --out "$LOGS/kernels_conv"
  skip bench_eval_compiled "$NO_CUDA; the compiled copy is timed on the card (inductor on a CPU box takes minutes)"
fi
if [ -n "${DEVICE_CHECK_COMPILE_TESTS:-}" ]; then
  if [ $CUDA = 1 ]; then
    stage bench_train_compile 90 $PY bench/train.py --models pspnet --modes fp16 --kernels fused --formats nhwc \
      --compile default --peers tv_deeplabv3 --no-baseline --batch 16 --steps 5 --warmup 2 --out "$LOGS/compile"
  else
    skip bench_train_compile "$NO_CUDA; the compiled rows time the card (inductor on a CPU box takes minutes)"
  fi
  stage pytest_compile 60 env SEGFP16_COMPILE_TESTS=1 SEGFP16_INDUCTOR_TESTS=1 $PY -m pytest -q -x -m "slow or not slow" \
    tests/test_compile.py
fi

echo >> "$SUMMARY"
echo "total $(( $(date +%s) - T_START )) s; files here: $(cd "$OUT" && ls | tr '\n' ' ')" >> "$SUMMARY"
cp "$SUMMARY" "$LOGS/"
pack
echo
cat "$SUMMARY"
exit $FAILED
