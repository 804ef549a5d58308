"""Hard labels: BCE against the logged 0/1 labels, one weight per task; for a next-item
(multiclass) task, cross-entropy of the softmax over the catalog (or, for a catalog too large
to score whole, a sampled softmax with the logQ correction).

    objective:
      kind: hard                # the default: teacher training and the hard-label student
      sampled_negatives: null   # next item: S negatives drawn by label frequency^0.75 instead
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from distkd.dist import Env
from distkd.objectives.base import ObjectiveContext, StepOutput
from distkd.objectives.losses import masked_bce
from distkd.objectives.next_item_losses import hard_ce, sampled_softmax_ce
from distkd.config import ConfigError
from distkd.data.layout import split_files
from distkd.models import item_log_prior


@dataclass
class HardConfig:
    kind: Literal["hard"] = "hard"
    sampled_negatives: Optional[int] = None  # next item only: sampled softmax instead of the full one

    def validate(self) -> None:

        if self.sampled_negatives is not None and self.sampled_negatives < 1:
            raise ConfigError(f"sampled_negatives: must be >= 1, got {self.sampled_negatives}")


class HardLabelTrain(nn.Module):
    def __init__(self, model: nn.Module, task_weights: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("w", torch.tensor(task_weights, dtype=torch.float32), persistent=False)

    def forward(self, batch) -> StepOutput:
        out = self.model(batch.sparse, batch.dense)
        loss = (masked_bce(out.logits, batch.labels) * self.w).sum()
        return StepOutput(loss, {"hard": loss.detach()})


class NextItemHardTrain(nn.Module):
    """Softmax cross-entropy over the catalog against the logged next item (-1: no label)."""

    def __init__(self, model: nn.Module, proposal: Optional[torch.Tensor], negatives: Optional[int]):
        super().__init__()
        self.model, self.negatives = model, negatives
        if proposal is not None:
            self.register_buffer("proposal", proposal, persistent=False)

    def forward(self, batch) -> StepOutput:
        labels = batch.classes[:, 0]
        if self.negatives:
            out = self.model(batch.sparse, batch.dense, full_logits=False)
            loss = sampled_softmax_ce(out.query, self.model.score, labels, self.negatives, self.proposal)
        else:
            loss = hard_ce(self.model(batch.sparse, batch.dense).logits, labels)
        return StepOutput(loss, {"hard": loss.detach()})


@dataclass
class HardLabel:
    task_weights: list[float]
    next_item: bool = False
    sampled_negatives: Optional[int] = None
    proposal: Optional[torch.Tensor] = None  # label frequency^0.75, for sampled negatives
    aligned: tuple = ()
    keep_requests: bool = False

    def model_config(self, cfg):
        return cfg

    def train_module(self, model: nn.Module, env: Env) -> nn.Module:
        if self.next_item:
            return NextItemHardTrain(model, self.proposal, self.sampled_negatives)
        return HardLabelTrain(model, self.task_weights)


def build(cfg: HardConfig, ctx: ObjectiveContext) -> HardLabel:
    if not ctx.schema.classes:
        return HardLabel(ctx.task_weights)
    proposal = None
    if cfg.sampled_negatives:
        # word2vec's unigram^0.75: the popular items a softmax must push down, not only them
        proposal = (0.75 * item_log_prior(ctx.schema, split_files(ctx.logs, "train", ctx.partitions))).exp()
    return HardLabel(ctx.task_weights, True, cfg.sampled_negatives, proposal)
