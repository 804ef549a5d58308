"""Hard labels: BCE against the logged 0/1 labels, one weight per task.

    objective:
      kind: hard        # the default: teacher training and the hard-label student
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from distkd.objectives.base import ObjectiveContext, StepOutput
from distkd.objectives.losses import masked_bce


@dataclass
class HardConfig:
    kind: Literal["hard"] = "hard"


class HardLabelTrain(nn.Module):
    def __init__(self, model: nn.Module, task_weights: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("w", torch.tensor(task_weights, dtype=torch.float32), persistent=False)

    def forward(self, batch) -> StepOutput:
        out = self.model(batch.sparse, batch.dense)
        loss = (masked_bce(out.logits, batch.labels) * self.w).sum()
        return StepOutput(loss, {"hard": loss.detach()})


@dataclass
class HardLabel:
    task_weights: list[float]
    aligned: tuple = ()
    keep_requests: bool = False

    def model_config(self, cfg):
        return cfg

    def train_module(self, model: nn.Module, device: torch.device) -> nn.Module:
        return HardLabelTrain(model, self.task_weights)


def build(cfg: HardConfig, ctx: ObjectiveContext) -> HardLabel:
    return HardLabel(ctx.task_weights)
