"""CTR distillation: the student learns from the teacher's cached logits (and the labels).

The teacher never runs here, except with a teacher instead of `cache:` (online
distillation, kept for the benchmark that shows what the cache saves): `export:` (a distkd
export), or a teacher of your own, `factory:` + `weights:` (+ `input:`, `kwargs:`,
`hidden_dim:`) or `program:` (distkd.models.teacher).

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
from typing import Any, Literal, Optional

import torch
from torch import nn

from distkd.config import ConfigError
from distkd.data.loader import Aligned
from distkd.data.schema import Schema
from distkd.models.teacher_spec import TeacherSpec
from distkd.objectives.base import ObjectiveContext, StepOutput, check_loss_weights, detached
from distkd.objectives.losses import hint_mse, listwise_kl, logit_mse, masked_bce, soft_bce


@dataclass
class TeacherSource:
    cache: Optional[str] = None  # a logit cache built by `distkd cache build`
    export: Optional[str] = None  # online: run this exported teacher inside the loop instead
    factory: Optional[str] = None  # online: a teacher of your own, "package.module:function" ...
    weights: Optional[str] = None  # ... and its state dict
    program: Optional[str] = None  # online: a torch.export program (.pt2)
    kwargs: dict[str, Any] = field(default_factory=dict)
    input: Literal["kjt", "dict"] = "kjt"
    hidden_dim: Optional[int] = None
    weight: float = 1.0
    sha256: Optional[str] = None  # the teacher the cache (or online teacher) must be (default: any)

    def validate(self) -> None:
        given = [n for n in ("cache", "export", "factory", "program") if getattr(self, n)]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of cache, export, factory (with weights) or program, got {given or 'none'}")
        if self.cache is None:
            self.spec().validate()
        if self.weight <= 0:
            raise ConfigError(f"weight must be positive, got {self.weight}")

    def spec(self) -> Optional[TeacherSpec]:
        """The online teacher (None for a cache)."""
        if self.cache is not None:
            return None
        return TeacherSpec(export=self.export, factory=self.factory, weights=self.weights, program=self.program,
                           kwargs=self.kwargs, input=self.input, hidden_dim=self.hidden_dim)


@dataclass
class LossWeights:
    hard: float = 1.0  # BCE on the logged labels (serving head)
    soft: float = 1.0  # soft-label BCE on sigmoid(teacher / tau), x tau²
    mse: float = 0.0  # MSE between logits
    listwise: float = 0.0  # softmax KL within a request, x tau²
    hint: float = 0.0  # projected hidden layer vs the teacher's cached hidden layer

    def validate(self) -> None:
        check_loss_weights(self)


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

    def teacher_logits(self, batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The target: the teachers' logits, averaged with their weights; teacher 0's hidden layer."""
        parts, hidden = [], None
        for i, t in enumerate(self.cfg.teachers):
            if t.cache is None:
                with torch.no_grad():  # every output checked (distkd.models.teacher)
                    o = self._online[i](batch.sparse, batch.dense, hidden=i == 0 and bool(self.cfg.losses.hint))
                z = o.logits.float()
                hidden = o.hidden.float() if o.hidden is not None else hidden
            else:
                z = batch.extras[f"teacher{i}.logits"]
                if i == 0 and self.cfg.losses.hint:
                    hidden = batch.extras["teacher0.hidden"]
            parts.append(self.mix[i] * z)
        return torch.stack(parts).sum(0), hidden

    def forward(self, batch) -> StepOutput:
        cfg, lw, tau, w = self.cfg, self.cfg.losses, self.cfg.temperature, self.w
        out = self.model(batch.sparse, batch.dense)
        target, teacher_hidden = self.teacher_logits(batch)
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
            terms["hint"] = lw.hint * hint_mse(out.hint, teacher_hidden, rows)
        return StepOutput(torch.stack(list(terms.values())).sum(), detached(terms))


@dataclass
class CtrKD:
    """The built objective: opened caches (the aligned columns) and what the model gains."""

    cfg: CtrKDConfig
    task_weights: list[float]
    aligned: list[Aligned]
    hint_dim: Optional[int]
    keep_requests: bool
    schema: Optional[Schema] = None  # the logs' (online teachers of your own are built for it)
    fingerprints: tuple = ()  # per teacher: the online teacher's fingerprint (None for a cache)

    def model_config(self, model):
        return dataclasses.replace(model, aux_head=self.cfg.aux_head, aux_grad_scale=self.cfg.aux_grad_scale,
                                   hint_dim=self.hint_dim)

    def train_module(self, model: nn.Module, device: torch.device) -> nn.Module:
        from distkd.models.teacher import load_teacher

        online = [None if t.cache is not None else load_teacher(t.spec(), self.schema, device, expect_sha256=sha)
                  for t, sha in zip(self.cfg.teachers, self.fingerprints or [None] * len(self.cfg.teachers))]
        return CtrKDTrain(model, self.cfg, self.task_weights, online)


def build(cfg: CtrKDConfig, ctx: ObjectiveContext) -> CtrKD:
    """Open (and so check) every teacher's cache against the logs, or its export, once."""
    from distkd.cache.reader import open_cache
    from distkd.models.teacher import describe

    if cfg.losses.listwise and ctx.schema.request_id is None:
        raise ConfigError(f"{ctx.where}: objective.losses.listwise needs logs with a request_id column")
    aligned, hint_dim, fingerprints = [], None, []
    for i, t in enumerate(cfg.teachers):
        hidden = i == 0 and bool(cfg.losses.hint)
        if t.cache is not None:
            view = open_cache(t.cache, ctx.logs, "train", teacher_sha256=t.sha256, hidden=hidden, name=f"teacher{i}",
                              partitions=ctx.partitions)
            aligned.append(view)
            fingerprints.append(None)
            if hidden:
                hint_dim = view.hidden_dim
            continue
        spec = t.spec()
        where = f"{ctx.where}: objective.teachers[{i}].{spec.form}"
        if t.export is not None and not (Path(t.export) / "export.json").is_file():
            raise ConfigError(f"{where}: {t.export} is not an exported model directory")
        try:
            record = describe(spec, ctx.schema)  # files there and hashed, export checked against the logs
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if t.sha256 and record["sha256"] != t.sha256:
            raise ConfigError(f"{where}: {spec.name} is teacher {record['sha256'][:12]}…, expected {t.sha256[:12]}…")
        fingerprints.append(record["sha256"])
        if hidden:
            hint_dim = record["hidden_dim"]
            if not hint_dim:
                raise ConfigError(f"{where}: losses.hint needs the teacher's hidden_dim")
    return CtrKD(cfg, ctx.task_weights, aligned, hint_dim, keep_requests=bool(cfg.losses.listwise),
                 schema=ctx.schema, fingerprints=tuple(fingerprints))
