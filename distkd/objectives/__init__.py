"""Objectives: each owns its loss, the side columns it reads and what it adds to the model.

    hard          hard labels (teacher training, the hard-label student)
    ctr_kd        CTR distillation from cached (or online) teacher logits
    next_item_kd  next-item distillation from a top-k cache of the teacher's softmax

A job's `objective:` section names one by `kind:` and is parsed into that kind's typed
config; `build` turns it into the object the trainer uses (see `base.Objective`). A new
objective is a module here with a config dataclass (a `kind: Literal[...]` field) and a
`build(cfg, ctx)`, added to `ObjectiveConfig` and `_BUILDERS`; the trainer is not touched.
"""

from __future__ import annotations

from typing import Union

from distkd.objectives import ctr_kd, hard, next_item_kd
from distkd.objectives.base import Objective, ObjectiveContext, StepOutput
from distkd.objectives.ctr_kd import CtrKDConfig
from distkd.objectives.hard import HardConfig
from distkd.objectives.next_item_kd import NextItemKDConfig
from distkd.config import ConfigError

ObjectiveConfig = Union[HardConfig, CtrKDConfig, NextItemKDConfig]  # `kind:` picks one (hard is the default)
_BUILDERS = {HardConfig: hard.build, CtrKDConfig: ctr_kd.build, NextItemKDConfig: next_item_kd.build}
DISTILLING = (CtrKDConfig, NextItemKDConfig)


def build(cfg: ObjectiveConfig, ctx: ObjectiveContext) -> Objective:
    """The objective of `cfg`, checked against the logs (caches opened here, once)."""
    return _BUILDERS[type(cfg)](cfg, ctx)


def distills(cfg: ObjectiveConfig) -> bool:
    """Whether the objective learns from a teacher (what `distkd distill` requires)."""
    return isinstance(cfg, DISTILLING)


def require_distilling(cfg: ObjectiveConfig, where: str) -> None:

    if not distills(cfg):
        raise ConfigError(f"{where}: `distkd distill` needs an objective that learns from a teacher "
                          "(objective: {kind: ctr_kd | next_item_kd, teachers: [...]}); see jobs/demo/distill.yaml")


__all__ = ["ObjectiveConfig", "Objective", "ObjectiveContext", "StepOutput", "build", "distills", "require_distilling"]
