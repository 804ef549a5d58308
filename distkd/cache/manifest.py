"""The cache files: checksums, input fingerprints, locations, footers and temporary files.

The manifest itself (typed records, format version) is distkd.cache.contract; its names are
importable from here too, where they used to live.

A cache file has exactly the row groups of its log shard (same row counts, same order) and
the columns of the cache's content (distkd.cache.content: per-task logits, or a next-item
top-k). Its key-value metadata `distkd.cache` (JSON, written when the file is closed) holds
the teacher's sha256, the shard's input fingerprint and `row_groups`: one 64-bit checksum of
`example_id` per row group, so alignment with the logs is verified without storing the ids
(`ids_checksum`: blake2b-64 of the int64 little-endian id bytes).

A shard's input fingerprint is cheap (footer only): its path relative to the logs, file
size, rows, row-group row counts and a hash of the Parquet footer; the worker adds the
checksum of all its ids (`combine_checksums` of the per-row-group ones).

CACHE_DIR and the logs may be local paths or storage URIs (s3://…, see distkd.storage);
every file is committed atomically either way (`storage.write_atomic`).
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
from distkd.cache.contract import FILE_META_KEY, FORMAT, CacheError, InputFingerprint, check_rel
from distkd.data.schema import LogsError


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


def input_fingerprint(logs_dir: str | Path, path: str | Path) -> InputFingerprint:
    """The cheap fingerprint of one log shard (footer only, no data read)."""
    try:
        with storage.open_input(path) as fh:  # one open (on S3: one HEAD, then ranged reads)
            with pq.ParquetFile(fh) as pf:
                counts = row_group_rows(pf)
            size, footer = fh.size(), footer_hash(fh, path)
    except (OSError, pa.ArrowException) as e:
        raise LogsError(f"{path}: cannot read Parquet footer: {e}") from None
    return InputFingerprint(rel_path(logs_dir, path), size, int(sum(counts)), counts, footer)


def rel_path(logs_dir: str | Path, path: str | Path) -> str:
    """`split/name.parquet`: a shard's path relative to its logs directory (local or URI)."""
    rel = storage.relative(logs_dir, path)
    if rel is None:  # not under logs_dir: its folder and name
        p = PurePosixPath(urlsplit(str(path)).path) if storage.is_remote(path) else Path(path)
        rel = f"{p.parent.name}/{p.name}"
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
