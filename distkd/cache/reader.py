"""Reading a cache from the distillation stage: `open_cache` -> `CacheColumns` for LogLoader.

    aligned = open_cache("runs/demo/cache", "runs/demo/logs", "train", teacher_sha256=sha)
    loader = LogLoader(split_files(logs, "train"), schema, 4096, aligned=[aligned])
    for batch in loader:
        batch.extras["teacher.logits"]   # float32 [B, T], tasks in schema order
        batch.extras["teacher.hidden"]   # float32 [B, H], with open_cache(..., hidden=True)

Opening checks, from footers only: every shard of the split (its folder, or its partition
range) is cached, by the expected teacher, for logs with this schema, from log shards that
still have their cheap fingerprints (a shard not cached is named: extend the cache), and
every cache file is the committed one (size) with the shard's row groups. A cache that
grows (new shards committed by a build running now) is read consistently: the manifest is
replaced whole, and committed files never change.
While the loader reads, `check` compares each row group's `example_id` checksum with the
one stored in the cache file: a misaligned row group raises CacheError, never trains.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from distkd import storage
from distkd.cache import manifest as mf
from distkd.cache.age import ages as shard_ages
from distkd.cache.content import ContentCodec, check_schema, codec_for
from distkd.cache.contract import MANIFEST, CacheError, Manifest, read_manifest
from distkd.cache.lock import ReaderLock
from distkd.cache.topk import TopKFormat
from distkd.data.layout import split_files
from distkd.data.loader import Aligned
from distkd.data.schema import load_schema


def load_manifest(cache_dir: str | Path) -> Manifest:
    m = read_manifest(cache_dir)
    if m is None:
        raise CacheError(f"{cache_dir}: no {MANIFEST}; not a logit cache (build it with `distkd cache build`)")
    return m


def check_identity(cache_dir: str | Path, manifest: Manifest, logs_dir: str | Path,
                   teacher_sha256: str | None = None) -> None:
    """The cache belongs to these logs' schema and (if given) to this teacher."""
    if teacher_sha256 is not None and manifest.teacher.sha256 != teacher_sha256:
        raise CacheError(
            f"{cache_dir}: holds logits of {manifest.teacher.describe()}, expected teacher "
            f"{teacher_sha256[:12]}…; build a cache for that teacher"
        )
    fp = load_schema(logs_dir).fingerprint()
    if manifest.schema.fingerprint != fp:
        raise CacheError(f"{cache_dir}: built for logs with schema {manifest.schema.fingerprint}, "
                         f"{logs_dir} has schema {fp}")


def check_split(cache_dir: str | Path, manifest: Manifest, logs_dir: str | Path, split: str,
                partitions=None, complete: bool = True, fingerprints: bool = True) -> list[tuple[str, str]]:
    """[(log shard path, relative path)] of the committed shards of a split (its folder, or its
    range of `partitions`): with `complete`, every shard of the split must be cached (the
    missing ones are named); with `fingerprints`, each log shard must still have the
    fingerprint its logits were computed from."""
    files = split_files(str(logs_dir), split, partitions)
    rels = [mf.rel_path(logs_dir, f) for f in files]
    missing = [r for r in rels if r not in manifest.shards]
    if missing and complete:
        rng = (partitions or {}).get(split)
        raise CacheError(
            f"{cache_dir}: {len(missing)} of {len(rels)} shards of split '{split}'"
            f"{f' ({rng.describe()})' if rng else ''} are not cached: {missing[:4]}"
            f"{' …' if len(missing) > 4 else ''}; extend the cache with `distkd cache build` over these logs "
            "(it computes only the shards it lacks)"
        )
    pairs = [(f, r) for f, r in zip(files, rels) if r in manifest.shards]
    if fingerprints:
        for f, rel in pairs:
            check_input(cache_dir, manifest, logs_dir, f, rel)
    return pairs


def check_input(cache_dir: str | Path, manifest: Manifest, logs_dir: str | Path, log_path: str, rel: str) -> None:
    """The log shard still has the (cheap) fingerprint its cached logits were computed from."""
    if diff := manifest.shards[rel].input.diff(mf.input_fingerprint(logs_dir, log_path)):
        raise CacheError(f"{cache_dir}: log shard {log_path} changed since its logits were cached ({'; '.join(diff)})")


def check_file(cache_dir: str | Path, manifest: Manifest, rel: str) -> list[str]:
    """Footer checks of one committed cache file; returns its per-row-group id checksums."""
    entry = manifest.shards[rel]
    path = mf.cache_file(cache_dir, rel)
    size = storage.size(path)
    if size is None:
        raise CacheError(f"{path}: missing (committed in {MANIFEST})")
    if size != entry.output.bytes:
        raise CacheError(f"{path}: {size} bytes, {MANIFEST} committed {entry.output.bytes}")
    meta, counts, schema = mf.read_file_meta(path)
    if counts != entry.input.row_groups:
        raise CacheError(f"{path}: row groups of {counts[:6]}… rows, its log shard has "
                         f"{entry.input.row_groups[:6]}…")
    if meta.get("teacher_sha256") != manifest.teacher.sha256:
        raise CacheError(f"{path}: written by teacher {str(meta.get('teacher_sha256'))[:12]}…, the manifest's is "
                         f"{manifest.teacher.sha256[:12]}…")
    check_schema(codec_for(manifest.content).schema, schema, path)
    sums = list(meta.get("row_groups", []))
    if len(sums) != len(counts) or mf.combine_checksums(sums) != entry.input.ids:
        raise CacheError(f"{path}: its example_id checksums do not match those committed in {MANIFEST}")
    return sums


