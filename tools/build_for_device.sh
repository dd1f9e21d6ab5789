#!/usr/bin/env bash
# Build common._C here for the GPU machine, so that the card's few minutes are not spent compiling:
#   tools/build_for_device.sh
# The card runs Python 3.12 with torch 2.11.0+cu130 on an H100 or H200 (sm_90), so the build uses a Python 3.12
# venv with that torch (tools/torch_venv.sh; VENV=/path/to/venv uses an existing one instead), FORCE_CUDA=1 (fail
# rather than build CPU-only) and TORCH_CUDA_ARCH_LIST=9.0; CUDA_HOME is whatever setup.py resolves (nvcc's own
# install dir). The result is common/_C.cpython-312-x86_64-linux-gnu.so in the working tree (~30 MB; it also runs
# on a CPU).
# It is git-ignored, so the device tool must be told to carry it: the script prints the path to pass as `carry`.
# tools/device_check.sh then imports it instead of building, when `import common` works, build_info says cuda and a
# fused launch runs on the card.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0 TORCHVISION=0.26.0  # the card's
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
export SEG_BUILD_TEMP=$PWD/build/device-py312-torch$TORCH-sm${TORCH_CUDA_ARCH_LIST//[;. ]/}  # apart from CPU-only builds
venv=${VENV:-$(tools/torch_venv.sh "$TORCH" "$TORCHVISION" | tail -n 1)}
py=$venv/bin/python
"$py" -c "import sys, torch; assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith('$TORCH'), \
  f'build_for_device: {sys.executable} has Python {sys.version.split()[0]}, torch {torch.__version__}; the card needs 3.12 and $TORCH'"

t0=$(date +%s)
"$py" setup.py build_ext --inplace  # in place: the venv is not touched (no editable install)
so=$("$py" -c "import sysconfig; print('common/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
info=$("$py" -c "import common; print(common.build_info())")  # this tree's common: the cwd comes first
echo "build_for_device: built in $(( $(date +%s) - t0 )) s: $so ($(du -m "$so" | cut -f1) MB)"
echo "build_for_device: nvcc targets $(grep -o 'code=sm_[0-9a-z]*' "$SEG_BUILD_TEMP/build.ninja" | sort -u | tr '\n' ' ')"
echo "build_for_device: $info"
case $info in *cpu+cuda*) ;; *) echo "build_for_device: the build holds no CUDA kernels" >&2; exit 1 ;; esac
echo "build_for_device: carry [\"$so\"]"
