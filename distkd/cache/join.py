"""The join of `distkd cache import`: predictions, by example_id, onto the rows of the log
shards, in memory bounded by a budget whatever the number of predictions or rows.

    pass 1  every predictions file (batch by batch) and every log shard's ids (row group by row
            group) go to P spill partitions by a hash of example_id (Arrow IPC files)
    pass 2  one partition at a time, both sides sorted by id: duplicate predictions, predicted
            ids the logs lack and logged rows without a prediction are counted (the first of
            each named, with its file and row); each matched row of a shard to import (its
            position in the import's row order, id and logits) goes to the destination
            partition of its position: D contiguous ranges of R rows
    pass 3  `Ordered`: the destination partitions in order, each sorted by position, give the
            logits in log order, `take(n)` rows at a time (the importer writes row groups)

Peak memory is one hash partition (both sides, their sorted copies) in pass 2, or one
destination range in pass 3, plus one batch or row group; `plan` sizes P and R from the
budget. The spill files (about the size of the predictions plus 16 bytes a logged row) are
temporary names in a temporary folder, deleted as they are read.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from distkd import storage
from distkd.cache.contract import CacheError
from distkd.cache.manifest import ids_checksum
from distkd.cache.predictions import read_chunks

logger = logging.getLogger(__name__)

WORK = 4  # bytes held in pass 2 per spilled byte: Arrow table, numpy copies, sort orders
MAX_PARTITIONS = 4096  # open spill files at once, at most
PROGRESS_EVERY_S = 5.0
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


def partition_of(ids: np.ndarray, n: int) -> np.ndarray:
    """The partition (0..n-1) of each id: a 64-bit mix (murmur3's finalizer), so that ids in
    sequence or with a common stride spread evenly."""
    x = ids.astype(np.int64, copy=False).view(np.uint64)
    s = np.uint64(33)
    x = (x ^ (x >> s)) * _M1
    x = (x ^ (x >> s)) * _M2
    return ((x ^ (x >> s)) % np.uint64(n)).astype(np.intp)


@dataclass(frozen=True)
class Plan:
    partitions: int  # P: hash partitions of pass 1 and 2
    range_rows: int  # R: rows of a destination partition (pass 3)
    batch_rows: int  # rows of a predictions batch read at once


def plan(prediction_rows: int, log_rows: int, todo_rows: int, logits_bytes: int, budget: int,
         partitions: Optional[int] = None) -> Plan:
    """P and R for a memory `budget` (bytes); `logits_bytes`: bytes of one row's logits. Each
    pass holds one spill file open per partition: at most the open-file limit allows."""
    spilled = prediction_rows * (20 + logits_bytes) + log_rows * 16  # id, logits, file, row | id, position
    p = partitions or max(1, math.ceil(WORK * spilled / budget))
    r = max(1, budget // (WORK * (16 + logits_bytes)))
    most = min(MAX_PARTITIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64)
    if max(p, math.ceil(todo_rows / r)) > most:
        raise CacheError(f"{max(p, math.ceil(todo_rows / r))} partitions for a memory budget of "
                         f"{budget / 2**20:,.1f} MiB, at most {most} (open files); give a larger --memory-budget")
    return Plan(p, r, int(min(65_536, max(1024, r))))


@dataclass(frozen=True)
class Shard:
    rel: str
    path: str  # the log shard's location
    row_groups: list[int]
    todo: bool  # written by this import (else committed: its ids only account for predictions)


class Spill:
    """N Arrow IPC files of one schema in `folder`, appended batch by batch, read whole."""

    def __init__(self, folder: Path, name: str, schema: pa.Schema, n: int):
        self.schema, self.n = schema, n
        self.paths = [folder / storage.temp_name(f"{name}-{p:05d}.arrow") for p in range(n)]
        self.writers: dict[int, tuple] = {}
        self.rows = np.zeros(n, np.int64)

    def write(self, parts: np.ndarray, table: pa.Table) -> None:
        counts = np.bincount(parts, minlength=self.n)
        table = table.take(pa.array(np.argsort(parts, kind="stable")))
        a = 0
        for p in np.flatnonzero(counts):
            if p not in self.writers:
                fh = open(self.paths[p], "wb")
                self.writers[p] = (fh, pa.ipc.new_stream(fh, self.schema))
            self.writers[p][1].write_table(table.slice(a, int(counts[p])))
            a += int(counts[p])
        self.rows += counts

    def close(self) -> None:
        for fh, w in self.writers.values():
            w.close()
            fh.close()
        self.writers.clear()

    def take(self, p: int) -> pa.Table:
        """Partition `p`, whole; its file is deleted."""
        if not self.rows[p]:
            return self.schema.empty_table()
        with pa.OSFile(str(self.paths[p])) as fh:
            table = pa.ipc.open_stream(fh).read_all()
        self.paths[p].unlink()
        return table


def _logits_array(z: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])


def _rows(col: pa.ChunkedArray, tasks: int) -> np.ndarray:
    return col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, tasks)


class _Meter:
    """A progress line (rows, rows/s, ETA) at most every PROGRESS_EVERY_S."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            logger.info(f"cache import: {self.what} {self.done:,}/{self.total:,} rows "
                        f"({100 * self.done / max(self.total, 1):.0f}%) | {rate:,.0f} rows/s | ETA {eta:,.0f}s")


