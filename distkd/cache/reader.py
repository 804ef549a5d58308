"""Reading a cache from the distillation stage: `open_cache` -> `CacheColumns` for LogLoader.

    aligned = open_cache("runs/demo/cache", "runs/demo/logs", "train", teacher_sha256=sha)
    loader = LogLoader(split_files(logs, "train"), schema, 4096, aligned=[aligned])
    for batch in loader:
        batch.extras["teacher.logits"]   # float32 [B, T], tasks in schema order
        batch.extras["teacher.hidden"]   # float32 [B, H], with open_cache(..., hidden=True)

Opening checks, from footers only: the manifest is complete for the split, was built
from these logs (same schema, same shards, same cheap fingerprints) and by the expected
teacher, and every cache file is the committed one (size) with the shard's row groups.
While the loader reads, `check` compares each row group's `example_id` checksum with the
one stored in the cache file: a misaligned row group raises CacheError, never trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa

from distkd import storage
from distkd.cache import manifest as mf
from distkd.cache.manifest import CacheError
from distkd.data.loader import Aligned, split_files
from distkd.data.schema import load_schema


def load_manifest(cache_dir: str | Path) -> dict[str, Any]:
    m = mf.read_manifest(cache_dir)
    if m is None:
        raise CacheError(f"{cache_dir}: no {mf.MANIFEST}; not a logit cache (build it with `distkd cache build`)")
    return m


def check_identity(cache_dir: str | Path, manifest: dict[str, Any], logs_dir: str | Path,
                   teacher_sha256: str | None = None) -> None:
    """The cache belongs to these logs' schema and (if given) to this teacher."""
    if teacher_sha256 is not None and manifest["teacher"]["sha256"] != teacher_sha256:
        raise CacheError(
            f"{cache_dir}: holds logits of {mf.describe_teacher(manifest['teacher'])}, expected teacher "
            f"{teacher_sha256[:12]}…; build a cache for that teacher"
        )
    fp = load_schema(logs_dir).fingerprint()
    if manifest["schema"]["fingerprint"] != fp:
        raise CacheError(f"{cache_dir}: built for logs with schema {manifest['schema']['fingerprint']}, "
                         f"{logs_dir} has schema {fp}")


def check_split(cache_dir: str | Path, manifest: dict[str, Any], logs_dir: str | Path, split: str,
                complete: bool = True, fingerprints: bool = True) -> list[tuple[str, str]]:
    """[(log shard path, relative path)] of a split whose logs have the planned shards (and, by
    default, whose cache is complete and whose log shards still have their fingerprints)."""
    if split not in manifest["splits"]:
        raise CacheError(f"{cache_dir}: has no split '{split}' (it has {sorted(manifest['splits'])}); "
                         f"build it with --splits {split}")
    files = split_files(logs_dir, split)
    have = [mf.rel_path(logs_dir, f) for f in files]
    want = manifest["splits"][split]
    if have != want:
        new, gone = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise CacheError(f"{cache_dir}: split '{split}' of {logs_dir} has shards {new[:3]} not in the cache and "
                         f"lacks {gone[:3]} that are; the cache was built from other logs")
    missing = mf.missing_shards(manifest, split)
    if missing and complete:
        raise CacheError(
            f"{cache_dir}: incomplete: {len(missing)} of {len(want)} shards of split '{split}' are not committed "
            f"(first: {missing[0]}); finish it with `distkd cache build` (it resumes)"
        )
    if fingerprints:
        for f, rel in zip(files, have):
            if rel in manifest["shards"]:
                check_input(cache_dir, manifest, logs_dir, f, rel)
    return list(zip(files, have))


def check_input(cache_dir: str | Path, manifest: dict[str, Any], logs_dir: str | Path, log_path: str, rel: str) -> None:
    """The log shard still has the (cheap) fingerprint its cached logits were computed from."""
    if diff := mf.fingerprint_diff(manifest["shards"][rel]["input"], mf.input_fingerprint(logs_dir, log_path)):
        raise CacheError(f"{cache_dir}: log shard {log_path} changed since its logits were cached ({'; '.join(diff)})")


def check_file(cache_dir: str | Path, manifest: dict[str, Any], rel: str) -> list[str]:
    """Footer checks of one committed cache file; returns its per-row-group id checksums."""
    entry = manifest["shards"][rel]
    path = mf.cache_file(cache_dir, rel)
    size = storage.size(path)
    if size is None:
        raise CacheError(f"{path}: missing (committed in {mf.MANIFEST})")
    if size != entry["output"]["bytes"]:
        raise CacheError(f"{path}: {size} bytes, {mf.MANIFEST} committed {entry['output']['bytes']}")
    meta, counts, schema = mf.read_file_meta(path)
    if counts != entry["input"]["row_groups"]:
        raise CacheError(f"{path}: row groups of {counts[:6]}… rows, its log shard has {entry['input']['row_groups'][:6]}…")
    if meta.get("teacher_sha256") != manifest["teacher"]["sha256"]:
        raise CacheError(f"{path}: written by teacher {str(meta.get('teacher_sha256'))[:12]}…, the manifest's is "
                         f"{manifest['teacher']['sha256'][:12]}…")
    content = manifest["content"]
    want = mf.output_schema(len(content["tasks"]), content["dtype"], content["hidden_dim"] if content["hidden"] else None)
    for field in want:
        i = schema.get_field_index(field.name)
        if i < 0 or schema.field(i).type != field.type:
            got = schema.field(i).type if i >= 0 else "missing"
            raise CacheError(f"{path}: column '{field.name}' is {got}, expected {field.type}")
    sums = list(meta.get("row_groups", []))
    if len(sums) != len(counts) or mf.combine_checksums(sums) != entry["input"].get("ids"):
        raise CacheError(f"{path}: its example_id checksums do not match those committed in {mf.MANIFEST}")
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
    hidden_dim: Optional[int] = None
    check_columns: Sequence[str] = ()

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


def open_cache(cache_dir: str | Path, logs_dir: str | Path, split: str, teacher_sha256: str | None = None,
               hidden: bool = False, name: str = "teacher") -> CacheColumns:
    """Validate the cache of `split` against the logs (and teacher) and return the columns
    LogLoader joins: extras `{name}.logits` float32 [B, T] and, with `hidden`, `{name}.hidden`
    float32 [B, H]. Raises CacheError (a LogsError) on any mismatch."""
    manifest = load_manifest(cache_dir)
    check_identity(cache_dir, manifest, logs_dir, teacher_sha256)
    columns = ["logits"]
    if hidden:
        if not manifest["content"]["hidden"]:
            raise CacheError(f"{cache_dir}: was built without the teacher's hidden layer; rebuild with --hidden")
        columns.append("hidden")
    side: dict[str, str] = {}
    expected: dict[str, list[str]] = {}
    for log_path, rel in check_split(cache_dir, manifest, logs_dir, split):
        key = storage.absolute(log_path)
        expected[key] = check_file(cache_dir, manifest, rel)
        side[key] = mf.cache_file(cache_dir, rel)
    hidden_dim = int(manifest["content"]["hidden_dim"]) if hidden else None
    return CacheColumns(name=name, cache_dir=str(cache_dir), split=split, columns=columns, side=side,
                        expected=expected, id_column=manifest["schema"]["spec"]["id"],
                        teacher_sha256=manifest["teacher"]["sha256"], hidden_dim=hidden_dim)
