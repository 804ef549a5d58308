"""`distkd data validate`: check every shard of a logs directory against its schema.

For each split and shard: the file opens as Parquet, its columns have the contract's
types, every row group passes `check_row_group` (streamed one row group at a time,
reading only the training columns), and `example_id` is unique across all shards of
all splits. The first problem raises `LogsError` naming the file (and row group,
column and row where there is one).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distkd import storage
from distkd.data.checks import check_row_group
from distkd.data.schema import SPLITS, LogsError, Schema, check_arrow_schema, load_schema


def shard_paths(split_dir: str | Path) -> list[str]:
    """The Parquet shards of one split (a path or a storage URI), in name order (hidden and
    temporary files skipped)."""
    if not storage.is_remote(split_dir) and not Path(split_dir).is_dir():
        raise LogsError(f"{split_dir}: split directory is missing")
    paths = [p for p in storage.list_files(split_dir, ".parquet") if not storage.basename(p).startswith(".")]
    if not paths:
        raise LogsError(f"{split_dir}: split directory holds no Parquet shards (*.parquet)")
    return paths


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _open(path: str) -> pq.ParquetFile:
    try:
        return storage.open_parquet(path)
    except (pa.ArrowException, OSError) as e:
        raise LogsError(f"{path}: not a readable Parquet file (corrupt or truncated?): {_one_line(e)}") from None


def _check_shard(path: str, schema: Schema, stats: dict) -> np.ndarray:
    """Check one shard; add to `stats`; return its example ids (int64)."""
    pf = _open(path)
    check_arrow_schema(schema, pf.schema_arrow, str(path))
    if schema.eval_columns:
        check_arrow_schema(schema, pf.schema_arrow, str(path), columns=schema.eval_columns)
    columns = schema.training_columns()
    ids, row0 = [], 0
    for rg in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(rg, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise LogsError(f"{path}: row group {rg}: cannot decode (corrupt file?): {_one_line(e)}") from None
        check_row_group(table, schema, str(path), row_group=rg, row0=row0)
        ids.append(table.column(schema.id).to_numpy().astype(np.int64, copy=False))
        for t in schema.tasks:
            label = table.column(t.label)
            labeled = len(label) - label.null_count
            positives = int(np.sum(label.drop_null().to_numpy(), dtype=np.int64)) if labeled else 0
            stats["labels"][t.name]["labeled"] += labeled
            stats["labels"][t.name]["positives"] += positives
        row0 += table.num_rows
    if row0 != pf.metadata.num_rows:
        raise LogsError(f"{path}: footer says {pf.metadata.num_rows} rows, row groups hold {row0}")
    stats["rows"] += row0
    stats["row_groups"] += pf.num_row_groups
    return np.concatenate(ids) if ids else np.empty(0, np.int64)


def _check_unique(ids: list[np.ndarray], paths: list[str], logs_dir: str) -> None:
    """Sort all ids; on an adjacent duplicate, name the id and every file and row it is in."""
    if not ids:
        return
    all_ids = np.concatenate(ids)
    s = np.sort(all_ids)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if not len(dup):
        return
    value = s[dup[0]]
    n_dup = len(np.unique(s[dup]))
    ends = np.cumsum([len(a) for a in ids])
    where = []
    for pos in np.flatnonzero(all_ids == value):
        f = int(np.searchsorted(ends, pos, side="right"))
        where.append(f"{paths[f]} row {int(pos - (ends[f - 1] if f else 0))}")
    more = f" ({n_dup - 1} more duplicated ids)" if n_dup > 1 else ""
    raise LogsError(f"{logs_dir}: duplicate example_id {int(value)} in " + " and ".join(where) + more)


def validate_logs(logs_dir: str | Path) -> dict:
    """Check a whole logs directory; return a summary (per split: rows, shards, row groups,
    per-task labeled rows, positives and positive rate). Raises LogsError on the first problem."""
    logs_dir = str(logs_dir)
    if not storage.is_remote(logs_dir) and not Path(logs_dir).is_dir():
        raise LogsError(f"{logs_dir}: logs directory not found")
    schema = load_schema(logs_dir)
    summary = {"logs": str(logs_dir), "schema": schema.fingerprint(), "rows": 0, "splits": {}}
    ids, paths = [], []
    for split in SPLITS:
        stats = {"rows": 0, "shards": 0, "row_groups": 0,
                 "labels": {t.name: {"labeled": 0, "positives": 0} for t in schema.tasks}}
        for path in shard_paths(storage.join(logs_dir, split)):
            ids.append(_check_shard(path, schema, stats))
            paths.append(path)
            stats["shards"] += 1
        for lab in stats["labels"].values():
            lab["rate"] = lab["positives"] / lab["labeled"] if lab["labeled"] else float("nan")
        summary["splits"][split] = stats
        summary["rows"] += stats["rows"]
    _check_unique(ids, paths, logs_dir)
    return summary


def run(args) -> int:
    t0 = time.perf_counter()
    s = validate_logs(args.logs)
    print(f"{s['logs']}: OK, {s['rows']:,} rows checked in {time.perf_counter() - t0:.1f}s (schema {s['schema']})")
    tasks = list(next(iter(s["splits"].values()))["labels"])
    width = {t: max(12, len(t) + 8) for t in tasks}
    head = "".join(f" {t + ' rate':>{width[t]}} {t + ' labeled':>{width[t]}}" for t in tasks)
    print(f"  {'split':<6} {'rows':>12} {'shards':>6} {'row groups':>10}{head}")
    for split, d in s["splits"].items():
        labs = "".join(f" {lab['rate']:>{width[t]}.4f} {lab['labeled']:>{width[t]},}" for t, lab in d["labels"].items())
        print(f"  {split:<6} {d['rows']:>12,} {d['shards']:>6} {d['row_groups']:>10}{labs}")
    return 0
