"""`distkd cache import`: a teacher's predictions computed elsewhere, as a logit cache.

For a teacher served by its own inference system: Parquet files of `example_id` plus logits
(distkd.cache.predictions: any order, any layout, local or object storage) are joined to the
log shards by id (distkd.cache.join: a partitioned hash join, memory bounded by
--memory-budget) and written as the same positional cache files and manifest as
`distkd cache build`, the teacher recorded as `{form: imported, name, sha256}` with the name
and fingerprint the user gives (the cache's key: another fingerprint is another cache).

Read top to bottom: take the build lock, remove leftovers of interrupted runs, reconcile
with an existing manifest (reconcile.py, as a build: another fingerprint, schema or dtype,
or a changed log shard, is refused; committed shards are skipped, so the cache grows by new
shards only), join every predictions file to the shards to import and check that each of
their logged rows is predicted exactly once (a missing id, a duplicate, an id not in the
logs, a wrong number of tasks, a non-finite logit: refused naming the file, row and id,
before anything is written), then write each shard's file atomically (the worker's commit
path) and record it in the manifest, which only this driver writes, last. Predictions of
rows already cached are accepted and not used. CTR logits only: a next-item (top-k) cache
is refused. `cache verify` checks an imported cache like a built one, but cannot
`--recompute` it (there is no teacher to run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pyarrow.parquet as pq

from distkd import storage
from distkd.cache.build import Progress, _Committer, _record, _totals, format_summary
from distkd.cache.content import DTYPES, codec_for
from distkd.cache.contract import (
    FILE_META_KEY, FORMAT, IMPORTED, BuildRun, CacheError, Content, Manifest, Output, SchemaRef, ShardEntry, Teacher,
    Timings, read_manifest, to_json_value,
)
from distkd.cache.join import Joined, Ordered, Shard, join, plan
from distkd.cache.lock import writing
from distkd.cache.manifest import cache_file, combine_checksums, ids_checksum, input_fingerprint
from distkd.cache.predictions import count_rows, find_files
from distkd.cache.reconcile import reconcile
from distkd.cache.worker import ShardTask, _commit, _HashingSink, _Tally, check_unchanged
from distkd.config import ConfigError, to_dict
from distkd.data.layout import split_files
from distkd.data.schema import SPLITS, load_schema

logger = logging.getLogger(__name__)

SPILL = "import"  # the temporary folder of the join's spill files: OUT/.import.tmp-<host>-<pid>
_HEX = re.compile(r"^[0-9a-f]{16,128}$")


@dataclass
class ImportJob:
    predictions: list[str]  # files, directories or globs (paths or URIs)
    logs: str
    out: str
    teacher_name: str
    fingerprint: str  # hex: the teacher's version as its owners name it (the cache is keyed on it)
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    dtype: Literal["fp16", "fp32"] = "fp16"
    memory_budget_mb: float = 1024.0  # the join's working memory (sizes its partitions)
    partitions: Optional[int] = None  # hash partitions of the join (default: from the budget)
    spill_dir: Optional[str] = None  # where the join spills (default: in OUT; a local temp folder for a URI)

    def validate(self) -> None:
        self.fingerprint = self.fingerprint.strip().lower()
        if not _HEX.match(self.fingerprint):
            raise ConfigError(f"--fingerprint {self.fingerprint!r}: 16 to 128 hex digits (e.g. the sha256 of the "
                              "teacher's weights or the version id its serving system gives)")
        if not self.teacher_name.strip():
            raise ConfigError("--teacher-name: a name for the teacher that computed the predictions")
        if not self.splits:
            raise ConfigError("--splits: at least one split")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: one of {sorted(DTYPES)}")
        if self.memory_budget_mb <= 0 or (self.partitions is not None and self.partitions < 1):
            raise ConfigError("--memory-budget must be > 0 and --partitions >= 1")


def header(job: ImportJob) -> Manifest:
    """The manifest's identity part: the imported teacher, the logs' schema, CTR logits."""
    schema = load_schema(job.logs)
    if schema.classes:
        raise ConfigError(f"{job.logs}: `cache import` takes per-task logits of binary tasks; these logs have the "
                          f"multiclass task(s) {[t.name for t in schema.classes]}, whose top-k cache it does not "
                          "import yet: build it with `distkd cache build`")
    teacher = Teacher({"form": IMPORTED, "name": job.teacher_name, "sha256": job.fingerprint})
    return Manifest(teacher=teacher, schema=SchemaRef(schema.fingerprint(), to_dict(schema)),
                    content=Content(job.dtype, False, None, schema.task_names), logs=storage.absolute(job.logs))


def _check_imported(out: str, new: Manifest) -> None:
    """An existing cache there holds imported predictions (not a build's logits)."""
    old = read_manifest(out)
    if old is None:
        return
    if old.teacher.record.get("form") != IMPORTED:
        raise CacheError(f"{out}: holds logits computed by `distkd cache build` ({old.teacher.describe()}); "
                         "import into a new cache directory")
    if old.teacher.sha256 == new.teacher.sha256 and old.teacher.record.get("name") != new.teacher.record["name"]:
        logger.warning(f"cache import: {out} records this fingerprint as teacher '{old.teacher.record.get('name')}'; "
                       f"keeping that name (not '{new.teacher.record['name']}')")


def _spill_folder(job: ImportJob, out: str) -> Path:
    if job.spill_dir:
        Path(job.spill_dir).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=storage.temp_name(SPILL), dir=job.spill_dir))
    if storage.is_remote(out):
        return Path(tempfile.mkdtemp(prefix="distkd-import-"))
    folder = Path(storage.local_path(out)) / storage.temp_name(SPILL)
    folder.mkdir()
    return folder


