"""Synthetic Criteo-like logs with a known ground truth (the model in distkd.data.synth_truth).

Generation is vectorized and streams one row group at a time; every row group is
seeded by (seed, split, shard, row group), so output is deterministic by seed and
independent of how many processes write it.

With `days` the logs are daily partitions `dt=YYYY-MM-DD` instead of split folders, and with
`drift` the truth moves by day: day t's weights are a rotation by drift * t radians from one
draw of the weights towards a second one (`synth_truth.Truth.drifted`), so the ids and dense
features keep their distributions while the label model they feed drifts at a known rate.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distkd import storage
from distkd.config import ConfigError
from distkd.data.schema import SCHEMA_FILE, DenseFeature, Schema, SparseFeature, Task
from distkd.data.synth_truth import PRESETS, Truth, cardinalities
from distkd.data.synth_layout import SPLIT_SHARE, check_days, plan_days, plan_shards, summarize

logger = logging.getLogger(__name__)

TASKS = (("click", "clicked", "p_click"), ("conversion", "converted", "p_conversion"))


def make_schema(preset: str, max_cardinality: int | None = None) -> Schema:
    p = PRESETS[preset]
    cards = cardinalities(p, max_cardinality)
    return Schema(
        sparse=[
            SparseFeature(name=f"C{i + 1}", num_embeddings=c, multi_valued=i in p.multi_valued)
            for i, c in enumerate(cards)
        ],
        dense=[DenseFeature(name=f"I{i + 1}", transform="log1p") for i in range(p.n_dense)],
        tasks=[Task(name=n, label=col) for n, col, _ in TASKS],
        request_id="request_id",
        eval_columns=[oracle for _, _, oracle in TASKS],
    )


def _mask_labels(table: pa.Table, rng: np.random.Generator, fraction: float) -> pa.Table:
    """Null both labels of a random `fraction` of rows: logged but never labelled."""
    if fraction <= 0:
        return table
    missing = rng.random(table.num_rows) < fraction
    for _, col, _ in TASKS:
        arr = table.column(col).to_numpy()
        table = table.set_column(
            table.schema.get_field_index(col), col, pa.array(arr, mask=missing, type=pa.int8())
        )
    return table


@dataclass(frozen=True)
class _ShardJob:
    out: str
    split: str
    split_idx: int
    shard: int
    rows: int
    id0: int
    preset: str
    seed: int
    row_group_rows: int
    max_cardinality: int | None
    unlabeled_fraction: float
    angle: float = 0.0  # the truth's drift on this shard's day (radians; see Truth.drifted)


_TRUTH_CACHE: dict = {}


def _truth(preset: str, seed: int, max_cardinality: int | None) -> Truth:
    key = (preset, seed, max_cardinality)
    if key not in _TRUTH_CACHE:
        _TRUTH_CACHE.clear()
        _TRUTH_CACHE[key] = Truth(preset, seed, max_cardinality)
    return _TRUTH_CACHE[key]


def _write_shard(job: _ShardJob) -> tuple[str, int]:
    truth = _truth(job.preset, job.seed, job.max_cardinality).drifted(job.angle)
    schema = make_schema(job.preset, job.max_cardinality).arrow_schema()
    final = storage.join(job.out, job.split, f"part-{job.shard:05d}.parquet")

    def write(fh) -> None:
        with pq.ParquetWriter(fh, schema, compression="zstd") as writer:
            done, rg = 0, 0
            while done < job.rows:
                n = min(job.row_group_rows, job.rows - done)
                rng = np.random.default_rng([job.seed, job.split_idx, job.shard, rg])
                table = truth.sample(n, rng, job.id0 + done)
                if job.split not in ("valid", "test"):  # train, or a day of partitioned logs
                    table = _mask_labels(table, rng, job.unlabeled_fraction)
                writer.write_table(table.cast(schema), row_group_size=n)
                done += n
                rg += 1

    storage.write_atomic(final, write)
    return final, job.rows


def generate(
    out: str | Path,
    rows: int,
    shards: int = 8,
    seed: int = 0,
    row_group_rows: int = 65_536,
    preset: str = "criteo",
    max_cardinality: int | None = None,
    unlabeled_fraction: float = 0.1,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
    days: int | None = None,
    start: str = "2026-11-01",
    drift: float = 0.0,
) -> Schema:
    """Write `rows` rows of synthetic logs into `out` (schema.yaml + train/valid/test shards),
    a local path or a storage URI (s3://bucket/logs, see distkd.storage).

    With `days`: daily partitions `dt=START`, `dt=START+1`, ... instead of split folders, each
    of `shards` shards (a job's `partitions:` picks the splits), every day's rows labelled like
    train rows; the truth drifts by `drift` radians a day (Truth.drifted: day t's weights have
    correlation cos(drift * t) with day 0's; 0 keeps one truth for every day)."""
    out = os.fspath(out)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {sorted(PRESETS)})")
    for name, value in (("--shards", shards), ("--row-group-rows", row_group_rows), ("--workers", workers),
                        ("--max-cardinality", 2 if max_cardinality is None else max_cardinality)):
        if value < (2 if name == "--max-cardinality" else 1):
            raise ConfigError(f"{name}: must be >= {2 if name == '--max-cardinality' else 1}, got {value}")
    if not 0 <= unlabeled_fraction <= 1:
        raise ConfigError(f"--unlabeled-fraction: must be in [0, 1], got {unlabeled_fraction}")
    if days is not None:
        check_days(rows, shards, days, start, drift)
    elif drift:
        raise ConfigError("--drift: the truth drifts by day; give --days N for daily partitions")
    if rows < 10 * (shards + 2):
        raise ConfigError(f"--rows {rows} is too few for {shards} shards (at least {10 * (shards + 2)})")
    old = storage.list_files(out, recursive=True)
    if old:
        if not force:
            raise FileExistsError(f"{out}: exists and is not empty (use --force to overwrite)")
        # The schema goes first: without it the directory is visibly unfinished from here on.
        storage.delete(storage.join(out, SCHEMA_FILE))
        if storage.is_remote(out):
            for f in old:
                storage.delete(f)  # nothing there (the schema) is no error
        else:
            shutil.rmtree(out)
    storage.ensure_writable_dir(out, "logs directory")
    schema = make_schema(preset, max_cardinality)
    jobs, id0 = [], 0
    plan = plan_shards(rows, shards) if days is None else plan_days(rows, shards, days, start)
    for idx, (group, sizes) in enumerate(plan.items()):
        storage.makedirs(storage.join(out, group))
        # Row groups are seeded by (seed, stream, shard, row group): streams 0-2 are the splits, 3+ the days.
        stream, angle = (idx, 0.0) if days is None else (len(SPLIT_SHARE) + idx, drift * idx)
        for shard, n in enumerate(sizes):
            jobs.append(_ShardJob(str(out), group, stream, shard, n, id0, preset, seed,
                                  row_group_rows, max_cardinality, unlabeled_fraction, angle))
            id0 += n
    start, done = time.perf_counter(), 0

    def report(path: str, n: int) -> None:
        nonlocal done
        done += n
        if progress:
            rate = done / max(time.perf_counter() - start, 1e-9)
            eta = (rows - done) / rate
            logger.info(f"  {done:>12,}/{rows:,} rows  {rate:,.0f} rows/s  ETA {eta:5.0f}s  {path}")

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for path, n in pool.map(_write_shard, jobs):
                report(path, n)
    else:
        for job in jobs:
            report(*_write_shard(job))
    # The schema goes last: a directory without it is visibly unfinished.
    schema.save(storage.join(out, SCHEMA_FILE))
    return schema


def run(args) -> int:
    start = time.perf_counter()
    try:
        schema = generate(
            args.out, args.rows, args.shards, args.seed, args.row_group_rows, args.preset,
            max_cardinality=args.max_cardinality, unlabeled_fraction=args.unlabeled_fraction,
            workers=args.workers, force=args.force, progress=True,
            days=args.days, start=args.start, drift=args.drift,
        )
    except FileExistsError as e:  # an existing logs directory is a usage error: one line, exit 2
        raise ConfigError(str(e)) from None
    took = time.perf_counter() - start
    print(summarize(args.out, schema, days=args.days is not None))
    logger.info(f"wrote {args.rows:,} rows in {took:.1f}s ({args.rows / took:,.0f} rows/s)")
    return 0