@dataclass
class _Problems:
    """Per kind: how many, and the first (by a sort key) with its message."""

    found: dict[str, list] = field(default_factory=dict)  # kind -> [count, key, message]

    def add(self, kind: str, count: int, key: tuple, message: str) -> None:
        old = self.found.get(kind)
        if old is None:
            self.found[kind] = [count, key, message]
            return
        old[0] += count
        if key < old[1]:
            old[1:] = [key, message]


@dataclass
class Joined:
    """What pass 2 leaves for pass 3, and what the join measured."""

    ordered: "Ordered"
    checksums: list[list[str]]  # per shard to import: the example_id checksum of each row group
    stats: dict


class Ordered:
    """Pass 3: the matched rows of the shards to import in log order, `take(n)` at a time."""

    def __init__(self, dest: Spill, range_rows: int, total: int, tasks: int, dtype):
        self.dest, self.r, self.total, self.tasks = dest, range_rows, total, tasks
        self.next = 0
        self.ids, self.z, self.i = np.empty(0, np.int64), np.empty((0, tasks), dtype), 0

    def _load(self) -> None:
        d = self.next
        table = self.dest.take(d)
        pos = table.column("pos").to_numpy()
        order = np.argsort(pos, kind="stable")
        start = d * self.r
        if not np.array_equal(pos[order], np.arange(start, min(start + self.r, self.total))):
            raise CacheError(f"import: destination range {d} does not hold rows {start}.. exactly once (a bug)")
        ids = table.column("id").to_numpy()[order]
        z = _rows(table.column("logits"), self.tasks)[order]
        self.ids, self.z, self.i = np.concatenate([self.ids[self.i:], ids]), np.concatenate([self.z[self.i:], z]), 0
        self.next += 1

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self.ids) - self.i < n:
            self._load()
        a, self.i = self.i, self.i + n
        return self.ids[a:self.i], self.z[a:self.i]


def join(files: list[str], shards: list[Shard], id_col: str, tasks: list[str], dtype, prediction_rows: int,
         pl: Plan, folder: Path, where: str, splits: list[str]) -> Joined:
    """Passes 1 and 2; CacheError naming the first of each kind of problem, before anything of
    the import is written (`where`: the cache, for messages)."""
    dt = pa.from_numpy_dtype(dtype)
    t = len(tasks)
    logits_t = pa.list_(dt, t)
    pred = Spill(folder, "pred", pa.schema([("id", pa.int64()), ("logits", logits_t), ("file", pa.int32()),
                                            ("row", pa.int64())]), pl.partitions)
    meter = _Meter("partitioned predictions:", prediction_rows)
    for i, path in enumerate(files):
        for row0, ids, z in read_chunks(path, id_col, tasks, dtype, pl.batch_rows):
            n = len(ids)
            pred.write(partition_of(ids, pl.partitions), pa.table(
                {"id": ids, "logits": _logits_array(z), "file": np.full(n, i, np.int32),
                 "row": np.arange(row0, row0 + n, dtype=np.int64)}, schema=pred.schema))
            meter.add(n)
    pred.close()

    todo = [s for s in shards if s.todo]
    order = todo + [s for s in shards if not s.todo]  # positions: the rows to write first
    offsets = np.cumsum([0] + [sum(s.row_groups) for s in order])
    n_todo = int(offsets[len(todo)])
    logs = Spill(folder, "logs", pa.schema([("id", pa.int64()), ("pos", pa.int64())]), pl.partitions)
    checksums: list[list[str]] = []
    meter = _Meter("partitioned log ids:", int(offsets[-1]))
    for k, s in enumerate(order):
        sums, pos = [], int(offsets[k])
        with storage.open_parquet(s.path) as pf:
            for g in range(pf.num_row_groups):
                ids = pf.read_row_group(g, columns=[id_col]).column(id_col).to_numpy().astype(np.int64, copy=False)
                sums.append(ids_checksum(ids))
                logs.write(partition_of(ids, pl.partitions),
                           pa.table({"id": ids, "pos": np.arange(pos, pos + len(ids), dtype=np.int64)}))
                pos += len(ids)
                meter.add(len(ids))
        if s.todo:
            checksums.append(sums)
    logs.close()

    def locate(p: int) -> str:
        k = int(np.searchsorted(offsets, p, side="right")) - 1
        return f"{order[k].path} row {p - int(offsets[k])}"

    dest = Spill(folder, "dest", pa.schema([("pos", pa.int64()), ("id", pa.int64()), ("logits", logits_t)]),
                 max(1, math.ceil(n_todo / pl.range_rows)))
    problems = _Problems()
    largest = 0
    meter = _Meter("joined partitions' rows:", int(pred.rows.sum() + logs.rows.sum()))
    for p in range(pl.partitions):
        pt, lt = pred.take(p), logs.take(p)
        largest = max(largest, pt.num_rows + lt.num_rows)
        _join_partition(pt, lt, files, n_todo, locate, problems, dest, pl.range_rows, splits)
        meter.add(pt.num_rows + lt.num_rows)
    dest.close()
    if problems.found:
        msgs = [f"{c:,} {kind}; first: {msg}" for kind, (c, _, msg) in problems.found.items()]
        for m in msgs:
            logger.error(f"cache import: {m}")
        raise CacheError(f"{where}: refusing the import, nothing of it is published: {'; '.join(msgs)}")
    stats = {"prediction_files": len(files), "prediction_rows": int(pred.rows.sum()), "partitions": pl.partitions,
             "largest_partition_rows": largest, "destination_partitions": dest.n, "range_rows": pl.range_rows,
             "rows_cached_before": int(offsets[-1]) - n_todo}
    return Joined(Ordered(dest, pl.range_rows, n_todo, t, dtype), checksums, stats)


