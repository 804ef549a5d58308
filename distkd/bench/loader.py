"""Loader throughput on one core beside pyarrow's raw read-and-decode, and across decoding workers.

    python -m distkd.bench.loader [--rows 2000000] [--logs runs/bench/loader-logs] [--reps 5]

(a) pyarrow alone: every row group of the train split, the training columns, each
    column touched as numpy (lists flattened);
(b) LogLoader: a full pass at batch size 8192 with the contract checks on, producing
    KeyedJaggedTensor batches;
(c) the KJT floor: (a) plus the one copy any KJT loader makes (ids key-major, dense and labels
    stacked), nothing else: the most a loader of KJT batches can reach against (a).
(a), (c) and (b) alternate `--reps` times in one process pinned to one core; the figure is the
median of the per-repetition ratios b/a with their min-max (aim: >= 0.9), beside c/a. Then (b) with 1
and 2 decoding workers (`LogLoader(workers=N)`, threads), alternating, on every core this
process may use: rows/s, median and min-max, and the scaling 2 vs 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from distkd import log
from distkd.bench import cpu_model
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import SCHEMA_FILE, load_schema
from distkd.data.synth import generate

logger = logging.getLogger(__name__)


def pin_one_core() -> int:
    """Pin this process (and torch / pyarrow pools) to one core; return that core."""

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    return cpu


def raw_pass(files: list[str], columns: list[str]) -> int:
    """pyarrow's own read and decode, row group by row group, touching every column."""
    rows = 0
    for path in files:
        with pq.ParquetFile(path) as pf:
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=columns)
                for col in table.columns:
                    for arr in col.chunks:
                        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                            arr.offsets.to_numpy()
                            arr.flatten().to_numpy()
                        else:
                            arr.to_numpy(zero_copy_only=False)
                rows += table.num_rows
    return rows


def kjt_floor_pass(files: list[str], schema, batch_size: int) -> int:
    """The least any loader of KJT batches does on top of (a): each batch's ids copied key-major
    into one values array with their lengths, the dense columns and labels stacked into
    float32 matrices. No checks, transforms, modulo, shuffle or batches across row groups."""
    if any(f.hash is not None for f in schema.sparse):
        raise ValueError("the KJT floor reads integer ids only (the bench's synthetic logs)")
    keys, rows = [f.name for f in schema.sparse], 0
    for path in files:
        with pq.ParquetFile(path) as pf:
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=schema.training_columns())
                n = table.num_rows
                sparse = []
                for k in keys:
                    arr = table.column(k).combine_chunks()
                    if pa.types.is_list(arr.type):
                        sparse.append((arr.values.to_numpy(), arr.offsets.to_numpy()))
                    else:
                        sparse.append((arr.to_numpy(zero_copy_only=False), None))
                dense = [table.column(f.name).to_numpy() for f in schema.dense]
                labels = [table.column(c).to_numpy() for c in schema.label_columns]
                for a in range(0, n, batch_size):
                    b = min(n, a + batch_size)
                    values, lengths = [], []
                    for v, off in sparse:
                        if off is None:
                            values.append(v[a:b])
                            lengths.append(np.ones(b - a, np.int32))
                        else:
                            values.append(v[off[a]:off[b]])
                            lengths.append(np.diff(off[a:b + 1]).astype(np.int32))
                    KeyedJaggedTensor(keys=keys, values=torch.from_numpy(np.concatenate(values)),
                                      lengths=torch.from_numpy(np.concatenate(lengths)), stride=b - a)
                    torch.from_numpy(np.stack([d[a:b] for d in dense], axis=1).astype(np.float32, copy=False))
                    torch.from_numpy(np.stack([y[a:b] for y in labels], axis=1).astype(np.float32))
                rows += n
    return rows


def loader_pass(files: list[str], schema, batch_size: int, workers: int = 1) -> int:

    rows = 0
    for batch in LogLoader(files, schema, batch_size, check=True, workers=workers):
        rows += len(batch)
    return rows


