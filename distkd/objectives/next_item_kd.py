"""Next-item distillation: the student learns the teacher's softmax over the catalog from its
top-k cache (distkd.cache.topk), and the logged next item.

    objective:
      kind: next_item_kd
      teachers: [{cache: runs/next-item/cache, sha256: ...}]   # one teacher's top-k cache
      temperature: 1.0        # build the cache at this tau (the cached log-sum-exp is at it)
      k: 64                   # optional: refuse a cache of another k
      losses:
        hard: 0.2             # softmax cross-entropy on the logged next item
        topk_kl: 0.8          # KL over the cached top-k plus one tail bucket, x tau^2
        tail_kl: 0.0          # the same with the tail importance-sampled (needs a cache with tail)
        ranking: 0.0          # Plackett-Luce likelihood of the teacher's top-k order
      ranking_position_decay: null   # Tang & Wang's exp(-r / decay) position weights
      unlabeled: true         # rows without a next item still learn from the teacher
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from distkd.config import ConfigError
from distkd.dist import Env
from distkd.objectives.base import ObjectiveContext, StepOutput, check_loss_weights, detached
from distkd.objectives.ctr_kd import TeacherSource
from distkd.objectives.next_item_losses import hard_ce, ranking_distillation, sampled_tail_kl, topk_kl
from distkd.cache.contract import CacheError
from distkd.cache.reader import open_cache


@dataclass
class NextItemLosses:
    hard: float = 0.2
    topk_kl: float = 0.8
    tail_kl: float = 0.0
    ranking: float = 0.0

    def validate(self) -> None:
        check_loss_weights(self)


@dataclass
class NextItemKDConfig:
    kind: Literal["next_item_kd"] = "next_item_kd"
    teachers: list[TeacherSource] = field(default_factory=list)
    temperature: float = 1.0
    k: Optional[int] = None
    losses: NextItemLosses = field(default_factory=NextItemLosses)
    ranking_position_decay: Optional[float] = None
    unlabeled: bool = True

    def validate(self) -> None:
        if len(self.teachers) != 1 or self.teachers[0].cache is None:
            raise ConfigError("teachers: exactly one teacher, given by its top-k cache (cache:)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")


class NextItemKDTrain(nn.Module):
    def __init__(self, model: nn.Module, cfg: NextItemKDConfig, lse_tau: float):
        super().__init__()
        self.model, self.cfg, self.lse_tau = model, cfg, lse_tau

    def forward(self, batch) -> StepOutput:
        cfg, lw, tau = self.cfg, self.cfg.losses, self.cfg.temperature
        logits = self.model(batch.sparse, batch.dense).logits
        labels = batch.classes[:, 0]
        rows = None if cfg.unlabeled else labels >= 0
        x = batch.extras
        ids, top, lse = x["teacher0.topk_ids"], x["teacher0.topk_logits"], x["teacher0.lse"]
        terms: dict[str, torch.Tensor] = {}
        if lw.hard:
            terms["hard"] = lw.hard * hard_ce(logits, labels)
        if lw.topk_kl:
            terms["topk_kl"] = lw.topk_kl * topk_kl(logits, ids, top, lse, tau, self.lse_tau, rows)
        if lw.tail_kl:
            terms["tail_kl"] = lw.tail_kl * sampled_tail_kl(logits, ids, top, lse, x["teacher0.tail_ids"],
                                                            x["teacher0.tail_logits"], x["teacher0.tail_logq"],
                                                            tau, self.lse_tau, rows)
        if lw.ranking:
            terms["ranking"] = lw.ranking * ranking_distillation(logits, ids, cfg.ranking_position_decay, rows)
        return StepOutput(torch.stack(list(terms.values())).sum(), detached(terms))


@dataclass
class NextItemKD:
    cfg: NextItemKDConfig
    aligned: list
    lse_tau: float
    keep_requests: bool = False

    def model_config(self, model):
        return model

    def train_module(self, model: nn.Module, env: Env) -> nn.Module:
        return NextItemKDTrain(model, self.cfg, self.lse_tau)


def build(cfg: NextItemKDConfig, ctx: ObjectiveContext) -> NextItemKD:
    """Open (and so check) the teacher's top-k cache against the logs and this objective, once."""

    if len(ctx.schema.classes) != 1 or ctx.schema.binary:
        raise ConfigError(f"{ctx.where}: objective.kind next_item_kd needs logs with one multiclass task; "
                          f"these have {ctx.schema.task_names}")
    t = cfg.teachers[0]
    view = open_cache(t.cache, ctx.logs, "train", teacher_sha256=t.sha256, name="teacher0", partitions=ctx.partitions)
    topk, n = view.topk, ctx.schema.classes[0].num_classes
    if topk is None:
        raise CacheError(f"{view.cache_dir}: holds per-task logits of a CTR teacher, not a next-item top-k cache")
    if topk.num_items != n:
        raise CacheError(f"{view.cache_dir}: a top-k cache over {topk.num_items:,} items; the logs' task has "
                         f"num_classes {n:,}: it belongs to another catalog")
    if cfg.k is not None and topk.k != cfg.k:
        raise CacheError(f"{view.cache_dir}: holds the teacher's top-{topk.k}; objective.k asks top-{cfg.k}: "
                         "build a cache with topk.k = objective.k")
    if cfg.losses.tail_kl and not topk.tail:
        raise CacheError(f"{view.cache_dir}: losses.tail_kl needs sampled tail items; the cache was built with "
                         "topk.tail: 0")
    return NextItemKD(cfg, [view], float(topk.tau))
