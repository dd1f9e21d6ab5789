#!/usr/bin/env bash
# The one script to run on a bare GPU machine (torch + nvcc there, no internet):
#   bash tools/device_check.sh OUT_DIR
# Every stage is time-boxed (the limits add up to 8 min 56 s; DEVICE_CHECK_COMPILE_TESTS=1 adds the 60 s stage of
# full-model compile tests; a normal run takes far less), and a failing stage does not stop the later ones.
# Logs and tables land in OUT_DIR; summary.md there lists each stage's exit code and duration.
set -u
OUT=${1:?usage: tools/device_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SEG_DATA_CACHE="$OUT/.cache"   # the demo dataset is generated here on first use
PY=${PY:-python3}
SUMMARY="$OUT/summary.md"
{
  echo "# device check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/card: /'
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo; echo "| stage | exit | seconds |"; echo "|---|---|---|"
} > "$SUMMARY"

stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit, log to OUT/NAME.log, record exit code and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $(( $(date +%s) - t0 )) |" >> "$SUMMARY"
  tail -n 5 "$OUT/$name.log"
}

# 1. build (CUDA for this card only, to keep it short), then say what was built
stage build 120 $PY -m pip install --no-build-isolation --no-deps -v -e .
stage build_info 10 $PY -c "import common; print(common.build_info())"
# 2. every GPU test
stage pytest_cuda 60 $PY -m pytest -q -m cuda tests
# 2b. compute-sanitizer over a small-shape subset: memcheck on every kernel family, racecheck (shared-memory hazards)
# on the bn reductions, the only kernels with shared memory and barriers
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
stage sanitizer_memcheck 35 "$SAN" --tool memcheck --error-exitcode 1 --leak-check no --print-limit 20 \
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_bn_relu.py tests/test_upsample_ops.py \
  -k "test_dtypes or test_split_halves or test_cuda_concat_matches_aten or test_cuda_ce_matches_aten"
stage sanitizer_racecheck 25 "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 \
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_bn_relu.py -k "test_dtypes or test_deterministic"
# 3. the kernel table (bn_relu, upsample, conv)
stage bench_kernels 45 env CONV_MODELS=pspnet,deeplabv3 $PY bench/kernels.py --out "$OUT"
# 4. a quick training table: PSPNet and DeepLabV3 at batch 16: fp32 / torch fp16 / apex O2, fused vs torch, + peers
stage bench_train 65 $PY bench/train.py --models pspnet,deeplabv3 --modes fp32,fp16,apex-O2 --kernels torch,fused \
  --formats nhwc --batch 16 --steps 10 --warmup 3 --out "$OUT"
# 4b. (issue 15) eval img/s unfolded / folded / compiled folded, fp16 first (each row is logged as it is done, so a
# timeout keeps the finished ones), then fp32; compiled training rows; the
# compile checks too slow for the 2-core CI box (full-model fullgraph, inductor equality)
stage bench_eval 40 $PY bench/eval.py --models pspnet --sizes 512x683 --dtypes half,fp32 --reps 5 --warmup 2 \
  --kernels fused --out "$OUT"
stage bench_train_compile 40 $PY bench/train.py --models pspnet --modes fp16 --kernels fused --formats nhwc \
  --compile default --peers tv_deeplabv3 --no-baseline --batch 16 --steps 5 --warmup 2 --out "$OUT/compile"
[ -n "${DEVICE_CHECK_COMPILE_TESTS:-}" ] && stage pytest_compile 60 env SEGFP16_COMPILE_TESTS=1 SEGFP16_INDUCTOR_TESTS=1 $PY -m pytest -q -x tests/test_compile.py
# 5. 1-GPU torchrun smoke runs of every script, --amp torch and --amp apex, on demo data
for script in fcn pspnet deeplabv3 deeplabv3plus; do
  for amp in torch apex; do
    stage "smoke_${script}_${amp}" 12 $PY -m torch.distributed.run --standalone --nproc_per_node 1 $script.py \
      --data demo --amp $amp --max_iters 10 --device cuda --work_dir "$OUT/work_${script}_${amp}"
  done
done
cat "$SUMMARY"