def unpin(cpus: set[int], threads: int) -> None:
    """Undo `pin_one_core` (for callers that go on with other work in this process)."""

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    pa.set_cpu_count(len(cpus))
    pa.set_io_thread_count(len(cpus))


def rates(files: list[str], schema, batch_size: int, reps: int) -> dict[str, list[float]]:
    """rows/s of (a) pyarrow, (c) the KJT floor and (b) LogLoader, `reps` interleaved passes each, on one core;
    the process's affinity and thread counts are restored afterwards."""

    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    cols = schema.training_columns()
    runs = {"pyarrow": lambda: raw_pass(files, cols), "floor": lambda: kjt_floor_pass(files, schema, batch_size),
            "loader": lambda: loader_pass(files, schema, batch_size)}
    out: dict[str, list[float]] = {name: [] for name in runs}
    pin_one_core()
    try:
        for _ in range(reps):
            for name, fn in runs.items():
                t = time.perf_counter()
                rows = fn()
                out[name].append(rows / (time.perf_counter() - t))
    finally:
        unpin(cpus, threads)
    return out


def worker_rates(files: list[str], schema, batch_size: int, reps: int, workers=(1, 2)) -> dict[int, list[float]]:
    """rows/s of LogLoader at each number of decoding workers, `reps` interleaved passes each,
    on the cores this process may use."""
    out: dict[int, list[float]] = {n: [] for n in workers}
    for _ in range(reps):
        for n in workers:
            t = time.perf_counter()
            rows = loader_pass(files, schema, batch_size, n)
            out[n].append(rows / (time.perf_counter() - t))
    return out


def paired(num: list[float], den: list[float]) -> list[float]:
    """Per-repetition ratios num/den of two interleaved measurements."""
    return [n / d for n, d in zip(num, den)]


def ratio_spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}-{max(xs):,.0f}]"


def ensure_logs(logs: Path, rows: int) -> None:

    if (logs / SCHEMA_FILE).exists() and any((logs / "train").glob("*.parquet")):
        return

    logger.info(f"generating {rows:,} rows of synthetic logs into {logs} ...")
    generate(logs, rows, shards=4, seed=0, row_group_rows=65536, preset="criteo", force=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distkd.bench.loader", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows to generate if --logs has no data")
    ap.add_argument("--logs", type=Path, default=Path("runs/bench/loader-logs"), help="logs directory")
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each measurement")
    args = ap.parse_args(argv)
    log.setup()

    ensure_logs(args.logs, args.rows)

    schema = load_schema(args.logs)
    files = split_files(args.logs, "train")

    cols = schema.training_columns()
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores usable; "
          f"torch {torch.__version__}, pyarrow {pa.__version__}")
    print(f"data: {len(files)} train shards in {args.logs}, {len(cols)} training columns, batch {args.batch_size}")

    r = rates(files, schema, args.batch_size, args.reps)
    ratios = paired(r["loader"], r["pyarrow"])
    ratio = statistics.median(ratios)
    print(f"one core, {args.reps} interleaved reps, rows/s median [min-max]:")
    print(f"  (a) pyarrow read+decode : {spread(r['pyarrow'])}")
    print(f"  (b) LogLoader, checks on: {spread(r['loader'])}")
    print(f"  (c) the KJT floor       : {spread(r['floor'])}")
    print(f"  b/a: {ratio_spread(ratios)} ({'meets' if ratio >= 0.9 else 'BELOW'} the 0.9 aim)")
    print(f"  c/a: {ratio_spread(paired(r['floor'], r['pyarrow']))} (the most a KJT loader can reach)")
    print(f"  b/c: {ratio_spread(paired(r['loader'], r['floor']))} (LogLoader against that floor)")

    w = worker_rates(files, schema, args.batch_size, args.reps)
    scale = paired(w[2], w[1])
    print(f"decoding workers (threads), {len(os.sched_getaffinity(0))} cores, {args.reps} interleaved reps:")
    for n, xs in w.items():
        print(f"  {n} worker(s): {spread(xs)} rows/s")
    print(f"  2 vs 1: {statistics.median(scale):.2f}x [{min(scale):.2f}-{max(scale):.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
