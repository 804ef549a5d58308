"""A stale teacher in the KD objective: weighting by its age, and an adapter on its logits.

A teacher trained once and cached is days old on the rows a student distills from later
(distkd.cache.age: the cache gives every row `teacher0.age`, days since the teacher's last
training partition). Two remedies, as ExFM (Meta, 2025) describes, each a `ctr_kd` option:

    age_weighting: {half_life_days: 7}   # the distillation terms of a row x 0.5 ** (age / 7)
    adapter: {form: affine, age: true}   # the soft target is the teacher corrected on the labels

Age weighting: a row's distillation terms (soft, mse, listwise, hint) are multiplied by
0.5 ** (max(age, 0) / half_life_days): 1 on the days the teacher trained on, 1/2 at one half
life, 0 in the limit; the hard-label term is never weighted. The terms stay means over the
distilling rows (the weights are not renormalised), so an old teacher's pull really shrinks.

Adapter: a small module on the teacher's logits z (per task; with `age: true` also the age in
weeks), started at the identity: form `affine` z' = a z + b (+ c age), `mlp` z' = z + MLP([z, age]).
It learns from the labels alone (BCE of z' on the labelled rows, x `weight`), and the student
distills from z' detached: the student's terms must not pull the adapter towards what the
student already predicts, or the target would stop correcting the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from distkd.config import ConfigError

WEEK = 7.0  # the adapter reads the age in weeks: inputs of the size of the logits


@dataclass
class AgeWeighting:
    half_life_days: float = 7.0  # a row's distillation terms x 0.5 ** (teacher age / half life)

    def validate(self) -> None:
        if not self.half_life_days > 0:
            raise ConfigError(f"half_life_days must be positive, got {self.half_life_days}")


@dataclass
class AdapterConfig:
    form: Literal["affine", "mlp"] = "affine"  # affine: z' = a z + b (+ c age); mlp: z' = z + MLP([z, age])
    age: bool = False  # the teacher's age (from the cache) as an input too
    weight: float = 1.0  # of its BCE on the labels
    hidden: int = 8  # the mlp's width

    def validate(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"weight must be positive (the adapter learns only from its label loss), got {self.weight}")
        if self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden}")


def age_weights(age: torch.Tensor, cfg: AgeWeighting) -> torch.Tensor:
    """[B] weights of the rows' distillation terms: 0.5 ** (max(age, 0) / half_life_days)."""
    return torch.pow(0.5, age.clamp(min=0) / cfg.half_life_days)


class Adapter(nn.Module):
    """The teacher's logits [B, T] corrected per task; the identity until it has learned."""

    def __init__(self, cfg: AdapterConfig, tasks: int, device: torch.device):
        super().__init__()
        self.form, self.use_age = cfg.form, cfg.age
        inputs = 2 if cfg.age else 1
        if cfg.form == "affine":
            self.coef = nn.Parameter(torch.zeros(tasks, inputs, device=device))  # on [z, age]; z's starts at 1
            with torch.no_grad():
                self.coef[:, 0] = 1.0
            self.bias = nn.Parameter(torch.zeros(tasks, device=device))
        else:  # one small MLP per task, batched: [T, inputs, H] then [T, H]; the last layer starts at 0
            self.w1 = nn.Parameter(torch.randn(tasks, inputs, cfg.hidden, device=device) / inputs ** 0.5)
            self.b1 = nn.Parameter(torch.zeros(tasks, cfg.hidden, device=device))
            self.w2 = nn.Parameter(torch.zeros(tasks, cfg.hidden, device=device))
            self.b2 = nn.Parameter(torch.zeros(tasks, device=device))

    def forward(self, z: torch.Tensor, age: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = z.unsqueeze(-1)  # [B, T, 1]
        if self.use_age:
            x = torch.cat([x, (age.to(z.dtype) / WEEK)[:, None, None].expand_as(x)], -1)
        if self.form == "affine":
            return (x * self.coef).sum(-1) + self.bias
        h = torch.relu(torch.einsum("bti,tih->bth", x, self.w1) + self.b1)
        return z + (h * self.w2).sum(-1) + self.b2


def check(age_weighting: Optional[AgeWeighting], adapter: Optional[AdapterConfig], teachers: list, gating: str) -> None:
    """What the options need: one teacher, and a cache where they read its age."""
    names = [n for n, on in (("age_weighting", age_weighting), ("adapter", adapter)) if on]
    if not names:
        return
    if len(teachers) != 1 or gating != "fixed":
        raise ConfigError(f"{' and '.join(names)}: need exactly one teacher (got {len(teachers)})")
    if (age_weighting or adapter.age) and teachers[0].cache is None:
        raise ConfigError("age_weighting and adapter.age read the teacher's age from its cache: give teachers[0].cache")
