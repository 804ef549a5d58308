#!/usr/bin/env bash
# The GPU check of distillation (issues #5 and #26), as one prepared script: small synthetic logs,
# a short teacher run and its logit cache (or those built beforehand: PREBUILT), then
#   1. distkd.bench.gpu on one rank: the distillation step alone (batches already on the device)
#      and end to end (from Parquet and the cache), in samples/s, naming the device;
#   2. `distkd distill` from the cache on every visible GPU (nccl, the CUDA fbgemm-gpu kernels):
#      the real job, its rate and test AUC.
# On a machine without CUDA it runs the same on CPU/gloo, which is how it is rehearsed here.
#
#   scripts/gpu_distill.sh [OUT]          # OUT defaults to runs/gpu; OUT/result.txt, OUT/gpu_bench.json
#
# Needs a stack on $PYTHON (default python): torch, fbgemm-gpu (the CUDA build on a GPU) and
# torchrec; Ray only to build the cache. Env: PREBUILT (a folder with logs/ and cache/, e.g.
# scripts/gpu_pack.sh's .gpu/carry/run: nothing is built), ROWS (200000), STEPS (100: timed steps
# of each figure per round, 3 rounds each; the distill job stops there or at the end of its
# epoch), BATCH (per rank; 4096 on GPU, 1024 on CPU), DISTILL (1; 0 skips step 2).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${1:-runs/gpu}
ROWS=${ROWS:-200000}
STEPS=${STEPS:-100}
DISTILL=${DISTILL:-1}

# Fail in one line, before any stage, if the stack is not there or not the CUDA one.
probe=$("$PY" - <<'PYEOF'
import sys
try:
    import distkd  # noqa: F401  (first: it quiets fbgemm-gpu 1.6.0's version notice, distkd/compat.py)
    import torch, fbgemm_gpu, torchrec  # noqa: F401
except ImportError as e:
    sys.exit(f"gpu_distill: {e}; install torch, fbgemm-gpu (CUDA build) and torchrec --no-deps first")
n = torch.cuda.device_count()
if n:
    # The CUDA fbgemm-gpu registers its TBE kernels for CUDA; the CPU wheel does not.
    import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::bounds_check_indices", "CUDA"):
        sys.exit("gpu_distill: fbgemm-gpu has no CUDA kernels (the CPU wheel?); install the CUDA build")
print(n or 2, "nccl" if n else "gloo")  # one rank per GPU; two CPU ranks otherwise
PYEOF
)
read -r NGPU BACKEND <<< "$probe"
BATCH=${BATCH:-$([ "$BACKEND" = nccl ] && echo 4096 || echo 1024)}
mkdir -p "$OUT"
rm -f "$OUT/result.txt" "$OUT/gpu_bench.json"
echo "gpu_distill: $BACKEND, $NGPU ranks, $STEPS steps of $BATCH rows per rank -> $OUT"

run() { echo "+ distkd $*" >&2; "$PY" -m distkd.cli "$@"; }
if [ -n "${PREBUILT:-}" ]; then
  LOGS=$PREBUILT/logs CACHE=$PREBUILT/cache
  [ -f "$CACHE/manifest.json" ] || { echo "gpu_distill: $CACHE/manifest.json missing (PREBUILT=$PREBUILT)" >&2; exit 1; }
else
  LOGS=$OUT/logs CACHE=$OUT/cache
  [ -f "$LOGS/schema.yaml" ] || run data synth --out "$LOGS" --rows "$ROWS" --shards 4 --max-cardinality 10000
  [ -f "$OUT/teacher/export/export.json" ] || \
    run teacher train --config jobs/demo/teacher.yaml --nproc "$NGPU" logs="$LOGS" out="$OUT/teacher" \
      train.batch_size="$BATCH" tensorboard=false
  run cache build --config jobs/demo/cache.yaml --teacher "$OUT/teacher/export" --logs "$LOGS" --out "$CACHE"
fi

"$PY" -m distkd.bench.gpu --logs "$LOGS" --cache "$CACHE" --out "$OUT" --batch "$BATCH" --steps "$STEPS" \
  | tee -a "$OUT/result.txt"

[ "$DISTILL" = 1 ] || exit 0
run distill --config jobs/demo/distill.yaml --nproc "$NGPU" logs="$LOGS" out="$OUT/student-kd" \
  objective.teachers.0.cache="$CACHE" train.batch_size="$BATCH" train.max_steps="$STEPS" \
  train.checkpoint_every=1000000 tensorboard=false

"$PY" - "$OUT" "$BACKEND" "$NGPU" <<'PYEOF' | tee -a "$OUT/result.txt"
import json, sys
from pathlib import Path
import torch
out, backend, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = json.loads((Path(out) / "student-kd" / "summary.json").read_text())
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
print(f"distill job on {n} x {dev} ({backend}), torch {torch.__version__}: {s['steps']} steps, "
      f"{s['rows_per_s']:,.0f} samples/s; test " +
      ", ".join(f"{t} AUC {m['auc']:.4f}" for t, m in s["test"].items()))
print("plan:", s["plan"])
PYEOF
