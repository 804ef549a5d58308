"""The cache contract: what a logit cache directory holds and how it is checked.

    CACHE_DIR/manifest.json             written by the build driver only, atomically
    CACHE_DIR/.lock                     flock held by the one build running (local caches)
    CACHE_DIR/<split>/<shard>.parquet   one file per log shard, same relative path

CACHE_DIR and the logs may be local paths or storage URIs (s3://…, see distkd.storage);
every file is committed atomically either way (`storage.write_atomic`).

A cache file has exactly the row groups of its log shard (same row counts, same order)
and the columns

    logits  fixed_size_list<float16 | float32>[T]   teacher logit per task (schema order)
    hidden  fixed_size_list<float16>[H]             the teacher's last deep layer (optional)

Its key-value metadata `distkd.cache` (JSON, written when the file is closed) holds the
teacher's sha256, the shard's input fingerprint and `row_groups`: one 64-bit checksum of
`example_id` per row group, so alignment with the logs is verified without storing the ids (`ids_checksum`: blake2b-64 of the int64
little-endian id bytes).

A shard's input fingerprint is cheap (footer only): its path relative to the logs, file
size, rows, row-group row counts and a hash of the Parquet footer; the worker adds the
checksum of all its ids (`combine_checksums` of the per-row-group ones). The manifest
records the format version, the teacher (sha256 and config), the schema, the plan (the
shards of each split) and, for every committed shard, its input fingerprint, output file,
rows, bytes, sha256 and timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distkd import storage
from distkd.data.schema import LogsError

FORMAT = 1
KIND = "distkd-logit-cache"
MANIFEST = "manifest.json"
LOCK = ".lock"
FILE_META_KEY = "distkd.cache"
DTYPES = {"fp16": pa.float16(), "fp32": pa.float32()}
# Fields of the input fingerprint compared before a committed shard is trusted.
CHEAP_FIELDS = ("path", "size", "rows", "row_groups", "footer")


class CacheError(LogsError):
    """A cache directory is incomplete, inconsistent or does not belong to these logs or this
    teacher; the message names the directory or file (and row group) and what differs."""


# -- checksums and fingerprints ---------------------------------------------------------

def ids_checksum(ids: pa.Array | pa.ChunkedArray | np.ndarray) -> str:
    """blake2b-64 (hex) of the ids as int64 little-endian bytes."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    if isinstance(ids, pa.Array):
        ids = ids.to_numpy(zero_copy_only=False)
    buf = np.ascontiguousarray(ids, dtype="<i8")
    return hashlib.blake2b(buf.data, digest_size=8).hexdigest()


def combine_checksums(per_row_group: list[str]) -> str:
    """One checksum for a shard: blake2b-64 over its row groups' checksums, in order."""
    return hashlib.blake2b("".join(per_row_group).encode(), digest_size=8).hexdigest()


def footer_hash(fh, path: str | Path) -> str:
    """sha256 (16 hex) of a Parquet file's footer (`fh`: the open file): changes with any
    rewrite of the file."""
    fh.seek(-8, os.SEEK_END)
    tail = fh.read(8)
    if tail[4:] != b"PAR1":
        raise LogsError(f"{path}: not a Parquet file (no PAR1 trailer)")
    (length,) = struct.unpack("<i", tail[:4])
    fh.seek(-8 - length, os.SEEK_END)
    return hashlib.sha256(fh.read(length)).hexdigest()[:16]


def row_group_rows(pf: pq.ParquetFile) -> list[int]:
    md = pf.metadata
    return [md.row_group(g).num_rows for g in range(md.num_row_groups)]


