"""CTR distillation: the student learns from the teacher's cached logits (and the labels).

The teacher never runs here, except with a teacher instead of `cache:` (online
distillation, kept for the benchmark that shows what the cache saves): `export:` (a distkd
export), or a teacher of your own, `factory:` + `weights:` (+ `input:`, `kwargs:`,
`hidden_dim:`) or `program:` (distkd.models.teacher). An online export is loaded by every
rank together once the process group exists, either whole on each rank (replicated) or with
its tables sharded over the training ranks (`online.sharding`; forward only, no optimizer).

    objective:
      kind: ctr_kd
      teachers: [{cache: runs/demo/cache, weight: 1.0}]
      temperature: 2.0
      losses: {hard: 1.0, soft: 1.0, mse: 0.0, listwise: 0.0, hint: 0.0}
      aux_head: false        # ExFM: the KD losses train a separate head
      gating: fixed          # fixed: the teachers' `weight`s; learned: a gate picks them per example
      unlabeled: true        # rows without labels learn from the teacher alone
      online: {sharding: auto}  # an online export: auto | replicated | sharded over the ranks
      age_weighting: {half_life_days: 7}  # a stale teacher: KD terms x 0.5 ** (age / 7) (distkd.objectives.staleness)
      adapter: {form: affine, age: true}  # a stale teacher: distill its logits corrected on the labels
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from distkd.config import ConfigError
from distkd.data.loader import Aligned
from distkd.data.schema import Schema
from distkd.dist import Env
from distkd.models.export import read_meta
from distkd.models.sharding_plan import ShardingConfig, describe_plan, shard_for_inference
from distkd.models.teacher import describe, load_teacher
from distkd.models.teacher_spec import TeacherSpec
from distkd.objectives.base import ObjectiveContext, StepOutput, check_loss_weights, detached
from distkd.objectives.losses import hint_mse, listwise_kl, logit_mse, masked_bce, soft_bce
from distkd.objectives.staleness import Adapter, AdapterConfig, AgeWeighting, age_weights, check as check_staleness
from distkd.cache.reader import open_cache

logger = logging.getLogger(__name__)


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
class OnlineTeacherConfig:
    # replicated: every rank loads the whole teacher (a full copy per process); sharded: its
    # tables spread over the training ranks (DistributedModelParallel, forward only); auto:
    # sharded for an export that is sharded or a job on more than one rank, else replicated
    sharding: Literal["auto", "replicated", "sharded"] = "auto"
    plan: ShardingConfig = field(default_factory=ShardingConfig)  # the sharding types the teacher's plan may use

    def sharded(self, source: TeacherSource, form: Optional[str], world_size: int) -> bool:
        """Whether the online teacher `source` (an export of `form`, file or sharded) is sharded."""
        if source.export is None or self.sharding == "replicated":
            return False  # a teacher of your own is a module distkd cannot plan: always whole
        return self.sharding == "sharded" or form == "sharded" or world_size > 1


@dataclass
class CtrKDConfig:
    kind: Literal["ctr_kd"] = "ctr_kd"
    teachers: list[TeacherSource] = field(default_factory=list)
    temperature: float = 1.0
    losses: LossWeights = field(default_factory=LossWeights)
    aux_head: bool = False
    aux_grad_scale: float = 1.0
    unlabeled: bool = True
    online: OnlineTeacherConfig = field(default_factory=OnlineTeacherConfig)  # how an online export is laid out
    # How several teachers make one target: fixed, their `weight`s; learned, per example, the
    # softmax of a gate on the student's hidden layer (it learns from the labels, gate_weight)
    gating: Literal["fixed", "learned"] = "fixed"
    gate_weight: float = 1.0  # weight of the gate's own loss (BCE of the gated target on the labels)
    # A stale teacher (its cache records its age on each row, distkd.cache.age; see distkd.objectives.staleness)
    age_weighting: Optional[AgeWeighting] = None  # the distillation terms of a row x 0.5 ** (age / half life)
    adapter: Optional[AdapterConfig] = None  # distill the teacher's logits corrected by a small module trained on labels

    @property
    def needs_age(self) -> bool:
        return bool(self.age_weighting or (self.adapter and self.adapter.age))

    def validate(self) -> None:
        check_staleness(self.age_weighting, self.adapter, self.teachers, self.gating)
        if self.online.sharding == "sharded" and any(t.factory or t.program for t in self.teachers):
            raise ConfigError("online.sharding: sharded is for distkd exports; a factory or program teacher "
                              "loads whole on every rank (replicated or auto)")
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
        if self.gating == "learned" and (len(self.teachers) < 2 or not self.gate_weight > 0):
            raise ConfigError(f"gating: learned needs 2 or more teachers and gate_weight > 0, got "
                              f"{len(self.teachers)} teacher(s), gate_weight {self.gate_weight}")


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
        self.gate = Gate(model.hidden_dim, self.mix, model.head.weight.device) if cfg.gating == "learned" else None
        self.adapter = Adapter(cfg.adapter, len(task_weights), model.head.weight.device) if cfg.adapter else None

    def teacher_logits(self, batch) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """Each teacher's logits [B, T], and teacher 0's hidden layer."""
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
            parts.append(z)
        return parts, hidden

    def forward(self, batch) -> StepOutput:
        cfg, lw, tau, w = self.cfg, self.cfg.losses, self.cfg.temperature, self.w
        out = self.model(batch.sparse, batch.dense)
        logits, teacher_hidden = self.teacher_logits(batch)
        terms: dict[str, torch.Tensor] = {}
        if self.gate is None:  # the teachers' logits, averaged with their fixed weights
            target = torch.stack([m * z for m, z in zip(self.mix, logits)]).sum(0)
        else:  # the gate learns from the labels which teacher to trust; the student distills its choice
            gated = self.gate(out.hidden, torch.stack(logits, -1))
            terms["gate"] = cfg.gate_weight * (masked_bce(gated, batch.labels) * w).sum()
            target = gated.detach()
        age = batch.extras.get("teacher0.age") if cfg.needs_age else None
        if self.adapter is not None:  # learns from the labels only; the student distills its output detached
            corrected = self.adapter(target, age)
            terms["adapter"] = cfg.adapter.weight * (masked_bce(corrected, batch.labels) * w).sum()
            target = corrected.detach()
        # Rows that distill: all of them, or only the labelled ones; weighted by the teacher's age.
        rows = None if cfg.unlabeled else ~torch.isnan(batch.labels).all(1)
        rw = age_weights(age, cfg.age_weighting) if cfg.age_weighting else None
        kd_head = out.aux_logits if cfg.aux_head else out.logits
        if lw.hard:
            terms["hard"] = lw.hard * (masked_bce(out.logits, batch.labels) * w).sum()
        if lw.soft:
            terms["soft"] = lw.soft * (soft_bce(kd_head, target, tau, rows, rw) * w).sum()
        if lw.mse:
            terms["mse"] = lw.mse * (logit_mse(kd_head, target, rows, rw) * w).sum()
        if lw.listwise:
            terms["listwise"] = lw.listwise * (listwise_kl(kd_head, target, batch.request_id, tau, rows, rw) * w).sum()
        if lw.hint:
            terms["hint"] = lw.hint * hint_mse(out.hint, teacher_hidden, rows, rw)
        return StepOutput(torch.stack(list(terms.values())).sum(), detached(terms))


class Gate(nn.Module):
    """Per-example teacher weights: softmax(linear(the student's hidden layer)), started at the
    fixed weights `mix`. It reads the hidden layer detached: it learns which teacher to trust,
    without steering the student's representation."""

    def __init__(self, hidden_dim: int, mix: list[float], device: torch.device):
        super().__init__()
        self.proj = nn.Linear(hidden_dim, len(mix), device=device)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.copy_(torch.tensor(mix).log())

    def weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, N] weights over the N teachers, each row summing to 1."""
        return torch.softmax(self.proj(hidden.detach()), -1)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The gated target [B, T] of the teachers' logits [B, T, N]."""
        return (logits * self.weights(hidden).unsqueeze(1)).sum(-1)


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
    forms: tuple = ()  # per teacher: an online export's form, file or sharded (None otherwise)

    def model_config(self, model):
        return dataclasses.replace(model, aux_head=self.cfg.aux_head, aux_grad_scale=self.cfg.aux_grad_scale,
                                   hint_dim=self.hint_dim)

    def train_module(self, model: nn.Module, env: Env) -> nn.Module:
        """Collective when a teacher is sharded: every rank loads it here, in the same order."""
        n = len(self.cfg.teachers)
        online = [None if t.cache is not None else self.load_online(i, env, sha, form)
                  for i, (t, sha, form) in enumerate(zip(self.cfg.teachers, self.fingerprints or [None] * n,
                                                         self.forms or [None] * n))]
        return CtrKDTrain(model, self.cfg, self.task_weights, online)

    def load_online(self, i: int, env: Env, sha256: Optional[str], form: Optional[str]):
        """Online teacher `i` on this rank: whole, or its tables sharded over the ranks (collective).
        Its loading leaves the RNG as it was: the student starts from the same weights either way."""
        source = self.cfg.teachers[i]
        sharded = self.cfg.online.sharded(source, form, env.world_size)
        parallel = (lambda m: shard_for_inference(m, env, self.cfg.online.plan)) if sharded else None
        with torch.random.fork_rng(devices=[env.device.index or 0] if env.device.type == "cuda" else []):
            teacher = load_teacher(source.spec(), self.schema, env.device, expect_sha256=sha256, parallel=parallel)
        if env.is_main:
            layout = f"sharded over {env.world_size} rank(s), plan {describe_plan(teacher.module)}" if sharded \
                else "replicated (a whole copy on every rank)"
            logger.info("online teacher %d (%s): %s", i, teacher.name, layout)
        return teacher


def build(cfg: CtrKDConfig, ctx: ObjectiveContext) -> CtrKD:
    """Open (and so check) every teacher's cache against the logs, or its export, once."""

    if cfg.losses.listwise and ctx.schema.request_id is None:
        raise ConfigError(f"{ctx.where}: objective.losses.listwise needs logs with a request_id column")
    aligned, hint_dim, fingerprints, forms = [], None, [], []
    for i, t in enumerate(cfg.teachers):
        hidden = i == 0 and bool(cfg.losses.hint)
        if t.cache is not None:
            view = open_cache(t.cache, ctx.logs, "train", teacher_sha256=t.sha256, hidden=hidden, name=f"teacher{i}",
                              partitions=ctx.partitions, age=i == 0 and cfg.needs_age)
            aligned.append(view)
            fingerprints.append(None)
            forms.append(None)
            if hidden:
                hint_dim = view.hidden_dim
            continue
        spec = t.spec()
        where = f"{ctx.where}: objective.teachers[{i}].{spec.form}"
        if t.export is not None and not (Path(t.export) / "export.json").is_file():
            raise ConfigError(f"{where}: {t.export} is not an exported model directory")
        if t.export is not None and (barred := [n for n in read_meta(t.export).get("features") or []
                                                if n not in ctx.schema.feature_names]):
            raise ConfigError(f"{where}: the teacher reads {barred}, which the student's batches never carry "
                              "(teacher-only features); cache its logits (`distkd cache build`) and distill from "
                              "the cache")
        try:
            record = describe(spec, ctx.schema)  # files there and hashed, export checked against the logs
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if t.sha256 and record["sha256"] != t.sha256:
            raise ConfigError(f"{where}: {spec.name} is teacher {record['sha256'][:12]}…, expected {t.sha256[:12]}…")
        fingerprints.append(record["sha256"])
        forms.append(read_meta(t.export).get("form", "file") if t.export is not None else None)
        if hidden:
            hint_dim = record["hidden_dim"]
            if not hint_dim:
                raise ConfigError(f"{where}: losses.hint needs the teacher's hidden_dim")
    return CtrKD(cfg, ctx.task_weights, aligned, hint_dim, keep_requests=bool(cfg.losses.listwise),
                 schema=ctx.schema, fingerprints=tuple(fingerprints), forms=tuple(forms))
