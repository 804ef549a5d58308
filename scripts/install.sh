#!/usr/bin/env bash
# One scripted place for the pinned stack. torchrec declares the CUDA `fbgemm-gpu`,
# which breaks against the CPU torch, so it goes in last with --no-deps, and the
# package itself is installed with --no-deps for the same reason.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q -r requirements.txt
$PIP install -q --no-deps torchrec==1.8.0
$PIP install -q --no-deps -e .
