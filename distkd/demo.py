"""`distkd demo` (`make demo`): the whole pipeline on one machine, from the job files.

    logs -> teacher -> logit cache (embedded Ray) -> students on hard labels
      -> students distilled from the cache -> evaluation report

Every stage reads its YAML in `jobs/<suite>/`, exactly as it would on a cluster. A
rerun reuses what is still valid: logs whose generation parameters match, exports
whose job config and input logs match, and cache shards whose fingerprints match;
anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from distkd.config import ConfigError, load, read_yaml, to_dict
from distkd.data.schema import SCHEMA_FILE, SPLITS
from distkd.launch import run_job
from distkd.models.export import read_meta
from distkd.train.job import TrainJob
from distkd.cache.build import CacheJob, build
from distkd.evaluate import EvalJob, evaluate_models
from distkd.report import format_comparison, write_report
from distkd.data import instacart, synth, synth_next_item
from distkd.data.movielens import convert
from distkd.data.movielens_next import convert_next

logger = logging.getLogger(__name__)


@dataclass
class DataJob:
    """How the demo's logs are made: synthetic (`source: synth`) or converted MovieLens."""

    out: str = "runs/demo/logs"
    # synth | movielens (CTR); synth_next_item | movielens_next (next item, a multiclass task)
    source: Literal["synth", "movielens", "synth_next_item", "movielens_next", "instacart"] = "synth"
    path: Optional[str] = None  # MovieLens release directory (movielens, movielens_next); Instacart CSV or its folder
    rows: int = 1_000_000
    shards: int = 4
    seed: int = 0
    preset: str = "criteo"
    max_cardinality: Optional[int] = 100_000
    unlabeled_fraction: float = 0.1
    row_group_rows: int = 65_536
    workers: Optional[int] = None  # synth: processes writing shards (default 2)
    num_items: Optional[int] = None  # synth_next_item: the catalog (default: the preset's)
    history: int = 20  # movielens_next: movies of history per row
    privileged: bool = False  # movielens: also the teacher-only hindsight features (distkd.data.movielens)
    holdout: int = 2  # instacart: each user's last N orders are test, the N before them valid


@dataclass
class Suite:
    name: str
    jobs: Path
    seeds: list[int] = field(default_factory=lambda: [0])


def say(msg: str, level: int = logging.INFO) -> None:
    """A stage's headline: a blank line, then `== msg`."""
    logger.log(level, f"\n== {msg}")