def input_fingerprint(logs_dir: str | Path, path: str | Path) -> dict[str, Any]:
    """The cheap fingerprint of one log shard (footer only, no data read)."""
    try:
        with storage.open_input(path) as fh:  # one open (on S3: one HEAD, then ranged reads)
            with pq.ParquetFile(fh) as pf:
                counts = row_group_rows(pf)
            size, footer = fh.size(), footer_hash(fh, path)
    except (OSError, pa.ArrowException) as e:
        raise LogsError(f"{path}: cannot read Parquet footer: {e}") from None
    return {
        "path": rel_path(logs_dir, path),
        "size": size,
        "rows": int(sum(counts)),
        "row_groups": counts,
        "footer": footer,
    }


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences of the cheap fields of two input fingerprints."""
    out = []
    for k in CHEAP_FIELDS:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "row_groups":
            out.append(f"row groups of {_short(a)} rows -> {_short(b)}")
        else:
            out.append(f"{k} {a} -> {b}")
    return out


def _short(counts: list[int] | None) -> str:
    counts = counts or []
    return str(counts) if len(counts) <= 6 else f"[{', '.join(map(str, counts[:5]))}, … ({len(counts)} groups)]"


def rel_path(logs_dir: str | Path, path: str | Path) -> str:
    """`split/name.parquet`: a shard's path relative to its logs directory (local or URI)."""
    rel = storage.relative(logs_dir, path)
    if rel is None:  # not under logs_dir: its folder and name
        p = PurePosixPath(urlsplit(str(path)).path) if storage.is_remote(path) else Path(path)
        rel = f"{p.parent.name}/{p.name}"
    return rel


def check_rel(rel: Any, where: str) -> str:
    """`rel` (a shard's path from a manifest) is a plain relative path inside its directory:
    not absolute, no `..`, `.` or empty parts, no backslash or URI scheme; else CacheError."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if (p is None or not rel or p.is_absolute() or "\\" in rel or "://" in rel or ":" in p.parts[0]
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise CacheError(f"{where}: shard path {rel!r} is not a relative path inside the cache directory "
                         "(absolute, '..' or empty parts); refusing the manifest")
    return rel


def cache_file(cache_dir: str | Path, rel: str) -> str:
    """The location (path or URI) of the cache file of log shard `rel`; CacheError if `rel`
    or (local caches) a symlink on the way leads outside `cache_dir`."""
    check_rel(rel, str(cache_dir))
    loc = storage.join(cache_dir, rel)
    if not storage.is_remote(loc):
        root = Path(storage.local_path(cache_dir)).resolve()
        target = Path(storage.local_path(loc)).resolve()
        if not target.is_relative_to(root):
            raise CacheError(f"{loc}: resolves to {target}, outside the cache directory {root} (a symlink); "
                             "refusing to read or write it")
    return loc


def temp_files(cache_dir: str | Path) -> list[str]:
    """Leftovers of interrupted writes (`storage.temp_name`), at any depth (partitions nest)."""
    return [f for f in storage.list_files(cache_dir, recursive=True) if storage.is_temp(storage.basename(f))]


def remove_temp_files(cache_dir: str | Path) -> list[str]:
    """Delete leftovers of interrupted writes (call only while holding the build lock; on object
    storage, where there is no lock, only while no other build of this cache runs)."""
    removed = temp_files(cache_dir)
    for f in removed:
        storage.delete(f)
    return removed


# -- cache files ------------------------------------------------------------------------

def topk_format(content: dict[str, Any]):
    """The TopKFormat of a next-item cache's content (None for a CTR cache)."""
    if not content.get("topk"):
        return None
    from distkd.cache.topk import TopKFormat

    return TopKFormat(**content["topk"])


