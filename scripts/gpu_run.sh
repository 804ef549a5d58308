#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_part.sh has put the fbgemm-gpu wheel back together:
# install the carried wheels into a target folder, then run scripts/gpu_distill.sh on the
# carried logs and cache, bounded (docs/gpu.md). The results (result.txt, gpu_bench.json) are
# copied to $OUT, which the device tool brings back.
#
#   scripts/gpu_run.sh [CARRY]         # CARRY: the carried folder (.gpu/carry)
#
# Env: DEST (/tmp/gpu-wheels, where the parts were reassembled), SITE (/tmp/site, the install
# target), PYTHON (python3: the image's, with torch), BOUND (360 s for gpu_distill.sh), RUN_OUT
# (/tmp/gpu-run: the run's own output, outside the carried folder), and gpu_distill.sh's own
# (STEPS, BATCH, DISTILL).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-.gpu/carry}
DEST=${DEST:-/tmp/gpu-wheels}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
BOUND=${BOUND:-360}
RUN_OUT=${RUN_OUT:-/tmp/gpu-run}
die() { echo "gpu_run: $*" >&2; exit 1; }

[ -f "$CARRY/MANIFEST" ] || die "$CARRY/MANIFEST missing (carry $CARRY)"
read -r NAME SIZE SHA < <(awk '$1 == "file" {print $2, $3, $4}' "$CARRY/MANIFEST")
WHEEL=$DEST/$NAME
[ -f "$WHEEL" ] || die "$WHEEL missing: run scripts/gpu_part.sh for every part first (docs/gpu.md)"
[ "$(stat -c %s "$WHEEL")" = "$SIZE" ] && [ "$(sha256sum "$WHEEL" | cut -d' ' -f1)" = "$SHA" ] || \
  die "$WHEEL: size or sha256 differs from the MANIFEST's; run the parts again from 0"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$WHEEL" "$CARRY"/wheels/*.whl
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "from distkd import compat; import torch, fbgemm_gpu, torchrec; print('gpu_run:', compat.versions(), 'stack', compat.stack(), '| cuda', torch.cuda.is_available())"

status=0
PYTHON=$PY PREBUILT=$CARRY/run timeout -k 15 "$BOUND" bash scripts/gpu_distill.sh "$RUN_OUT" || status=$?
[ "$status" -ne 124 ] || echo "gpu_run: gpu_distill.sh stopped at its ${BOUND}s bound" >&2
if [ -n "${OUT:-}" ]; then
  for f in result.txt gpu_bench.json; do [ ! -f "$RUN_OUT/$f" ] || cp "$RUN_OUT/$f" "$OUT/"; done
fi
exit "$status"
