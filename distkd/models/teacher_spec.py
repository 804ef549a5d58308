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

from distkd.config import ConfigError

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


def as_spec(teacher: "str | TeacherSpec", where: str = "teacher") -> TeacherSpec:
    """A job's `teacher:` (an export path, or a spec) as a checked TeacherSpec."""
    spec = TeacherSpec(export=teacher) if isinstance(teacher, str) else teacher
    try:
        spec.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    from distkd import storage

    for k in ("export", "weights", "program"):
        v = getattr(spec, k)
        if v and storage.is_remote(v):
            raise ConfigError(f"{where}.{k}: {v}: must be a path every worker can open (a shared file "
                              "system); copy it there from object storage")
    return spec


# -- command line ---------------------------------------------------------------------------

def spec_from_args(args) -> Optional[TeacherSpec]:
    """The spec the teacher flags name (distkd.cli adds them), None when none is given."""
    import yaml

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
