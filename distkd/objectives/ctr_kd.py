"""CTR distillation: the student learns from the teacher's cached logits (and the labels).

The teacher never runs here, except with `export:` instead of `cache:` (online
distillation, kept for the benchmark that shows what the cache saves).

    objective:
      kind: ctr_kd
      teachers: [{cache: runs/demo/cache, weight: 1.0}]
      temperature: 2.0
      losses: {hard: 1.0, soft: 1.0, mse: 0.0, listwise: 0.0, hint: 0.0}
      aux_head: false        # ExFM: the KD losses train a separate head
      unlabeled: true        # rows without labels learn from the teacher alone
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from distkd.config import ConfigError
from distkd.data.loader import Aligned
from distkd.objectives.base import ObjectiveContext, StepOutput, detached
from distkd.objectives.losses import hint_mse, listwise_kl, logit_mse, masked_bce, soft_bce


@dataclass
class TeacherSource:
    cache: Optional[str] = None  # a logit cache built by `distkd cache build`
    export: Optional[str] = None  # online: run this exported teacher inside the loop instead
    weight: float = 1.0
    sha256: Optional[str] = None  # the teacher the cache must come from (default: any)

    def validate(self) -> None:
        if (self.cache is None) == (self.export is None):
            raise ConfigError("give exactly one of cache or export")
        if self.weight <= 0:
            raise ConfigError(f"weight must be positive, got {self.weight}")


@dataclass
class LossWeights:
    hard: float = 1.0  # BCE on the logged labels (serving head)
    soft: float = 1.0  # soft-label BCE on sigmoid(teacher / tau), x tau²
    mse: float = 0.0  # MSE between logits
    listwise: float = 0.0  # softmax KL within a request, x tau²
    hint: float = 0.0  # projected hidden layer vs the teacher's cached hidden layer

    def validate(self) -> None:
        bad = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) < 0]
        if bad:
            raise ConfigError(f"loss weights must be >= 0: {bad}")
        if not any(getattr(self, f.name) for f in dataclasses.fields(self)):
            raise ConfigError("every loss weight is 0: nothing to train")


@dataclass
class CtrKDConfig:
    kind: Literal["ctr_kd"] = "ctr_kd"
    teachers: list[TeacherSource] = field(default_factory=list)
    temperature: float = 1.0
    losses: LossWeights = field(default_factory=LossWeights)
    aux_head: bool = False
    aux_grad_scale: float = 1.0
    unlabeled: bool = True

    def validate(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher is required")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.aux_head and not self.losses.hard:
            raise ConfigError("aux_head: the serving head learns from labels only, so losses.hard must be > 0")
        if self.aux_head and not (self.losses.soft or self.losses.mse or self.losses.listwise):
            raise ConfigError("aux_head: needs a teacher loss (soft, mse or listwise) to train it")
        if self.losses.hint and len(self.teachers) != 1:
            raise ConfigError("losses.hint needs exactly one teacher")


class CtrKDTrain(nn.Module):
    """The student inside its KD loss: a weighted sum of the configured terms, per task weighted."""

    def __init__(self, model: nn.Module, cfg: CtrKDConfig, task_weights: list[float], online: list):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.register_buffer("w", torch.tensor(task_weights, dtype=torch.float32), persistent=False)
        total = sum(t.weight for t in cfg.teachers)
        self.mix = [t.weight / total for t in cfg.teachers]
        # Online teachers stay outside the module tree: DMP must not shard or train them.
        self._online = online

    def teacher_logits(self, batch) -> torch.Tensor:
        """The target: the teachers' logits, averaged with their weights."""
        parts = []
        for i, t in enumerate(self.cfg.teachers):
            if t.export is not None:
                with torch.no_grad():
                    z = self._online[i](batch.sparse, batch.dense).logits
            else:
                z = batch.extras[f"teacher{i}.logits"]
            parts.append(self.mix[i] * z)
        return torch.stack(parts).sum(0)

    def forward(self, batch) -> StepOutput:
        cfg, lw, tau, w = self.cfg, self.cfg.losses, self.cfg.temperature, self.w
        out = self.model(batch.sparse, batch.dense)
        target = self.teacher_logits(batch)
        # Rows that distill: all of them, or only the labelled ones.
        rows = None if cfg.unlabeled else ~torch.isnan(batch.labels).all(1)
        kd_head = out.aux_logits if cfg.aux_head else out.logits
        terms: dict[str, torch.Tensor] = {}
        if lw.hard:
            terms["hard"] = lw.hard * (masked_bce(out.logits, batch.labels) * w).sum()
        if lw.soft:
            terms["soft"] = lw.soft * (soft_bce(kd_head, target, tau, rows) * w).sum()
        if lw.mse:
            terms["mse"] = lw.mse * (logit_mse(kd_head, target, rows) * w).sum()
        if lw.listwise:
            terms["listwise"] = lw.listwise * (listwise_kl(kd_head, target, batch.request_id, tau, rows) * w).sum()
        if lw.hint:
            terms["hint"] = lw.hint * hint_mse(out.hint, batch.extras["teacher0.hidden"], rows)
        return StepOutput(torch.stack(list(terms.values())).sum(), detached(terms))


@dataclass
class CtrKD:
    """The built objective: opened caches (the aligned columns) and what the model gains."""

    cfg: CtrKDConfig
    task_weights: list[float]
    aligned: list[Aligned]
    hint_dim: Optional[int]
    keep_requests: bool

    def model_config(self, model):
        return dataclasses.replace(model, aux_head=self.cfg.aux_head, aux_grad_scale=self.cfg.aux_grad_scale,
                                   hint_dim=self.hint_dim)

    def train_module(self, model: nn.Module, device: torch.device) -> nn.Module:
        from distkd.models.export import load_export

        online = [None if t.export is None else load_export(t.export, device=device)[0] for t in self.cfg.teachers]
        return CtrKDTrain(model, self.cfg, self.task_weights, online)


def build(cfg: CtrKDConfig, ctx: ObjectiveContext) -> CtrKD:
    """Open (and so check) every teacher's cache against the logs, or its export, once."""
    from distkd.cache.reader import open_cache
    from distkd.models.export import read_meta

    if cfg.losses.listwise and ctx.schema.request_id is None:
        raise ConfigError(f"{ctx.where}: objective.losses.listwise needs logs with a request_id column")
    aligned, hint_dim = [], None
    for i, t in enumerate(cfg.teachers):
        hidden = i == 0 and bool(cfg.losses.hint)
        if t.cache is not None:
            view = open_cache(t.cache, ctx.logs, "train", teacher_sha256=t.sha256, hidden=hidden, name=f"teacher{i}",
                              partitions=ctx.partitions)
            aligned.append(view)
            if hidden:
                hint_dim = view.hidden_dim
            continue
        if not (Path(t.export) / "export.json").is_file():
            raise ConfigError(f"{ctx.where}: objective.teachers[{i}].export: {t.export} is not an exported model directory")
        meta = read_meta(t.export)
        if t.sha256 and meta["sha256"] != t.sha256:
            raise ConfigError(f"{ctx.where}: objective.teachers[{i}].export: {t.export} is teacher "
                              f"{meta['sha256'][:12]}…, expected {t.sha256[:12]}…")
        if hidden:
            hint_dim = int(meta["model"]["deep_arch"][-1])
    return CtrKD(cfg, ctx.task_weights, aligned, hint_dim, keep_requests=bool(cfg.losses.listwise))
