"""Distillation: the student learns from the teacher's cached outputs (and the labels).

The trainer is the same as for hard labels; this module supplies the objective and
the aligned cache columns it reads. The teacher itself never runs here, except with
`export:` instead of `cache:` (online distillation, kept for the benchmark that
shows what the cache saves).

    distill:
      teachers: [{cache: runs/demo/cache, weight: 1.0}]
      temperature: 2.0
      losses: {hard: 1.0, soft: 1.0, mse: 0.0, listwise: 0.0, hint: 0.0}
      aux_head: false        # ExFM: the KD losses train a separate head
      unlabeled: true        # rows without labels learn from the teacher alone
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional

import torch

from distkd.config import ConfigError, from_dict
from distkd.objectives.losses import hint_mse, listwise_kl, logit_mse, masked_bce, soft_bce
from distkd.models.ranking import ModelConfig, ModelOutput
from distkd.data.schema import Schema


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


@dataclass
class DistillConfig:
    teachers: list[TeacherSource]
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


def parse(raw: dict) -> DistillConfig:
    return from_dict(DistillConfig, raw, "distill")


class Distill:
    """The KD objective: a weighted sum of the configured losses, per task weighted."""

    def __init__(self, cfg: DistillConfig, task_weights: list[float], online: list[torch.nn.Module]):
        self.cfg = cfg
        self.w = torch.tensor(task_weights, dtype=torch.float32)
        self.names = [f"teacher{i}" for i in range(len(cfg.teachers))]
        total = sum(t.weight for t in cfg.teachers)
        self.mix = [t.weight / total for t in cfg.teachers]
        self.online = online  # exported teachers run in the loop (same order as cfg.teachers)

    def teacher_logits(self, batch) -> torch.Tensor:
        """The target: the teachers' logits, averaged with their weights."""
        parts = []
        for i, (name, t) in enumerate(zip(self.names, self.cfg.teachers)):
            if t.export is not None:
                with torch.no_grad():
                    z = self.online[i](batch.sparse, batch.dense).logits
            else:
                z = batch.extras[f"{name}.logits"]
            parts.append(self.mix[i] * z)
        return torch.stack(parts).sum(0)

    def __call__(self, out: ModelOutput, batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, lw, tau = self.cfg, self.cfg.losses, self.cfg.temperature
        w = self.w.to(out.logits.device)
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
            terms["hint"] = lw.hint * hint_mse(out.hint, batch.extras[f"{self.names[0]}.hidden"], rows)
        loss = torch.stack(list(terms.values())).sum()
        return loss, {k: v.item() for k, v in terms.items()}


def parse_section(raw: Optional[dict], where: str) -> DistillConfig:
    """A job file's distill: section, checked (no paths); errors name the job file `where`."""
    if not raw:
        raise ConfigError(f"{where}: `distkd distill` needs a distill: section (teachers, losses); "
                          "see jobs/demo/distill.yaml")
    try:
        return parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def preflight(cfg: DistillConfig, logs: str, where: str) -> None:
    """Check every teacher's cache against the logs (or its export) before any rank starts, so
    a wrong cache is a one-line error (exit 2), not a stack of rank tracebacks."""
    from distkd.cache.reader import open_cache
    from distkd.models.export import META_FILE

    for i, t in enumerate(cfg.teachers):
        if t.cache is not None:
            open_cache(t.cache, logs, "train", teacher_sha256=t.sha256, hidden=i == 0 and bool(cfg.losses.hint))
        elif not (Path(t.export) / META_FILE).is_file():
            raise ConfigError(f"{where}: distill.teachers[{i}].export: {t.export} is not an exported model directory")


def make_distill_objective(raw: dict, schema: Schema, model: ModelConfig, task_weights: list[float],
                           logs: str) -> tuple[Distill, list, ModelConfig]:
    """The objective, the cache columns to align with the train split, and the student's
    model config extended with what the losses need (aux head, hint projection)."""
    from distkd.cache.reader import load_manifest, open_cache
    from distkd.models.export import load_export

    cfg = parse(raw)
    if cfg.losses.listwise and schema.request_id is None:
        raise ConfigError("distill.losses.listwise needs logs with a request_id column")
    aligned, online, hint_dim = [], [], None
    for i, t in enumerate(cfg.teachers):
        if t.cache is not None:
            hidden = i == 0 and bool(cfg.losses.hint)
            aligned.append(open_cache(t.cache, logs, "train", teacher_sha256=t.sha256, hidden=hidden,
                                      name=f"teacher{i}"))
            online.append(None)
            if hidden:
                hint_dim = int(load_manifest(t.cache)["content"]["hidden_dim"])
        else:
            teacher, meta = load_export(t.export)
            if t.sha256 and meta["sha256"] != t.sha256:
                raise ConfigError(f"distill.teachers[{i}].export: {t.export} is teacher {meta['sha256'][:12]}…, "
                                  f"expected {t.sha256[:12]}…")
            online.append(teacher)
            if cfg.losses.hint:
                hint_dim = teacher.hidden_dim
    model = dataclasses.replace(model, aux_head=cfg.aux_head, aux_grad_scale=cfg.aux_grad_scale, hint_dim=hint_dim)
    return Distill(cfg, task_weights, online), aligned, model