def _remove_leftovers(out: str) -> None:
    """Spill folders of an interrupted import (call holding the build lock)."""
    if storage.is_remote(out):
        return
    for d in Path(storage.local_path(out)).glob(storage.temp_name(SPILL, "*")):
        shutil.rmtree(d, ignore_errors=True)
        logger.info(f"cache import: removed {d} (left by an interrupted import)")


def import_predictions(job: ImportJob) -> dict[str, Any]:
    """Import the predictions of `job` into its cache; return the summary of this run."""
    started = time.perf_counter()
    job.validate()
    new = header(job)
    out = job.out
    with writing(out, "cache import", "import"):
        _remove_leftovers(out)
        _check_imported(out, new)
        current = {s: [input_fingerprint(job.logs, p) for p in split_files(job.logs, s)] for s in job.splits}
        pl = reconcile(out, job.logs, new, current)
        manifest, todo = pl.manifest, pl.todo
        run = BuildRun(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), computed=[], skipped=len(pl.valid),
                       rows_computed=0, predictions=list(job.predictions))
        joined, folder = None, None
        try:
            if todo:  # every check before anything is written: a refused import publishes nothing
                folder = _spill_folder(job, out)
                joined = _join(job, out, manifest, pl.valid, todo, current, folder)
            else:
                logger.info(f"cache import: {out}: every shard of {job.splits} is committed; nothing to import")
            t0 = time.perf_counter()
            _publish(job, out, manifest, pl.gone, run, todo, joined, started)
            compute_s = time.perf_counter() - t0
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    summary = {**to_json_value(manifest.totals), "cache": str(out), "complete": manifest.complete,
               "teacher": manifest.teacher.record, "computed": len(run.computed), "skipped": run.skipped,
               "rows_computed": run.rows_computed, "seconds": run.seconds, "compute_s": compute_s,
               "rows_per_s": run.rows_computed / compute_s if compute_s else 0.0, "pool": None,
               **(joined.stats if joined else {})}
    logger.info(format_summary(summary, codec_for(manifest.content).describe(manifest.totals.bytes_per_row_per_task)))
    return summary


def _join(job: ImportJob, out: str, manifest: Manifest, valid: list[str], todo: list, current: dict,
          folder: Path) -> Joined:
    """Passes 1 and 2 of the join over the shards to import and the committed ones."""
    files = find_files(job.predictions)
    rows = sum(count_rows(f) for f in files)
    fps = {fp.path: fp for fps in current.values() for fp in fps}
    shards = [*(Shard(fp.path, storage.join(job.logs, fp.path), fp.row_groups, True) for fp in todo),
              *(Shard(rel, storage.join(job.logs, rel), fps[rel].row_groups, False) for rel in valid)]
    codec = codec_for(manifest.content)
    dtype = codec.dtype_np
    pl = plan(rows, sum(fp.rows for fp in fps.values()), sum(fp.rows for fp in todo),
              len(manifest.content.tasks) * dtype().itemsize,
              int(job.memory_budget_mb * 2**20), job.partitions)
    logger.info(f"cache import: {out}: {len(todo)} shard(s) to import ({sum(fp.rows for fp in todo):,} rows), "
                f"{len(valid)} committed; {rows:,} predictions in {len(files)} file(s); join in {pl.partitions} "
                f"partition(s), ranges of {pl.range_rows:,} rows (memory budget {job.memory_budget_mb:,.1f} MiB, "
                f"spill in {folder})")
    return join(files, shards, manifest.schema.id_column, list(manifest.content.tasks), dtype, rows, pl, folder, out,
                job.splits)


