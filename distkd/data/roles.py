"""Feature roles: which features of the logs a job reads.

A feature is `shared` (the default) or `teacher_only` (privileged: in the logs, never at
serving). A teacher job reads every feature; a student job (hard-label or distilled) the
shared ones. A job may narrow that with `features: [...]`; a student naming a teacher-only
feature, or any job naming a feature the schema lacks, is refused naming it.

The result is a view: a Schema like any other, holding only those features, so the loader
reads only their columns, the model has tables and inputs only for them and an export (and
its serving contract) states only them. A view's fingerprint is that of a schema holding just
those features; an export records them (`features` in export.json) and fits logs whose view
of those features has its fingerprint (`view_fingerprint`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from distkd.config import ConfigError
from distkd.data.schema import SHARED, TEACHER_ONLY, Schema

JOB_ROLES = ("teacher", "student")


def privileged(schema: Schema) -> list[str]:
    """The teacher-only features (sparse, then dense): teachers read them, students never do."""
    return [f.name for f in [*schema.sparse, *schema.dense] if f.role == TEACHER_ONLY]


def view(schema: Schema, features: Optional[list[str]] = None, role: str = "teacher") -> Schema:
    """The schema a job of `role` reads: every feature (teacher) or the shared ones (student),
    narrowed to `features` (schema order kept) when given; `schema` itself when that is all."""
    if role not in JOB_ROLES:
        raise ConfigError(f"role: {role!r} is not one of {list(JOB_ROLES)}")
    barred_all = privileged(schema)
    if features is not None:
        unknown = [n for n in features if n not in schema.feature_names]
        if unknown:
            raise ConfigError(f"features: {unknown} are not features of the schema ({schema.feature_names})")
        barred = [n for n in features if n in barred_all] if role == "student" else []
        if barred:
            raise ConfigError(f"features: {barred} are teacher-only (privileged): a student never reads them")
    if features is None and (role == "teacher" or not barred_all):
        return schema
    keep = set(schema.feature_names if features is None else features)
    ok = lambda f: f.name in keep and (role == "teacher" or f.role == SHARED)  # noqa: E731
    out = replace(schema, sparse=[f for f in schema.sparse if ok(f)], dense=[f for f in schema.dense if ok(f)])
    if not out.sparse:
        raise ConfigError(f"features: a {role} job of these logs would read no sparse feature "
                          f"(teacher-only: {barred_all}); at least one is required")
    return out


def view_fingerprint(schema: Schema, features: Optional[list[str]] = None) -> str:
    """The fingerprint of the view of `features` (None: the whole schema): what an export that
    reads those features of these logs records."""
    return view(schema, features).fingerprint()
