"""`make bench-staleness`: students distilled from a 1-, 7- and 14-day-old teacher on logs whose
truth drifts by day, with and without age weighting and the adapter, against the hard-label student.

Everything goes through the CLI's entry points (`distkd.cli.main`): `data synth` writes N daily
partitions whose truth turns by `--drift` radians a day; for each age a, a teacher trains on the
`--teacher-days` days ending a days before the test day T (jobs/daily/staleness/teacher.yaml) and
`cache build` caches its logits of the student's days; then for each seed the students train on
the `--student-days` days before T (jobs/daily/staleness/student.yaml) and report their AUC on T:

    hard        the hard-label student (objective.kind=hard)
    KD          hard + soft-label KD from the teacher's cache
    KD+age      the same, the KD terms weighted by 0.5 ** (age / half life) (objective.age_weighting)
    KD+adapter  the same, distilling the teacher's logits corrected by an affine adapter (objective.adapter)

Each KD student is paired with the hard student of the same seed: the table gives the mean AUC
difference and its 95% t interval over the seeds (distkd.eval_stats.t_interval), for the first
task (click), and KD+age and KD+adapter also with plain KD of the same seed. The seed is the
students' (initialisation and row order); logs and teachers are one draw.

    python -m distkd.bench.staleness [--days 20] [--rows-per-day 20000] [--seeds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from distkd import log
from distkd.bench import cpu_model
from distkd.cli import main as cli
from distkd.eval_stats import t_interval

logger = logging.getLogger(__name__)

START = "2026-11-01"
VARIANTS = {  # name: overrides of the student's distill job
    "KD": [],
    "KD+age": ["objective.age_weighting.half_life_days={half_life}"],
    "KD+adapter": ["objective.adapter.form=affine"],
}


def day(i: int) -> str:
    return (dt.date.fromisoformat(START) + dt.timedelta(days=i)).isoformat()


def split_overrides(split: str, first: str, last: str) -> list[str]:
    return [f"partitions.{split}.key=dt", f"partitions.{split}.start={first}", f"partitions.{split}.end={last}"]


def days_overrides(train: tuple[str, str], test: str) -> list[str]:
    return [*split_overrides("train", *train), *split_overrides("valid", test, test), *split_overrides("test", test, test)]


def run(argv: list[str]) -> float:
    """`distkd ARGV` in this process; its seconds. A failing stage stops the bench."""
    t0 = time.perf_counter()
    rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"bench-staleness: `distkd {' '.join(argv)}` exited {rc}")
    return time.perf_counter() - t0


def auc(out: Path, task: str) -> float:
    """The run's AUC of `task` on its test split (summary.json)."""
    return float(json.loads((out / "summary.json").read_text())["test"][task]["auc"])


def fmt(ci: dict) -> str:
    if ci["low"] is None:
        return f"{ci['mean']:+.4f}"
    return f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"


def table(result: dict) -> str:
    """Markdown: per teacher age, each variant's mean AUC and its paired differences (same seed)
    against the hard-label student and, for KD+age and KD+adapter, against plain KD."""
    hard = result["students"]["hard"]
    lines = [f"| teacher age (days) | teacher AUC on T | student | AUC on T (mean ± sd, {len(hard)} seeds) | "
             "− hard, mean [95% t interval] | − KD, mean [95% t interval] |", "|---|---|---|---|---|---|"]
    lines.append(f"| – | – | hard | {t_interval(hard)['mean']:.4f} ± {_sd(hard):.4f} | – | – |")
    for age, t in result["teachers"].items():
        kd = result["students"][f"KD@{age}"]
        for v in VARIANTS:
            aucs = result["students"][f"{v}@{age}"]
            vs_kd = "–" if v == "KD" else fmt(t_interval([a - b for a, b in zip(aucs, kd)]))
            lines.append(f"| {age} | {t['auc']:.4f} | {v} | {t_interval(aucs)['mean']:.4f} ± {_sd(aucs):.4f} | "
                         f"{fmt(t_interval([a - b for a, b in zip(aucs, hard)]))} | {vs_kd} |")
    return "\n".join(lines)


