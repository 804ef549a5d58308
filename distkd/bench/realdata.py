"""`make bench-realdata`: distillation on two real data sets, each teacher kind against a hard-label
student searched the same way, >= 5 seeds of each winner on test, paired KD - hard intervals.

    python -m distkd.bench.realdata [--sets instacart movielens-priv] [--samples 6] [--seeds 0 1 2 3 4]

Per data set, a suite of jobs/ (data, teacher, cache, student, distill, eval: the privileged
teacher's suite) with plain/ (the plain teacher and its cache) and ensemble/ (the ensemble's
second member and the cache of the two):

  1. logs (the converter), then three teachers, each reused while its job and logs are unchanged:
     privileged (every feature, the teacher-only ones included), plain (the student's features,
     bigger) and a second plain one of another architecture and seed; caches of the privileged
     teacher, the plain one and the ensemble of the two plain ones (mean logit).
  2. the search: one hard-label study and one KD study per teacher kind, each `--samples` trials,
     fifo (every trial runs to the end: no scheduler cuts a slow starter, so the hard student's
     low-rate trials are judged on their last validation like the KD ones). The shared fields
     (both learning rates, epochs) take the *same* drawn values in every study; a KD trial adds
     only its loss weight. Selection on the valid split's AUC only.
  3. each study's winner retrained for every seed; on the test split: the teacher, the hard and
     the KD students' AUC, logloss and calibration, the per-seed KD - hard differences with
     their 95% t interval, and eta (the share of the teacher - hard gap KD recovers) where the
     teacher is above the hard student.

Prints a markdown table and writes it, with the settings that won, into docs/realdata.md
between its study markers (`--doc`), and everything into <--out>/<set>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from distkd import log
from distkd.cache.build import CacheJob, build
from distkd.config import load
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema
from distkd.demo import DataJob, load_out, logs_fingerprint, make_logs, train_stage
from distkd.eval_stats import GAP_METRICS, HARD, KD, gap_recovered, paired_differences, spread
from distkd.evaluate import check_export, evaluate_export, evaluate_models, resolve_export
from distkd.launch.sweep import SchedulerConfig, Study, SweepConfig, run_study
from distkd.launch.sweep_report import exports, rows
from distkd.metrics import TaskMetrics

logger = logging.getLogger(__name__)

SETS = ("instacart", "movielens-priv")
# each kind's teacher job files (an ensemble: its members) and its cache job, under the suite's folder
KINDS = {"priv": ["teacher.yaml"], "ensemble": ["plain/teacher.yaml", "ensemble/teacher.yaml"],
         "plain": ["plain/teacher.yaml"]}
CACHES = {"priv": "cache.yaml", "ensemble": "ensemble/cache.yaml", "plain": "plain/cache.yaml"}
METRIC = "valid/mean/auc"
SHARED = {"optim.dense_lr": {"loguniform": [0.001, 0.03]}, "optim.embedding_lr": {"loguniform": [0.0005, 0.05]},
          "train.epochs": {"choice": [1, 2, 3]}}
KD_ONLY = {"objective.losses.mse": {"loguniform": [0.1, 3.0]}}
SHOWN = ("auc", "logloss", "calibration")
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def draws(space: dict, n: int, seed: int) -> list[dict]:
    """n points of `space`, from a generator seeded by (seed, the space's keys)."""
    rng = random.Random(f"distkd-realdata/{seed}/{','.join(space)}")
    out = []
    for _ in range(n):
        point = {}
        for key, spec in space.items():
            kind, v = next(iter(spec.items()))
            point[key] = (v[rng.randrange(len(v))] if kind == "choice"
                          else math.exp(rng.uniform(math.log(v[0]), math.log(v[1]))))
        out.append(point)
    return out


def teacher_metrics(logs: str, members: list[str], task: str) -> dict[str, float]:
    """A teacher's test metrics; several members: their mean logit (the ensemble's `mean_logit`)."""
    schema = load_schema(logs)
    files = split_files(logs, "test")
    logits, labels = [], None
    for d in members:
        v = check_export(resolve_export(d), schema, logs)
        _, p, y = evaluate_export(resolve_export(d), LogLoader(files, v, 16384, prefetch=0), stride=1)
        p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        logits.append(np.log(p / (1 - p)))
        labels = y
    m = TaskMetrics([task])
    m.update(torch.from_numpy(np.mean(logits, axis=0)), torch.from_numpy(np.asarray(labels, np.float64)))
    return {k: float(v) for k, v in m.compute()[task].items()}


def study(cfg: SweepConfig, name: str, base: Study, points: list[dict], seeds: list[int], where: str) -> dict:
    """Search `points`, then the valid winner once per seed: its settings and seed exports."""
    state = run_study(cfg, name, base, where, points=points, asha=False)
    table = [r for r in rows(state, METRIC, "max") if r[METRIC] is not None]
    if not table:
        raise RuntimeError(f"{name}: no trial finished (see {Path(cfg.out) / name})")
    best = {k: table[0][k] for k in points[0]}
    seeded = run_study(cfg, f"{name}-seeds", base, where, asha=False,
                       points=[{**best, "train.seed": s} for s in seeds])
    return {"settings": best, "valid_auc": table[0][METRIC], "trials": len(table), "exports": exports(seeded)}


def run_set(jobs: Path, name: str, samples: int, seeds: list[int], kinds: list[str], out_root: str) -> dict:
    folder = jobs / name
    data = load(DataJob, folder / "data.yaml")
    make_logs(data)
    fp = logs_fingerprint(data.out)
    task = load_schema(data.out).task_names[0]
    teachers = {}
    for t in sorted({m for k in kinds for m in KINDS[k]}):
        train_stage(folder / t, [], fp, f"teacher {t}")
        teachers[t] = str(Path(load_out(folder / t)) / "export")
    caches = {}
    for kind in kinds:
        job = replace(load(CacheJob, folder / CACHES[kind]), by_teacher=True)
        caches[kind] = build(job)["cache"]
    cfg = SweepConfig(out=f"{out_root}/{name}", metric=METRIC, mode="max", num_samples=samples, max_concurrent=2,
                      scheduler=SchedulerConfig(kind="fifo"), ranks_per_trial=1, cpus_per_rank=1.0)
    where = f"distkd.bench.realdata {name}"
    shared = draws(SHARED, samples, 0)
    extra = draws(KD_ONLY, samples, 0)
    out = {"set": name, "logs": data.out, "task": task, "samples": samples, "seeds": seeds, "space": SHARED,
           "kd_space": KD_ONLY, "scheduler": "fifo", "kinds": {}}
    out["hard"] = study(cfg, "hard", Study(base=str(folder / "student.yaml")), shared, seeds, where)
    for kind in kinds:
        base = Study(base=str(folder / "distill.yaml"), overrides=[f"objective.teachers.0.cache={caches[kind]}"])
        kd = study(cfg, f"kd-{kind}", base, [{**s, **e} for s, e in zip(shared, extra)], seeds, where)
        out["kinds"][kind] = {"kd": kd, "cache": caches[kind], "members": [teachers[m] for m in KINDS[kind]],
                              **compare(data.out, task, [teachers[m] for m in KINDS[kind]], kd["exports"],
                                        out["hard"]["exports"])}
    return out


def compare(logs: str, task: str, members: list[str], kd: list[str], hard: list[str]) -> dict:
    """Test metrics of the teacher and both students, paired KD - hard intervals and eta."""
    res = evaluate_models(logs, {KD: kd, HARD: hard}, split="test")
    teacher = teacher_metrics(logs, members, task)
    models = res["models"]
    paired = paired_differences(models, [task])[task]
    by_seed = {e["seed"]: e for e in models[HARD]["exports"]}
    eta = {}
    for metric, sign in GAP_METRICS.items():
        hard_mean, kd_mean = (models[n]["metrics"][task][metric]["mean"] for n in (HARD, KD))
        per_seed = [gap_recovered(e["metrics"][task][metric], by_seed[e["seed"]]["metrics"][task][metric],
                                  teacher[metric]) for e in models[KD]["exports"]]
        eta[metric] = {"value": gap_recovered(kd_mean, hard_mean, teacher[metric]),
                       "teacher_above": bool(sign * (teacher[metric] - hard_mean) > 0),
                       "per_seed": spread([v for v in per_seed if v is not None])}
    summary = {n: {m: models[n]["metrics"][task][m] for m in SHOWN} for n in (KD, HARD)}
    summary["parameters"] = {n: models[n]["parameters"]["mean"] for n in (KD, HARD)}
    return {"teacher": {m: teacher[m] for m in SHOWN}, "students": summary,
            "paired": {m: {k: paired[m][k] for k in ("per_seed", "mean", "low", "high", "n")} for m in GAP_METRICS},
            "eta": eta}


def _f(v, d=4, sign=False) -> str:
    return "–" if v is None else (f"{v:+.{d}f}" if sign else f"{v:.{d}f}")


def markdown(results: list[dict], seconds: float) -> str:
    lines = ["| data set | teacher | teacher AUC / logloss / cal. | hard AUC (mean ± sd) | KD AUC (mean ± sd) | "
             "KD − hard AUC [95% t] | KD − hard logloss [95% t] | hard / KD cal. | η AUC (means; per seed) | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    goals = []
    for r in results:
        met = []
        for kind, k in r["kinds"].items():
            t, s, p, e = k["teacher"], k["students"], k["paired"], k["eta"]
            auc, ll = p["auc"], p["logloss"]
            ok = auc["low"] is not None and auc["low"] > 0 and (e["auc"]["value"] or 0) >= 0.5
            met.append(ok)
            eta = (f"{_f(e['auc']['value'], 2)}; {_f(e['auc']['per_seed']['mean'], 2)} ± {_f(e['auc']['per_seed']['std'], 2)}"
                   if e["auc"]["teacher_above"] else "– (teacher not above hard)")
            lines.append(
                f"| {r['set']} | {kind} | {_f(t['auc'])} / {_f(t['logloss'])} / {_f(t['calibration'], 3)} | "
                f"{_f(s[HARD]['auc']['mean'])} ± {_f(s[HARD]['auc']['std'])} | {_f(s[KD]['auc']['mean'])} ± "
                f"{_f(s[KD]['auc']['std'])} | {_f(auc['mean'], sign=True)} [{_f(auc['low'], sign=True)}, "
                f"{_f(auc['high'], sign=True)}] | {_f(ll['mean'], sign=True)} [{_f(ll['low'], sign=True)}, "
                f"{_f(ll['high'], sign=True)}] | {_f(s[HARD]['calibration']['mean'], 3)} / "
                f"{_f(s[KD]['calibration']['mean'], 3)} | {eta} | {'met' if ok else 'missed'} |")
        goals.append(f"* **{r['set']}**: goal (paired AUC interval above 0 and η ≥ 0.5 for one teacher kind) "
                     f"{'met' if any(met) else 'missed'}.")
    lines += ["", *goals, "", "Settings that won on the valid split (the same drawn learning rates and epochs "
              "for every study; fifo):", ""]
    for r in results:
        lines.append(f"* {r['set']} ({r['samples']} trials a study, seeds {r['seeds']}): hard "
                     + _settings(r["hard"]) + "; " + "; ".join(f"KD-{k} " + _settings(v["kd"])
                                                               for k, v in r["kinds"].items()))
    per_seed = "; ".join(f"{r['set']} {k}: " + ", ".join(_f(d, sign=True) for d in v["paired"]["auc"]["per_seed"])
                         for r in results for k, v in r["kinds"].items())
    lines += ["", f"Per-seed KD − hard test AUC: {per_seed}.", "",
              f"This invocation: {seconds / 60:.1f} min (2-core shared CPU, nice 10; logs, teachers, caches "
              "and finished trials are reused)."]
    return "\n".join(lines)


def _settings(s: dict) -> str:
    return ("(valid AUC " + _f(s["valid_auc"]) + ": "
            + ", ".join(f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                        for k, v in s["settings"].items()) + ")")


def write_doc(doc: Path, table: str, command: str) -> None:
    """Replace the part of `doc` between the study markers (the hand-written text stays)."""
    text = doc.read_text() if doc.is_file() else f"# Real data\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc}: no {BEGIN} ... {END} markers to write the study between")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n`{command}`\n\n{table}\n{END}{rest.split(END, 1)[1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), help="folders of --jobs")
    p.add_argument("--jobs", default="jobs")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--samples", type=int, default=6, help="trials of each study (the same for every study)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/realdata", help="the studies' folders and each set's JSON")
    p.add_argument("--doc", default="docs/realdata.md", help="markdown page to write the table into ('' for none)")
    args = p.parse_args(argv)
    log.setup()
    if len(args.seeds) < 2:
        p.error("--seeds: at least two for a paired interval")
    t0 = time.perf_counter()
    results = []
    for name in args.sets:
        r = run_set(Path(args.jobs), name, args.samples, args.seeds, args.kinds, args.out)
        Path(args.out, f"{name}.json").write_text(json.dumps(r, indent=2, default=str))
        results.append(r)
    table = markdown(results, time.perf_counter() - t0)
    print(table)
    if args.doc:
        command = ("python -m distkd.bench.realdata --sets " + " ".join(args.sets) + f" --samples {args.samples} "
                   "--seeds " + " ".join(map(str, args.seeds)) + (" --kinds " + " ".join(args.kinds)
                                                                 if args.kinds != list(KINDS) else ""))
        write_doc(Path(args.doc), table, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
