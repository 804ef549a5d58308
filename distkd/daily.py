"""`distkd daily --config JOB --date D`: one day of a student retrained on a rolling window.

The existing stages in sequence, each step recorded in OUT/days/D/state.json (distkd.daily_state)
so that a rerun skips what finished and a killed run resumes in the step it was in:

    validate   day D's shards against the schema (types, row groups, unique example ids)
    drift      day D against the drift.window_days days before it (distkd.data.drift); a failing
               check stops the day with exit 3 naming the feature and figure: nothing after it
               runs, so the cache and the promoted student are untouched
    cache      the teacher's logits for the window D-window_days+1 .. D (a cache that grows:
               yesterday's build holds the window but D, so this computes day D alone)
    distill    the student on the window, warm-started from the promoted student (`init:`; the
               first day from scratch), into OUT/days/D/student; killed, it resumes from its own
               last committed checkpoint (the trainer's --resume)
    eval       candidate and promoted student on day D+1, which neither has trained on; when
               D+1 is not there yet the day waits (status `waiting`): rerun it, or run D+1, which
               finishes it first
    promote    when the candidate's metric minus the promoted one's is at least eval.min_gain
               (the first candidate always): OUT/current.json names its export, written
               atomically after the export was verified; the last keep_last promoted exports kept

The student is configured by a distill job file (`student:`) and inline fields (`distill:`);
the daily job fills in logs, out, partitions, init and the teacher's cache for each day.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from distkd import storage
from distkd.cache.build import CacheJob, build
from distkd.config import ConfigError, from_dict, load, read_yaml
from distkd.daily_state import (
    STEPS, DayState, check_export, days_recorded, drop_checkpoints, out_lock, promote, read_current, remove_student,
)
from distkd.data.drift import EXIT_FAILED, DriftConfig, check_day
from distkd.data.layout import PartitionRange, split_files
from distkd.data.schema import LogsError, load_schema
from distkd.data.validate import validate_files
from distkd.evaluate import evaluate_models
from distkd.launch import run_job
from distkd.models.export import read_meta, resolve_export
from distkd.train.job import TrainJob

logger = logging.getLogger(__name__)

CANDIDATE, CURRENT = "candidate", "current"
LOWER_IS_BETTER = ("logloss", "ne")


@dataclass
class EvalGate:
    """The promotion rule: the candidate against the promoted student on day D+1."""

    metric: Literal["auc", "logloss", "ne"] = "auc"  # of `task` on day D+1
    task: Optional[str] = None  # default: the schema's first task
    # Promote when the candidate's metric improves on the promoted one's by at least this much
    # (AUC: candidate - current; logloss, ne: current - candidate); -0.001: not worse by 0.001
    min_gain: float = -0.001
    batch_size: int = 16384


@dataclass
class DailyJob:
    """One day of a student retrained on a rolling window (`distkd daily`, docs/daily.md): the
    logs, the teacher and its cache, the student's job, the drift thresholds and the promotion rule."""

    logs: str = "runs/daily/logs"  # date-partitioned logs (KEY=YYYY-MM-DD folders)
    teacher: str = "runs/daily/teacher/export"  # the teacher export whose cached logits the student learns from
    cache: str = "runs/daily/cache"  # a root of caches by teacher (out/<teacher sha256[:12]>/)
    out: str = "runs/daily/out"  # days/D/ (state, candidate, eval) and current.json
    key: str = "dt"  # the partition key
    window_days: int = 7  # the student trains on days D-window_days+1 .. D
    warm_start: bool = True  # false: every day from scratch (the baseline `make bench-daily` compares with)
    keep_last: int = 3  # promoted exports kept (the current one and those before it)
    student: Optional[str] = None  # a distill job file for the student's model, optim, train, objective
    distill: dict[str, Any] = field(default_factory=dict)  # fields over it (logs, out, partitions, init: set here)
    cache_workers: Optional[int] = None  # the cache build's Ray actors (default: its own)
    drift: DriftConfig = field(default_factory=DriftConfig)
    eval: EvalGate = field(default_factory=EvalGate)

    def validate(self) -> None:
        if self.window_days < 1 or self.keep_last < 1:
            raise ConfigError(f"window_days and keep_last must be >= 1, got {self.window_days}, {self.keep_last}")
        for name in ("logs", "out", "partitions", "init", "role"):
            if name in self.distill:
                raise ConfigError(f"distill.{name}: set by the daily job for each day; leave it out")
        self.student_job("2026-01-02", None, "sha")  # the student's fields load: a typo fails now

    def student_job(self, day: str, init: Optional[str], sha256: str, where: str = "daily job") -> TrainJob:
        """The day's distill job: the student file and `distill:` fields, with this day's logs,
        window, out directory, warm start and the teacher's cache."""
        data = _merged(read_yaml(self.student) if self.student else {}, self.distill)
        objective = data.get("objective") or {}
        objective.setdefault("kind", "ctr_kd")
        objective["teachers"] = [{"cache": self.cache, "sha256": sha256}]
        first = str(_date(day) - datetime.timedelta(days=self.window_days - 1))
        on = {"key": self.key, "start": day, "end": day}
        data.update(logs=self.logs, out=str(Path(self.out) / "days" / day / "student"), role="student",
                    objective=objective, init={"path": init},
                    # valid and test are day D, inside the window: the trainer's own report, never the gate
                    partitions={"train": {"key": self.key, "start": first, "end": day}, "valid": on, "test": on})
        return from_dict(TrainJob, data, f"{where}: the student of {day}")