def _sd(values: list[float]) -> float:
    n = len(values)
    m = sum(values) / n
    return (sum((x - m) ** 2 for x in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=20, help="daily partitions; the last is the test day T")
    p.add_argument("--rows-per-day", dest="rows_per_day", type=int, default=20_000)
    p.add_argument("--drift", type=float, default=0.1, help="the truth's drift, radians a day")
    p.add_argument("--ages", default="1,7,14", help="the teachers' ages on T: their window ends T - age")
    p.add_argument("--teacher-days", dest="teacher_days", type=int, default=4)
    p.add_argument("--student-days", dest="student_days", type=int, default=2)
    p.add_argument("--half-life", dest="half_life", type=float, default=7.0, help="KD+age: days")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--task", default="click")
    p.add_argument("--jobs", default="jobs/daily/staleness")
    p.add_argument("--work", default="runs/bench/staleness", help="emptied first")
    p.add_argument("--out", default=None, help="the table's file (markdown; default WORK/table.md)")
    a = p.parse_args(argv)
    log.setup()
    ages = [int(x) for x in a.ages.split(",")]
    test = a.days - 1
    if test - max(ages) - a.teacher_days + 1 < 0 or a.student_days > test:
        raise SystemExit(f"bench-staleness: {a.days} days are too few for ages {ages} and {a.teacher_days}-day teachers")
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    t0 = time.perf_counter()
    run(["data", "synth", "--out", str(logs), "--preset", "small", "--rows", str(a.days * a.rows_per_day),
         "--shards", "1", "--days", str(a.days), "--start", START, "--drift", str(a.drift)])
    students = (day(test - a.student_days), day(test - 1))
    result: dict = {"args": vars(a), "test_day": day(test), "student_days": students, "teachers": {},
                    "students": {}, "seconds": {}}
    for age in ages:
        end = test - age
        out = work / f"teacher-{age}"
        s = run(["teacher", "train", "--config", f"{a.jobs}/teacher.yaml", f"logs={logs}", f"out={out}",
                 *days_overrides((day(end - a.teacher_days + 1), day(end)), day(test))])
        c = run(["cache", "build", "--teacher", str(out / "export"), "--logs", str(logs), "--out",
                 str(work / f"cache-{age}"), "--splits", "train", "--workers", "1", *split_overrides("train", *students)])
        result["teachers"][age] = {"window": [day(end - a.teacher_days + 1), day(end)], "auc": auc(out, a.task),
                                   "train_s": round(s, 1), "cache_s": round(c, 1)}
    runs = [("hard", None, ["objective={kind: hard}"], "student")]
    runs += [(f"{v}@{age}", age, [f"objective.teachers.0.cache={work / f'cache-{age}'}",
                                  *(o.format(half_life=a.half_life) for o in extra)], "distill")
             for age in ages for v, extra in VARIANTS.items()]
    for seed in range(a.seeds):
        for name, age, extra, cmd in runs:
            out = work / "students" / f"{name}-seed{seed}"
            argv = [cmd, *(["train"] if cmd == "student" else []), "--config", f"{a.jobs}/student.yaml", f"logs={logs}",
                    f"out={out}", f"train.seed={seed}", *days_overrides(students, day(test)), *extra]
            s = run(argv)
            result["students"].setdefault(name, []).append(auc(out, a.task))
            result["seconds"].setdefault(name, []).append(round(s, 1))
    result["total_s"] = round(time.perf_counter() - t0, 1)
    header = (f"bench-staleness: {a.days} days x {a.rows_per_day:,} rows, drift {a.drift} rad/day; test day "
              f"{day(test)}; students on {students[0]} .. {students[1]}; teachers on {a.teacher_days} days ending "
              f"{', '.join(str(x) for x in ages)} days before it; KD+age half life {a.half_life} days; "
              f"{a.seeds} seeds; {result['total_s']:.0f}s; {cpu_model()}")
    md = f"{header}\n\n{table(result)}\n"
    print(md)
    (work / "result.json").write_text(json.dumps(result, indent=1))
    Path(a.out or work / "table.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