@dataclass
class CacheColumns(Aligned):
    """A validated cache of one split, as the loader joins it: plain data, so it travels to
    the ranks (pickled) instead of being opened again there."""

    name: str
    cache_dir: str
    split: str
    columns: list[str]
    side: dict[str, str]  # absolute log shard path -> cache file
    expected: dict[str, list[str]]  # absolute log shard path -> example_id checksum per row group
    id_column: str
    teacher_sha256: str
    codec: ContentCodec  # decodes the columns (distkd.cache.content)
    hidden_dim: Optional[int] = None
    check_columns: Sequence[str] = ()
    topk: Optional[TopKFormat] = None  # a next-item cache: what it keeps of each row's softmax
    ages: Optional[dict[str, int]] = None  # cache file -> the teacher's age on it, days (open_cache(age=True))

    def decode(self, table: pa.Table, source: str) -> dict[str, np.ndarray]:
        """Per-task logits `{name}.logits` (and `.hidden`) float32, or a top-k cache's columns
        unpacked (`{name}.topk_ids` int64 [B, k], `.topk_logits`, `.lse`, with a tail `.tail_ids`,
        `.tail_logits`, `.tail_logq`); with ages, `{name}.age` float32 [B], the teacher's age in
        days on each row (one value per shard, so a row's age travels with its logits)."""
        out = self.codec.decode(table, self.name, self.columns, source)
        if self.ages is not None:
            out[f"{self.name}.age"] = np.full(table.num_rows, self.ages[source], np.float32)
        return out

    def pin(self):
        """Hold the cache against `distkd cache gc` while this process reads it."""
        return ReaderLock(self.cache_dir).acquire()

    def side_path(self, log_path: str) -> str:
        try:
            return self.side[storage.absolute(log_path)]
        except KeyError:
            raise CacheError(f"{self.cache_dir}: no cached logits for {log_path} (split '{self.split}')") from None

    def check(self, log_table: pa.Table, side_table: pa.Table, log_path: str, g: int) -> None:
        sums = self.expected[storage.absolute(log_path)]
        got = mf.ids_checksum(log_table.column(self.id_column))
        if g >= len(sums) or got != sums[g]:
            raise CacheError(
                f"{self.side_path(log_path)}: row group {g}: example_id checksum {got} of {log_path} does not match "
                f"the cache's {sums[g] if g < len(sums) else 'none'}; the cache is not aligned with these logs"
            )


def resolve_cache(cache_dir: str | Path, teacher_sha256: str | None = None) -> str:
    """The cache folder `cache_dir` names: itself, or under a root of caches by teacher
    (`cache build ... by_teacher: true`) the one of `teacher_sha256` (or the only one)."""
    cache_dir = str(cache_dir)
    if read_manifest(cache_dir) is not None:
        return cache_dir
    if teacher_sha256 is not None and read_manifest(storage.join(cache_dir, teacher_sha256[:12])) is not None:
        return storage.join(cache_dir, teacher_sha256[:12])
    subs = caches_under(cache_dir)
    if len(subs) == 1 and teacher_sha256 is None:
        return subs[0]
    if subs:
        raise CacheError(f"{cache_dir}: a root of {len(subs)} caches ({', '.join(storage.basename(s) for s in subs)})"
                         + (f", none of teacher {teacher_sha256[:12]}…" if teacher_sha256 else
                            "; name the teacher (sha256:) or the cache folder"))
    raise CacheError(f"{cache_dir}: no {MANIFEST}; not a logit cache (build it with `distkd cache build`)")


def caches_under(root: str | Path) -> list[str]:
    """The cache folders one level under `root` (a root of caches by teacher), by name."""
    return sorted(storage.join(root, posixpath.dirname(storage.relative(root, f)))
                  for f in storage.list_files(root, MANIFEST, recursive=True)
                  if storage.relative(root, f).count("/") == 1)


def open_cache(cache_dir: str | Path, logs_dir: str | Path, split: str, teacher_sha256: str | None = None,
               hidden: bool = False, name: str = "teacher", partitions=None, age: bool = False) -> CacheColumns:
    """Validate the cache of `split` against the logs (and teacher) and return the columns
    LogLoader joins: extras `{name}.logits` float32 [B, T], with `hidden` `{name}.hidden`
    float32 [B, H], with `age` `{name}.age` float32 [B] (the teacher's age in days, distkd.cache.age).
    Raises CacheError (a LogsError) on any mismatch."""
    cache_dir = resolve_cache(cache_dir, teacher_sha256)
    manifest = load_manifest(cache_dir)
    check_identity(cache_dir, manifest, logs_dir, teacher_sha256)
    if hidden and not manifest.content.hidden:
        raise CacheError(f"{cache_dir}: was built without the teacher's hidden layer; rebuild with --hidden")
    codec = codec_for(manifest.content)
    side: dict[str, str] = {}
    expected: dict[str, list[str]] = {}
    pairs = check_split(cache_dir, manifest, logs_dir, split, partitions)
    for log_path, rel in pairs:
        key = storage.absolute(log_path)
        expected[key] = check_file(cache_dir, manifest, rel)
        side[key] = mf.cache_file(cache_dir, rel)
    by_rel = shard_ages(manifest, [rel for _, rel in pairs], str(cache_dir)) if age else None
    return CacheColumns(name=name, cache_dir=str(cache_dir), split=split, columns=codec.read_columns(hidden),
                        side=side, expected=expected, id_column=manifest.schema.id_column,
                        teacher_sha256=manifest.teacher.sha256, codec=codec,
                        hidden_dim=int(manifest.content.hidden_dim) if hidden else None, topk=manifest.content.topk,
                        ages={mf.cache_file(cache_dir, rel): a for rel, a in by_rel.items()} if age else None)
