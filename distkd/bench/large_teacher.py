"""A teacher larger than one process wants: its export, and its cache built by one actor or a group.

    python -m distkd.bench.large_teacher [--rows 200000] [--dim 128] [--reps 2]

The teacher: the criteo preset with its cardinalities uncapped (9.0M ids over 26 tables) at
`--dim` 128, 4.3 GiB of fp32 tables, trained a few steps on 2 ranks (table-wise) and exported
twice, sharded (every rank writes its shards through DCP) and as one gathered file. Then the
train split is cached on a two-node loopback Ray cluster (one CPU a node) by two K = 1 workers
(each a whole teacher) and by one K = 2 group (each actor half of it), interleaved, `--reps` times.
Peak RSS is the kernel's high-water mark per process and stage (distkd.memory); the figures are
each rank's and each actor's own. Prints a markdown report (also written to `--out`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
from pathlib import Path

import torch

from distkd import log
from distkd.bench import cpu_model
from distkd.bench.ray_local import ray_cluster
from distkd.cache.build import CacheJob, build
from distkd.config import load
from distkd.data.schema import SCHEMA_FILE, load_schema
from distkd.data.synth import generate
from distkd.launch import run_job
from distkd.train.job import TrainJob

logger = logging.getLogger(__name__)

GIB = 2**30


def ensure_logs(logs: Path, rows: int) -> None:
    if (logs / SCHEMA_FILE).exists():
        return
    logger.info(f"generating {rows:,} rows of criteo-preset logs, cardinalities uncapped, into {logs} ...")
    generate(logs, rows, shards=4, seed=0, row_group_rows=8192, preset="criteo", max_cardinality=None,
             workers=1, force=True)


def train_teacher(logs: Path, out: Path, dim: int, form: str) -> dict:
    """A few steps on 2 ranks, exported in `form`; rank 0's summary (with every rank's memory).
    A finished run under `out` is reused: delete it (or --work) to train again."""
    if (out / "summary.json").is_file() and (out / "export" / "export.json").is_file():
        logger.info(f"reusing the teacher in {out} (its summary holds the memory figures)")
        return json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    job = load(TrainJob, None, [f"logs={logs}", f"out={out}", "role=teacher", "tensorboard=false", "nproc=2",
                                f"model.embedding_dim={dim}", "train.batch_size=1024", "train.max_steps=10",
                                "train.checkpoint_every=1000", f"export.format={form}"])
    return run_job(job)


def table_bytes(logs: Path, dim: int, plan: dict[str, str], world: int = 2) -> tuple[int, int, dict[int, int]]:
    """(all tables, the largest, each rank's share under `plan`) in bytes of fp32 rows. A table
    on several ranks (column-wise) is split evenly; one with no ranks (data-parallel) is on all."""
    sizes = {f"t_{f.name}": f.num_embeddings * dim * 4 for f in load_schema(logs).sparse}
    per_rank = {r: 0 for r in range(world)}
    for table, where in plan.items():
        ranks = json.loads(where[where.index("["):]) if "[" in where else []
        for r in ranks or range(world):
            per_rank[r] += sizes[table] // (len(ranks) or 1)
    return sum(sizes.values()), max(sizes.values()), per_rank


def cache_once(logs: Path, export: Path, out: Path, address: str, ranks: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    job = CacheJob(teacher=str(export), logs=str(logs), out=str(out), splits=["train"], ray_address=str(address),
                   teacher_ranks=ranks, workers=2 // ranks, threads_per_worker=1, batch_size=4096)
    return build(job)


def steady_rate(s: dict) -> float:
    """Rows/s once the workers were up (their start-up and the teacher load excluded)."""
    return s["rows_computed"] / max(s["compute_s"] - (s["workers_start_s"] or 0.0), 1e-9)


def actor_peaks(s: dict) -> list[dict]:
    """Every actor's stages (start, load, build) in GiB, over the pool's workers and group ranks."""
    return [{k: v / GIB for k, v in rec["peak_rss_bytes"].items()} for w in s["workers"] for rec in w.get("memory", [])]


def fmt(xs: list[float], digits: int = 0) -> str:
    med = statistics.median(xs)
    return f"{med:,.{digits}f} ({min(xs):,.{digits}f}–{max(xs):,.{digits}f})" if len(xs) > 1 else f"{med:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distkd.bench.large_teacher", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="interleaved builds of each kind")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/large-teacher"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/large-teacher.md"))
    ap.add_argument("--report", action="store_true", help="only print the report of the last run (--work/results.json)")
    args = ap.parse_args(argv)
    log.setup()
    if args.report:
        return write_report(args, **json.loads((args.work / "results.json").read_text()))
    # the driver's address look-ups must say 127.0.0.1, as the loopback nodes' do (ray_local)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    work, logs = args.work, args.work / "logs"
    ensure_logs(logs, args.rows)

    exports = {form: train_teacher(logs, work / f"teacher-{form}", args.dim, form) for form in ("sharded", "file")}

    runs: dict[int, list[dict]] = {1: [], 2: []}
    (work / "ray").mkdir(parents=True, exist_ok=True)
    with ray_cluster(work / "ray", head_cpus=1, workers=({"cpus": 1},), dashboard=False) as address:
        for rep in range(args.reps):
            for k in (1, 2) if rep % 2 == 0 else (2, 1):  # interleaved, the order alternating
                logger.info(f"rep {rep + 1}/{args.reps}: cache build with teacher_ranks={k}")
                runs[k].append(cache_once(logs, work / "teacher-sharded" / "export", work / f"cache-k{k}", address, k))

    (work / "results.json").write_text(json.dumps({"exports": exports, "runs": runs, "load_average": os.getloadavg()[0]}, indent=1, default=str))
    return write_report(args, exports, runs)


def write_report(args, exports: dict, runs: dict, load_average: float | None = None) -> int:
    runs = {int(k): v for k, v in runs.items()}  # JSON keys are strings
    total, largest, per_rank = table_bytes(args.work / "logs", args.dim, exports["sharded"]["plan"])
    load = os.getloadavg()[0] if load_average is None else load_average
    text = "\n".join(report(args, exports, total, largest, per_rank, runs, load)) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


def report(args, exports: dict, total: int, largest: int, per_rank: dict[int, int], runs: dict[int, list[dict]],
           load: float) -> list[str]:
    lines = [
        f"# Large teacher: {total / GIB:.2f} GiB of fp32 tables",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, load average {load:.1f} at the end of the run; torch {torch.__version__}, "
        f"python {platform.python_version()}. `python -m distkd.bench.large_teacher --rows {args.rows} --dim {args.dim} "
        f"--reps {args.reps}`.",
        "",
        f"Teacher: criteo preset, cardinalities uncapped, embedding_dim {args.dim}: {total / GIB:.2f} GiB of tables, the "
        f"largest {largest / GIB:.2f} GiB; on 2 ranks as the CPU planner placed them (table- or column-wise): "
        + ", ".join(f"rank {r} holds {b / GIB:.2f} GiB ({b / total:.2f})" for r, b in sorted(per_rank.items())) + ".",
        "",
        "## Export: peak RSS per rank (GiB)",
        "",
        "| export | rank | its tables | RSS after training | peak while training | peak while exporting | "
        "export's own (peak − RSS after) | its tables + the largest table |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for form in ("sharded", "file"):
        for r, m in enumerate(exports[form]["memory"]):
            p = {k: v / GIB for k, v in m["peak_rss_bytes"].items()}
            after = m["rss_bytes"] / GIB  # the export frees what it made: this is the RSS it started from
            lines.append(f"| {form} | {r} | {per_rank.get(r, 0) / GIB:.2f} | {after:.2f} | {p['train']:.2f} | "
                         f"{p['export']:.2f} | {p['export'] - after:+.2f} | {(per_rank.get(r, 0) + largest) / GIB:.2f} |")
    lines += ["", "## Cache build: two K = 1 workers against one K = 2 group on the same 2 CPUs", "",
              "| teacher_ranks | actors | RSS at start-up | peak loading the teacher | peak building | "
              "held while building, share of the tables (largest actor; smallest) | rows/s (end to end) | rows/s (workers up) |",
              "|---|---|---|---|---|---|---|---|"]
    for k in (1, 2):
        peaks = [p for s in runs[k] for p in actor_peaks(s)]
        held = [(p["build"] - p["start"]) * GIB / total for p in peaks]
        lines.append(f"| {k} | {len(actor_peaks(runs[k][0]))} | {fmt([p['start'] for p in peaks], 2)} | "
                     f"{fmt([p['load'] for p in peaks], 2)} | {fmt([p['build'] for p in peaks], 2)} | "
                     f"{max(held):.2f}; {min(held):.2f} | "
                     f"{fmt([s['rows_per_s'] for s in runs[k]])} | {fmt([steady_rate(s) for s in runs[k]])} |")
    ratio = [steady_rate(b) / steady_rate(a) for a, b in zip(runs[1], runs[2])]
    e2e = [b["rows_per_s"] / a["rows_per_s"] for a, b in zip(runs[1], runs[2])]
    lines += ["", f"K = 2 group / two K = 1 workers, rows/s, paired by repetition: workers up {fmt(ratio, 2)}, "
              f"end to end {fmt(e2e, 2)}.",
              "GiB; medians with (min–max) over the repetitions and every actor of every build. Start-up: the actor's "
              "process with torch imported; loading: the teacher read from the sharded export (K = 1: whole, unsharded; "
              "K = 2: each rank its shards); building: reading, decoding, the forward and writing, after the load."]
    cumulative = [m for form in exports for m in exports[form]["memory"]] + [
        rec for k in runs for s in runs[k] for w in s["workers"] for rec in w.get("memory", [])]
    if not all(m.get("per_stage", True) for m in cumulative):
        lines += ["", "**This kernel ignored the peak's reset** (distkd.memory.peak_resettable): a stage's figure "
                  "is the peak of the process so far, not that stage's own."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