def _merged(base: dict, over: dict) -> dict:
    """`over` laid onto a copy of `base`, mapping into mapping (`distill: {train: {epochs: 2}}`
    changes one field of the student file's train section)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _date(day: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(day)
    except ValueError:
        raise ConfigError(f"--date: {day!r} is not a date YYYY-MM-DD") from None


def _next_day(day: str) -> str:
    return str(_date(day) + datetime.timedelta(days=1))


def _day_files(job: DailyJob, day: str) -> Optional[list[str]]:
    """Day `day`'s shards, or None when the logs have no such partition."""
    try:
        return split_files(job.logs, "day", {"day": PartitionRange(key=job.key, start=day, end=day)})
    except LogsError:
        return None


def _teacher_sha(job: DailyJob) -> str:
    return read_meta(resolve_export(job.teacher))["sha256"]


class Day:
    """One day's run: its state and the steps, in order."""

    def __init__(self, job: DailyJob, day: str, nproc: Optional[int] = None, callbacks: Sequence = ()) -> None:
        self.job, self.day, self.nproc, self.callbacks = job, day, nproc, list(callbacks)
        self.out = Path(job.out)
        self.state = DayState(self.out, day)
        self.student = self.out / "days" / day / "student"

    def run(self) -> int:
        """The remaining steps; the exit status (0, or 3: stopped by the drift check)."""
        for name in STEPS:
            if self.state.done(name):
                logger.info(f"daily {self.day}: {name}: done at {self.state.step(name)['finished_at']}, skipped")
                continue
            before = self.state.start(name)
            logger.info(f"daily {self.day}: {name} ...")
            t0 = time.perf_counter()
            rc = getattr(self, "_" + name)(before)
            if rc is not None:
                return rc
            self.state.finish(name, seconds=round(time.perf_counter() - t0, 3))
        self.state.end("done")
        return 0

    def _validate(self, before: dict) -> None:
        files = _day_files(self.job, self.day)
        s = validate_files(self.job.logs, files or [])
        self.state.step("validate").update(rows=s["rows"], shards=s["shards"])

    def _drift(self, before: dict) -> Optional[int]:
        report = check_day(self.job.logs, self.day, self.job.drift, key=self.job.key)
        record = {"window": report.window, "checks": len(report.checks),
                  "failures": [{"feature": c.feature, "figure": c.figure, "value": c.value,
                                "threshold": c.threshold(), "detail": c.detail} for c in report.failures]}
        if report.failures:
            self.state.finish("drift", "failed", **record)
            self.state.end("stopped")
            lines = "; ".join(c.describe() for c in report.failures)
            logger.error(f"distkd: daily {self.day}: drift fails {len(report.failures)} check(s): {lines}; "
                         "the cache and the promoted student are untouched (fix the day's logs and rerun)")
            return EXIT_FAILED
        self.state.step("drift").update(record)
        return None

    def _cache(self, before: dict) -> Optional[int]:
        first = str(_date(self.day) - datetime.timedelta(days=self.job.window_days - 1))
        cache = CacheJob(teacher=self.job.teacher, logs=self.job.logs, out=self.job.cache, splits=["daily"],
                         partitions={"daily": PartitionRange(key=self.job.key, start=first, end=self.day)},
                         by_teacher=True, workers=self.job.cache_workers)
        cache.validate()
        s = build(cache)
        if not s["complete"]:
            raise storage.StorageError(f"{s['cache']}: the cache build left shards uncomputed; rerun the day")
        self.state.step("cache").update(cache=s["cache"], computed=s["computed"], skipped=s["skipped"])
        return None

    def _distill(self, before: dict) -> None:
        resume = before.get("status") == "started"  # killed in this step: the trainer resumes itself
        # the init it started with (a pointer that moved since must not change a run half done)
        init = before["init"] if resume and "init" in before else self._init()
        self.state.step("distill").update(init=init)
        self.state.save()
        job = self.job.student_job(self.day, init, _teacher_sha(self.job))
        if self.nproc is not None:
            job.nproc = self.nproc
        logger.info(f"daily {self.day}: distill {'resumes' if resume else 'starts'} in {job.out}, "
                    f"{'from ' + init if init else 'from scratch'}")
        run_job(job, resume=resume, where=f"daily {self.day}", callbacks=self.callbacks)
        export = resolve_export(self.student)
        meta = read_meta(export)
        check_export(export, meta["sha256"])
        self.state.step("distill").update(export=str(export), sha256=meta["sha256"], resumed=resume)

    def _init(self) -> Optional[str]:
        cur = read_current(self.out)
        if cur is None or not self.job.warm_start:
            return None
        check_export(Path(cur["export"]), cur["sha256"])
        return cur["export"]

    def _eval(self, before: dict) -> Optional[int]:
        nxt = _next_day(self.day)
        if _day_files(self.job, nxt) is None:
            self.state.finish("eval", "waiting", on=nxt)
            self.state.end("waiting")
            logger.warning(f"daily {self.day}: day {nxt} is not in {self.job.logs} yet: the candidate waits to be "
                           f"judged on it (rerun --date {self.day} or run --date {nxt} once it lands)")
            return 0
        distilled = self.state.step("distill")
        cur = read_current(self.out)
        models = {CANDIDATE: [distilled["export"]]}
        if cur is not None:
            check_export(Path(cur["export"]), cur["sha256"])
            models[CURRENT] = [cur["export"]]
        gate = self.job.eval
        task = gate.task or load_schema(self.job.logs, stats=False).task_names[0]
        result = evaluate_models(self.job.logs, models, "eval", gate.batch_size,
                                 partitions={"eval": PartitionRange(key=self.job.key, start=nxt, end=nxt)})
        storage.atomic_write_bytes(self.state.dir / "eval.json",
                                   lambda fh: fh.write(json.dumps(result, indent=1, default=str).encode()))
        value = {n: result["models"][n]["metrics"][task][gate.metric]["mean"] for n in models}
        record = {"on": nxt, "task": task, "metric": gate.metric, "candidate": value[CANDIDATE],
                  "rows": result["rows"], "min_gain": gate.min_gain}
        if cur is None:
            record.update(promote=True, why="no promoted student yet")
        else:
            gain = value[CURRENT] - value[CANDIDATE] if gate.metric in LOWER_IS_BETTER else value[CANDIDATE] - value[CURRENT]
            record.update(current=value[CURRENT], current_day=cur["day"], current_sha256=cur["sha256"],
                          gain=gain, promote=gain >= gate.min_gain,
                          why=f"gain {gain:+.4f} {'>=' if gain >= gate.min_gain else '<'} min_gain {gate.min_gain:+.4f}")
        self.state.step("eval").update(record)
        logger.info(f"daily {self.day}: {task} {gate.metric} on {nxt}: candidate {value[CANDIDATE]:.4f}"
                    + (f", current (day {cur['day']}) {value[CURRENT]:.4f}" if cur else "") + f": {record['why']}")
        return None

    def _promote(self, before: dict) -> None:
        decided, distilled = self.state.step("eval"), self.state.step("distill")
        if decided["promote"]:
            promote(self.out, self.day, Path(distilled["export"]), distilled["sha256"], self.job.keep_last,
                    {"eval": {k: decided.get(k) for k in ("on", "task", "metric", "candidate", "current", "gain")}})
            drop_checkpoints(self.student)
        else:
            remove_student(self.out, self.day, "not promoted")
        self.state.step("promote").update(promoted=decided["promote"])


