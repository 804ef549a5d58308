"""Cache build throughput beside the teacher's raw forward rate, same rows, same cores.

    python -m distkd.bench.cache [--rows 1000000] [--logs runs/bench/cache-logs]

(a) the teacher alone: one process, no Ray, no I/O: every row of the logs pre-decoded into
    batches in memory, then timed forward passes with W×t torch threads;
(b) `distkd cache build` of the same logs on an already started Ray (cluster start-up not
    timed): W workers × t threads each, as the pool sizes itself on this machine (one CPU
    left to Ray), including worker start-up, teacher loading, reading, decoding, writing
    and the manifest. Each worker also runs one reading/decoding thread beside its torch
    threads; that overlap is the point of the design and is reported as such.
Prints both rates, the ratio b/a (goal >= 0.9) and bytes on disk per row per task (goal
<= 2.5), plus (b') the workers' steady rate on shards (start-up excluded).
Default data: criteo-preset logs (cardinalities capped at 100,000) and an untrained
teacher with the default ModelConfig, both created under runs/bench/ when missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from distkd import log
from distkd.bench import cpu_model
from distkd.data.schema import SCHEMA_FILE, load_schema
from distkd.data.synth import generate
from distkd.models.export import META_FILE, load_export, read_meta, write_export
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.data.loader import LogLoader, split_files
from distkd.cache.build import CacheJob, build
from distkd.cache.pool import connect, plan_pool

# Ray is imported by the baseline that starts it: its import costs seconds.

logger = logging.getLogger(__name__)


def ensure_logs(logs: Path, rows: int) -> None:

    if (logs / SCHEMA_FILE).exists():
        return

    logger.info(f"generating {rows:,} rows of criteo-preset logs into {logs} ...")
    generate(logs, rows, shards=4, seed=0, row_group_rows=16_384, preset="criteo", max_cardinality=100_000,
             workers=min(2, os.cpu_count() or 1), force=True)


def ensure_teacher(export: Path, logs: Path, cfg=None) -> None:
    """An untrained teacher export for `logs` (`cfg`: a ModelConfig, default its defaults)."""

    schema = load_schema(logs)
    if (export / META_FILE).exists():
        if read_meta(export).get("schema_fingerprint") == schema.fingerprint():
            return


    logger.info(f"writing an untrained teacher export to {export} ...")
    torch.manual_seed(0)
    cfg = cfg or ModelConfig()
    model = RankingModel(schema, cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    write_export(export, "teacher", schema, cfg, model.state_dict(), extra={"note": "untrained, for benchmarks"})


def decoded_batches(logs: Path, splits: list[str], batch_size: int) -> list:
    """Every row of the splits as Batches in memory, per shard like the workers (no batch spans
    two shards)."""

    schema = load_schema(logs)
    batches = []
    for f in [f for s in splits for f in split_files(logs, s)]:
        batches += list(LogLoader([f], schema, batch_size, prefetch=0))
    return batches


def time_forward(model, batches: list, threads: int) -> float:
    """rows/s of one forward pass of `model` over `batches` with `threads` torch threads
    (the process's thread count is restored afterwards)."""

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            t = time.perf_counter()
            for b in batches:
                model(b.sparse, b.dense).logits.float().numpy()
            return sum(len(b) for b in batches) / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)


def forward_rate(export: Path, logs: Path, splits: list[str], batch_size: int, threads: int, passes: int) -> tuple[float, int]:
    """(rows/s, rows): best of `passes` forward passes over pre-decoded batches."""

    model, _ = load_export(export)
    batches = decoded_batches(logs, splits, batch_size)
    rows = sum(len(b) for b in batches)
    return max(time_forward(model, batches, threads) for _ in range(passes)), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distkd.bench.cache", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows to generate if --logs has no data")
    ap.add_argument("--logs", type=Path, default=Path("runs/bench/cache-logs"))
    ap.add_argument("--teacher", type=Path, default=Path("runs/bench/cache-teacher"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cache"), help="cache directory (replaced)")
    ap.add_argument("--splits", default="train,valid,test")
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=None, help="default: as the build sizes its pool")
    ap.add_argument("--threads-per-worker", type=int, default=None)
    ap.add_argument("--passes", type=int, default=2, help="(a) is the best of this many passes (conservative on a noisy machine)")
    args = ap.parse_args(argv)
    log.setup()
    splits = [s for s in args.splits.split(",") if s]

    ensure_logs(args.logs, args.rows)
    ensure_teacher(args.teacher, args.logs)

    import ray


    t = time.perf_counter()
    connect(None)  # cluster start-up: not part of either figure
    ray_start = time.perf_counter() - t
    plan = plan_pool(ray.cluster_resources(), args.workers, args.threads_per_worker)
    threads = plan.workers * plan.threads
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, ray {ray.__version__}, "
          f"python {platform.python_version()}")
    print(f"Ray started in {ray_start:.1f}s (not timed); pool {plan.describe()}, so (a) runs {threads} torch thread(s)")

    a, rows = forward_rate(args.teacher, args.logs, splits, args.batch_size, threads, args.passes)
    print(f"(a) teacher forward, no Ray, no I/O : {a:>10,.0f} rows/s  ({rows:,} rows, {threads} thread(s), "
          f"batch {args.batch_size}, best of {args.passes})", flush=True)

    shutil.rmtree(args.out, ignore_errors=True)
    job = CacheJob(teacher=str(args.teacher), logs=str(args.logs), out=str(args.out), splits=splits,
                   workers=plan.workers, threads_per_worker=plan.threads, batch_size=args.batch_size)
    s = build(job)  # its progress: the cache's own log lines
    if s["rows"] != rows:
        raise SystemExit(f"row counts differ: (a) ran {rows:,} rows, the cache has {s['rows']:,}")
    b = s["rows_computed"] / s["seconds"]
    steady = s["rows_computed"] / (s["seconds"] - (s["workers_start_s"] or 0.0))
    print(f"(b) cache build (Ray up already)    : {b:>10,.0f} rows/s  ({s['rows']:,} rows in {s['seconds']:.1f}s: "
          f"worker start-up, teacher load, read, decode, forward, write, manifest)")
    w0 = s["workers"][0] if s["workers"] else {}
    print(f"(b') the same, from workers ready   : {steady:>10,.0f} rows/s  (less {s['workers_start_s']:.1f}s of worker "
          f"start-up: {w0.get('teacher_load_s', 0):.1f}s loading the teacher, the rest Ray starting the actor's "
          f"process and its imports of torch and torchrec)")
    ratio = b / a
    bpt = s["bytes_per_row_per_task"]
    print(f"ratio b/a: {ratio:.2f} ({'meets' if ratio >= 0.9 else 'BELOW'} the 0.9 goal); b'/a: {steady / a:.2f}")
    print(f"bytes on disk per row per task: {bpt:.2f} ({'meets' if bpt <= 2.5 else 'ABOVE'} the 2.5 goal; "
          f"fp16 logits, zstd, {s['bytes'] / 2**20:.1f} MiB for {s['rows']:,} rows)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
