"""One cache worker: the teacher loaded once, then one log shard at a time.

`compute_shard` streams a shard row group by row group: a background thread reads,
checks and decodes the next row groups (at most `prefetch` ahead, so memory is bounded
by a few row groups whatever the shard size) while the main thread runs the teacher
and appends one output row group per input row group to a temporary file (or object),
hashing the bytes as they are written. `storage.write_atomic` commits it whole (local:
fsync and rename; object storage: a complete temporary object moved to the final key);
the caller (the driver) records it in the manifest.

Every teacher output is checked as it comes (distkd.models.teacher: shape, dtype, tasks,
NaN/inf, on every batch): a bad one raises CacheError naming the shard, row group and row,
before the commit, so nothing of that shard is published.

`CacheWorker` is the Ray actor around it (the driver wraps it with `ray.remote`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distkd import storage
from distkd.cache.manifest import (
    FILE_META_KEY, FORMAT, CacheError, combine_checksums, fingerprint_diff, ids_checksum, input_fingerprint,
    output_schema,
)
from distkd.cache.topk import TopKFormat, pack, select
from distkd.data.checks import check_row_group
from distkd.data.batch import to_batch
from distkd.data.rows import decode
from distkd.data.schema import Schema
from distkd.models.teacher import Teacher, TeacherRef
from distkd.models.teacher_spec import TeacherError, TeacherSpec


@dataclass
class ShardTask:
    logs_dir: str
    log_path: str  # absolute path or URI (as the driver sees it: shared or object storage)
    out_path: str
    expected: dict[str, Any]  # the cheap input fingerprint the driver planned with
    teacher_sha256: str
    dtype: str = "fp16"
    hidden: bool = False
    batch_size: int = 8192
    prefetch: int = 2
    attempt: int = 1
    topk: dict[str, Any] | None = None  # a next-item teacher: the TopKFormat fields (distkd.cache.topk)


class _HashingSink:
    """A write-only file for ParquetWriter: passes bytes on to `fh`, counting and hashing them."""

    closed = False

    def __init__(self, fh: Any):
        self.fh, self.sha256, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        self.fh.write(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        pass


class _Reader:
    """Background thread: row groups -> (index, rows, ids checksum, [Batch]), `prefetch` ahead."""

    _END = object()

    def __init__(self, path: str, schema: Schema, batch_size: int, prefetch: int):
        self.path, self.schema, self.batch_size = path, schema, batch_size
        self.q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()
        self.busy = 0.0  # seconds spent reading and decoding
        self.thread = threading.Thread(target=self._run, name="distkd-cache-reader", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        keys = [f.name for f in self.schema.sparse]
        cols = self.schema.training_columns()
        try:
            with storage.open_parquet(self.path) as pf:
                row0 = 0
                for g in range(pf.num_row_groups):
                    t0 = time.perf_counter()
                    table = pf.read_row_group(g, columns=cols)
                    check_row_group(table, self.schema, self.path, g, row0)
                    n = table.num_rows
                    rows = decode(table, self.schema, self.path)
                    checksum = ids_checksum(rows.ids)
                    batches = [to_batch(rows.slice(a, min(a + self.batch_size, n)), keys)
                               for a in range(0, n, self.batch_size)]
                    del table, rows
                    row0 += n
                    self.busy += time.perf_counter() - t0
                    if not self._put((g, n, checksum, batches)):
                        return
            self._put(self._END)
        except BaseException as e:  # re-raised by the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@torch.inference_mode()
def compute_shard(teacher: Teacher, schema: Schema, task: ShardTask, device: torch.device,
                  worker: dict[str, Any] | None = None,
                  on_row_group: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the cache file of one log shard; return its entry for the manifest.
    `on_row_group(g)` runs once row group g is in the (uncommitted) temporary file."""
    start = time.perf_counter()
    now = input_fingerprint(task.logs_dir, task.log_path)
    if diff := fingerprint_diff(task.expected, now):
        raise CacheError(f"{task.log_path}: the log shard changed after the build was planned ({'; '.join(diff)})")
    n_tasks = len(schema.binary)
    hidden_dim = teacher.hidden_dim if task.hidden else None
    np_dtype = np.float16 if task.dtype == "fp16" else np.float32
    fmt = TopKFormat(**task.topk) if task.topk else None
    file_schema = fmt.arrow_schema() if fmt else output_schema(n_tasks, task.dtype, hidden_dim)
    options = fmt.parquet_options() if fmt else dict(compression="zstd", use_dictionary=False, write_statistics=False)
    # batch_size: `cache verify --recompute` batches rows as the build did (bit-exact recomputation)
    meta = {"format": FORMAT, "teacher_sha256": task.teacher_sha256, "tasks": schema.task_names,
            "dtype": task.dtype, "input": now, "batch_size": task.batch_size, "topk": task.topk}
    checksums: list[str] = []
    forward_s = write_s = wait_s = written = 0.0
    sink: _HashingSink | None = None
    reader = _Reader(task.log_path, schema, task.batch_size, task.prefetch)

    def write(fh: Any) -> None:
        nonlocal forward_s, write_s, wait_s, written, sink
        sink = _HashingSink(fh)
        with pq.ParquetWriter(sink, file_schema, **options) as writer:
            t0 = time.perf_counter()
            row0 = 0
            for g, n, checksum, batches in reader:
                t1 = time.perf_counter()
                wait_s += t1 - t0
                logits = np.empty((n, n_tasks), np_dtype) if fmt is None else None
                hidden = np.empty((n, hidden_dim), np.float16) if hidden_dim else None
                tops = []  # next item: each batch's top-k, packed
                # tail draws seeded by the shard and row group: a rebuild writes the same bytes
                gen = torch.Generator().manual_seed(int(checksum, 16) % 2**63) if fmt is not None else None
                a = 0
                for batch in batches:
                    try:
                        o = teacher(batch.sparse.to(device, non_blocking=True),
                                    batch.dense.to(device, non_blocking=True), hidden=hidden is not None)
                    except TeacherError as e:
                        at = f", row {a + e.row} (row {row0 + a + e.row} of the shard)" if e.row is not None else ""
                        raise CacheError(f"{task.log_path}: row group {g}{at}: {e}; nothing of this shard "
                                         "is published") from None
                    b = a + len(batch)
                    if fmt is not None:
                        tops.append(pack(select(o.logits.float().cpu(), fmt, gen), fmt))
                        a = b
                        continue
                    logits[a:b] = o.logits.float().cpu().numpy()
                    if not np.isfinite(logits[a:b]).all():  # finite in the teacher's dtype, not in fp16
                        r = int(np.argwhere(~np.isfinite(logits[a:b]))[0][0])
                        raise CacheError(f"{task.log_path}: row group {g}, row {a + r}: teacher {teacher.name}'s "
                                         f"logits {o.logits[r].tolist()} exceed the {task.dtype} range; cache with "
                                         "dtype fp32; nothing of this shard is published")
                    if hidden is not None:
                        hidden[a:b] = o.hidden.float().cpu().numpy()
                    a = b
                row0 += n
                del batches
                t2 = time.perf_counter()
                forward_s += t2 - t1
                if fmt is not None:
                    table = pa.concat_tables(tops) if tops else fmt.arrow_schema().empty_table()
                else:
                    cols = {"logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), n_tasks)}
                    if hidden is not None:
                        cols["hidden"] = pa.FixedSizeListArray.from_arrays(pa.array(hidden.reshape(-1)), hidden_dim)
                    table = pa.table(cols, schema=writer.schema)
                writer.write_table(table, row_group_size=max(n, 1))
                checksums.append(checksum)
                if on_row_group is not None:
                    on_row_group(g)
                t0 = time.perf_counter()
                write_s += t0 - t2
            writer.add_key_value_metadata({FILE_META_KEY: json.dumps({**meta, "row_groups": checksums})})
        if len(checksums) != len(now["row_groups"]):  # raised before the commit: nothing is published
            raise CacheError(f"{task.log_path}: read {len(checksums)} row groups, the footer lists {len(now['row_groups'])}")
        written = time.perf_counter()

    try:
        storage.write_atomic(task.out_path, write, tag=f"{socket.gethostname()}-{os.getpid()}-{task.attempt}")
        write_s += time.perf_counter() - written  # the commit: fsync + rename, or the object's upload + move
    except storage.StorageError:
        raise
    except OSError as e:  # a full disk, a lost mount: the user's to fix, one line (write_atomic left nothing)
        raise storage.StorageError(f"{task.out_path}: cannot write the cache file: {e.strerror or e}; nothing of "
                                   "this shard is published") from None
    finally:
        reader.close()
    return {
        "input": {**now, "ids": combine_checksums(checksums)},
        "output": {"file": storage.basename(task.out_path), "rows": now["rows"], "bytes": sink.bytes,
                   "sha256": sink.sha256.hexdigest()},
        "timings": {
            "seconds": round(time.perf_counter() - start, 3),
            "read_decode_s": round(reader.busy, 3),
            "forward_s": round(forward_s, 3),
            "write_s": round(write_s, 3),
            "wait_input_s": round(wait_s, 3),
            "attempt": task.attempt,
            "worker": worker or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


class CacheWorker:
    """Ray actor: loads the teacher once (fingerprint-verified), then builds shards on request.
    `teacher`: a TeacherRef from the driver (or an export directory)."""

    def __init__(self, teacher: TeacherRef | TeacherSpec | str, device: str, threads: int):
        from distkd.dist import quiet
        from distkd.models.teacher import load_teacher

        quiet()
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        ref = teacher if isinstance(teacher, TeacherRef) else None
        try:
            self.teacher = load_teacher(ref.spec if ref else teacher, ref.schema if ref else None, self.device,
                                        expect_sha256=ref.sha256 if ref else None)
        except TeacherError as e:  # a one-line reason in the driver's "worker is gone" message
            raise CacheError(f"worker {socket.gethostname()}:{os.getpid()}: {e}") from None
        self.meta = {"sha256": self.teacher.sha256}
        self.schema = self.teacher.schema
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                     "threads": torch.get_num_threads(), "teacher_load_s": round(time.perf_counter() - t0, 3),
                     "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}  # set by the pool (pool.actor_env)

    def ready(self) -> dict[str, Any]:
        return self.info

    def build(self, task: ShardTask) -> dict[str, Any]:
        if task.teacher_sha256 != self.meta["sha256"]:
            raise CacheError(
                f"worker {self.info['host']}:{self.info['pid']} loaded teacher {self.meta['sha256'][:12]}…, "
                f"the build expects {task.teacher_sha256[:12]}…: the export changed during the build"
            )
        return compute_shard(self.teacher, self.schema, task, self.device, self.info, self.on_row_group)

    def on_row_group(self, g: int) -> None:
        """Called as each row group is written; a seam for tests (subclasses), nothing here."""
