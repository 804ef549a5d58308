"""`distkd data inspect`: stream one split through the real loader and summarize it."""

from __future__ import annotations

import logging
import time

import torch

from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema

logger = logging.getLogger(__name__)


def inspect_split(logs: str, split: str = "train", batch_size: int = 8192, progress: bool = True) -> dict:
    schema = load_schema(logs)
    loader = LogLoader(split_files(logs, split), schema, batch_size)
    start = time.perf_counter()
    rows, ids_per_feature = 0, torch.zeros(len(schema.sparse), dtype=torch.float64)
    labelled = torch.zeros(len(schema.binary), dtype=torch.float64)
    positives = torch.zeros(len(schema.binary), dtype=torch.float64)
    for step, batch in enumerate(loader, 1):
        rows += len(batch)
        lengths = batch.sparse.lengths().view(len(schema.sparse), -1)
        ids_per_feature += lengths.sum(1).double()
        known = ~torch.isnan(batch.labels)
        labelled += known.sum(0).double()
        positives += torch.nan_to_num(batch.labels, nan=0.0).sum(0).double()
        if progress and (step % 20 == 0 or step == len(loader)):
            rate = rows / (time.perf_counter() - start)
            eta = (loader.num_rows - rows) / max(rate, 1e-9)
            logger.info(f"\r  {rows:>12,}/{loader.num_rows:,} rows  {rate:,.0f} rows/s  ETA {eta:4.0f}s",
                        extra={"end": ""})
    took = time.perf_counter() - start
    if progress:
        logger.info("")  # ends the progress line
    return {
        "split": split,
        "files": len(loader.files),
        "rows": rows,
        "batches": len(loader),
        "seconds": took,
        "rows_per_s": rows / took if took else float("nan"),
        "ids_per_row": {f.name: float(n) / max(rows, 1) for f, n in zip(schema.sparse, ids_per_feature)},
        "label_rate": {t.name: float(p / max(n, 1)) for t, p, n in zip(schema.binary, positives, labelled)},
        "labelled": {t.name: int(n) for t, n in zip(schema.binary, labelled)},
    }


def format_summary(s: dict) -> str:
    multi = {k: v for k, v in s["ids_per_row"].items() if abs(v - 1.0) > 1e-9}
    lines = [
        f"loader pass over '{s['split']}': {s['rows']:,} rows in {s['batches']} batches, "
        f"{s['seconds']:.1f}s ({s['rows_per_s']:,.0f} rows/s)",
        "labels: " + ", ".join(f"{t} {s['labelled'][t]:,} labelled, rate {r:.4f}" for t, r in s["label_rate"].items()),
    ]
    if multi:
        lines.append("multi-valued: " + ", ".join(f"{k} {v:.2f} ids/row" for k, v in multi.items()))
    return "\n".join(lines)


def run(args) -> int:
    print(format_summary(inspect_split(args.logs, args.split, args.batch_size)))
    return 0
