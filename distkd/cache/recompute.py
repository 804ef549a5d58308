"""`distkd cache verify --recompute FRACTION`: run the teacher again on a sample of row groups.

The sha256 checks prove the files are the ones committed; they cannot prove the committed
logits are what this teacher computes. This does: a seeded random sample of the cache's row
groups (the seed is reported, `--seed` repeats the sample) is decoded exactly as the build
did (same batch size, read from each file's footer, and the worker's thread count) and
scored again, and the result, rounded to the cache's dtype, is compared with the cached
values. The difference is counted in ulps of that dtype (units in the last place: adjacent
fp16 values are 1 ulp apart), so the default tolerance, 0, means bit-identical: what the
same teacher, library build and hardware give. Another BLAS, CPU or GPU may move a logit by
an ulp (`--tolerance 1`); another build of the teacher moves many by far more.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import numpy as np
import torch

from distkd import storage
from distkd.cache import manifest as mf
from distkd.cache.content import ContentCodec, codec_for, score
from distkd.cache.contract import CacheError, Manifest
from distkd.cache.worker import row_group_batches
from distkd.config import from_dict
from distkd.data.schema import Schema
from distkd.models.teacher import Teacher, load_teacher
from distkd.models.teacher_spec import EnsembleSpec, TeacherError, TeacherSpec, as_spec

DEFAULT_BATCH = 8192  # CacheJob's default, for files written before the footer recorded it

logger = logging.getLogger(__name__)


def ordered(a: np.ndarray) -> np.ndarray:
    """IEEE floats as integers in value order: adjacent floats differ by 1 (±0 both map to 0)."""
    bits, sign = (np.uint16, 0x8000) if a.dtype == np.float16 else (np.uint32, 0x80000000)
    i = np.ascontiguousarray(a).view(bits).astype(np.int64)
    mag = i & (sign - 1)
    return np.where(i & sign, -mag, mag)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(ordered(a) - ordered(b))


def manifest_teacher(manifest: Manifest) -> "TeacherSpec | EnsembleSpec":
    """The teacher the manifest says built the cache (caches from before the spec was recorded
    name an export directory)."""
    if manifest.teacher.spec:
        kind = EnsembleSpec if manifest.teacher.record.get("form") == EnsembleSpec.form else TeacherSpec
        return from_dict(kind, manifest.teacher.spec, "manifest.json:teacher.spec")
    if manifest.teacher.export:
        return TeacherSpec(export=manifest.teacher.export)
    raise CacheError("manifest.json: records no teacher to recompute with; give --teacher")


def sample(manifest: Manifest, rels: list[str], fraction: float, seed: int) -> list[tuple[str, int]]:
    """A seeded sample (at least one) of the (shard, row group) pairs of `rels`, in file order."""
    units = [(rel, g) for rel in rels for g in range(len(manifest.shards[rel].input.row_groups))]
    if not units:
        return []
    k = min(len(units), max(1, math.ceil(fraction * len(units))))
    pick = np.random.default_rng(seed).choice(len(units), size=k, replace=False)
    return [units[i] for i in sorted(pick)]


@torch.inference_mode()
def _row_group(teacher: Teacher, schema: Schema, codec: ContentCodec, log_path: str, cache_path: str, g: int,
               row0: int, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{column: (cached, recomputed)} of one row group, as the codec compares them: scored again
    exactly as the build did (same batches, a top-k cache's tail from the same seed)."""
    with storage.open_parquet(log_path) as pf:
        table = pf.read_row_group(g, columns=schema.training_columns())
    _, checksum, batches = row_group_batches(table, schema, log_path, g, row0, batch_size)
    try:
        now = codec.comparable(score(teacher, codec, batches, checksum, torch.device("cpu")))
    except TeacherError as e:
        raise CacheError(f"{log_path}: row group {g}{f', row {e.row}' if e.row is not None else ''}: {e}") from None
    with storage.open_parquet(cache_path) as pf:
        cached = codec.comparable(pf.read_row_group(g))
    return {name: (cached[name], now[name]) for name in now}


