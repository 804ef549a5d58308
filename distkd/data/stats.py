"""`distkd data stats`: per-feature statistics of the train split, stored with the logs.

One streaming pass, row group by row group (memory bounded by one row group and the
sketches), over the train split only, so no valid/test row leaks into a transform. Written
atomically to `LOGS/stats.json`:

    {"format": 1, "kind": "distkd.stats", "fingerprint": sha256(content)[:16], "content": {...}}

content: the shards read (file, bytes, rows), the sketches used, and per feature:

- dense: count of finite values, mean and std (population, ddof 0, exact: float64 sums merged
  per row group with Chan's formula), min, max, nan/posinf/neginf/null counts, the same mean
  and std of log1p(max(x, 0)) (for log1p_standardize), and 201 quantiles (probabilities 0,
  0.005, ..., 1) of a bottom-k row sample: the 65,536 rows with the smallest
  splitmix64(example_id), deterministic whatever the shard or row order. Exact when the split
  has at most 65,536 rows; otherwise the rank of each quantile is within 0.01 of its
  probability with probability > 0.99999 (Dvoretzky-Kiefer-Wolfowitz: 2 exp(-2 k 0.01^2)).
- sparse: ids, ids per row, null rows and null ids, min, max, negative ids, ids at or past
  the table's rows (out_of_range) and past 10x the rows (beyond_10x), and distinct ids: a KMV
  sketch (the 4,096 smallest splitmix64 of the ids; exact below 4,096 distinct, else relative
  standard error 1/sqrt(4094) = 1.6%). String ids count by their 64-bit hash.

Every sketch merges (moments by Chan's formula, bottom-k and KMV by union), so shards could
be summarized in parallel and combined (`Accumulator.merge`, distkd.data.sketches).

`load_schema` reads the file back (distkd.data.stats_file) and gives each transform that needs them
its parameters; `distkd data validate` runs the same accumulator (without the sample) to warn
about raw-scale dense features and ids that do not fit their tables.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterator

import pyarrow as pa

from distkd import storage
from distkd.data.arrow_types import check_arrow_schema
from distkd.data.schema import load_schema
from distkd.data.stats_file import stats_location, write_stats
from distkd.data.sketches import QUANTILE_POINTS, SKETCHES, Accumulator
from distkd.config import to_dict
from distkd.data.layout import PartitionRange, split_files

logger = logging.getLogger(__name__)


# -- the pass --------------------------------------------------------------------------------


class Progress:
    """rows, rows/s and ETA on stderr, at most twice a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.rows, self.t0, self.last = total, 0, time.perf_counter(), 0.0
        self.enabled = enabled and os.environ.get("DISTKD_NO_PROGRESS") != "1"

    def update(self, rows: int, final: bool = False) -> None:
        self.rows += rows
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and not final):
            return
        self.last = now
        rate = self.rows / max(now - self.t0, 1e-9)
        eta = (self.total - self.rows) / max(rate, 1e-9)
        logger.info(f"\r  {self.rows:>12,}/{self.total:,} rows  {rate:>10,.0f} rows/s  ETA {eta:5.0f}s",
                    extra={"end": "\n" if final else ""})


def compute_stats(logs: str, split: str = "train", progress: bool = True, partitions=None) -> dict:
    """One pass over `split` of `logs` (its folder, or its range of `partitions`): the content
    of stats.json."""

    logs = str(logs)
    schema = load_schema(logs, stats=False)
    columns = [schema.id] + schema.feature_names
    paths = split_files(logs, split, partitions)
    shards = read_footers(logs, schema, paths, columns)
    acc = Accumulator(schema)
    for table in row_groups(paths, columns, Progress(sum(s["rows"] for s in shards), progress)):
        acc.update(table)
    rng = (partitions or {}).get(split)
    return {"split": split, "partition": to_dict(rng) if rng is not None else None, "shards": shards,
            "sketches": SKETCHES, **acc.result()}


