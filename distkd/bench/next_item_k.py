"""How η and the cache's size move with k and the sampled tail, through the real pipeline.

For each (k, tail) setting: a top-k cache of the suite's teacher (`distkd cache build`), one KD
student per seed distilled from it (the suite's distill job with `objective.k` and the loss
weights set), all evaluated on the test split against the teacher and the hard-label students.
The logs, teacher, base cache (k = 64, no tail) and students are those of `distkd demo
--next-item`, reused where the demo made them and made (the same way, by the demo's own stages)
where it did not. `--rows N` runs the whole sweep on a scaled copy of the suite instead (N rows,
students' step budgets scaled alike, everything under runs/next-item-N), for a machine where the
full suite's five caches take too long. Prints (and writes as JSON and Markdown): bytes per row
and per cached entry, Recall@10, NDCG@10, Recall@50 and η(Recall@10) per setting.

    python -m distkd.bench.next_item_k [--jobs jobs/next-item] [--rows N] [--seeds 1] [--settings 8:0 32:0 64:0 128:0 64:32]

With a tail, the KL's tail term is the importance-sampled estimate (`tail_kl`) in place of the
one-bucket top-k KL (`topk_kl`), at the same weight. The caches' Ray cluster is RAY_ADDRESS's
where set (e.g. a `ray start --head --num-cpus N` sized to take every core), else an embedded one.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from distkd import log
from distkd.bench import scaled_jobs
from distkd.config import read_yaml
from distkd.cache.contract import read_manifest, to_json_value
from distkd.demo import load_out, teacher_and_cache, train_stage
from distkd.eval_stats import gap_recovered
from distkd.evaluate import evaluate_models

logger = logging.getLogger(__name__)


def setting(text: str) -> tuple[int, int]:
    k, _, tail = text.partition(":")
    return int(k), int(tail or 0)


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "distkd.cli", *args]
    logger.info(f"\n== {' '.join(cmd[2:])}")
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default="jobs/next-item")
    ap.add_argument("--rows", type=int, default=None, help="run on a copy of the suite scaled to this many rows")
    ap.add_argument("--out", default=None, help="default: <the suite's runs>/k-sweep")
    ap.add_argument("--seeds", type=int, default=1, help="KD students per setting (seeds 0..n-1)")
    ap.add_argument("--settings", nargs="+", type=setting, default=[(8, 0), (32, 0), (64, 0), (128, 0), (64, 32)],
                    metavar="K:TAIL")
    args = ap.parse_args(argv)
    log.setup()
    jobs = Path(args.jobs)
    runs = str(Path(load_out(jobs / "teacher.yaml")).parent)  # runs/next-item
    if args.rows:
        runs_to = f"{runs}-{args.rows}"
        jobs = scaled_jobs(jobs, Path(runs_to) / "jobs", args.rows, (runs, runs_to))
        runs = runs_to
    out = Path(args.out or f"{runs}/k-sweep")
    t0 = time.perf_counter()

    _, fp, teacher, base = teacher_and_cache(jobs)
    demo_cache = Path(base.out) / teacher["sha256"][:12]  # by_teacher
    distill = read_yaml(jobs / "distill.yaml")
    weight = distill["objective"]["losses"]["topk_kl"]
    hard_out, kd_out = load_out(jobs / "student.yaml"), load_out(jobs / "distill.yaml")
    hard = []
    for seed in range(args.seeds):
        train_stage(jobs / "student.yaml", [f"train.seed={seed}", f"out={hard_out}/seed-{seed}"], fp,
                    f"student, hard labels, seed {seed}")
        hard.append(f"{hard_out}/seed-{seed}/export")

    rows = []
    for k, tail in args.settings:
        name = f"k{k}" + (f"-tail{tail}" if tail else "")
        is_base = (k, tail) == (base.topk.k, base.topk.tail)
        cache = demo_cache if is_base else out / name / "cache"
        if not is_base:
            cli("cache", "build", "--config", str(jobs / "cache.yaml"), f"out={cache}", f"topk.k={k}",
                f"topk.tail={tail}")
        exports = []
        for seed in range(args.seeds):
            run = f"{kd_out}/seed-{seed}" if is_base else f"{out}/{name}/seed-{seed}"
            losses = [f"objective.losses.topk_kl={0 if tail else weight}", f"objective.losses.tail_kl={weight if tail else 0}"]
            train_stage(jobs / "distill.yaml", [f"out={run}", f"train.seed={seed}", f"objective.teachers.0.cache={cache}",
                                                f"objective.teachers.0.sha256={teacher['sha256']}", f"objective.k={k}",
                                                *losses], fp, f"student, distilled from {name}, seed {seed}")
            exports.append(f"{run}/export")
        rows.append({"name": name, "k": k, "tail": tail, "cache": str(cache), "exports": exports,
                     "summary": to_json_value(read_manifest(cache).totals)})

    models = {"teacher": [base.teacher], "student-hard": hard, **{r["name"]: r["exports"] for r in rows}}
    logger.info(f"\n== eval: test split, {len(models)} models")
    result = evaluate_models(read_yaml(jobs / "eval.yaml")["logs"], models, split="test",
                             gap=("teacher", rows[0]["name"], "student-hard"))
    task = result["tasks"][0]
    m = {n: result["models"][n]["metrics"][task] for n in models}
    for r in rows:
        r.update({metric: m[r["name"]][metric]["mean"] for metric in ("recall@10", "ndcg@10", "recall@50")})
        r["recall@10_std"] = m[r["name"]]["recall@10"].get("std")  # over the seeds (None with one)
        r["eta_recall@10"] = gap_recovered(r["recall@10"], m["student-hard"]["recall@10"]["mean"],
                                           m["teacher"]["recall@10"]["mean"])
    lines = ["| k | sampled tail | bytes/row | bytes/entry | Recall@10 | NDCG@10 | Recall@50 | η(Recall@10) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in ("teacher", "student-hard"):
        lines.append(f"| {n} | | | | {m[n]['recall@10']['mean']:.4f} | {m[n]['ndcg@10']['mean']:.4f} | "
                     f"{m[n]['recall@50']['mean']:.4f} | |")
    for r in rows:
        s, std = r["summary"], r["recall@10_std"]
        recall = f"{r['recall@10']:.4f}" + ("" if std is None else f" ± {std:.4f}")
        lines.append(f"| {r['k']} | {r['tail'] or 'off'} | {s['bytes_per_row']:.1f} | "
                     f"{s['bytes_per_row_per_task']:.2f} | {recall} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@50']:.4f} | {r['eta_recall@10']:.3f} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "k_sweep.json").write_text(json.dumps({"rows": rows, "seeds": args.seeds, "eval_rows": result["rows"]}, indent=1))
    (out / "k_sweep.md").write_text(table + "\n")
    print(f"\n{table}\n\n{args.seeds} seed(s) per setting, {result['rows']:,} test rows; "
          f"{time.perf_counter() - t0:.0f}s; written to {out}/k_sweep.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
