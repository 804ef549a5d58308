"""`make bench-distill`: what the cache saves, in one run on the same rows and cores.

(a) the student on hard labels, (b) the student distilled from the cached logits,
(c) the student distilled online, the exported teacher's forward pass inside the loop.
Each trains the same student for the same steps on two gloo ranks (one thread each);
the time per epoch is the loop's rows/s (start-up and evaluation excluded) scaled to
the train split. Uses the demo's logs, teacher and cache (built first if missing).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq

from distkd.bench import cli_summary, cpu_model
from distkd.loader import split_files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="jobs/demo")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    a = p.parse_args(argv)
    from distkd.demo import teacher_and_cache

    jobs = Path(a.jobs)
    data, _, teacher, cache = teacher_and_cache(jobs)
    export = cache.teacher

    student = ["student", "train", "--config", str(jobs / "student.yaml")]
    distill = ["distill", "--config", str(jobs / "distill.yaml")]
    runs = {
        "a: hard labels": cli_summary(student, a.steps),
        "b: distill from cache": cli_summary(distill + [f"distill.teachers.0.cache={cache.out}"], a.steps),
        "c: distill online": cli_summary(distill + ["distill.teachers.0.cache=null",
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
