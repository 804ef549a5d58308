"""The cache's contract: `manifest.json` as typed records, and the names every stage shares.

    CACHE_DIR/manifest.json             written by the build driver only, atomically
    CACHE_DIR/.lock                     flock held by the one build running (local caches)
    CACHE_DIR/<split>/<shard>.parquet   one file per log shard, same relative path

The manifest records the format version, the teacher (sha256 and what it was computed from),
the logs' schema, the content of the cache files (per-task logits or a next-item top-k, see
distkd.cache.content), the plan (the shards of each split) and, for every committed shard,
its input fingerprint, output file, rows, bytes, sha256 and timings; then each build run,
the totals and the shards dropped because their log shard is gone.

`Manifest.from_json` refuses another format version and any field this version does not
know (naming the field and the file), so a manifest from a newer distkd is never half read.
`Manifest.to_json` writes the keys in the order the build has always written them, with
`json.dumps(indent=1)`: the same content gives the same bytes, and a manifest written before
these records existed reads and writes back unchanged (tests/test_cache_contract.py).
Optional fields are written only when set; `None` there means absent from the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from distkd import storage
from distkd.cache.topk import TopKFormat
from distkd.data.schema import LogsError

FORMAT = 1
KIND = "distkd-logit-cache"
MANIFEST = "manifest.json"
LOCK = ".lock"
FILE_META_KEY = "distkd.cache"
IMPORTED = "imported"  # teacher.form of a cache of predictions computed elsewhere (`distkd cache import`)


class CacheError(LogsError):
    """A cache directory is incomplete, inconsistent or does not belong to these logs or this
    teacher; the message names the directory or file (and row group) and what differs."""


def check_rel(rel: Any, where: str) -> str:
    """`rel` (a shard's path from a manifest) is a plain relative path inside its directory:
    not absolute, no `..`, `.` or empty parts, no backslash or URI scheme; else CacheError."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if (p is None or not rel or p.is_absolute() or "\\" in rel or "://" in rel or ":" in p.parts[0]
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise CacheError(f"{where}: shard path {rel!r} is not a relative path inside the cache directory "
                         "(absolute, '..' or empty parts); refusing the manifest")
    return rel


def optional(**kw) -> Any:
    """A field written only when set (not None, not empty): absent from the file otherwise."""
    return field(default=None, metadata={"optional": True}, **kw)


def _keys(doc: Any, known: tuple[str, ...], required: tuple[str, ...], where: str, path: str) -> dict[str, Any]:
    """`doc` as a dict; CacheError on a field not in `known` or a `required` one missing."""
    if not isinstance(doc, dict):
        raise CacheError(f"{where}: '{path}' is {type(doc).__name__}, expected an object")
    for k in doc:
        if k not in known:
            raise CacheError(f"{where}: unknown field '{path}.{k}': format {FORMAT} has no such field "
                             "(written by another distkd version?); refusing the manifest")
    for k in required:
        if k not in doc:
            raise CacheError(f"{where}: '{path}' has no field '{k}'; refusing the manifest")
    return dict(doc)


def _fields(cls: type, doc: Any, where: str, path: str) -> dict[str, Any]:
    """`doc`'s keys as keyword arguments of the dataclass `cls` (see _keys)."""
    fs = fields(cls)
    required = tuple(f.name for f in fs
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return _keys(doc, tuple(f.name for f in fs), required, where, path)


def to_json_value(x: Any) -> Any:
    """The JSON form of a record (nested records, lists and dicts too), fields in their order."""
    if isinstance(x, Teacher):
        return dict(x.record)
    if dataclasses.is_dataclass(x):
        out = {}
        for f in fields(x):
            v = getattr(x, f.name)
            if f.metadata.get("optional") and (v is None or v == {}):
                continue
            out[f.name] = to_json_value(v)
        return out
    if isinstance(x, dict):
        return {k: to_json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json_value(v) for v in x]
    return x


# -- the records -----------------------------------------------------------------------

@dataclass(frozen=True)
class InputFingerprint:
    """A log shard as its logits were computed from: the cheap part (footer only) and, once
    computed, `ids`, the checksum of all its example ids (manifest.combine_checksums)."""

    path: str  # relative to the logs directory
    size: int
    rows: int
    row_groups: list[int]
    footer: str
    ids: Optional[str] = optional()

    CHEAP = ("path", "size", "rows", "row_groups", "footer")  # compared before a committed shard is trusted

    @classmethod
    def from_json(cls, doc: Any, where: str, path: str = "input") -> "InputFingerprint":
        return cls(**_fields(cls, doc, where, path))

    def with_ids(self, ids: str) -> "InputFingerprint":
        return dataclasses.replace(self, ids=ids)

    def diff(self, now: "InputFingerprint") -> list[str]:
        """Human-readable differences of the cheap fields (empty: the same shard)."""
        out = []
        for k in self.CHEAP:
            a, b = getattr(self, k), getattr(now, k)
            if a == b:
                continue
            out.append(f"row groups of {_short(a)} rows -> {_short(b)}" if k == "row_groups" else f"{k} {a} -> {b}")
        return out


def _short(counts: list[int]) -> str:
    return str(counts) if len(counts) <= 6 else f"[{', '.join(map(str, counts[:5]))}, … ({len(counts)} groups)]"


@dataclass(frozen=True)
class Output:
    file: str  # the cache file's name
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Timings:
    seconds: float
    read_decode_s: float
    forward_s: float
    write_s: float
    wait_input_s: float
    attempt: int
    worker: dict[str, Any]  # the worker's own record (host, pid, device, threads, …): free-form
    finished_at: str


@dataclass(frozen=True)
class ShardEntry:
    input: InputFingerprint
    output: Output
    timings: Timings
    # The log shard's partition folders ({"dt": "2026-11-03"}): with the teacher's `window`,
    # the teacher's age on its rows. Absent for split folders and in manifests written before.
    partition: Optional[dict[str, str]] = optional()

    @classmethod
    def from_json(cls, doc: Any, where: str, path: str) -> "ShardEntry":
        d = _fields(cls, doc, where, path)
        part = d.get("partition")
        if part is not None and not (isinstance(part, dict) and all(isinstance(v, str) for v in part.values())):
            raise CacheError(f"{where}: '{path}.partition' is {part!r}, expected an object of partition values")
        return cls(InputFingerprint.from_json(d["input"], where, f"{path}.input"),
                   Output(**_fields(Output, d["output"], where, f"{path}.output")),
                   Timings(**_fields(Timings, d["timings"], where, f"{path}.timings")), part)


@dataclass
class BuildRun:
    """One run of `distkd cache build` (or `cache import`), filled in as it goes (what it reached
    when it failed)."""

    started_at: str
    computed: list[str]
    skipped: int
    rows_computed: int
    pool: Optional[str] = optional()
    teacher_ranks: Optional[int] = optional()  # actors per teacher copy; absent when 1 (distkd.cache.group)
    workers_start_s: Optional[float] = optional()
    workers: Optional[list[dict[str, Any]]] = optional()
    seconds: Optional[float] = optional()
    predictions: Optional[list[str]] = optional()  # `distkd cache import`: the predictions it read


# What distkd.models.teacher.describe records (it owns the layout; the cache reads sha256,
# spec, export and name). Kept as the mapping it is so that its keys keep their order.
TEACHER_FIELDS = ("form", "name", "spec", "input", "sha256", "role", "model", "parameters", "bytes", "export",
                  "weights_sha256", "source", "combine", "members",  # an ensemble: how, and of which teachers
                  "window")  # the partitions an export was trained on: {key, start, end} (distkd.cache.age)


@dataclass(frozen=True)
class Teacher:
    record: dict[str, Any]

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Teacher":
        _keys(doc, TEACHER_FIELDS, ("sha256",), where, "teacher")
        return cls(dict(doc))

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    @property
    def spec(self) -> Optional[dict[str, Any]]:
        return self.record.get("spec")

    @property
    def export(self) -> Optional[str]:
        return self.record.get("export")

    @property
    def window(self) -> Optional[dict[str, str]]:
        """{key, start, end}: the first and last partition the teacher trained on (None: unknown)."""
        return self.record.get("window")

    def describe(self) -> str:
        return f"teacher {self.sha256[:12]}… ({self.export or self.record.get('name', '?')})"


@dataclass(frozen=True)
class SchemaRef:
    fingerprint: str
    spec: dict[str, Any]  # the logs' schema (distkd.data.schema owns its layout)

    @property
    def id_column(self) -> str:
        return self.spec["id"]


@dataclass(frozen=True)
class Content:
    """What the cache files hold: per-task logits (CTR) or, with `topk`, a next-item top-k of
    the catalog; distkd.cache.content turns it into the files' columns."""

    dtype: str
    hidden: bool
    hidden_dim: Optional[int]
    tasks: list[str]
    topk: Optional[TopKFormat] = optional()

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Content":
        d = _fields(cls, doc, where, "content")
        if d.get("topk") is not None:
            d["topk"] = _topk(d["topk"], where, "content.topk")
        return cls(**d)


def _topk(doc: Any, where: str, path: str) -> TopKFormat:
    try:
        return TopKFormat(**_fields(TopKFormat, doc, where, path))
    except ValueError as e:
        raise CacheError(f"{where}: '{path}': {e}") from None


@dataclass(frozen=True)
class Totals:
    rows: int
    shards: int
    bytes: int
    bytes_per_row: float
    bytes_per_row_per_task: float  # per cached value: a task's logit, or a top-k or tail item
    values_per_row: int
    topk: Optional[TopKFormat]

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Totals":
        d = _fields(cls, doc, where, "totals")
        if d["topk"] is not None:
            d["topk"] = _topk(d["topk"], where, "totals.topk")
        return cls(**d)


@dataclass(frozen=True)
class Dropped:
    at: str
    rows: int


@dataclass
class Manifest:
    """A cache directory's manifest. The build driver changes it as shards commit; every other
    reader only reads it."""

    teacher: Teacher
    schema: SchemaRef
    content: Content
    logs: str
    splits: dict[str, list[str]] = field(default_factory=dict)
    shards: dict[str, ShardEntry] = field(default_factory=dict)
    builds: list[BuildRun] = field(default_factory=list)
    complete: bool = False
    totals: Optional[Totals] = optional()
    dropped: dict[str, Dropped] = optional()
    format: int = FORMAT
    kind: str = KIND

    KEYS = ("format", "kind", "teacher", "schema", "content", "logs", "splits", "shards", "builds", "complete",
            "totals", "dropped")  # the order on disk

    def __post_init__(self) -> None:
        if self.dropped is None:
            self.dropped = {}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Manifest":
        """The manifest of a parsed `manifest.json`; `where` (its location) names it in errors."""
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise CacheError(f"{where}: not a distkd logit cache manifest")
        if doc.get("format") != FORMAT:
            raise CacheError(f"{where}: cache format {doc.get('format')}; this distkd reads format {FORMAT}")
        d = _fields(cls, doc, where, "manifest")
        splits = d.get("splits", {})
        for rel in [*d.get("shards", {}), *(r for rels in splits.values() for r in rels)]:
            check_rel(rel, where)  # paths from the manifest never leave the cache (or logs) directory
        return cls(
            teacher=Teacher.from_json(d["teacher"], where),
            schema=SchemaRef(**_fields(SchemaRef, d["schema"], where, "schema")),
            content=Content.from_json(d["content"], where),
            logs=d["logs"],
            splits={s: list(rels) for s, rels in splits.items()},
            shards={rel: ShardEntry.from_json(e, where, f"shards[{rel!r}]") for rel, e in d.get("shards", {}).items()},
            builds=[BuildRun(**_fields(BuildRun, b, where, f"builds[{i}]")) for i, b in enumerate(d.get("builds", []))],
            complete=d.get("complete", False),
            totals=Totals.from_json(d["totals"], where) if d.get("totals") is not None else None,
            dropped={rel: Dropped(**_fields(Dropped, e, where, f"dropped[{rel!r}]"))
                     for rel, e in (d.get("dropped") or {}).items()},
        )

    def to_json(self) -> str:
        doc = to_json_value(self)
        return json.dumps({k: doc[k] for k in self.KEYS if k in doc}, indent=1)

    def planned(self, split: str | None = None) -> list[str]:
        """Relative paths of the planned shards (of one split, or all)."""
        splits = self.splits if split is None else {split: self.splits.get(split, [])}
        return list(dict.fromkeys(rel for rels in splits.values() for rel in rels))

    def missing_shards(self, split: str | None = None) -> list[str]:
        return [rel for rel in self.planned(split) if rel not in self.shards]

    def committed(self) -> list[ShardEntry]:
        """The entries of the planned shards that are committed."""
        return [self.shards[r] for r in self.planned() if r in self.shards]


def read_manifest(cache_dir: str | Path) -> Manifest | None:
    """The manifest, or None when the directory has none; CacheError if it is not ours."""
    path = storage.join(cache_dir, MANIFEST)
    try:
        doc = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except storage.StorageError as e:
        raise CacheError(f"unreadable manifest: {e}") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable manifest: {e}") from None
    return Manifest.from_json(doc, path)


def write_manifest(cache_dir: str | Path, manifest: Manifest) -> None:
    blob = manifest.to_json().encode()
    storage.write_atomic(storage.join(cache_dir, MANIFEST), lambda fh: fh.write(blob))
