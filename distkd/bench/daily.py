"""`make bench-daily`: ten synthetic days through `distkd daily`, warm-started against from scratch.

Synthetic logs in daily partitions whose truth drifts (`--drift` rad/day), a teacher trained
once on the first two days (jobs/daily/teacher.yaml), then days 3..N through `run_day` twice
over one cache: the job as written (each day's student warm-started from the promoted one)
and with `warm_start: false` (each day from scratch, the same steps). Per day: the candidate's
AUC of the first task on day D+1, whether it was promoted, the distill step's seconds and the
day's; the last day waits for a day D+1 that never comes (its candidate is not judged). The
first run of a day also builds the cache for it; the from-scratch run finds it built.

    python -m distkd.bench.daily [--days 10] [--rows-per-day 50000] [--work runs/bench/daily]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from distkd import log
from distkd.bench import cpu_model
from distkd.config import load
from distkd.daily import DailyJob, run_day
from distkd.daily_state import DayState, read_current
from distkd.data.synth import generate
from distkd.launch import run_job
from distkd.train.job import TrainJob

logger = logging.getLogger(__name__)

START = "2026-11-01"


def day_name(i: int) -> str:
    return f"2026-11-{i + 1:02d}"


def one_run(job: DailyJob, days: list[str]) -> list[dict]:
    """Each day through run_day: its exit, seconds, the candidate's AUC on D+1, promoted or not."""
    rows = []
    for day in days:
        t0 = time.perf_counter()
        rc = run_day(job, day)
        state = DayState(Path(job.out), day)
        ev = state.step("eval")
        rows.append({"day": day, "rc": rc, "status": state.status, "seconds": time.perf_counter() - t0,
                     "auc": ev.get("candidate"), "current_auc": ev.get("current"),
                     "promoted": state.step("promote").get("promoted"),
                     "distill_s": state.step("distill").get("seconds"), "cache_s": state.step("cache").get("seconds")})
        cur = read_current(Path(job.out))
        logger.info(f"bench-daily: {job.out} {day}: {rows[-1]['status']}, current {cur and cur['day']}")
    return rows


def verdict(row: dict) -> str:
    return ("yes" if row["promoted"] else "no") if row["status"] == "done" else row["status"]


def table(warm: list[dict], scratch: list[dict]) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.4f}"

    def sec(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = ["| day | warm: AUC on D+1 | promoted | distill s | day s (with the cache build) | "
             "from scratch: AUC on D+1 | promoted | distill s | day s |", "|---|---|---|---|---|---|---|---|---|"]
    for w, s in zip(warm, scratch):
        lines.append(f"| {w['day']} | {f(w['auc'])} | {verdict(w)} | {sec(w.get('distill_s'))} | {w['seconds']:.0f} | "
                     f"{f(s['auc'])} | {verdict(s)} | {sec(s.get('distill_s'))} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--rows-per-day", dest="rows_per_day", type=int, default=50_000)
    p.add_argument("--drift", type=float, default=0.05, help="the truth's drift, radians a day")
    p.add_argument("--jobs", default="jobs/daily")
    p.add_argument("--work", default="runs/bench/daily", help="emptied first")
    a = p.parse_args(argv)
    log.setup()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    generate(logs, a.days * a.rows_per_day, shards=1, preset="small", days=a.days, start=START, drift=a.drift)
    teacher = load(TrainJob, Path(a.jobs) / "teacher.yaml", [f"logs={logs}", f"out={work / 'teacher'}"])
    t0 = time.perf_counter()
    run_job(teacher)
    teacher_s = time.perf_counter() - t0
    job = load(DailyJob, Path(a.jobs) / "daily.yaml", [f"logs={logs}", f"teacher={work / 'teacher' / 'export'}",
                                                        f"cache={work / 'cache'}", f"out={work / 'warm'}"])
    days = [day_name(i) for i in range(2, a.days)]
    warm = one_run(job, days)
    scratch = one_run(dataclasses.replace(job, out=str(work / "scratch"), warm_start=False), days)
    print(f"bench-daily: {a.days} days x {a.rows_per_day:,} rows (drift {a.drift} rad/day), window "
          f"{job.window_days} days, min_gain {job.eval.min_gain}; teacher {teacher_s:.0f}s; {cpu_model()}")
    print(table(warm, scratch))
    (work / "result.json").write_text(json.dumps({"warm": warm, "scratch": scratch}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