def content_schema(content: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of the cache files of a manifest's content."""
    fmt = topk_format(content)
    if fmt is not None:
        return fmt.arrow_schema()
    return output_schema(len(content["tasks"]), content["dtype"], content["hidden_dim"] if content["hidden"] else None)


def output_schema(n_tasks: int, dtype: str, hidden_dim: int | None) -> pa.Schema:
    fields = [pa.field("logits", pa.list_(DTYPES[dtype], n_tasks), nullable=False)]
    if hidden_dim:
        fields.append(pa.field("hidden", pa.list_(pa.float16(), hidden_dim), nullable=False))
    return pa.schema(fields)


def file_meta(pf: pq.ParquetFile, source: str) -> dict[str, Any]:
    """The `distkd.cache` key-value metadata of an open cache file."""
    kv = pf.metadata.metadata or {}
    raw = kv.get(FILE_META_KEY.encode())
    if raw is None:
        raise CacheError(f"{source}: no '{FILE_META_KEY}' metadata: not a distkd cache file")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CacheError(f"{source}: cache file format {meta.get('format')} is not {FORMAT}")
    return meta


def read_file_meta(path: str | Path) -> tuple[dict[str, Any], list[int], pa.Schema]:
    """(metadata, row-group row counts, Arrow schema) of a cache file, from its footer."""
    try:
        with storage.open_parquet(path) as pf:
            return file_meta(pf, str(path)), row_group_rows(pf), pf.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"{path}: cannot read the cache file's Parquet footer: {e}") from None


# -- manifest ---------------------------------------------------------------------------

def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The manifest, or None when the directory has none; CacheError if it is not ours."""
    path = storage.join(cache_dir, MANIFEST)
    try:
        m = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except storage.StorageError as e:
        raise CacheError(f"unreadable manifest: {e}") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable manifest: {e}") from None
    if m.get("kind") != KIND:
        raise CacheError(f"{path}: not a distkd logit cache manifest")
    if m.get("format") != FORMAT:
        raise CacheError(f"{path}: cache format {m.get('format')}; this distkd reads format {FORMAT}")
    for rel in [*m.get("shards", {}), *(r for rels in m.get("splits", {}).values() for r in rels)]:
        check_rel(rel, path)  # paths from the manifest never leave the cache (or logs) directory
    return m


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    blob = json.dumps(manifest, indent=1).encode()
    storage.write_atomic(storage.join(cache_dir, MANIFEST), lambda fh: fh.write(blob))


def planned(manifest: dict[str, Any], split: str | None = None) -> list[str]:
    """Relative paths of the planned shards (of one split, or all)."""
    splits = manifest["splits"] if split is None else {split: manifest["splits"].get(split, [])}
    return list(dict.fromkeys(rel for rels in splits.values() for rel in rels))


def missing_shards(manifest: dict[str, Any], split: str | None = None) -> list[str]:
    return [rel for rel in planned(manifest, split) if rel not in manifest["shards"]]


def describe_teacher(t: dict[str, Any]) -> str:
    return f"teacher {t['sha256'][:12]}… ({t.get('export') or t.get('name', '?')})"


def check_same_build(cache_dir: str | Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to mix: another teacher, schema or content layout into an existing cache."""
    where = f"{cache_dir}: existing cache"
    if old["teacher"]["sha256"] != new["teacher"]["sha256"]:
        raise CacheError(
            f"{where} holds logits of {describe_teacher(old['teacher'])}, this build's is "
            f"{describe_teacher(new['teacher'])}; build into a new cache directory (or delete this one)"
        )
    if old["schema"]["fingerprint"] != new["schema"]["fingerprint"]:
        raise CacheError(
            f"{where} was built for logs with schema {old['schema']['fingerprint']}, these logs have "
            f"{new['schema']['fingerprint']}; build into a new cache directory"
        )
    for k in ("dtype", "hidden", "tasks", "topk"):
        if old["content"].get(k) != new["content"].get(k):
            raise CacheError(
                f"{where} has {k}={old['content'].get(k)!r}, this build asks {k}={new['content'].get(k)!r}; "
                "build into a new cache directory"
            )


def check_plan(cache_dir: str | Path, manifest: dict[str, Any], split: str, current: list[dict[str, Any]]) -> None:
    """Refuse log shards whose bytes changed since their logits were cached (a shard the logs
    gained or lost is the cache growing, see distkd.cache.build)."""
    for fp in current:
        entry = manifest["shards"].get(fp["path"])
        if entry is not None and (diff := fingerprint_diff(entry["input"], fp)):
            raise CacheError(
                f"{cache_dir}: log shard {fp['path']} changed since its logits were cached "
                f"({'; '.join(diff)}); logs are append-only for a cache: write changed data as new shards, "
                "or build into a new cache directory"
            )
