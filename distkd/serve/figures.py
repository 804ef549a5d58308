"""The serving figures of the evaluation report: file size and latency per model, and what
int8 tables cost in AUC.

For the teacher, the (first) distilled student and that student with int8 row-wise tables:
the TorchScript serving file (`distkd export`'s, written under the report's `serving/`), its
size, and p50/p99 latency at batch 1, 64 and 1024 on one CPU thread, measured side by side
(distkd.serve.latency) on the first rows of the evaluated split, raw dense in, as a server
would call it. The int8 student is also scored on the whole split, so the report can say
what quantization costs in AUC next to what it saves in bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from distkd import storage
from distkd.data.rows import Rows, decode
from distkd.data.schema import Schema
from distkd.metrics import TaskMetrics
from distkd.models.teacher import kjt_to_dict
from distkd.serve import latency
from distkd.serve.contract import raw_schema, rows_to_inputs
from distkd.serve.export import load, write
from distkd.serve.module import from_export

QUANT = "int8"


def raw_rows(files: list[str], schema: Schema, n: int) -> Rows:
    """The first `n` rows of the split with raw dense values (what a server receives)."""
    parts, have, raw = [], 0, raw_schema(schema)
    for path in files:
        with storage.open_parquet(path) as pf:
            for g in range(pf.num_row_groups):
                parts.append(decode(pf.read_row_group(g, columns=schema.training_columns()), raw, path))
                have += len(parts[-1])
                if have >= n:
                    return Rows.concat(parts).slice(0, n)
    return Rows.concat(parts)


@torch.inference_mode()
def quantized_metrics(module, loader) -> dict[str, dict[str, float]]:
    """Metrics of a serving module over the loader's split (its dense already transformed)."""
    metrics = TaskMetrics(loader.schema.task_names)
    keys = module.features
    for batch in loader:
        metrics.update(module.score(kjt_to_dict(batch.sparse, keys), batch.dense), batch.labels)
    return metrics.compute()


def serving_figures(exports: dict[str, Path], loader, files: list[str], out_dir: str | Path,
                    float_metrics: dict[str, dict], rounds: int = latency.ROUNDS,
                    calls: Optional[dict[int, int]] = None) -> dict[str, Any]:
    """`exports`: {"teacher": dir, "student-KD": dir}; the last one is also served int8.
    `float_metrics[name]`: that model's per-task metrics from the evaluation (for the AUC cost)."""

    out = Path(out_dir)
    names = list(exports)
    student = names[-1]
    plan = [(name, exports[name], None) for name in names] + [(f"{student} {QUANT}", exports[student], QUANT)]
    models, entries = {}, {}
    for name, export_dir, quant in plan:
        c = write(export_dir, out / name.replace(" ", "-"), ["torchscript"], quant)
        f = next(f for f in c["files"].values() if f["format"] == "torchscript" and f["quantization"] == quant)
        path = out / name.replace(" ", "-") / f["file"]
        models[name] = load("torchscript", path)
        entries[name] = {"export": str(export_dir), "file": str(path), "bytes": f["bytes"],
                         "parameters": c["model"]["parameters"], "quantization": quant}
    n = max(latency.BATCHES)
    rows = raw_rows(files, loader.schema, n)
    keys = [f.name for f in loader.schema.sparse]
    inputs = {b: rows_to_inputs(rows.slice(0, min(b, len(rows))), keys) for b in latency.BATCHES if b <= len(rows)}
    timing = latency.measure(models, inputs, rounds=rounds, calls=calls)
    for name in entries:
        entries[name]["latency"] = timing["models"][name]
    q = f"{student} {QUANT}"

    module = from_export(exports[student], QUANT)[0]
    qm = quantized_metrics(module, loader)
    entries[q]["metrics"] = {t: {"auc": m["auc"], "logloss": m["logloss"]} for t, m in qm.items()}
    entries[q]["auc_cost"] = {t: float_metrics[student][t]["auc"] - m["auc"] for t, m in qm.items()}
    return {"models": entries, "quantized": q, "of": student, "dir": str(out),
            **{k: v for k, v in timing.items() if k != "models"}}
