#!/usr/bin/env bash
# The GPU check of distillation (issue #5, item 7), as one prepared script: small synthetic
# logs, a short teacher run, its logit cache, then distillation from the cache on every visible
# GPU (nccl, the CUDA fbgemm-gpu kernels), recording samples/s. On a machine without CUDA it runs
# the same stages on CPU/gloo, which is how it is tested here.
#
#   scripts/gpu_distill.sh [OUT]          # OUT defaults to runs/gpu; results in OUT/result.txt
#
# Needs the pinned stack on $PYTHON (default python): torch with CUDA, the CUDA fbgemm-gpu that
# matches it, and torchrec (installed with --no-deps). Env: ROWS (200000), STEPS (300), BATCH
# (per rank; 4096 on GPU, 1024 on CPU).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${1:-runs/gpu}
ROWS=${ROWS:-200000}
STEPS=${STEPS:-300}

# Fail in one line, before any stage, if the stack is not there or not the CUDA one.
probe=$("$PY" - <<'EOF'
import sys
try:
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
EOF
)
read -r NGPU BACKEND <<< "$probe"
BATCH=${BATCH:-$([ "$BACKEND" = nccl ] && echo 4096 || echo 1024)}
echo "gpu_distill: $BACKEND, $NGPU ranks, $ROWS rows, $STEPS steps of $BATCH rows per rank -> $OUT"

run() { echo "+ distkd $*" >&2; "$PY" -m distkd.cli "$@"; }
[ -f "$OUT/logs/schema.yaml" ] || run data synth --out "$OUT/logs" --rows "$ROWS" --shards 4 --max-cardinality 10000
[ -f "$OUT/teacher/export/export.json" ] || \
  run teacher train --config jobs/demo/teacher.yaml --nproc "$NGPU" logs="$OUT/logs" out="$OUT/teacher" \
    train.batch_size="$BATCH" tensorboard=false
run cache build --config jobs/demo/cache.yaml --teacher "$OUT/teacher/export" --logs "$OUT/logs" --out "$OUT/cache"
run distill --config jobs/demo/distill.yaml --nproc "$NGPU" logs="$OUT/logs" out="$OUT/student-kd" \
  distill.teachers.0.cache="$OUT/cache" train.batch_size="$BATCH" train.max_steps="$STEPS" \
  train.checkpoint_every=1000000 tensorboard=false

"$PY" - "$OUT" "$BACKEND" "$NGPU" <<'EOF' | tee "$OUT/result.txt"
import json, sys
from pathlib import Path
import torch
out, backend, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = json.loads((Path(out) / "student-kd" / "summary.json").read_text())
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
print(f"distill on {n} x {dev} ({backend}), torch {torch.__version__}: {s['steps']} steps, "
      f"{s['rows_per_s']:,.0f} samples/s; test " +
      ", ".join(f"{t} AUC {m['auc']:.4f}" for t, m in s["test"].items()))
print("plan:", s["plan"])
EOF
