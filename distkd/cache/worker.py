"""One cache worker: the teacher loaded once, then one log shard at a time.

`compute_shard` streams a shard row group by row group: a background thread reads,
checks and decodes the next row groups (at most `prefetch` ahead, so memory is bounded
by a few row groups whatever the shard size) while the main thread runs the teacher
and appends one output row group per input row group to a temporary file (or object),
its columns encoded by the cache's content codec (distkd.cache.content),
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
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distkd import log, memory, storage
from distkd.cache.content import ContentCodec, codec_for, score
from distkd.cache.contract import (
    FILE_META_KEY, FORMAT, CacheError, Content, InputFingerprint, Output, ShardEntry, Timings, to_json_value,
)
from distkd.cache.manifest import combine_checksums, ids_checksum, input_fingerprint
from distkd.data.batch import Batch, to_batch
from distkd.data.checks import check_row_group
from distkd.data.rows import decode
from distkd.data.schema import Schema
from distkd.models.teacher import Teacher, TeacherRef, load_teacher
from distkd.models.teacher_spec import TeacherError, TeacherSpec
from distkd.log import quiet


@dataclass
class ShardTask:
    logs_dir: str
    log_path: str  # absolute path or URI (as the driver sees it: shared or object storage)
    out_path: str
    expected: InputFingerprint  # the cheap input fingerprint the driver planned with
    teacher_sha256: str
    content: Content  # the manifest's: what the file holds (distkd.cache.content)
    batch_size: int = 8192
    prefetch: int = 2
    attempt: int = 1


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


def row_group_batches(table: pa.Table, schema: Schema, path: str, g: int, row0: int,
                      batch_size: int) -> tuple[int, str, list[Batch]]:
    """(rows, example_id checksum, batches) of log row group `g` (its first row: `row0` of the
    shard), checked and decoded as the build reads it."""
    check_row_group(table, schema, path, g, row0)
    rows = decode(table, schema, path)
    n, keys = table.num_rows, [f.name for f in schema.sparse]
    return n, ids_checksum(rows.ids), [to_batch(rows.slice(a, min(a + batch_size, n)), keys)
                                       for a in range(0, n, batch_size)]


class ShardReader:
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
        cols = self.schema.training_columns()
        try:
            with storage.open_parquet(self.path) as pf:
                row0 = 0
                for g in range(pf.num_row_groups):
                    t0 = time.perf_counter()
                    n, checksum, batches = row_group_batches(pf.read_row_group(g, columns=cols), self.schema,
                                                             self.path, g, row0, self.batch_size)
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


@dataclass
class _Tally:
    """What writing one shard measured and produced (seconds by stage, checksums, the file)."""

    forward_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0
    closed_at: float = 0.0  # perf_counter when the file was complete, before its commit
    checksums: list[str] = field(default_factory=list)  # example_id checksum per row group
    bytes: int = 0
    sha256: str = ""


def check_unchanged(task: ShardTask) -> InputFingerprint:
    """The shard's fingerprint now; CacheError if it changed since the driver planned."""
    now = input_fingerprint(task.logs_dir, task.log_path)
    if diff := task.expected.diff(now):
        raise CacheError(f"{task.log_path}: the log shard changed after the build was planned ({'; '.join(diff)})")
    return now


def _score(teacher: Teacher, codec: ContentCodec, task: ShardTask, device: torch.device, g: int, row0: int,
           checksum: str, batches: list[Batch]) -> pa.Table:
    try:
        return score(teacher, codec, batches, checksum, device)
    except TeacherError as e:
        at = f", row {e.row} (row {row0 + e.row} of the shard)" if e.row is not None else ""
        raise CacheError(f"{task.log_path}: row group {g}{at}: {e}; nothing of this shard is published") from None


def _write(fh: Any, teacher: Teacher, codec: ContentCodec, task: ShardTask, device: torch.device, reader: ShardReader,
           meta: dict[str, Any], tally: _Tally, on_row_group: Callable[[int], None] | None) -> None:
    """The cache file into `fh`: one output row group per input row group, then the footer."""
    sink = _HashingSink(fh)
    with pq.ParquetWriter(sink, codec.schema, **codec.parquet_options()) as writer:
        t0, row0 = time.perf_counter(), 0
        for g, n, checksum, batches in reader:
            t1 = time.perf_counter()
            tally.wait_s += t1 - t0
            table = _score(teacher, codec, task, device, g, row0, checksum, batches)
            row0 += n
            del batches
            t2 = time.perf_counter()
            tally.forward_s += t2 - t1
            writer.write_table(table, row_group_size=max(n, 1))
            tally.checksums.append(checksum)
            if on_row_group is not None:
                on_row_group(g)
            t0 = time.perf_counter()
            tally.write_s += t0 - t2
        writer.add_key_value_metadata({FILE_META_KEY: json.dumps({**meta, "row_groups": tally.checksums})})
    expected = meta["input"]["row_groups"]
    if len(tally.checksums) != len(expected):  # raised before the commit: nothing is published
        raise CacheError(f"{task.log_path}: read {len(tally.checksums)} row groups, the footer lists {len(expected)}")
    tally.bytes, tally.sha256, tally.closed_at = sink.bytes, sink.sha256.hexdigest(), time.perf_counter()


