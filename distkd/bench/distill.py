"""`make bench-distill`: what the cache saves, in one run on the same rows and cores.

(a) the student on hard labels, (b) the student distilled from the cached logits,
(c) the student distilled online, the exported teacher's forward pass inside the loop.
Each trains the same student for the same steps on two gloo ranks (one thread each);
the time per epoch is the loop's rows/s (start-up and evaluation excluded) scaled to
the train split. Uses the demo's logs, teacher and cache (built first if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from distkd.bench import cpu_model
from distkd.loader import split_files


def run_student(args: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTKD_NO_PROGRESS": "1"}
        cmd = [sys.executable, "-m", "distkd.cli", *args, f"out={out}", f"train.max_steps={steps}",
               "train.checkpoint_every=1000000", "tensorboard=false"]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="jobs/demo")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    a = p.parse_args(argv)
    from distkd.cache.build import CacheJob, build
    from distkd.config import load, read_yaml
    from distkd.demo import DataJob, logs_fingerprint, make_logs, train_stage

    jobs = Path(a.jobs)
    data = load(DataJob, jobs / "data.yaml")
    make_logs(data)
    teacher = train_stage(jobs / "teacher.yaml", [], logs_fingerprint(data.out), "teacher")
    cache = load(CacheJob, jobs / "cache.yaml")
    cache.out = f"{cache.out}/{teacher['sha256'][:12]}"
    build(cache)
    export = read_yaml(jobs / "cache.yaml")["teacher"]

    student = ["student", "train", "--config", str(jobs / "student.yaml")]
    distill = ["distill", "--config", str(jobs / "distill.yaml")]
    runs = {
        "a: hard labels": run_student(student, a.steps),
        "b: distill from cache": run_student(distill + [f"distill.teachers.0.cache={cache.out}"], a.steps),
        "c: distill online": run_student(distill + ["distill.teachers.0.cache=null",
                                                    f"distill.teachers.0.export={export}"], a.steps),
    }
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in split_files(data.out, "train"))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; 2 gloo ranks, one thread each")
    print(f"student {runs['a: hard labels']['parameters']['total']:,} parameters; teacher "
          f"{teacher['parameters']:,}; {a.steps} steps per run; epoch = {rows:,} train rows")
    print(f"{'run':<24} {'rows/s':>10} {'epoch s':>9}")
    epoch = {}
    for name, s in runs.items():
        epoch[name] = rows / s["rows_per_s"]
        print(f"{name:<24} {s['rows_per_s']:>10,.0f} {epoch[name]:>9.1f}")
    a_, b_, c_ = epoch.values()
    print(f"b/a = {b_ / a_:.3f} (goal <= 1.05): reading cached logits costs {100 * (b_ / a_ - 1):+.1f}% epoch time")
    print(f"c/b = {c_ / b_:.2f}: running the teacher in the loop instead of reading the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
