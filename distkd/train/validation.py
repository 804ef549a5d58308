"""Validation during training: metrics over a split, aggregated over ranks, and early stopping."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from distkd.data.batch import transfer_for
from distkd.data.loader import LogLoader
from distkd.data.schema import Schema
from distkd.metrics import SchemaMetrics, headline

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: LogLoader, schema: Schema, device: torch.device) -> dict[str, dict[str, float]]:
    """Collective: metrics of `model` over the loader's whole split, aggregated over ranks."""
    was_training = model.training
    model.eval()
    metrics = SchemaMetrics(schema)
    non_blocking = transfer_for(device).non_blocking
    for batch in loader:
        batch = batch.to(device, non_blocking=non_blocking)
        metrics.update(model(batch.sparse, batch.dense).logits, batch)
    model.train(was_training)
    return metrics.compute()




@dataclass
class Validator:
    """Runs validation passes, keeps their history and says when early stopping triggers."""

    loader: LogLoader
    schema: Schema
    device: torch.device
    patience: int = 0  # passes without improvement before stopping; 0: never stop early
    best: float = float("-inf")
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, model: torch.nn.Module, step: int) -> tuple[dict[str, dict[str, float]], bool]:
        """Collective: (metrics, whether to stop)."""
        result = evaluate(model, self.loader, self.schema, self.device)
        self.history.append({"step": step, "metrics": result})
        logger.info(f"step {step}: valid " + ", ".join(_brief(t, m) for t, m in result.items()))
        score = headline(result)
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
        return result, bool(self.patience) and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale, "history": self.history}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.best, self.stale, self.history = sd["best"], sd["stale"], list(sd["history"])


def _brief(task: str, m: dict[str, float]) -> str:
    if "auc" in m:
        return f"{task} AUC {m['auc']:.4f} logloss {m['logloss']:.4f}"
    return f"{task} Recall@10 {m['recall@10']:.4f} NDCG@10 {m['ndcg@10']:.4f}"
