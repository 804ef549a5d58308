#!/usr/bin/env bash
# One scripted place for the pinned stack.
#
#   STACK=torch2.13 VENV=.venv bash scripts/install.sh        # the default (CI)
#   STACK=torch2.11 VENV=.venv-torch2.11 bash scripts/install.sh
#
# requirements.txt holds what every stack shares; scripts/stacks/$STACK.txt pins the stack itself
# (torch, fbgemm-gpu-cpu, torchrec and torchrec's own requirements). torchrec declares the CUDA
# `fbgemm-gpu`, which breaks against a CPU fbgemm, so it goes in last with --no-deps, and the
# package itself is installed with --no-deps for the same reason.
#
# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs torch from that index first (the CPU
# build, ~1 GB smaller); without it pip takes torch from its configured indexes, which on PyPI is
# the CUDA build (it runs on CPU too). docs/install.md says what each gives.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=${STACK:-torch2.13}
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
PINS=scripts/stacks/$STACK.txt
if [ ! -f "$PINS" ]; then
  echo "install.sh: unknown STACK=$STACK; supported: $(cd scripts/stacks && ls -- *.txt | sed 's/\.txt$//' | xargs)" >&2
  exit 2
fi
TORCH=$(grep -E '^torch==' "$PINS")
TORCHREC=$(grep -E '^torchrec==' "$PINS")
STACK_REQS=$(mktemp)
trap 'rm -f "$STACK_REQS"' EXIT
grep -v -E '^torchrec==' "$PINS" > "$STACK_REQS"

echo "install.sh: stack $STACK ($TORCH, $(grep -E '^fbgemm' "$PINS"), $TORCHREC) into $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  $PIP install -q "$TORCH" --index-url "$TORCH_INDEX"
fi
$PIP install -q -r requirements.txt -r "$STACK_REQS"
$PIP install -q --no-deps "$TORCHREC"
$PIP install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec; print('install.sh: torch', torch.__version__, '| torchrec', torchrec.__version__)"