def _commit(task: ShardTask, write: Callable[[Any], None], tally: _Tally) -> None:
    """Write and commit the file whole (storage.write_atomic); the commit's time counts as writing."""
    try:
        storage.write_atomic(task.out_path, write, tag=f"{socket.gethostname()}-{os.getpid()}-{task.attempt}")
        tally.write_s += time.perf_counter() - tally.closed_at  # fsync + rename, or the object's upload + move
    except storage.StorageError:
        raise
    except OSError as e:  # a full disk, a lost mount: the user's to fix, one line (write_atomic left nothing)
        raise storage.StorageError(f"{task.out_path}: cannot write the cache file: {e.strerror or e}; nothing of "
                                   "this shard is published") from None


@torch.inference_mode()
def compute_shard(teacher: Teacher, schema: Schema, task: ShardTask, device: torch.device,
                  worker: dict[str, Any] | None = None,
                  on_row_group: Callable[[int], None] | None = None) -> ShardEntry:
    """Write the cache file of one log shard; return its entry for the manifest.
    `on_row_group(g)` runs once row group g is in the (uncommitted) temporary file."""
    start = time.perf_counter()
    now = check_unchanged(task)
    codec = codec_for(task.content)
    # batch_size: `cache verify --recompute` batches rows as the build did (bit-exact recomputation)
    meta = {"format": FORMAT, "teacher_sha256": task.teacher_sha256, "tasks": schema.task_names,
            "dtype": task.content.dtype, "input": to_json_value(now), "batch_size": task.batch_size,
            "topk": to_json_value(task.content.topk)}
    tally = _Tally()
    reader = ShardReader(task.log_path, schema, task.batch_size, task.prefetch)
    try:
        _commit(task, lambda fh: _write(fh, teacher, codec, task, device, reader, meta, tally, on_row_group), tally)
    finally:
        reader.close()
    return ShardEntry(
        input=task.expected.with_ids(combine_checksums(tally.checksums)),
        output=Output(storage.basename(task.out_path), now.rows, tally.bytes, tally.sha256),
        timings=Timings(seconds=round(time.perf_counter() - start, 3), read_decode_s=round(reader.busy, 3),
                        forward_s=round(tally.forward_s, 3), write_s=round(tally.write_s, 3),
                        wait_input_s=round(tally.wait_s, 3), attempt=task.attempt, worker=worker or {},
                        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z")),
    )


class CacheWorker:
    """Ray actor: loads the teacher once (fingerprint-verified), then builds shards on request.
    `teacher`: a TeacherRef from the driver (or an export directory). A member of a teacher
    group (distkd.cache.group) is this actor with the teacher loaded later, under the group's
    sharding plan."""

    def __init__(self, teacher: TeacherRef | TeacherSpec | str, device: str, threads: int):
        self.setup(device, threads)
        self.load(teacher)

    def setup(self, device: str, threads: int) -> None:

        quiet()
        log.setup()  # its level from DISTKD_LOG_LEVEL (pool.actor_env): its lines reach the driver's stderr
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.stages = memory.Stages()  # this actor's peak RSS: start-up, teacher load, building
        self.stages.mark("start")

    def load(self, teacher: TeacherRef | TeacherSpec | str, parallel: Callable | None = None) -> None:
        """The teacher, on this process alone or (`parallel`, collective) sharded over a group."""

        t0 = time.perf_counter()
        ref = teacher if isinstance(teacher, TeacherRef) else None
        try:
            self.teacher = load_teacher(ref.spec if ref else teacher, ref.schema if ref else None, self.device,
                                        expect_sha256=ref.sha256 if ref else None, parallel=parallel)
        except TeacherError as e:  # a one-line reason in the driver's "worker is gone" message
            raise CacheError(f"worker {socket.gethostname()}:{os.getpid()}: {e}") from None
        self.meta = {"sha256": self.teacher.sha256}
        self.schema = self.teacher.schema
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                     "threads": torch.get_num_threads(), "teacher_load_s": round(time.perf_counter() - t0, 3),
                     "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}  # set by the pool (pool.actor_env)
        self.stages.mark("load")

    def ready(self) -> dict[str, Any]:
        return self.info

    def memory(self) -> dict[str, Any]:
        """Peak RSS of loading the teacher and of building since (what `teacher_ranks` divides)."""
        self.stages.mark("build")
        return self.stages.record()

    def build(self, task: ShardTask) -> ShardEntry:
        self.check_teacher(task)
        return compute_shard(self.teacher, self.schema, task, self.device, self.info, self.on_row_group)

    def check_teacher(self, task: ShardTask) -> None:
        if task.teacher_sha256 != self.meta["sha256"]:
            raise CacheError(
                f"worker {self.info['host']}:{self.info['pid']} loaded teacher {self.meta['sha256'][:12]}…, "
                f"the build expects {task.teacher_sha256[:12]}…: the export changed during the build"
            )

    def on_row_group(self, g: int) -> None:
        """Called as each row group is written; a seam for tests (subclasses), nothing here."""
