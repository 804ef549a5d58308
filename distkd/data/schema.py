"""The logs contract: which Parquet columns a log shard has and what they mean.

A logs directory holds `schema.yaml` and one folder per split (`train/`, `valid/`,
`test/`) of Parquet shards. Every shard has:

- `example_id` (int64): stable and unique across the whole logs directory;
- sparse features: int64 ids, or list<int64> for multi-valued ones; ids are in
  [0, num_embeddings), or any non-negative int64 reduced modulo `hash_size`;
- dense features: float32, with an optional transform applied by the loader;
- one 0/1 label column per task (nullable: an unlabeled row still serves distillation);
- optionally `request_id` (int64), grouping the rows shown together;
- optionally evaluation-only columns (e.g. the true probability of a synthetic task),
  which training never reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pyarrow as pa

from distkd.config import ConfigError, from_dict, read_yaml, to_dict

SCHEMA_VERSION = 1
SCHEMA_FILE = "schema.yaml"
SPLITS = ("train", "valid", "test")


@dataclass
class SparseFeature:
    name: str
    num_embeddings: Optional[int] = None
    hash_size: Optional[int] = None
    multi_valued: bool = False

    def validate(self) -> None:
        if (self.num_embeddings is None) == (self.hash_size is None):
            raise ConfigError(f"sparse feature '{self.name}': give exactly one of num_embeddings or hash_size")
        if self.rows <= 0:
            raise ConfigError(f"sparse feature '{self.name}': table size must be positive")

    @property
    def rows(self) -> int:
        """Rows of the embedding table this feature looks up."""
        return self.num_embeddings if self.num_embeddings is not None else self.hash_size  # type: ignore[return-value]


@dataclass
class DenseFeature:
    name: str
    transform: Literal["none", "log1p"] = "none"


@dataclass
class Task:
    name: str
    label: str


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
        fields = [pa.field(self.id, pa.int64(), nullable=False)]
        for f in self.sparse:
            fields.append(pa.field(f.name, pa.list_(pa.int64()) if f.multi_valued else pa.int64()))
        fields += [pa.field(f.name, pa.float32()) for f in self.dense]
        fields += [pa.field(t.label, pa.int8(), nullable=True) for t in self.tasks]
        if self.request_id:
            fields.append(pa.field(self.request_id, pa.int64()))
        fields += [pa.field(c, pa.float32()) for c in self.eval_columns]
        return pa.schema(fields)

    def fingerprint(self) -> str:
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the schema YAML atomically, to a path or a storage URI (see distkd.storage)."""
        import yaml

        from distkd import storage

        text = yaml.safe_dump(to_dict(self), sort_keys=False)
        storage.write_atomic(path, lambda fh: fh.write(text.encode()))


def load_schema(path: str | Path) -> Schema:
    """Load a schema from a YAML file, or from `<dir>/schema.yaml` when given a logs directory
    (a local path or a storage URI such as s3://bucket/logs)."""
    from distkd import storage

    if storage.is_remote(path):
        if not storage.basename(path).endswith((".yaml", ".yml")):
            path = storage.join(path, SCHEMA_FILE)
    else:
        path = Path(path)
        if path.is_dir():
            path = path / SCHEMA_FILE
    return from_dict(Schema, read_yaml(path), str(path))


def check_arrow_schema(schema: Schema, actual: pa.Schema, source: str, columns: list[str] | None = None) -> None:
    """Raise a ValueError naming `source` and the column if `actual` does not hold `columns`
    (default: the training columns) with the contract's types."""
    expected = schema.arrow_schema()
    for name in schema.training_columns() if columns is None else columns:
        want = expected.field(name).type
        idx = actual.get_field_index(name)
        if idx < 0:
            raise LogsError(f"{source}: missing column '{name}' (expected {want})")
        got = actual.field(idx).type
        if not _compatible(got, want):
            raise LogsError(f"{source}: column '{name}' has type {got}, expected {want}")


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got == want:
        return True
    # Labels may be any integer width or bool; ids may be stored in narrower ints.
    if pa.types.is_integer(want) and (pa.types.is_integer(got) or pa.types.is_boolean(got)):
        return True
    if pa.types.is_list(want) and (pa.types.is_list(got) or pa.types.is_large_list(got)):
        return pa.types.is_integer(got.value_type)
    return False


class LogsError(ValueError):
    """A log shard breaks the logs contract; the message names the file, column and row."""
