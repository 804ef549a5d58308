#!/usr/bin/env bash
# Here, before the GPU run (docs/gpu.md): everything the GPU machine lacks, in folders the device
# tool can carry (64 MiB a call, no network there).
#
#   scripts/gpu_pack.sh            # into .gpu/ (git-ignored)
#
#   .gpu/parts/    the CUDA fbgemm-gpu wheel of the torch2.11 stack (scripts/stacks/torch2.11.txt)
#                  in parts of PART_MIB, with MANIFEST (sizes, offsets, sha256): one call each
#   .gpu/carry/    carried by the run: wheels/ (torchrec and the requirements the image lacks),
#                  MANIFEST (the whole wheel's sha256) and run/ (small synthetic logs and the
#                  teacher's logit cache of them, built here on CPU: Ray is not needed there)
#
# Env: GPU_DIR (.gpu), PYVER (3.12, the image's Python), FBGEMM_DIST (fbgemm-gpu; fbgemm-gpu-cpu
# packs the CPU wheel for a rehearsal), PART_MIB (56), ROWS (200000), PYTHON (.venv/bin/python:
# the default stack with Ray, which builds the logs, the teacher and the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU_DIR:-.gpu}
PYVER=${PYVER:-3.12}
FBGEMM_DIST=${FBGEMM_DIST:-fbgemm-gpu}
ROWS=${ROWS:-200000}
PY=${PYTHON:-.venv/bin/python}
PINS=scripts/stacks/torch2.11.txt
pin() { grep -E "^$1==" "$PINS" | cut -d= -f3; }

# What the image lacks (/work/.library/device/KINDS.md lists what it has: torch 2.11.0+cu130,
# numpy, pyarrow, pyyaml, tqdm, pyre-extensions, typing-inspect, lightning-utilities,
# cloudpickle, portalocker, packaging): the triple's other two and torchrec's requirements.
# torchmetrics: the image has 1.9.0, torchrec 1.6.1 pins 1.0.3. pyvers: tensordict's.
SMALL=("torchrec==$(pin torchrec)" "tensordict==$(pin tensordict)" "torchmetrics==$(pin torchmetrics)"
       "pyvers>=0.2,<0.3")
FBGEMM="$FBGEMM_DIST==$(pin fbgemm-gpu-cpu)"

download() {  # download DIR SPEC...: wheels for CPython $PYVER on manylinux x86-64, no dependencies
  local dir=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}

mkdir -p "$GPU/download" "$GPU/carry/wheels"
echo "gpu_pack: $FBGEMM and ${SMALL[*]} for CPython $PYVER -> $GPU"
download "$GPU/download" "$FBGEMM"
rm -f "$GPU"/carry/wheels/*.whl
download "$GPU/carry/wheels" "${SMALL[@]}"
# iopath is published as a source archive only: build its (pure Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w "$GPU/carry/wheels" "iopath==$(pin iopath)"

shopt -s nullglob
wheels=("$GPU"/download/"${FBGEMM_DIST//-/_}"-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "gpu_pack: expected one $FBGEMM_DIST wheel in $GPU/download, found ${#wheels[@]}" >&2; exit 1; }
bash scripts/gpu_split.sh "${wheels[0]}" "$GPU/parts"
cp "$GPU/parts/MANIFEST" "$GPU/carry/MANIFEST"

RUN=$GPU/carry/run
run() { echo "+ distkd $*" >&2; "$PY" -m distkd.cli "$@"; }
if [ ! -f "$RUN/cache/manifest.json" ]; then
  [ -f "$RUN/logs/schema.yaml" ] || run data synth --out "$RUN/logs" --rows "$ROWS" --shards 4 --max-cardinality 10000
  [ -f "$GPU/build/teacher/export/export.json" ] || \
    run teacher train --config jobs/demo/teacher.yaml --nproc 2 logs="$RUN/logs" out="$GPU/build/teacher" \
      train.batch_size=1024 tensorboard=false
  run cache build --config jobs/demo/cache.yaml --teacher "$GPU/build/teacher/export" --logs "$RUN/logs" --out "$RUN/cache"
fi

echo "gpu_pack: done"
ls -l "$GPU/parts"
for d in "$GPU/carry" "$GPU/carry/wheels" "$RUN/logs" "$RUN/cache"; do du -sh "$d"; done
echo "carried per call with the working tree (~$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes):"
echo "  parts: $GPU/parts/MANIFEST + one part (at most ${PART_MIB:-56} MiB); run: $GPU/carry"