def logs_fingerprint(logs: str | Path) -> str:
    """Cheap identity of a logs directory: schema and every shard's path, size and mtime."""
    logs = Path(logs)
    h = hashlib.sha256((logs / SCHEMA_FILE).read_bytes())
    for split in SPLITS:
        for f in sorted((logs / split).glob("*.parquet")):
            st = f.stat()
            h.update(f"{split}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def make_logs(job: DataJob) -> None:
    out = Path(job.out)
    stamp = out / "data-job.json"
    want = {k: v for k, v in to_dict(job).items() if k != "workers"}  # the logs don't depend on it
    if job.source in ("synth", "synth_next_item"):
        presets = synth.PRESETS if job.source == "synth" else synth_next_item.PRESETS
        if job.preset in presets:  # the truth's parameters live in code: a change there means new logs
            want["truth"] = repr(presets[job.preset])
    if (out / SCHEMA_FILE).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        say(f"logs: reusing {out} (same parameters)")
        return
    say(f"logs: writing {out}")
    if job.source in ("movielens", "movielens_next") and not (job.path and Path(job.path).is_dir()):
        raise ConfigError(f"data.path: MovieLens directory {job.path!r} not found")
    if job.source == "instacart":
        if not (job.path and Path(job.path).exists()):
            raise ConfigError(f"data.path: Instacart order lines {job.path!r} not found")
        instacart.convert(job.path, out, job.shards, job.row_group_rows, job.holdout, force=True)
    elif job.source == "movielens":
        convert(job.path, out, shards=job.shards, row_group_rows=job.row_group_rows, force=True,
                privileged=job.privileged)
    elif job.source == "movielens_next":
        convert_next(job.path, out, job.history, shards=job.shards, row_group_rows=job.row_group_rows, force=True)
    elif job.source == "synth_next_item":
        synth_next_item.generate(out, job.rows, job.shards, job.seed, job.row_group_rows, job.preset, num_items=job.num_items,
                      unlabeled_fraction=job.unlabeled_fraction, workers=job.workers or 2, force=True)
    else:
        schema = synth.generate(out, job.rows, job.shards, job.seed, job.row_group_rows, job.preset,
                          max_cardinality=job.max_cardinality, unlabeled_fraction=job.unlabeled_fraction,
                          workers=job.workers or 2, force=True, progress=True)
        logger.info(synth.summarize(out, schema))
    stamp.write_text(json.dumps(want, indent=2))


def train_stage(config: Path, overrides: list[str], logs_fp: str, label: str) -> dict[str, Any]:
    """Train (or reuse) one model; returns its export metadata."""

    job = load(TrainJob, config, overrides)
    out = Path(job.out)
    want = {"job": to_dict(job), "logs": logs_fp}
    stamp = out / "export" / "inputs.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        say(f"{label}: reusing {out / 'export'} (same job, same logs)")
        return read_meta(out / "export")
    say(f"{label}: training ({config}{' ' + ' '.join(overrides) if overrides else ''})")
    run_job(job, where=str(config))  # the same preflight and launcher as `distkd distill`
    stamp.write_text(json.dumps(want, indent=2))
    return read_meta(out / "export")


def teacher_and_cache(jobs: Path) -> tuple[DataJob, str, dict[str, Any], Any]:
    """A suite's logs, teacher export and logit cache, each reused while still valid.
    Returns the data job, the logs' fingerprint, the teacher's export metadata and the cache job."""

    data = load(DataJob, jobs / "data.yaml")
    make_logs(data)
    fp = logs_fingerprint(data.out)
    teacher = train_stage(jobs / "teacher.yaml", [], fp, "teacher")
    # One cache directory per teacher under one root (by_teacher): a retrained teacher gets a
    # fresh cache, never a blend; students name the root and the teacher's sha256.
    cache_job = replace(load(CacheJob, jobs / "cache.yaml"), by_teacher=True)
    say(f"cache: {cache_job.out}/{teacher['sha256'][:12]}")
    build(cache_job)
    return data, fp, teacher, cache_job


def run_suite(suite: Suite) -> dict[str, Any]:

    jobs = suite.jobs
    _, fp, teacher, cache_job = teacher_and_cache(jobs)
    hard = []
    for seed in suite.seeds:
        student = load_out(jobs / "student.yaml")
        train_stage(jobs / "student.yaml", [f"train.seed={seed}", f"out={student}/seed-{seed}"], fp,
                    f"student, hard labels, seed {seed}")
        hard.append(f"{student}/seed-{seed}/export")

    kd = []
    for seed in suite.seeds:
        student = load_out(jobs / "distill.yaml")
        train_stage(jobs / "distill.yaml", [f"train.seed={seed}", f"out={student}/seed-{seed}",
                                            f"objective.teachers.0.cache={cache_job.out}",
                                            f"objective.teachers.0.sha256={teacher['sha256']}"], fp,
                    f"student, distilled from the cache, seed {seed}")
        kd.append(f"{student}/seed-{seed}/export")

    ev = load(EvalJob, jobs / "eval.yaml")
    ev = replace(ev, kd=kd, hard=hard)
    say(f"eval: {ev.split} split, report in {ev.out}")
    result = evaluate_models(ev.logs, {"teacher": [ev.teacher], "student-KD": ev.kd, "student-hard": ev.hard},
                             split=ev.split, batch_size=ev.batch_size,
                             serving_dir=Path(ev.out) / "serving" if ev.serving else None)
    report = write_report(result, ev.out)
    table = format_comparison(result)
    return {"suite": suite.name, "table": table, "report": str(report), "result": result}


def load_out(config: Path) -> str:

    out = read_yaml(config).get("out")
    if not out:
        raise ConfigError(f"{config}: out: is required")
    return out


def suite_name(data: DataJob) -> str:
    """What a suite is called, from what its data job makes: the MovieLens release it converts
    (the folder's name: ml-latest-small, ml-100k, ...) or the generator, so that a suite pointed
    at another release is not reported under the shipped one's name."""
    release = Path(data.path).resolve().name if data.path else "MovieLens"
    return {"synth": "synthetic", "synth_next_item": "next-item (synthetic)", "movielens": release,
            "movielens_next": f"next-movie ({release})"}[data.source]


def named(jobs: Path, seeds: list[int]) -> Suite:
    return Suite(suite_name(load(DataJob, jobs / "data.yaml")), jobs, seeds=seeds)


def movielens(suite: Suite) -> list[Suite]:
    """[suite] when its MovieLens release is there, else [] (said)."""
    path = load(DataJob, suite.jobs / "data.yaml").path
    if path and Path(path).is_dir():
        return [suite]
    say(f"skipping {suite.name}: the MovieLens release {path!r} is not there (see {suite.jobs / 'data.yaml'})",
        logging.WARNING)
    return []


def run(args) -> int:
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    jobs = Path(args.jobs)
    # next-item is its own run: the next-item teacher alone takes ~15 min here
    first, second = ("next-item", "movielens-next") if getattr(args, "next_item", False) else ("demo", "movielens")
    suites = [named(jobs / first, seeds)]
    if not args.skip_movielens:
        suites += movielens(named(jobs / second, seeds))
    results = [run_suite(s) for s in suites]
    for r in results:
        print(f"\n### {r['suite']}\n{r['table']}\nreport: {r['report']}")
    logger.info(f"\ndemo finished in {time.perf_counter() - start:.0f}s")
    return 0