def read_footers(logs: str, schema, paths: list[str], columns: list[str]) -> list[dict]:
    """Footers first: each shard's types checked before any work (LogsError naming the file and
    column), its shard_entry returned (rows known for the ETA)."""
    shards = []
    for path in paths:
        with storage.open_parquet(path) as pf:
            check_arrow_schema(schema, pf.schema_arrow, path, columns=columns)
            shards.append(shard_entry(logs, path, pf))
    return shards


def row_groups(paths: list[str], columns: list[str], bar: Progress) -> Iterator[pa.Table]:
    """`columns` of every row group of `paths`, in order, one at a time (progress on `bar`)."""
    for path in paths:
        with storage.open_parquet(path) as pf:
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=columns)
                yield table
                bar.update(table.num_rows)
    bar.update(0, final=True)


def shard_entry(logs: str, path: str, pf) -> dict:
    """What stats.json records of a shard it read (to tell later whether the split changed)."""
    rel = storage.relative(logs, path) or storage.basename(path)
    return {"file": rel.split("/", 1)[-1] if rel.startswith(("train/", "valid/", "test/")) else rel,
            "bytes": storage.size(path), "rows": pf.metadata.num_rows}


def _g(x) -> str:
    return "-" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:.5g}"


def format_summary(c: dict) -> str:
    lines = [f"{c['split']}: {c['rows']:,} rows, {c['row_groups']} row groups, {len(c['shards'])} shards"]
    head = ["count", "mean", "std", "min", "p1", "p50", "p99", "max", "nan", "inf", "null"]
    lines.append("  " + f"{'dense':<20}" + "".join(f"{h:>11}" for h in head))
    for name, d in c["dense"].items():
        q = d.get("quantiles") or [None] * QUANTILE_POINTS
        at = [q[round(p * (len(q) - 1))] for p in (0.01, 0.5, 0.99)]
        cells = [f"{d['count']:,}", *map(_g, [d["mean"], d["std"], d["min"], *at, d["max"]]),
                 f"{d['nan']:,}", f"{d['posinf'] + d['neginf']:,}", f"{d['null']:,}"]
        lines.append("  " + f"{name:<20}" + "".join(f"{x:>11}" for x in cells))
    head = ["ids/row", "distinct", "table", "min", "max", "out_of_range", "null"]
    lines.append("  " + f"{'sparse':<20}" + "".join(f"{h:>13}" for h in head))
    for name, d in c["sparse"].items():
        distinct = f"{d['distinct']:,}" + ("" if d["distinct_exact"] else "~")
        cells = [_g(d["ids_per_row"]), distinct, f"{d['table_rows']:,}",
                 *(["(hashed)", "-"] if d["hashed"] else [_g(d["min"]), _g(d["max"])]),
                 f"{d['out_of_range']:,}", f"{d['null_rows'] + d['null_ids']:,}"]
        lines.append("  " + f"{name:<20}" + "".join(f"{x:>13}" for x in cells))
    return "\n".join(lines)


def run(args) -> int:

    t0 = time.perf_counter()
    partitions = None
    if getattr(args, "partition", None):  # KEY=START..END: the train window of partitioned logs
        key, _, span = args.partition.partition("=")
        start, _, end = span.partition("..")
        partitions = {"train": PartitionRange(key=key, start=start or None, end=end or start or None)}
    content = compute_stats(args.logs, partitions=partitions)
    fp = write_stats(args.logs, content)
    took = time.perf_counter() - t0
    print(format_summary(content))
    logger.info(f"wrote {stats_location(args.logs)} (fingerprint {fp}) in {took:.1f}s "
                f"({content['rows'] / max(took, 1e-9):,.0f} rows/s)")
    schema = load_schema(args.logs)
    used = [f"{f.name} ({f.transform})" for f in schema.dense if f.needs_stats]
    if used:
        logger.info(f"schema {schema.fingerprint()}: parameters from this file for {', '.join(used)}")
    return 0
