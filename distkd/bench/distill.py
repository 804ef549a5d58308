"""`make bench-distill`: what the cache saves, in one run on the same rows and cores.

(a) the student on hard labels, (b) the student distilled from the cached logits,
(c) the student distilled online, the exported teacher's forward pass inside the loop.
Each trains the same student for the same steps on two gloo ranks (one thread each);
the time per epoch is the loop's rows/s (start-up and evaluation excluded) scaled to
the train split. Uses the demo's logs, teacher and cache (built first if missing).

A shared two-core machine drifts by several percent between runs a minute apart, as
much as b and a differ, so a and b run `--repeats` times each in the order a b b a
a b b a ... (a drift linear in time weighs on both alike) and the ratio is of medians.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq

from distkd import log
from distkd.bench import cli_summary, cpu_model
from distkd.data.loader import split_files
from distkd.demo import teacher_and_cache

logger = logging.getLogger(__name__)


def interleaved(names: list[str], repeats: int) -> list[str]:
    """Each name `repeats` times, every other round reversed (a b c c b a a b c ...): a drift
    linear in time weighs on all alike."""
    return [n for r in range(repeats) for n in (names if r % 2 == 0 else names[::-1])]


def run_all(commands: dict[str, list[str]], order: list[str], steps: int) -> tuple[dict[str, list[float]], int]:
    """rows/s of each run of `order` (names of `commands`), and the student's parameters."""
    rates: dict[str, list[float]] = {n: [] for n in commands}
    parameters = 0
    for i, name in enumerate(order, 1):
        logger.info(f"[{i}/{len(order)}] {name} ({steps} steps)")
        s = cli_summary(commands[name], steps)
        rates[name].append(s["rows_per_s"])
        parameters = s["parameters"]["total"]
    return rates, parameters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="jobs/demo")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of a and of b each (c runs once)")
    a = p.parse_args(argv)
    log.setup()

    jobs = Path(a.jobs)
    data, _, teacher, cache = teacher_and_cache(jobs)
    distill = ["distill", "--config", str(jobs / "distill.yaml")]
    commands = {
        "a: hard labels": ["student", "train", "--config", str(jobs / "student.yaml")],
        "b: distill from cache": distill + [f"objective.teachers.0.cache={cache.out}",
                                            f"objective.teachers.0.sha256={teacher['sha256']}"],
        "c: distill online": distill + ["objective.teachers.0.cache=null", f"objective.teachers.0.export={cache.teacher}"],
    }
    names = list(commands)
    order = interleaved(names[:2], a.repeats) + [names[2]]
    rates, parameters = run_all(commands, order, a.steps)

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in split_files(data.out, "train"))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; 2 gloo ranks, one thread each")
    print(f"student {parameters:,} parameters; teacher {teacher['parameters']:,}; {a.steps} steps per run; "
          f"epoch = {rows:,} train rows; order {' '.join(n[0] for n in order)}")
    print(f"{'run':<24} {'rows/s (median)':>16} {'epoch s':>9}  each run, rows/s")
    epoch = {}
    for name in names:
        med = statistics.median(rates[name])
        epoch[name] = rows / med
        each = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"{name:<24} {med:>16,.0f} {epoch[name]:>9.1f}  {each}")
    a_, b_, c_ = epoch.values()
    print(f"b/a = {b_ / a_:.3f} (goal <= 1.05): reading cached logits costs {100 * (b_ / a_ - 1):+.1f}% epoch time")
    print(f"c/b = {c_ / b_:.2f}: running the teacher in the loop instead of reading the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
