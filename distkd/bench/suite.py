"""`make bench`: every benchmark on one generated dataset, in one run, into BENCHMARKS.md.

    python -m distkd.bench.suite [--scale ROWS] [--quick] [--reps 3] [--out BENCHMARKS.md]

One Criteo-like dataset (distkd.data.synth, `--scale` rows, 32 train shards) and one
untrained teacher export; subsets of 2, 8 and 32 train shards (hard links, one valid and one
test shard each) are the scale sweep's 1×, 4× and 16×; 16× is the whole train split, on
which the side-by-side figures are measured. Every figure is the median of `--reps`
interleaved repetitions, with its min–max. Stages (progress and an ETA on stderr):

  loader    LogLoader vs pyarrow's read+decode of the same columns, one core
  cache     teacher forward alone (1 thread, all cores), distkd's build (its pool as shipped:
            one worker per core), the Ray Data pipeline (distkd.bench.baselines), and the
            build at 1×, 4×, 16× (time, peak RSS)
  distill   the student: hard labels, from the cache, online; from the cache at 1×, 4×, 16×
            (one epoch: time, peak RSS); the loader's cache join under cProfile
  train     the trainer's plain loop vs TorchRec's TrainPipelineSparseDist (its default), 1 and 2 ranks

BENCH_SCALE (rows) sets the scale too. --quick: a tiny run (seconds) that checks the
structure, one repetition: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import cProfile
import pstats

from distkd import log
from distkd.bench import cli_summary
from distkd.bench.suite_report import SWEEP  # the sweep's scales
from distkd.data.schema import SCHEMA_FILE, load_schema
from distkd.data.synth import generate
from distkd.bench.loader import rates
from distkd.data.loader import LogLoader, split_files
from distkd.cache.build import CacheJob, build
from distkd.bench.baselines import ray_data_build
from distkd.bench.cache import decoded_batches, ensure_teacher, time_forward
from distkd.cache.pool import plan_pool
from distkd.models.export import load_export, read_meta
from distkd.bench.distill import interleaved
from distkd.cache.reader import open_cache
from distkd.bench.suite_report import machine, write_markdown
from distkd.log import quiet
from distkd.models.ranking import ModelConfig

# Ray and psutil are imported by the steps that use them: Ray's import costs seconds.

logger = logging.getLogger(__name__)

DEFAULT_SCALE = 3_000_000
QUICK_SCALE = 24_000
# Train shards per scale unit: at 1x a pool of two workers (this machine's) has a shard each, so
# the build's rounds grow with the rows; with one shard at 1x, 1, 4, 16 shards made 1, 2, 8 rounds.
SHARDS_PER_X = 2
SHARDS = SHARDS_PER_X * SWEEP[-1]
# The suite's teacher: smaller than ModelConfig's default so that the full run fits an hour
# on two cores; a cheaper teacher makes the framework's own costs weigh more, not less.
TEACHER = {"embedding_dim": 32, "dense_arch": [64], "cross_layers": 1, "cross_rank": 16, "deep_arch": [256, 128]}


class Progress:
    """Stage lines with rows, rows/s and an ETA from the planned work left (weighted units)."""

    def __init__(self, total: float):
        self.total, self.done, self.start = total, 0.0, time.perf_counter()

    def __call__(self, stage: str, units: float, rows: int = 0, rate: float = 0.0) -> None:
        self.done += units
        el = time.perf_counter() - self.start
        eta = el * (self.total - self.done) / self.done if self.done else 0.0
        what = f", {rows:,} rows, {rate:,.0f} rows/s" if rows else ""
        logger.info(f"[{el / 60:5.1f} min] {stage}{what}; {100 * self.done / self.total:3.0f}% done, "
                    f"ETA {eta / 60:.1f} min")


class PeakRSS:
    """Peak resident memory of a process tree (sampled every 0.2 s): the largest single
    process, optionally leaving out some pids (the driver itself)."""

    def __init__(self, pid: int | None = None, exclude: tuple[int, ...] = (), match: str = ""):
        import psutil

        self.root, self.exclude, self.peak = psutil.Process(pid or os.getpid()), set(exclude), 0
        self.match = match  # only processes whose command line holds this (e.g. a Ray actor's class)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self.stop.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                if p.pid in self.exclude:
                    continue
                try:
                    if self.match and self.match not in " ".join(p.cmdline()):
                        continue
                    self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> "PeakRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def cli_measured(args: list[str], steps: int) -> tuple[dict, float, int]:
    """`cli_summary` with its wall time and the peak RSS of its largest process (a rank)."""
    t = time.perf_counter()
    with PeakRSS(exclude=(os.getpid(),)) as rss:
        s = cli_summary(args, steps)
    return s, time.perf_counter() - t, rss.peak


# -- data ------------------------------------------------------------------------------------

def make_data(work: Path, rows: int, quick: bool) -> dict[int, Path]:
    """The dataset and its sweep subsets; returns {train shards: logs dir}."""

    logs = work / "logs"
    stamp = logs / "bench-rows.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == {"rows": rows, "shards": SHARDS}):
        generate(logs, rows, shards=SHARDS, seed=0, row_group_rows=2_048 if quick else 16_384, preset="criteo",
                 max_cardinality=100_000, workers=min(2, os.cpu_count() or 1), force=True, progress=not quick)
        stamp.write_text(json.dumps({"rows": rows, "shards": SHARDS}))
    subsets = {}
    for k in SWEEP:
        sub = work / f"logs-{k}x"
        shutil.rmtree(sub, ignore_errors=True)
        for split, n in (("train", SHARDS_PER_X * k), ("valid", 1), ("test", 1)):
            (sub / split).mkdir(parents=True)
            for f in sorted((logs / split).glob("*.parquet"))[:n]:
                os.link(f, sub / split / f.name)
        shutil.copy2(logs / SCHEMA_FILE, sub / SCHEMA_FILE)
        subsets[k] = sub
    return subsets


def train_rows(logs: Path) -> int:

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((logs / "train").glob("*.parquet")))


# -- stages ----------------------------------------------------------------------------------

def stage_loader(R: dict, subsets: dict[int, Path], reps: int, progress: Progress) -> None:

    logs = subsets[SWEEP[-1]]
    r = rates(split_files(logs, "train"), load_schema(logs), 8192, reps)
    R["loader"] = r
    progress("loader vs pyarrow", 1, train_rows(logs), min(r["loader"]))


def _ray(num_cpus: int):
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray


def _build(teacher: Path, logs: Path, out: Path, plan) -> dict:

    shutil.rmtree(out, ignore_errors=True)
    job = CacheJob(teacher=str(teacher), logs=str(logs), out=str(out), splits=["train"], workers=plan.workers,
                   threads_per_worker=plan.threads, batch_size=8192)
    with PeakRSS(exclude=(os.getpid(),), match="CacheWorker") as rss:  # Ray titles actors ray::CacheWorker
        with log.silenced("distkd.cache"):  # timed: the suite's own progress lines say enough
            s = build(job)
    return {"rows_per_s": s["rows_computed"] / s["seconds"], "seconds": s["seconds"], "rows": s["rows"],
            "peak_rss": rss.peak, "workers_start_s": s["workers_start_s"]}


def stage_cache(R: dict, work: Path, subsets: dict[int, Path], teacher: Path, reps: int, progress: Progress) -> None:
    """Interleaved rounds: raw forward (1 thread, all cores) | Ray on every core: distkd build
    (its pool takes every CPU), the sweep's smaller builds | Ray with one CPU more: Ray Data with
    the same pool (its read tasks need a CPU beside the actors, or the pipeline never starts)."""

    cores = len(os.sched_getaffinity(0))
    full = subsets[SWEEP[-1]]
    rows = train_rows(full)
    C = R["cache"] = {"raw_1": [], "raw_all": [], "build": [], "ray_data": [],
                      "sweep": {k: [] for k in SWEEP}, "cores": cores}
    model, _ = load_export(teacher)
    batches = decoded_batches(subsets[SWEEP[1]], ["train"], 8192)  # a quarter of the rows: rate only
    for r in range(reps):
        C["raw_1"].append(time_forward(model, batches, 1))
        C["raw_all"].append(time_forward(model, batches, cores))
        progress(f"cache [{r + 1}/{reps}] teacher forward alone", 1, sum(map(len, batches)), C["raw_1"][-1])
        ray = _ray(cores)
        plan = plan_pool(ray.cluster_resources(), None, None, "cpu")
        C["plan"] = plan.describe()
        b = _build(teacher, full, work / "cache-16x", plan)
        C["build"].append(b["rows_per_s"])
        C["sweep"][SWEEP[-1]].append(b)
        progress(f"cache [{r + 1}/{reps}] distkd build, {plan.describe()}", 2, rows, b["rows_per_s"])
        for k in SWEEP[:-1]:
            s = _build(teacher, subsets[k], work / f"cache-{k}x", plan)
            C["sweep"][k].append(s)
            progress(f"cache [{r + 1}/{reps}] build sweep {k}x", 2 * k / SWEEP[-1], s["rows"], s["rows_per_s"])
        ray = _ray(cores + 1)
        out = work / "ray-data-out"
        shutil.rmtree(out, ignore_errors=True)
        d = ray_data_build(str(teacher), split_files(full, "train"), str(out), plan.workers, plan.threads,
                           plan.num_cpus)
        C["ray_data"].append(d["rows"] / d["seconds"])
        progress(f"cache [{r + 1}/{reps}] Ray Data pipeline", 2, d["rows"], C["ray_data"][-1])
        ray.shutdown()
    C["workers"] = plan.workers * plan.threads
    shutil.rmtree(work / "ray-data-out", ignore_errors=True)


def _students(logs: Path, cache: Path, teacher: Path, nproc: int) -> dict[str, list[str]]:

    sha = read_meta(teacher)["sha256"]
    fixed = [f"logs={logs}", "train.eval_every=null", f"nproc={nproc}"]
    distill = ["distill", "--config", "jobs/demo/distill.yaml", *fixed]
    return {
        "hard": ["student", "train", "--config", "jobs/demo/student.yaml", *fixed],
        "cache": distill + [f"objective.teachers.0.cache={cache}", f"objective.teachers.0.sha256={sha}"],
        "online": distill + ["objective.teachers.0.cache=null", f"objective.teachers.0.export={teacher}"],
    }


def stage_distill(R: dict, work: Path, subsets: dict[int, Path], teacher: Path, reps: int, steps: int,
                  progress: Progress) -> None:

    nproc = 1 if steps < 10 else 2  # --quick: one rank, in the CLI's own process (no spawn)
    D = R["distill"] = {"hard": [], "cache": [], "online": [], "sweep": {k: [] for k in SWEEP}, "steps": steps,
                        "nproc": nproc}
    big = SWEEP[-1]
    cmds = _students(subsets[big], work / f"cache-{big}x", teacher, nproc)
    for i, name in enumerate(interleaved(["hard", "cache", "online"], reps)):
        s, _, _ = cli_measured(cmds[name], steps)
        D[name].append(s["rows_per_s"])
        D["parameters"] = s["parameters"]["total"]
        progress(f"distill [{i + 1}/{3 * reps}] {name}", 1, s["rows"], s["rows_per_s"])
    for r in range(reps):  # one epoch from the cache at each scale
        for k in SWEEP:
            cmd = _students(subsets[k], work / f"cache-{k}x", teacher, nproc)["cache"]
            s, wall, peak = cli_measured(cmd, 10**9)
            D["sweep"][k].append({"seconds": s["rows"] / s["rows_per_s"], "wall": wall, "peak_rss": peak,
                                  "rows": s["rows"], "rows_per_s": s["rows_per_s"]})
            progress(f"distill sweep [{r + 1}/{reps}] {k}x, one epoch", 3 * k / big, s["rows"], s["rows_per_s"])
    R["profile"] = profile_join(subsets[SWEEP[1]], work / f"cache-{SWEEP[1]}x", teacher)
    progress("distill: cache join under cProfile", 1)


def profile_join(logs: Path, cache: Path, teacher: Path, top: int = 12) -> dict:
    """One pass of the student's loader (batch 1024, no prefetch thread: all work in this
    thread) with and without the cache join, timed, then the joined pass under cProfile."""


    schema, files = load_schema(logs), split_files(logs, "train")
    cols = open_cache(cache, logs, "train", read_meta(teacher)["sha256"])

    def run(aligned) -> float:
        t = time.perf_counter()
        for _ in LogLoader(files, schema, 1024, prefetch=0, aligned=aligned):
            pass
        return time.perf_counter() - t

    plain, joined = min(run([]) for _ in range(2)), min(run([cols]) for _ in range(2))
    prof = cProfile.Profile()
    prof.enable()
    run([cols])
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    rows = []
    for (file, line, fn), (_, calls, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        rows.append({"function": f"{fn} ({where})", "calls": calls, "tottime": tt, "share": tt / total if total else 0})
    return {"rows": train_rows(logs), "plain_s": plain, "joined_s": joined, "top": rows, "total_s": total}


def stage_train(R: dict, work: Path, logs: Path, reps: int, steps: int, quick: bool, progress: Progress) -> None:
    """Launches of 1 and 2 ranks in the order 1 2 2 1 ...; each launch runs distkd's loop and
    the pipeline alternately."""

    config = "jobs/demo/student.yaml" if quick else "jobs/demo/teacher.yaml"
    T = R["train"] = {"config": config, "steps": steps, 1: {"distkd": [], "pipeline": []},
                      2: {"distkd": [], "pipeline": []}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTKD_NO_PROGRESS": "1"}
    for i, n in enumerate(interleaved([1, 2], reps)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            subprocess.run([sys.executable, "-m", "distkd.bench.baselines", "train", "--config", config,
                            "--nproc", str(n), "--steps", str(steps), "--json", str(out), f"logs={logs}",
                            f"out={tmp}/run"], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            r = json.loads(out.read_text())
        for k in ("distkd", "pipeline"):
            T[n][k] += r["rows_per_s"][k]
        T["pipelined_modules"] = r["pipelined_modules"]
        progress(f"train [{i + 1}/{2 * reps}] {n} rank(s)", 1 + n / 2, steps * r["rows_per_step"],
                 r["rows_per_s"]["distkd"][-1])


# -- the driver ------------------------------------------------------------------------------

def run(scale: int, reps: int, out: Path, work: Path, quick: bool) -> dict:

    quiet()
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    # planned work in rough units (a unit ~ one pass of the teacher over the train split)
    sweep = sum(SWEEP) / SWEEP[-1]
    progress = Progress(3 + reps * (1 + 2 + 2 + 2 * (sweep - 1) + 1) + 3 * reps + 3 * reps * sweep + 3.5 * reps)
    R: dict[str, Any] = {"scale": scale, "reps": reps, "quick": quick, "machine": machine(),
                         "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    subsets = make_data(work, scale, quick)
    R["rows_train"] = train_rows(subsets[SWEEP[-1]])
    R["shards_per_x"] = SHARDS_PER_X
    progress("data generated", 1, scale)
    teacher = work / "teacher"
    ensure_teacher(teacher, subsets[SWEEP[-1]], ModelConfig(**TEACHER))

    R["teacher"] = {**TEACHER, "parameters": read_meta(teacher).get("parameters")}
    stage_loader(R, subsets, reps, progress)
    stage_cache(R, work, subsets, teacher, reps, progress)
    stage_distill(R, work, subsets, teacher, reps, 4 if quick else 300, progress)
    stage_train(R, work, subsets[SWEEP[-1]], reps, 4 if quick else 40, quick, progress)
    R["seconds"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / (out.stem + ".json")).write_text(json.dumps(R, indent=1, default=str))
    write_markdown(R, out)
    logger.info(f"wrote {out} in {R['seconds'] / 60:.1f} min")
    return R


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distkd.bench.suite", description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=int(os.environ.get("BENCH_SCALE", 0)) or None,
                   help=f"rows of the dataset (default {DEFAULT_SCALE:,}; BENCH_SCALE)")
    p.add_argument("--quick", action="store_true", help=f"a tiny run ({QUICK_SCALE:,} rows, one repetition)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of every figure (default 3; --quick 1)")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--work", type=Path, default=Path("runs/bench/suite"), help="data, teacher and caches")
    p.add_argument("--from-json", type=Path, default=None,
                   help="only write --out from the figures a run saved (BENCHMARKS.json)")
    a = p.parse_args(argv)
    log.setup()
    if a.from_json:
        write_markdown(json.loads(a.from_json.read_text()), a.out)
        return 0
    scale = a.scale or (QUICK_SCALE if a.quick else DEFAULT_SCALE)
    run(scale, a.reps or (1 if a.quick else 3), a.out, a.work, a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