def run_day(job: DailyJob, day: str, nproc: Optional[int] = None, callbacks: Sequence = ()) -> int:
    """Day `day` of `job`: the days before it that wait for it to be judged first, then its own
    remaining steps. The exit status. `callbacks` go to the distill step's ranks (as cli.main's)."""
    _date(day)
    if _day_files(job, day) is None:
        raise LogsError(f"{job.logs}: no partition {job.key}={day}")
    out = Path(job.out)
    state = DayState(out, day)
    if state.status == "done":
        logger.info(f"daily {day}: finished at {state.doc.get('ended_at')}: nothing to do")
        return 0
    with out_lock(out):
        for earlier in days_recorded(out):
            if earlier < day and DayState(out, earlier).status == "waiting" and _next_day(earlier) == day:
                logger.info(f"daily {day}: day {earlier} waited for {day} to be judged on: finishing it first")
                Day(job, earlier, nproc, callbacks).run()
        cur = read_current(out)
        if cur is not None and cur["day"] >= day:
            raise ConfigError(f"{out}: the promoted student is day {cur['day']}'s; day {day} is not after it "
                              "(a daily job moves forward: run a later day, or another out directory)")
        this = Day(job, day, nproc, callbacks)
        if this.state.status == "stopped":
            logger.info(f"daily {day}: stopped at {this.state.doc.get('ended_at')} by a check: running its checks again")
            this.state.restart()
        return this.run()


def summary_line(job: DailyJob, day: str, rc: int) -> str:
    state, cur = DayState(Path(job.out), day), read_current(Path(job.out))
    ev = state.step("eval")
    what = {"done": "promoted" if state.step("promote").get("promoted") else "kept the promoted student",
            "stopped": "stopped by the drift check", "waiting": f"waiting for day {ev.get('on')}"}.get(
        state.status, state.status)
    if ev.get("status") == "done":
        what += (f" ({ev['task']} {ev['metric']} on {ev['on']}: candidate {ev['candidate']:.4f}"
                 + (f", current {ev['current']:.4f}" if ev.get("current") is not None else "") + ")")
    pointer = f"day {cur['day']} ({cur['sha256'][:12]}…)" if cur else "none"
    return f"daily {day}: {what}; current: {pointer}; exit {rc}"


def run(args) -> int:
    """`distkd daily`."""
    job = load(DailyJob, args.config, list(args.overrides))
    rc = run_day(job, args.date, nproc=args.nproc, callbacks=getattr(args, "callbacks", ()))
    print(summary_line(job, args.date, rc))
    return rc
