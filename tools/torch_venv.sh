#!/usr/bin/env bash
# A Python 3.12 venv with one torch / torchvision pair and the rest of requirements-test.txt; prints its path (last
# line of stdout). Used by the compatibility stage of .ci/run and by tools/build_for_device.sh.
#   tools/torch_venv.sh 2.11.0 0.26.0
# The venv lives outside the clone and is kept between runs (~4 GB of CUDA wheels, which pip here does not cache):
# ${SEG_VENV_ROOT:-~/.cache/segfp16-venvs}/py3.12-torch<version>. Each call brings it in line with requirements-test.txt
# (a no-op when it is), so a requirement added there shows up here too; the pins must lie inside requirements.txt's
# range, or pip says so (both are requirements of one install).
set -euo pipefail
torch=${1:?usage: tools/torch_venv.sh TORCH_VERSION TORCHVISION_VERSION}
vision=${2:?usage: tools/torch_venv.sh TORCH_VERSION TORCHVISION_VERSION}
cd "$(dirname "$0")/.."

py=${PYTHON312:-}
if [ -z "$py" ]; then
  if python3.12 -V >/dev/null 2>&1; then
    py=python3.12
  elif command -v pyenv >/dev/null && v=$(pyenv versions --bare | grep '^3\.12\.' | tail -n 1) && [ -n "$v" ]; then
    py=$(PYENV_VERSION=$v pyenv which python3.12)  # pyenv's shim refuses a version that is not selected
  else
    echo "torch_venv: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
    exit 1
  fi
fi

venv=${SEG_VENV_ROOT:-$HOME/.cache/segfp16-venvs}/py3.12-torch$torch
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q -r requirements-test.txt "torch==$torch" "torchvision==$vision" >&2
"$venv/bin/python" -c "import torch, torchvision; print('torch_venv:', torch.__version__, 'cuda', torch.version.cuda,
                     'torchvision', torchvision.__version__)" >&2
echo "$venv"
