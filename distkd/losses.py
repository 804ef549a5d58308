"""Training objectives. Each takes the model output and the batch and returns
(loss, {name: value}) so the trainer can log every component.

Labels are float with NaN for rows that have none; a loss over labels averages over
the labelled rows of each task only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distkd.models import ModelOutput


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task mean BCE over rows whose target is not NaN: [T]."""
    mask = ~torch.isnan(targets)
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits, safe, reduction="none") * mask
    return loss.sum(0) / mask.sum(0).clamp(min=1)


class HardLabel:
    """BCE against the logged 0/1 labels, one weight per task."""

    def __init__(self, task_weights: list[float]):
        self.w = torch.tensor(task_weights, dtype=torch.float32)

    def __call__(self, out: ModelOutput, batch) -> tuple[torch.Tensor, dict[str, float]]:
        per_task = masked_bce(out.logits, batch.labels)
        loss = (per_task * self.w.to(per_task.device)).sum()
        return loss, {"hard": loss.item()}
