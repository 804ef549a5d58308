"""How a teacher is given: `TeacherSpec` (exactly one of an export, a factory with its weights,
or a torch.export program), `as_spec` for a job's `teacher:` and `spec_from_args` for the
command line's teacher flags. What a teacher receives and returns, its fingerprint and its
loading are distkd.models.teacher's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distkd.config import ConfigError
from distkd import storage

FORMS = ("export", "factory", "program")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class TeacherError(ConfigError):
    """A teacher cannot be loaded, or returned something the contract refuses; `row` is the
    batch row of a non-finite value (None otherwise)."""

    row: Optional[int] = None


@dataclass
class TeacherSpec:
    export: Optional[str] = None  # a distkd export directory
    factory: Optional[str] = None  # "package.module:function" returning the module
    weights: Optional[str] = None  # the factory module's state dict (torch.load(weights_only=True))
    program: Optional[str] = None  # a torch.export program (.pt2)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the factory
    input: Literal["kjt", "dict"] = "kjt"  # the batch form the module takes (module docstring)
    hidden_dim: Optional[int] = None  # width of `hidden`, for caching it (exports know their own)

    def validate(self) -> None:
        given = [f for f in FORMS if getattr(self, f)]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of export, factory (with weights) or program, got {given or 'none'}")
        if bool(self.factory) != bool(self.weights):
            raise ConfigError("factory and weights go together (the weights: a state dict file)")
        if self.factory and not _FACTORY.fullmatch(self.factory):
            raise ConfigError(f"factory: {self.factory!r} is not 'package.module:function'")
        if self.kwargs and not self.factory:
            raise ConfigError("kwargs: only a factory takes them")
        if self.export and self.input != "kjt":
            raise ConfigError("input: a distkd export takes the kjt form")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ConfigError(f"hidden_dim: must be >= 1, got {self.hidden_dim}")

    @property
    def form(self) -> str:
        return next(f for f in FORMS if getattr(self, f))

    @property
    def name(self) -> str:
        return f"{self.factory} ({self.weights})" if self.factory else str(self.export or self.program)

    def resolved(self) -> "TeacherSpec":
        """The same spec with absolute paths (workers and ranks may run elsewhere)."""
        fix = {k: str(Path(getattr(self, k)).resolve()) for k in ("export", "weights", "program") if getattr(self, k)}
        return replace(self, **fix)


COMBINE = ("mean_logit", "mean_prob")


@dataclass
class EnsembleSpec:
    """N teachers scored as one (distkd.models.ensemble): their logits averaged (`mean_logit`), or
    their probabilities averaged and turned back into a logit (`mean_prob`). Its fingerprint
    covers `combine` and every member's, in order: one changed member is another teacher."""

    members: list[TeacherSpec] = field(default_factory=list)
    combine: Literal["mean_logit", "mean_prob"] = "mean_logit"
    input: Literal["kjt"] = "kjt"  # what the ensemble takes; each member is called in its own form
    hidden_dim: Optional[int] = None  # an ensemble has no one hidden layer to cache

    form = "ensemble"

    def validate(self) -> None:
        if len(self.members) < 2:
            raise ConfigError(f"teachers: an ensemble needs at least 2 teachers, got {len(self.members)}")
        if self.hidden_dim is not None:
            raise ConfigError("hidden_dim: an ensemble has no one hidden layer to cache")
        for i, m in enumerate(self.members):
            as_spec(m, f"teachers[{i}]")

    @property
    def name(self) -> str:
        return f"{self.combine} of [{', '.join(m.name for m in self.members)}]"

    def resolved(self) -> "EnsembleSpec":
        return replace(self, members=[m.resolved() for m in self.members])


def ensemble(teachers: "list[str | TeacherSpec]", combine: str = "mean_logit",
             where: str = "teachers") -> EnsembleSpec:
    """A job's `teachers:` list (export paths or specs) and `combine:` as a checked EnsembleSpec."""
    spec = EnsembleSpec([as_spec(t, f"{where}[{i}]") for i, t in enumerate(teachers)], combine)  # type: ignore[arg-type]
    try:
        spec.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec


def as_spec(teacher: "str | TeacherSpec | EnsembleSpec", where: str = "teacher") -> "TeacherSpec | EnsembleSpec":
    """A job's `teacher:` (an export path, or a spec) as a checked TeacherSpec (an ensemble's
    spec is checked and returned as it is)."""
    if isinstance(teacher, EnsembleSpec):
        teacher.validate()
        return teacher
    spec = TeacherSpec(export=teacher) if isinstance(teacher, str) else teacher
    try:
        spec.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None

    for k in ("export", "weights", "program"):
        v = getattr(spec, k)
        if v and storage.is_remote(v):
            raise ConfigError(f"{where}.{k}: {v}: must be a path every worker can open (a shared file "
                              "system); copy it there from object storage")
    return spec


# -- command line ---------------------------------------------------------------------------

def spec_from_args(args) -> Optional[TeacherSpec]:
    """The spec the teacher flags name (distkd.cli adds them), None when none is given."""

    g = lambda name: getattr(args, name, None)  # noqa: E731
    if not any(g(n) for n in ("teacher", "teacher_factory", "teacher_program")):
        if any(g(n) is not None for n in ("teacher_weights", "teacher_input", "teacher_kwargs", "teacher_hidden_dim")):
            raise ConfigError("--teacher-weights/-input/-kwargs/-hidden-dim need --teacher-factory or --teacher-program")
        return None
    kwargs = yaml.safe_load(g("teacher_kwargs")) if g("teacher_kwargs") else {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--teacher-kwargs: expected a mapping, got {g('teacher_kwargs')!r}")
    spec = TeacherSpec(export=g("teacher"), factory=g("teacher_factory"), weights=g("teacher_weights"),
                       program=g("teacher_program"), kwargs=kwargs, input=g("teacher_input") or "kjt",
                       hidden_dim=g("teacher_hidden_dim"))
    return as_spec(spec, "--teacher")