def _join_partition(pt: pa.Table, lt: pa.Table, files: list[str], n_todo: int, locate, problems: _Problems,
                    dest: Spill, range_rows: int, splits: list[str]) -> None:
    """Pass 2 on one hash partition: problems counted, matched rows to import sent to `dest`."""
    pid, fidx, prow = (pt.column(c).to_numpy() for c in ("id", "file", "row"))
    lid, lpos = lt.column("id").to_numpy(), lt.column("pos").to_numpy()
    po = np.argsort(pid, kind="stable")
    sid = pid[po]
    if (d := np.flatnonzero(sid[1:] == sid[:-1])).size:
        a, b = po[d[0]], po[d[0] + 1]
        problems.add("duplicate predictions", d.size, (int(fidx[b]), int(prow[b])),
                     f"example_id {int(sid[d[0]])} is predicted twice: {files[fidx[a]]} row {int(prow[a])} and "
                     f"{files[fidx[b]]} row {int(prow[b])}")
    lo = np.argsort(lid, kind="stable")
    if (d := np.flatnonzero(lid[lo][1:] == lid[lo][:-1])).size:
        a, b = lo[d[0]], lo[d[0] + 1]
        problems.add("example_ids logged twice", d.size, (int(min(lpos[a], lpos[b])),),
                     f"example_id {int(lid[a])} is in {locate(int(lpos[a]))} and {locate(int(lpos[b]))}; "
                     "the logs' ids must be unique")
    at = np.minimum(np.searchsorted(sid, lid), max(len(sid) - 1, 0))
    found = (sid[at] == lid) if len(sid) else np.zeros(len(lid), bool)
    if (m := np.flatnonzero(~found & (lpos < n_todo))).size:
        k = m[np.argmin(lpos[m])]
        problems.add("logged rows without a prediction", m.size, (int(lpos[k]),),
                     f"example_id {int(lid[k])} ({locate(int(lpos[k]))}) is in no predictions file")
    matched = np.zeros(len(pid), bool)
    matched[po[at[found]]] = True
    if (u := np.flatnonzero(~matched)).size:
        k = u[np.lexsort((prow[u], fidx[u]))[0]]
        problems.add("predicted ids not in the logs", u.size, (int(fidx[k]), int(prow[k])),
                     f"{files[fidx[k]]} row {int(prow[k])}: example_id {int(pid[k])} is not in the logs (splits "
                     f"{','.join(splits)}: name every split the predictions cover with --splits)")
    w = np.flatnonzero(found & (lpos < n_todo))
    if w.size and not problems.found:  # once refused, only counting goes on
        pos = lpos[w]
        dest.write((pos // range_rows).astype(np.intp), pa.table(
            {"pos": pos, "id": lid[w], "logits": pt.column("logits").take(pa.array(po[at[w]]))}, schema=dest.schema))
