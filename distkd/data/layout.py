"""Where a split's shards are: split folders, or ranges of a Hive-partitioned tree.

Two layouts of one logs directory (local or object storage):

    LOGS/schema.yaml  LOGS/train/*.parquet  LOGS/valid/...  LOGS/test/...      split folders
    LOGS/schema.yaml  LOGS/dt=2026-11-30/part-*.parquet  LOGS/dt=2026-12-01/...  partitions

With partitions, a job says which partition values make each split (`partitions:` in the
job file), so a rolling window is a change of the job, not a copy of the data:

    partitions:
      train: {key: dt, start: 2026-11-02, end: 2026-11-29}   # inclusive; values compare as
      valid: {key: dt, start: 2026-11-30, end: 2026-11-30}   # strings: ISO dates sort by date
      test:  {key: dt, start: 2026-12-01, end: 2026-12-01}

A split without an entry is its folder. Shards are listed recursively (`dt=.../hour=.../`
nests), hidden and temporary files skipped, in path order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distkd import storage
from distkd.config import ConfigError
from distkd.data.schema import LogsError


@dataclass
class PartitionRange:
    key: str = "dt"
    start: Optional[str] = None  # inclusive; None: from the first partition
    end: Optional[str] = None  # inclusive; None: to the last

    def validate(self) -> None:
        if not self.key or "=" in self.key or "/" in self.key:
            raise ConfigError(f"key: {self.key!r} is not a partition key")
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ConfigError(f"start {self.start!r} is after end {self.end!r}")

    def holds(self, value: str) -> bool:
        return (self.start is None or value >= self.start) and (self.end is None or value <= self.end)

    def describe(self) -> str:
        return f"{self.key} in [{self.start or '…'}, {self.end or '…'}]"


Partitions = dict[str, PartitionRange]


def partition_values(rel: str) -> dict[str, str]:
    """{key: value} of the `key=value` folders in a shard's relative path."""
    parts = rel.split("/")[:-1]
    return dict(p.split("=", 1) for p in parts if "=" in p)


def _visible(loc: str, root: str) -> bool:
    rel = storage.relative(root, loc) or storage.basename(loc)
    return not any(p.startswith(".") for p in rel.split("/"))


def all_shards(logs: str) -> list[str]:
    """Every Parquet shard under `logs`, recursively (hidden and temporary files skipped)."""
    return [f for f in storage.list_files(logs, ".parquet", recursive=True) if _visible(f, logs)]


def is_partitioned(logs: str) -> bool:
    """No split folders, and shards under key=value folders."""
    if any(storage.list_files(storage.join(logs, s), ".parquet") for s in ("train", "valid", "test")):
        return False
    return any(partition_values(storage.relative(logs, f) or "") for f in all_shards(logs))


def split_files(logs: str, split: str, partitions: Partitions | None = None) -> list[str]:
    """Sorted shard locations of `split`: its partition range if `partitions` has one, else
    LOGS/<split>/*.parquet. LogsError if there are none."""
    rng = (partitions or {}).get(split)
    if rng is None:
        d = storage.join(logs, split)
        files = [f for f in storage.list_files(d, ".parquet") if not storage.basename(f).startswith(".")]
        if not files:
            raise LogsError(f"{d}: no Parquet shards (*.parquet) for split '{split}'")
        return files
    files = []
    for f in all_shards(logs):
        value = partition_values(storage.relative(logs, f) or "").get(rng.key)
        if value is not None and rng.holds(value):
            files.append(f)
    if not files:
        raise LogsError(f"{logs}: no Parquet shards with {rng.describe()} for split '{split}'")
    return files


def partition_of(logs: str, path: str, key: str) -> str | None:
    return partition_values(storage.relative(logs, path) or "").get(key)


def window_of(logs: str, split: str, partitions: Partitions | None) -> dict[str, str] | None:
    """{key, start, end}: the first and last partition value of a split's shards (None for a
    split folder). A model's training window: how old it is on a later partition."""
    rng = (partitions or {}).get(split)
    if rng is None:
        return None
    values = sorted(v for f in split_files(logs, split, partitions) if (v := partition_of(logs, f, rng.key)))
    return {"key": rng.key, "start": values[0], "end": values[-1]} if values else None