def recompute(cache_dir: str, logs_dir: str, manifest: Manifest, schema: Schema, rels: list[str],
              fraction: float, seed: Optional[int], tolerance: int, teacher: "str | TeacherSpec | None",
              problems: list[str]) -> dict[str, Any]:
    """Recompute a sample of the row groups of shards `rels`; append problems; return the report."""
    if not 0 < fraction <= 1:
        raise CacheError(f"--recompute: the fraction of row groups must be in (0, 1], got {fraction}")
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    spec = as_spec(teacher) if teacher is not None else manifest_teacher(manifest)
    dtype = manifest.content.dtype
    codec = codec_for(manifest.content)
    report: dict[str, Any] = {"fraction": fraction, "seed": seed, "tolerance_ulp": tolerance, "dtype": dtype,
                              "row_groups": 0, "of": sum(len(manifest.shards[r].input.row_groups) for r in rels),
                              "max_ulp": 0, "max_abs": 0.0, "worst": None, "sampled": []}
    try:
        loaded = load_teacher(spec, schema, "cpu", expect_sha256=manifest.teacher.sha256)
    except TeacherError as e:
        problems.append(f"{cache_dir}: cannot recompute: {e}")
        return report
    if codec.hidden:
        loaded.hidden_dim = int(manifest.content.hidden_dim)
    before = torch.get_num_threads()
    try:
        for rel, g in sample(manifest, rels, fraction, seed):
            entry = manifest.shards[rel]
            torch.set_num_threads(int(entry.timings.worker.get("threads") or 1))
            cache_path = mf.cache_file(cache_dir, rel)
            meta, _, _ = mf.read_file_meta(cache_path)
            counts = entry.input.row_groups
            try:
                cols = _row_group(loaded, schema, codec, storage.join(logs_dir, rel), cache_path, g, sum(counts[:g]),
                                  int(meta.get("batch_size") or DEFAULT_BATCH))
            except CacheError as e:
                problems.append(str(e))
                continue
            report["row_groups"] += 1
            report["sampled"].append(f"{rel}#{g}")
            for name, (cached, now) in cols.items():
                _compare(report, problems, codec, cache_path, g, name, cached, now)
    finally:
        torch.set_num_threads(before)
    w = report["worst"]
    if w is not None and report["max_ulp"] > tolerance:
        problems.append(
            f"{w['file']}: row group {w['row_group']}, row {w['row']} ({w['what']}): cached {w['column']} "
            f"{w['cached']!r}, the teacher now gives {w['recomputed']!r}: {report['max_ulp']} ulp of {dtype} apart "
            f"(tolerance {tolerance}); written by another build of the teacher, other library versions or "
            "other hardware")
    logger.info(f"cache verify: recomputed {report['row_groups']} of {report['of']} row groups (fraction {fraction}, "
                f"seed {seed}: --seed {seed} repeats the sample); largest difference {report['max_ulp']} ulp of "
                f"{dtype} (|Δ| {report['max_abs']:.3g}), tolerance {tolerance} ulp")
    return report


def _compare(report: dict[str, Any], problems: list[str], codec: ContentCodec, cache_path: str, g: int, name: str,
             cached: np.ndarray, now: np.ndarray) -> None:
    """One column of a row group: item ids must be the same; values are measured in ulps (the
    largest difference is kept in the report)."""
    if cached.shape != now.shape:
        problems.append(f"{cache_path}: row group {g}: '{name}' has shape {list(cached.shape)}, the "
                        f"teacher now gives {list(now.shape)}")
        return
    if name.endswith("_ids"):  # a top-k cache's items: the same ones, or a finding
        if (bad := np.argwhere(cached != now)).size:
            r, c = bad[0]
            problems.append(f"{cache_path}: row group {g}, row {int(r)}: cached {name}[{int(c)}] is item "
                            f"{int(cached[r, c])}, the teacher now ranks item {int(now[r, c])} there; "
                            "written by another build of the teacher, other library versions or hardware")
        return
    ulp = ulp_distance(cached, now)
    diff = np.abs(cached.astype(np.float32) - now.astype(np.float32))
    report["max_abs"] = max(report["max_abs"], float(diff.max(initial=0.0)))
    if ulp.size and (report["worst"] is None or int(ulp.max()) > report["max_ulp"]):
        r, c = np.unravel_index(int(ulp.argmax()), ulp.shape)
        report["max_ulp"] = int(ulp.max())
        report["worst"] = {"file": cache_path, "row_group": g, "row": int(r), "column": name,
                           "what": codec.position(name, int(c)), "cached": float(cached[r, c]),
                           "recomputed": float(now[r, c])}
