"""`make bench-distill`: what the cache saves, in one run on the same rows and cores.

(a) the student on hard labels, (b) the student distilled from the cached logits,
(c) the student distilled online, the exported teacher's forward pass inside the loop.
Each trains the same student for the same steps on two gloo ranks (one thread each);
the time per epoch is the loop's rows/s (start-up and evaluation excluded) scaled to
the train split. Uses the demo's logs, teacher and cache (built first if missing).

A shared two-core machine drifts by several percent between runs a minute apart, as
much as b and a differ, so a and b run `--repeats` times each in the order a b b a
a b b a ... (a drift linear in time weighs on both alike) and the ratio is of medians.
Each of a and b runs under every `--loops` value (`train.pipeline`: TorchRec's
TrainPipelineSparseDist, the default, and the plain loop), all in one interleaved order, so
the pipeline/plain ratio comes from the same rounds.
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
from distkd.bench import cli_summary, cpu_model, scaled_jobs
from distkd.data.loader import split_files
from distkd.demo import load_out, teacher_and_cache
from distkd.eval_stats import t_interval

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


def paired_ratio(num: list[float], den: list[float]) -> str:
    """'mean [95% t interval]' of the per-round ratios num/den (rounds paired by position: the
    two ran next to each other, so a drift between rounds cancels)."""
    t = t_interval([a / b for a, b in zip(num, den)])
    if t["low"] is None:
        return f"{t['mean']:.3f} (n={t['n']}, no interval)"
    return f"{t['mean']:.3f} [{t['low']:.3f}, {t['high']:.3f}] (n={t['n']})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="jobs/demo")
    p.add_argument("--rows", type=int, default=None, help="run on a copy of the suite scaled to this many rows")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of a and of b each, per loop (c runs once)")
    p.add_argument("--loops", default="sparse_dist,plain",
                   help="train.pipeline values to measure a and b under (the first: the default)")
    a = p.parse_args(argv)
    log.setup()

    jobs = Path(a.jobs)
    if a.rows:
        runs = str(Path(load_out(jobs / "teacher.yaml")).parent)
        runs_to = f"{runs}-{a.rows}"
        jobs = scaled_jobs(jobs, Path(runs_to) / "jobs", a.rows, (runs, runs_to))
    data, _, teacher, cache = teacher_and_cache(jobs)
    distill = ["distill", "--config", str(jobs / "distill.yaml")]
    base = {
        "a: hard labels": ["student", "train", "--config", str(jobs / "student.yaml")],
        "b: distill from cache": distill + [f"objective.teachers.0.cache={cache.out}",
                                            f"objective.teachers.0.sha256={teacher['sha256']}"],
    }
    loops = a.loops.split(",")
    commands = {f"{name} [{loop}]": cmd + [f"train.pipeline={loop}"] for loop in loops for name, cmd in base.items()}
    online = "c: distill online"  # an online teacher is not fx-traceable: the plain loop whatever the switch
    commands[online] = distill + ["objective.teachers.0.cache=null", f"objective.teachers.0.export={cache.teacher}"]
    names = list(commands)
    order = interleaved(names[:-1], a.repeats) + [online]
    rates, parameters = run_all(commands, order, a.steps)

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in split_files(data.out, "train"))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; 2 gloo ranks, one thread each")
    print(f"student {parameters:,} parameters; teacher {teacher['parameters']:,}; {a.steps} steps per run; "
          f"epoch = {rows:,} train rows; {a.repeats} rounds of {', '.join(names[:-1])} (every other reversed), "
          f"then {online}")
    print(f"{'run':<36} {'rows/s (median)':>16} {'epoch s':>9}  each run, rows/s")
    epoch = {}
    for name in names:
        med = statistics.median(rates[name])
        epoch[name] = rows / med
        each = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"{name:<36} {med:>16,.0f} {epoch[name]:>9.1f}  {each}")
    hard, kd = list(base)
    for loop in loops:
        ratio = epoch[f"{kd} [{loop}]"] / epoch[f"{hard} [{loop}]"]
        print(f"[{loop}] b/a = {ratio:.3f} (goal <= 1.03): reading cached logits costs {100 * (ratio - 1):+.1f}% "
              f"epoch time; paired per round, a/b rows/s: "
              f"{paired_ratio(rates[f'{hard} [{loop}]'], rates[f'{kd} [{loop}]'])}")
    for other in loops[1:]:
        for name in (hard, kd):
            got, ref = rates[f"{name} [{loops[0]}]"], rates[f"{name} [{other}]"]
            print(f"{name}: {loops[0]} / {other} rows/s = {statistics.median(got) / statistics.median(ref):.3f} "
                  f"(medians); paired per round {paired_ratio(got, ref)}")
    print(f"c/b = {epoch[online] / epoch[f'{kd} [{loops[0]}]']:.2f}: running the teacher in the loop instead of "
          "reading the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
