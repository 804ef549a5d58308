"""`distkd cache verify`: is this cache complete, intact and aligned with these logs?

Checks, for every split and shard the manifest planned: the shard is committed; its cache
file exists with the committed size and sha256; its footer has the log shard's row groups,
the manifest's teacher and the contract's columns; the log shard still has the fingerprint
the cache was built from; and the `example_id` of every row group of the log shard hashes to
the checksum stored in the cache file. With `--teacher`, the export's sha256 must be the
manifest's fingerprint (any teacher form, distkd.models.teacher). With `--recompute F`, the
teacher runs again on a seeded sample of a fraction F of the row groups and its logits must
match the cached ones (distkd.cache.recompute). Every problem is listed (file and row
group); any problem exits non-zero.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from distkd import storage
from distkd.cache import manifest as mf
from distkd.cache.content import codec_for
from distkd.cache.contract import IMPORTED, CacheError
from distkd.cache.lock import BuildLock
from distkd.cache.reader import check_file, check_identity, check_input, load_manifest
from distkd.cache.recompute import recompute as rerun
from distkd.config import ConfigError
from distkd.models.export import sha256_file
from distkd.data.schema import LogsError, load_schema
from distkd.models.teacher import describe
from distkd.models.teacher_spec import TeacherSpec, as_spec, spec_from_args

logger = logging.getLogger(__name__)


def check_ids(cache_dir: str | Path, log_path: str, rel: str, sums: list[str], id_col: str) -> None:
    """Every row group of the log shard hashes to the checksum stored in its cache file."""
    try:
        with storage.open_parquet(log_path) as pf:
            if pf.num_row_groups != len(sums):
                raise CacheError(f"{mf.cache_file(cache_dir, rel)}: {len(sums)} row groups, {log_path} has {pf.num_row_groups}")
            for g in range(pf.num_row_groups):
                got = mf.ids_checksum(pf.read_row_group(g, columns=[id_col]).column(id_col))
                if got != sums[g]:
                    raise CacheError(
                        f"{mf.cache_file(cache_dir, rel)}: row group {g}: example_id checksum {sums[g]} does not match "
                        f"{log_path} row group {g} ({got}): not aligned with the logs"
                    )
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"{log_path}: cannot read: {e}") from None


def verify_cache(cache_dir: str | Path, logs_dir: str | Path, teacher: "str | Path | TeacherSpec | None" = None,
                 recompute: Optional[float] = None, seed: Optional[int] = None,
                 tolerance: int = 0) -> dict[str, Any]:
    """Verify everything; return a summary, or raise CacheError after listing every problem.
    `recompute`: the fraction of row groups to score again (with `teacher`, else the manifest's)."""
    start = time.perf_counter()
    cache_dir = str(cache_dir)
    manifest = load_manifest(cache_dir)
    if recompute is not None and manifest.teacher.record.get("form") == IMPORTED:
        raise CacheError(f"{cache_dir}: holds predictions imported from teacher '{manifest.teacher.record.get('name')}' "
                         f"({manifest.teacher.sha256[:12]}…), computed elsewhere: there is no teacher to run again; "
                         "--recompute checks caches written by `distkd cache build` (verify it without)")
    problems: list[str] = []
    rows = size = shards = 0
    intact: list[str] = []  # shards that pass every other check: the ones recomputation samples
    spec = None if teacher is None else as_spec(str(teacher) if isinstance(teacher, Path) else teacher)
    with BuildLock(cache_dir, shared=True):
        try:
            check_identity(cache_dir, manifest, logs_dir)
        except LogsError as e:
            problems.append(str(e))
        if spec is not None:
            digest = describe(spec)["sha256"]
            if digest != manifest.teacher.sha256:
                problems.append(f"{cache_dir}: holds logits of {manifest.teacher.describe()}, "
                                f"the teacher {spec.name} has sha256 {digest[:12]}…")
        id_col = manifest.schema.id_column
        for rel in manifest.missing_shards():
            problems.append(f"{mf.cache_file(cache_dir, rel)}: not committed (the cache is incomplete; "
                            "`distkd cache build` resumes it)")
        for rel, entry in sorted(manifest.shards.items()):  # every committed shard, planned now or not
            log_path = storage.join(logs_dir, rel)
            before = len(problems)
            if storage.size(log_path) is None:
                problems.append(f"{mf.cache_file(cache_dir, rel)}: its log shard {log_path} is gone "
                                "(`distkd cache build` drops its logits)")
                continue
            try:
                check_input(cache_dir, manifest, logs_dir, log_path, rel)
            except LogsError as e:
                problems.append(str(e))
            try:
                sums = check_file(cache_dir, manifest, rel)
                digest = sha256_file(mf.cache_file(cache_dir, rel))
                if digest != entry.output.sha256:
                    raise CacheError(f"{mf.cache_file(cache_dir, rel)}: sha256 {digest[:12]}… is not the committed "
                                     f"{entry.output.sha256[:12]}…")
                check_ids(cache_dir, log_path, rel, sums, id_col)
            except LogsError as e:
                problems.append(str(e))
            if len(problems) > before:
                continue
            shards += 1
            intact.append(rel)
            rows += entry.output.rows
            size += entry.output.bytes
        known = {storage.absolute(mf.cache_file(cache_dir, rel)) for rel in [*manifest.planned(), *manifest.shards]}
        for p in storage.list_files(cache_dir, ".parquet", recursive=True):
            if not storage.is_temp(storage.basename(p)) and storage.absolute(p) not in known:
                problems.append(f"{p}: a Parquet file the manifest does not list")
        report = None
        if recompute is not None and not problems:  # a teacher mismatch or a broken file says enough
            report = rerun(cache_dir, str(logs_dir), manifest, load_schema(logs_dir), intact, recompute, seed,
                           tolerance, spec, problems)
        temps = mf.temp_files(cache_dir)
    if temps:
        logger.info(f"cache verify: note: {len(temps)} temporary file(s) of an interrupted build "
                    "(the next build removes them)")
    if problems:
        for p in problems if len(problems) > 1 else ():
            logger.error(f"cache verify: {p}")
        raise CacheError(f"{cache_dir}: {len(problems)} problem(s); first: {problems[0]}")
    per_row = codec_for(manifest.content).values_per_row  # cached values: a task's logit, or a top-k/tail item
    summary = {"cache": str(cache_dir), "rows": rows, "shards": shards, "bytes": size,
               "bytes_per_row_per_task": size / rows / per_row if rows else 0.0,
               "teacher": manifest.teacher.sha256, "seconds": time.perf_counter() - start,
               "recompute": report}
    logger.info(f"cache {cache_dir}: OK — {shards} shards, {rows:,} rows aligned with {logs_dir}, every file's "
                f"sha256 and every row group's example_id checksum match; teacher {manifest.teacher.sha256[:12]}…; "
                f"{summary['bytes_per_row_per_task']:.2f} bytes per cached value ({summary['seconds']:.1f}s)")
    return summary


def run(args) -> int:
    """`distkd cache verify`."""

    if args.tolerance < 0:
        raise ConfigError(f"--tolerance: ulps must be >= 0, got {args.tolerance}")
    verify_cache(args.cache, args.logs, spec_from_args(args), recompute=args.recompute, seed=args.seed,
                 tolerance=args.tolerance)
    return 0
