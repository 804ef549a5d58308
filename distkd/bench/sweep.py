"""`make bench-sweep`: N students from one cache as one sweep, against N runs alone and N online.

(a) one `distkd sweep`: N trials (the distill job, seeds 0..N-1) read the cache, as many at a
    time as the machine's CPUs allow (one rank, one thread each), on an embedded Ray;
(b) N × `distkd distill --nproc 1` from the cache, one after another;
(c) N × the same distilled online: the exported teacher's forward pass inside the loop.
Each figure is the wall-clock time of the whole thing, process and Ray start-up included, for
the same students (job, steps, seeds). Uses a suite's logs, teacher and cache (built first if
missing); default the MovieLens suite.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from distkd import log
from distkd.bench import cpu_model
from distkd.demo import teacher_and_cache

logger = logging.getLogger(__name__)


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTKD_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distkd.cli", *cmd], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="jobs/movielens")
    p.add_argument("--students", type=int, default=4, help="N")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per student")
    a = p.parse_args(argv)
    log.setup()

    jobs = Path(a.jobs)
    _, _, teacher, cache = teacher_and_cache(jobs)
    distill = str(jobs / "distill.yaml")
    fixed = [f"train.max_steps={a.steps}", f"train.eval_every={a.steps}", "train.checkpoint_every=1000000",
             "tensorboard=false"]
    cpus = len(os.sched_getaffinity(0))
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sweep.yaml"
        config.write_text(yaml.safe_dump({
            "out": f"{tmp}/sweep", "metric": "valid/mean/auc", "num_samples": 1, "max_concurrent": cpus,
            "scheduler": {"kind": "fifo"},
            "kd": {"base": distill, "overrides": fixed + [f"objective.teachers.0.cache={cache.out}"],
                   "space": {"train.seed": {"grid": list(range(a.students))}}}}))
        logger.info(f"[a] one sweep of {a.students} students from the cache")
        times["a"] = _run(["sweep", "--config", str(config)])
        sources = {"b": [f"objective.teachers.0.cache={cache.out}"],
                   "c": ["objective.teachers.0.cache=null", f"objective.teachers.0.export={cache.teacher}"]}
        for key, source in sources.items():
            logger.info(f"[{key}] {a.students} runs alone, {'from the cache' if key == 'b' else 'online'}")
            times[key] = sum(_run(["distill", "--config", distill, *fixed, *source, f"train.seed={i}",
                                   f"out={tmp}/{key}-{i}", "--nproc", "1"]) for i in range(a.students))
    print(f"machine: {cpu_model()}, {cpus} cores; one rank and one torch thread per student")
    print(f"{a.students} students of {distill}, {a.steps} steps each; teacher {teacher['parameters']:,} parameters")
    print(f"(a) one sweep from the cache ({cpus} trials at a time): {times['a']:8.1f} s")
    print(f"(b) {a.students} runs alone from the cache:               {times['b']:8.1f} s")
    print(f"(c) {a.students} runs alone, teacher in the loop:         {times['c']:8.1f} s")
    print(f"b/a = {times['b'] / times['a']:.2f}: the sweep against the same students run one by one")
    print(f"c/a = {times['c'] / times['a']:.2f}: the sweep against online distillation run one by one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
