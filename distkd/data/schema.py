"""The logs contract: which Parquet columns a log shard has and what they mean.

A logs directory holds `schema.yaml` and one folder per split (`train/`, `valid/`,
`test/`) of Parquet shards. Every shard has:

- `example_id` (int64): stable and unique across the whole logs directory;
- sparse features: int64 ids, or list<int64> for multi-valued ones; ids are in
  [0, num_embeddings), or any non-negative integer reduced modulo `hash_size`; or string /
  binary ids (lists of them) hashed into `hash_size` by the feature's `hash:` (distkd.data.hashing);
- dense features: float32, with an optional transform applied by the loader;
- one 0/1 label column per task (nullable: an unlabeled row still serves distillation);
- optionally `request_id` (int64), grouping the rows shown together;
- optionally evaluation-only columns (e.g. the true probability of a synthetic task),
  which training never reads.

Types users have are accepted too, and decoded to the same values: any integer width for ids
and labels, float64 (or float16, or integer) dense columns cast to float32 (a finite value
beyond float32 is refused), bool labels and float labels with NaN for "no label", and
dictionary-encoded columns of any of these.

Each feature has a role: `shared` (the default) or `teacher_only`, a privileged feature in the
logs but never at serving: a student job reads the view without them (distkd.data.roles). A
role is part of the fingerprint only when it is not the default: schemas without roles keep theirs.

Transforms `standardize`, `log1p_standardize` and `quantile` take per-feature parameters from
the logs' statistics (`stats.json`, written by `distkd data stats`, see distkd.data.stats):
`load_schema` attaches them to the features (`DenseFeature.params`), so every process that
decodes rows applies the same transform from the one Schema object, exports carry them in
`to_dict(schema)`, and `fingerprint()` changes when they do.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

import yaml

from distkd.config import ConfigError, from_dict, read_yaml, to_dict
from distkd.data.stats_file import param_fields, read_stats, stats_location
from distkd import storage

SCHEMA_VERSION = 1
SCHEMA_FILE = "schema.yaml"
SPLITS = ("train", "valid", "test")
STANDARDIZED = ("standardize", "log1p_standardize")  # z-scores, clipped to +-clip
NEEDS_STATS = (*STANDARDIZED, "quantile")
DEFAULT_CLIP = 5.0
# Optional fields added after version 1: left out of the fingerprint (and schema.yaml) while
# unset, so the fingerprints of schemas that do not use them stay what they were.
_OPTIONAL = ("hash", "clip", "params")
SHARED, TEACHER_ONLY = "shared", "teacher_only"
Role = Literal["shared", "teacher_only"]  # teacher_only: privileged, in the logs but never at serving


@dataclass
class HashSpec:
    """How string ids become table rows: see distkd.data.hashing for the exact function."""

    function: Literal["fnv1a_fmix64"] = "fnv1a_fmix64"
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed: must be in [0, 2**64), got {self.seed}")


@dataclass
class SparseFeature:
    name: str
    num_embeddings: Optional[int] = None
    hash_size: Optional[int] = None
    multi_valued: bool = False
    hash: Optional[HashSpec] = None  # set: the column holds strings (or binary), hashed into hash_size
    role: Role = SHARED  # teacher_only: a privileged feature, read by teachers, never by a student

    def validate(self) -> None:
        if (self.num_embeddings is None) == (self.hash_size is None):
            raise ConfigError(f"sparse feature '{self.name}': give exactly one of num_embeddings or hash_size")
        if self.rows <= 0:
            raise ConfigError(f"sparse feature '{self.name}': table size must be positive")
        if self.hash is not None and self.hash_size is None:
            raise ConfigError(f"sparse feature '{self.name}': hash: needs hash_size (the rows string ids hash into)")

    @property
    def rows(self) -> int:
        """Rows of the embedding table this feature looks up."""
        return self.num_embeddings if self.num_embeddings is not None else self.hash_size  # type: ignore[return-value]


@dataclass
class DenseParams:
    """A transform's parameters, from the logs' stats.json (or pinned in schema.yaml)."""

    mean: Optional[float] = None  # standardize: of x; log1p_standardize: of log1p(max(x, 0))
    std: Optional[float] = None  # population std (ddof 0), same values as mean
    quantiles: Optional[list[float]] = None  # quantile: x at probabilities linspace(0, 1, len)


@dataclass
class DenseFeature:
    name: str
    transform: Literal["none", "log1p", "standardize", "log1p_standardize", "quantile"] = "none"
    clip: Optional[float] = None  # standardize transforms: z clipped to +-clip (default 5)
    params: Optional[DenseParams] = None  # attached by load_schema from stats.json
    role: Role = SHARED  # teacher_only: a privileged feature, read by teachers, never by a student

    def validate(self) -> None:
        where = f"dense feature '{self.name}'"
        if self.clip is not None and (self.transform not in STANDARDIZED or not self.clip > 0):
            raise ConfigError(f"{where}: clip must be > 0 and applies only to transforms {list(STANDARDIZED)}")
        p = self.params
        if p is None:
            return
        if self.transform in STANDARDIZED and (p.mean is None or p.std is None
                                               or not math.isfinite(p.mean) or not math.isfinite(p.std)):
            raise ConfigError(f"{where}: transform '{self.transform}' needs finite params mean and std")
        if self.transform == "quantile":
            q = p.quantiles or []
            if len(q) < 2 or not all(map(math.isfinite, q)) or any(b < a for a, b in zip(q, q[1:])):
                raise ConfigError(f"{where}: transform 'quantile' needs params.quantiles: 2 or more finite, "
                                  "non-decreasing values")

    @property
    def needs_stats(self) -> bool:
        return self.transform in NEEDS_STATS

    @property
    def z_clip(self) -> float:
        return DEFAULT_CLIP if self.clip is None else self.clip


@dataclass
class Task:
    name: str
    label: str
    # binary: a 0/1 label (CTR). multiclass: a class or item id in [0, num_classes) (next item),
    # null for none; `item_feature` names the sparse feature sharing the label's ids (the history).
    kind: Literal["binary", "multiclass"] = "binary"
    num_classes: Optional[int] = None
    item_feature: Optional[str] = None

    def validate(self) -> None:
        if self.kind == "multiclass":
            if not self.num_classes or self.num_classes < 2:
                raise ConfigError(f"task '{self.name}': a multiclass task needs num_classes >= 2")
        elif self.num_classes is not None or self.item_feature is not None:
            raise ConfigError(f"task '{self.name}': num_classes and item_feature are for kind: multiclass")


@dataclass
class Schema:
    sparse: list[SparseFeature]
    dense: list[DenseFeature]
    tasks: list[Task]
    id: str = "example_id"
    request_id: Optional[str] = None
    eval_columns: list[str] = field(default_factory=list)
    version: int = SCHEMA_VERSION

    def validate(self) -> None:
        if self.version != SCHEMA_VERSION:
            raise ConfigError(f"version: {self.version} is not supported (this distkd reads {SCHEMA_VERSION})")
        if not self.tasks:
            raise ConfigError("tasks: at least one task is required")
        if not self.sparse:
            raise ConfigError("sparse: at least one sparse feature is required")
        names = [self.id] + self.feature_names + [t.label for t in self.tasks] + self.eval_columns
        if self.request_id:
            names.append(self.request_id)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"column(s) {dup} named more than once")
        tdup = sorted({t.name for t in self.tasks if [u.name for u in self.tasks].count(t.name) > 1})
        if tdup:
            raise ConfigError(f"task name(s) {tdup} used more than once")
        sparse = {f.name: f for f in self.sparse}
        for t in self.classes:
            f = sparse.get(t.item_feature) if t.item_feature else None
            if t.item_feature and (f is None or f.rows != t.num_classes):
                raise ConfigError(f"task '{t.name}': item_feature '{t.item_feature}' must be a sparse feature with "
                                  f"{t.num_classes} rows (the label's ids)")
            if f is not None and f.role != SHARED:
                raise ConfigError(f"task '{t.name}': item_feature '{f.name}' is teacher-only; a student's next-item "
                                  "model needs it: make it shared")

    @property
    def binary(self) -> list[Task]:
        """The 0/1 tasks (CTR heads, BCE, AUC)."""
        return [t for t in self.tasks if t.kind == "binary"]

    @property
    def classes(self) -> list[Task]:
        """The multiclass tasks (a softmax over num_classes: the next item)."""
        return [t for t in self.tasks if t.kind == "multiclass"]

    @property
    def binary_names(self) -> list[str]:
        return [t.name for t in self.binary]

    @property
    def binary_labels(self) -> list[str]:
        return [t.label for t in self.binary]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.sparse] + [f.name for f in self.dense]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def label_columns(self) -> list[str]:
        return [t.label for t in self.tasks]

    def training_columns(self) -> list[str]:
        """Columns the loader reads (evaluation-only columns excluded)."""
        cols = [self.id] + self.feature_names + self.label_columns
        if self.request_id:
            cols.append(self.request_id)
        return cols

    def arrow_schema(self) -> pa.Schema:
        """The canonical types, the ones to write (check_arrow_schema accepts more)."""
        fields = [pa.field(self.id, pa.int64(), nullable=False)]
        for f in self.sparse:
            ids = pa.string() if f.hash is not None else pa.int64()
            fields.append(pa.field(f.name, pa.list_(ids) if f.multi_valued else ids))
        fields += [pa.field(f.name, pa.float32()) for f in self.dense]
        fields += [pa.field(t.label, pa.int8() if t.kind == "binary" else pa.int64(), nullable=True)
                   for t in self.tasks]
        if self.request_id:
            fields.append(pa.field(self.request_id, pa.int64()))
        fields += [pa.field(c, pa.float32()) for c in self.eval_columns]
        return pa.schema(fields)

    def spec(self) -> dict:
        """`to_dict(self)` less the optional fields left unset: what the fingerprint covers."""
        d = to_dict(self)
        for f in d["sparse"] + d["dense"]:
            for k in _OPTIONAL:
                if k in f and f[k] is None:
                    del f[k]
            if f.get("role") == SHARED:  # the default: schemas without roles keep their fingerprints
                del f["role"]
        for t in d["tasks"]:  # binary tasks read as they did before multiclass ones existed
            if t.get("kind") == "binary":
                for k in ("kind", "num_classes", "item_feature"):
                    t.pop(k, None)
        return d

    def fingerprint(self) -> str:
        """Covers every field that changes decoded values: features, tables, hash function and
        seed, transforms with their clip and parameters (statistics), tasks, columns."""
        blob = json.dumps(self.spec(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def missing_stats(self) -> list[str]:
        return [f.name for f in self.dense if f.needs_stats and f.params is None]

    def save(self, path: str | Path) -> None:
        """Write the schema YAML atomically, to a path or a storage URI (see distkd.storage).
        Parameters attached from stats.json are written too (then pinned): save a schema as
        built, not as loaded, to keep them derived."""


        text = yaml.safe_dump(self.spec(), sort_keys=False)
        storage.write_atomic(path, lambda fh: fh.write(text.encode()))


class MissingStats(ConfigError):
    """A transform needs statistics the logs do not have yet (`distkd data stats` computes them)."""


def load_schema(path: str | Path, stats: bool = True) -> Schema:
    """Load a schema from a YAML file, or from `<dir>/schema.yaml` when given a logs directory
    (a local path or a storage URI such as s3://bucket/logs).

    With `stats`, dense features whose transform needs statistics get their parameters from
    `stats.json` beside the YAML (unless schema.yaml pins them); MissingStats if there are none.
    """

    if storage.is_remote(path):
        if not storage.basename(path).endswith((".yaml", ".yml")):
            path = storage.join(path, SCHEMA_FILE)
        u = urlsplit(path)
        logs = urlunsplit((u.scheme, u.netloc, posixpath.dirname(u.path), u.query, ""))
    else:
        path = Path(path)
        if path.is_dir():
            path = path / SCHEMA_FILE
        logs = str(path.parent)
    schema = from_dict(Schema, read_yaml(path), str(path))
    if stats and schema.missing_stats():
        attach_stats(schema, logs)
    return schema


def attach_stats(schema: Schema, logs: str) -> Schema:
    """Give every dense feature whose transform needs statistics and has no params the ones
    from `logs`/stats.json (in place; returned). MissingStats naming the feature if there are none."""
    missing = [f for f in schema.dense if f.needs_stats and f.params is None]
    if not missing:
        return schema
    loc, f0 = stats_location(logs), missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    doc = read_stats(logs)
    if doc is None:
        raise MissingStats(f"dense feature '{f0.name}'{more}: transform '{f0.transform}' needs statistics and "
                           f"{loc} does not exist; run `distkd data stats {logs}`")
    dense = doc["content"]["dense"]
    for f in missing:
        e = dense.get(f.name)
        if e is None or not e.get("count"):
            why = "has no statistics of it (computed before it was added?)" if e is None else "counted no finite value"
            raise MissingStats(f"dense feature '{f.name}': transform '{f.transform}' needs statistics; {loc} "
                               f"{why}; run `distkd data stats {logs}`")
        f.params = DenseParams(**param_fields(f.transform, e))
        try:
            f.validate()
        except ConfigError as err:
            raise ConfigError(f"{loc}: {err}") from None
    return schema


class LogsError(ValueError):
    """A log shard breaks the logs contract; the message names the file, column and row."""
