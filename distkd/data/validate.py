"""`distkd data validate`: check every shard of a logs directory against its schema.

For each split and shard: the file opens as Parquet, its columns have the contract's
types, every row group passes `check_row_group` (streamed one row group at a time,
reading only the training columns), and `example_id` is unique across all shards of
all splits. The first problem raises `LogsError` naming the file (and row group,
column and row where there is one).

Logs that pass can still train badly; those get warnings (exit status 0), from the train
split's statistics gathered in the same pass (distkd.data.stats): a dense feature without a
transform on a raw scale (|mean| or std > 10, or |x| > 1e3: the bottom MLP's default init
expects inputs of order 1, and one such column dominates its pre-activations and the first
Adam steps; well-scaled inputs such as rates, z-scores or log1p counts stay below these), a
sparse feature whose ids are mostly >= 10x its hash_size (folded modulo into a far smaller
table) or whose distinct ids are < 1% of its table's rows (a table far too large), a
transform with no statistics yet, and a stats.json computed from other train shards.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distkd import storage
from distkd.data import stats as st
from distkd.data.stats_file import read_stats, stats_location
from distkd.data.checks import check_row_group
from distkd.data.rows import _floats
from distkd.data.arrow_types import check_arrow_schema
from distkd.data.schema import SPLITS, LogsError, MissingStats, Schema, load_schema
from distkd.data.sketches import Accumulator
from distkd.config import from_dict
from distkd.data.layout import PartitionRange, all_shards, is_partitioned, split_files

logger = logging.getLogger(__name__)

# Scale warnings (see the module docstring).
DENSE_MEAN, DENSE_STD, DENSE_MAX = 10.0, 10.0, 1e3
BEYOND_SHARE, FAR_BELOW = 0.5, 0.01  # share of ids >= 10x hash_size; distinct ids / table rows


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


def _check_shard(path: str, schema: Schema, stats: dict, acc: Accumulator | None = None) -> np.ndarray:
    """Check one shard; add to `stats` (and `acc`); return its example ids (int64)."""
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
        if acc is not None:
            acc.update(table)
        ids.append(table.column(schema.id).to_numpy().astype(np.int64, copy=False))
        for t in schema.binary:
            label = _floats(table.column(t.label).combine_chunks())  # NaN: no label
            labeled = int(np.count_nonzero(~np.isnan(label)))
            positives = int(np.nansum(label, dtype=np.float64))
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


def scale_warnings(schema: Schema, c: dict) -> list[str]:
    """One line per feature whose figures in stats content `c` will hurt training."""
    out = []
    for f in schema.dense:
        d = c["dense"][f.name]
        if f.transform != "none" or not d["count"]:
            continue
        big = max(abs(d["min"]), abs(d["max"]))
        why = [f"mean {d['mean']:.4g}"] if abs(d["mean"]) > DENSE_MEAN else []
        why += [f"std {d['std']:.4g}"] if d["std"] > DENSE_STD else []
        why += [f"max |x| {big:.4g}"] if big > DENSE_MAX else []
        if why:
            out.append(f"dense feature '{f.name}' has no transform and {', '.join(why)} (past |mean| {DENSE_MEAN:g}, "
                       f"std {DENSE_STD:g} or |x| {DENSE_MAX:g}: a raw scale that hurts training): set `transform: "
                       "standardize` (or log1p_standardize, quantile) and run `distkd data stats`")
    for f in schema.sparse:
        d = c["sparse"][f.name]
        if f.hash_size is not None and not f.hash and d["ids"] and d["beyond_10x"] > BEYOND_SHARE * d["ids"]:
            out.append(f"sparse feature '{f.name}': {d['beyond_10x'] / d['ids']:.0%} of ids are >= 10x "
                       f"hash_size {f.hash_size:,} (max id {d['max']:,}, ~{d['distinct']:,} distinct ids), folded "
                       "modulo into a table far smaller than the id space: raise hash_size if they collide")
        if d["distinct"] < FAR_BELOW * f.rows:
            out.append(f"sparse feature '{f.name}': {'' if d['distinct_exact'] else '~'}{d['distinct']:,} distinct ids "
                       f"in train for a table of {f.rows:,} rows ({d['distinct'] / f.rows:.2%}): the table is far too "
                       "large; lower " + ("hash_size" if f.hash_size is not None else "num_embeddings"))
    return out


def _stale_stats(logs_dir: str) -> list[str]:
    """A warning if stats.json was computed from other train shards than the logs hold now."""
    doc = read_stats(logs_dir)
    if doc is None:
        return []

    rng = doc["content"].get("partition")
    partitions = {"train": from_dict(PartitionRange, rng, "stats.partition")} if rng else None
    now = []
    for path in split_files(logs_dir, "train", partitions):
        with _open(path) as pf:
            now.append(st.shard_entry(logs_dir, path, pf))
    if now == doc["content"]["shards"]:
        return []
    return [f"{stats_location(logs_dir)}: computed from other train shards than the logs hold now; "
            f"rerun `distkd data stats {logs_dir}`"]


def _groups(logs_dir: str) -> dict[str, list[str]]:
    """Split folders {train, valid, test: shards}, or for partitioned logs one group per
    top-level partition folder (dt=2026-11-30: shards)."""

    if not is_partitioned(logs_dir):
        return {split: shard_paths(storage.join(logs_dir, split)) for split in SPLITS}
    groups: dict[str, list[str]] = {}
    for f in all_shards(logs_dir):
        groups.setdefault((storage.relative(logs_dir, f) or "").split("/")[0], []).append(f)
    return groups


def validate_logs(logs_dir: str | Path) -> dict:
    """Check a whole logs directory; return a summary (per split: rows, shards, row groups,
    per-task labeled rows, positives and positive rate; warnings). Raises LogsError on the
    first problem."""
    logs_dir = str(logs_dir)
    if not storage.is_remote(logs_dir) and not Path(logs_dir).is_dir():
        raise LogsError(f"{logs_dir}: logs directory not found")
    warnings = []
    try:
        schema = load_schema(logs_dir)
    except MissingStats as e:
        schema = load_schema(logs_dir, stats=False)
        warnings.append(str(e))
    summary = {"logs": str(logs_dir), "schema": schema.fingerprint(), "rows": 0, "splits": {}}
    ids, paths = [], []
    acc = Accumulator(schema, sample=False)
    for split, shards in _groups(logs_dir).items():
        stats = {"rows": 0, "shards": 0, "row_groups": 0,
                 "labels": {t.name: {"labeled": 0, "positives": 0} for t in schema.binary}}
        for path in shards:  # scale warnings from train (split folders) or from every partition
            ids.append(_check_shard(path, schema, stats, acc if split in ("train", "*") or "=" in split else None))
            paths.append(path)
            stats["shards"] += 1
        for lab in stats["labels"].values():
            lab["rate"] = lab["positives"] / lab["labeled"] if lab["labeled"] else float("nan")
        summary["splits"][split] = stats
        summary["rows"] += stats["rows"]
    _check_unique(ids, paths, logs_dir)
    summary["warnings"] = warnings + scale_warnings(schema, acc.result()) + _stale_stats(logs_dir)
    return summary


def validate_files(logs_dir: str | Path, paths: list[str]) -> dict:
    """Check some shards of a logs directory (a daily job's one day): each against the schema,
    row group by row group, and `example_id` unique among them. Returns rows and shards;
    raises LogsError on the first problem."""
    schema = load_schema(str(logs_dir), stats=False)
    stats = {"rows": 0, "shards": 0, "row_groups": 0,
             "labels": {t.name: {"labeled": 0, "positives": 0} for t in schema.binary}}
    ids = [_check_shard(p, schema, stats) for p in paths]
    _check_unique(ids, list(paths), str(logs_dir))
    stats["shards"] = len(paths)
    return stats


def run(args) -> int:
    t0 = time.perf_counter()
    s = validate_logs(args.logs)
    print(f"{s['logs']}: OK, {s['rows']:,} rows checked in {time.perf_counter() - t0:.1f}s (schema {s['schema']})")
    tasks = list(next(iter(s["splits"].values()))["labels"])
    width = {t: max(12, len(t) + 8) for t in tasks}
    head = "".join(f" {t + ' rate':>{width[t]}} {t + ' labeled':>{width[t]}}" for t in tasks)
    w = max(6, *(len(k) for k in s["splits"]))
    print(f"  {'split':<{w}} {'rows':>12} {'shards':>6} {'row groups':>10}{head}")
    for split, d in s["splits"].items():
        labs = "".join(f" {lab['rate']:>{width[t]}.4f} {lab['labeled']:>{width[t]},}" for t, lab in d["labels"].items())
        print(f"  {split:<{w}} {d['rows']:>12,} {d['shards']:>6} {d['row_groups']:>10}{labs}")
    for w in s["warnings"]:
        logger.warning(f"warning: {w}")
    return 0
