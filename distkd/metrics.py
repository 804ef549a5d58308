"""Per-task ranking metrics, aggregated across ranks.

AUC, accuracy, precision, recall and F1 come from torchmetrics (which gathers its
state over the default process group on `compute`); logloss, normalized entropy and
calibration are exact sums all-reduced here. Rows without a label (NaN) are skipped.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryPrecision, BinaryRecall
from distkd.metrics_retrieval import RetrievalMetrics

METRICS = ("auc", "logloss", "ne", "calibration", "accuracy", "precision", "recall", "f1", "rows")


class TaskMetrics:
    """Accumulate logits/labels for every task; `compute()` is collective (call on all ranks)."""

    def __init__(self, tasks: list[str], threshold: float = 0.5):
        self.tasks = tasks
        self.curves = [
            MetricCollection(
                {
                    "auc": BinaryAUROC(),
                    "accuracy": BinaryAccuracy(threshold=threshold),
                    "precision": BinaryPrecision(threshold=threshold),
                    "recall": BinaryRecall(threshold=threshold),
                    "f1": BinaryF1Score(threshold=threshold),
                }
            )
            for _ in tasks
        ]
        # Per task: rows, sum of labels, sum of predictions, sum of log losses.
        self.sums = torch.zeros(len(tasks), 4, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
        for t, curves in enumerate(self.curves):
            y = labels[:, t]
            keep = ~torch.isnan(y)
            if not keep.any():
                continue
            z, y = logits[keep, t], y[keep]
            p = torch.sigmoid(z)
            curves.update(p, y.long())
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
            self.sums[t] += torch.tensor([y.numel(), y.sum().item(), p.sum().item(), loss.item()], dtype=torch.float64)

    def compute(self) -> dict[str, dict[str, float]]:
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        out = {}
        for t, (task, curves) in enumerate(zip(self.tasks, self.curves)):
            n, pos, pred, loss = sums[t].tolist()
            if n == 0:
                out[task] = {m: float("nan") for m in METRICS}
                continue
            rate = pos / n
            base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else float("nan")
            m = {k: float(v) for k, v in curves.compute().items()}
            m.update(
                logloss=loss / n,
                ne=(loss / n) / base,
                calibration=(pred / pos) if pos else float("nan"),
                rows=n,
            )
            out[task] = {k: m[k] for k in METRICS}
        return out

    def reset(self) -> None:
        for c in self.curves:
            c.reset()
        self.sums.zero_()


RETRIEVAL = ("recall@10", "ndcg@10", "mrr", "recall@50", "accuracy", "macro_precision", "macro_recall",
             "macro_f1", "rows")


def format_table(rows: dict[str, dict[str, dict[str, float]]], metrics=None) -> str:
    """rows: name -> task -> metric -> value, as a fixed-width table (binary-task metrics, or
    retrieval ones when the tasks have no AUC)."""
    if metrics is None:
        first = next((v for tasks in rows.values() for v in tasks.values()), {})
        metrics = METRICS if "auc" in first else RETRIEVAL
    head = f"{'model':<18} {'task':<12} " + " ".join(f"{m:>11}" for m in metrics)
    lines = [head, "-" * len(head)]
    for name, tasks in rows.items():
        for task, vals in tasks.items():
            cells = []
            for m in metrics:
                v = vals.get(m, float("nan"))
                cells.append(f"{int(v):>11,}" if m == "rows" and v == v else f"{v:>11.4f}")
            lines.append(f"{name:<18} {task:<12} " + " ".join(cells))
    return "\n".join(lines)


class SchemaMetrics:
    """Every task of a schema: TaskMetrics for the binary ones (on the logits, one per task),
    RetrievalMetrics for a multiclass one (on the catalog logits and the batch's class ids)."""

    def __init__(self, schema):

        self.binary = TaskMetrics(schema.binary_names) if schema.binary else None
        self.classes = [(t.name, RetrievalMetrics(t.num_classes)) for t in schema.classes]

    def update(self, logits: torch.Tensor, batch) -> None:
        if self.binary is not None:
            self.binary.update(logits, batch.labels)
        for j, (_, m) in enumerate(self.classes):
            m.update(logits, batch.classes[:, j])

    def compute(self) -> dict[str, dict[str, float]]:
        out = self.binary.compute() if self.binary is not None else {}
        out.update({name: m.compute() for name, m in self.classes})
        return out


def headline(result: dict[str, dict[str, float]]) -> float:
    """One number to rank runs by (higher is better): the mean over tasks of AUC for a binary
    task, Recall@10 for a multiclass one."""
    return sum(m["auc"] if "auc" in m else m["recall@10"] for m in result.values()) / len(result)