def _publish(job: ImportJob, out: str, manifest: Manifest, gone: list[str], run: BuildRun, todo: list,
             joined: Optional[Joined], started: float) -> None:
    """Pass 3: each shard's file committed and recorded; the manifest written last."""
    for rel in gone:
        storage.delete(cache_file(out, rel))
        logger.info(f"cache import: log shard {rel} is gone from {job.logs}; dropped its logits from the cache")
    manifest.builds.append(run)
    manifest.complete = not todo
    _record(out, manifest, failing=False)
    try:
        if todo:
            commit = _Committer(out, manifest, run, Progress(sum(fp.rows for fp in todo), len(todo)), None)
            for fp, sums in zip(todo, joined.checksums):
                task = ShardTask(storage.absolute(job.logs), storage.absolute(storage.join(job.logs, fp.path)),
                                 storage.absolute(cache_file(out, fp.path)), fp, manifest.teacher.sha256,
                                 manifest.content)
                commit(task, write_shard(task, joined.ordered, sums))
    finally:  # what committed so far is recorded even when the import fails
        run.seconds = round(time.perf_counter() - started, 3)
        manifest.complete = not manifest.missing_shards()
        manifest.totals = _totals(manifest)
        _record(out, manifest, failing=sys.exc_info()[1] is not None)


def write_shard(task: ShardTask, ordered: Ordered, sums: list[str]) -> ShardEntry:
    """The cache file of one log shard from the joined logits, committed atomically (as a
    worker commits a built shard); its entry for the manifest."""
    start = time.perf_counter()
    now = check_unchanged(task)
    codec = codec_for(task.content)
    meta = {"format": FORMAT, "teacher_sha256": task.teacher_sha256, "tasks": list(task.content.tasks),
            "dtype": task.content.dtype, "input": to_json_value(now), "topk": None, "imported": True,
            "row_groups": sums}
    tally = _Tally()

    def write(fh: Any) -> None:
        sink = _HashingSink(fh)
        with pq.ParquetWriter(sink, codec.schema, **codec.parquet_options()) as writer:
            for g, n in enumerate(task.expected.row_groups):
                ids, z = ordered.take(n)
                if ids_checksum(ids) != sums[g]:
                    raise CacheError(f"{task.log_path}: row group {g}: the joined ids are not the logged ones (a bug)")
                writer.write_table(codec.table([(z, None)]), row_group_size=max(n, 1))
            writer.add_key_value_metadata({FILE_META_KEY: json.dumps(meta)})
        tally.bytes, tally.sha256, tally.closed_at = sink.bytes, sink.sha256.hexdigest(), time.perf_counter()

    _commit(task, write, tally)
    return ShardEntry(
        input=task.expected.with_ids(combine_checksums(sums)),
        output=Output(storage.basename(task.out_path), now.rows, tally.bytes, tally.sha256),
        timings=Timings(seconds=round(time.perf_counter() - start, 3), read_decode_s=0.0, forward_s=0.0,
                        write_s=round(tally.write_s, 3), wait_input_s=0.0, attempt=1,
                        worker={"host": socket.gethostname(), "pid": os.getpid(), "import": True},
                        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z")),
    )


def job_from_args(args) -> ImportJob:
    splits = [s.strip() for s in (args.splits or ",".join(SPLITS)).split(",") if s.strip()]
    return ImportJob(predictions=list(args.predictions), logs=args.logs, out=args.out, teacher_name=args.teacher_name,
                     fingerprint=args.fingerprint, splits=splits, dtype=args.dtype,
                     memory_budget_mb=args.memory_budget, partitions=args.partitions, spill_dir=args.spill_dir)


def run(args) -> int:
    """`distkd cache import`."""
    summary = import_predictions(job_from_args(args))
    return 0 if summary["complete"] else 1
