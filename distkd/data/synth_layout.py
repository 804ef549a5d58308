"""Where synthetic logs go (distkd.data.synth, synth_next_item): split folders 80/10/10 or daily
partitions `dt=YYYY-MM-DD`, how many rows each shard gets, and the table `distkd data synth` prints."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

import torch
from torchmetrics.functional.classification import binary_auroc

from distkd import storage
from distkd.config import ConfigError
from distkd.data.schema import Schema

SPLIT_SHARE = {"train": 0.8, "valid": 0.1, "test": 0.1}


def plan_shards(rows: int, shards: int) -> dict[str, list[int]]:
    """Rows per shard for each split: 80/10/10, valid and test get a quarter of the shards."""
    plan = {}
    left = rows
    for i, (split, share) in enumerate(SPLIT_SHARE.items()):
        n = left if i == len(SPLIT_SHARE) - 1 else int(rows * share)
        left -= n
        k = shards if split == "train" else max(1, shards // 4)
        plan[split] = [n // k + (j < n % k) for j in range(k)]
    return plan


def plan_days(rows: int, shards: int, days: int, start: str) -> dict[str, list[int]]:
    """Rows per shard of each daily partition `dt=YYYY-MM-DD` from `start`: rows split evenly."""
    d0 = datetime.date.fromisoformat(start)
    per_day = [rows // days + (i < rows % days) for i in range(days)]
    return {f"dt={d0 + datetime.timedelta(days=i)}": [n // shards + (j < n % shards) for j in range(shards)]
            for i, n in enumerate(per_day)}


def check_days(rows: int, shards: int, days: int, start: str, drift: float) -> None:
    if days < 1:
        raise ConfigError(f"--days: must be >= 1, got {days}")
    try:
        datetime.date.fromisoformat(start)
    except ValueError:
        raise ConfigError(f"--start: {start!r} is not a date YYYY-MM-DD") from None
    if not (math.isfinite(drift) and drift >= 0):
        raise ConfigError(f"--drift: must be >= 0 (radians a day), got {drift}")
    if rows < 10 * shards * days:
        raise ConfigError(f"--rows {rows} is too few for {days} days of {shards} shards (at least {10 * shards * days})")


def summarize(out: str | Path, schema: Schema, days: bool = False) -> str:
    """A per-split (or, with `days`, per-partition) table of rows, shards, size on disk, label
    rates and oracle AUC."""

    lines = [f"logs {out}: {len(schema.sparse)} sparse, {len(schema.dense)} dense, tasks {schema.task_names}"]
    groups = list(SPLIT_SHARE)
    if days:
        groups = sorted({storage.relative(out, f).split("/")[0] for f in storage.list_files(out, ".parquet", True)})
    w = max(map(len, groups))
    lines.append(f"{'split':<{w}} {'shards':>6} {'rows':>12} {'MiB':>8}  " + "  ".join(
        f"{t.name + ' rate':>16} {t.name + ' oracle AUC':>22}" for t in schema.tasks))
    for split in groups:
        files = storage.list_files(storage.join(out, split), ".parquet")
        columns = schema.label_columns + schema.eval_columns
        table = pa.concat_tables(storage.open_parquet(f).read(columns=columns) for f in files)
        cells = []
        for t, oracle in zip(schema.tasks, schema.eval_columns):
            y = table.column(t.label).to_numpy(zero_copy_only=False).astype(np.float64)
            p = table.column(oracle).to_numpy()
            keep = ~np.isnan(y)
            auc = binary_auroc(torch.from_numpy(p[keep]), torch.from_numpy(y[keep]).long()).item()
            cells.append(f"{np.mean(y[keep]):>16.4f} {auc:>22.4f}")
        mib = sum(storage.size(f) for f in files) / 2**20
        lines.append(f"{split:<{w}} {len(files):>6} {table.num_rows:>12,} {mib:>8.1f}  " + "  ".join(cells))
    return "\n".join(lines)
