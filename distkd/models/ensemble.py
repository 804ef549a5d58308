"""A teacher ensemble: N teachers (other seeds, architectures or feature sets) scored as one.

    teachers: [runs/t0/export, runs/t1/export, {factory: ..., weights: ...}]
    combine: mean_logit     # the mean of the members' logits
    combine: mean_prob      # the mean of their probabilities, as a logit (sigmoid; a catalog: softmax)

To the cache build, `cache verify --recompute` and the online path an ensemble is one
teacher (distkd.models.teacher's contract): one combined target per row. Its fingerprint is
the sha256 of the canonical JSON of `combine` and the members' fingerprints in order, so one
changed member is another teacher: the cache it built is refused, never blended into. The
manifest's teacher record lists every member (`members`: fingerprint, form, name, export).

A member may read a view of the logs (fewer features: a teacher trained with `features:`);
each is handed only its own features, by name, from the batch of the logs' whole schema.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from distkd.config import to_dict
from distkd.data.schema import Schema
from distkd.models.teacher_spec import EnsembleSpec, TeacherError

_EPS = 1e-7  # probabilities are kept in [eps, 1 - eps] before the logit


def fingerprint(combine: str, members: list[str]) -> str:
    blob = {"ensemble": combine, "members": members}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def describe(spec: EnsembleSpec, schema: Optional[Schema], describe_member: Callable) -> dict[str, Any]:
    """The manifest's teacher record of an ensemble: every member described by `describe_member`
    (distkd.models.teacher.describe, which checks it against the logs), the combined fingerprint,
    `combine` and the members."""
    spec = spec.resolved()
    if schema is None:
        raise TeacherError(f"teacher {spec.name}: describing an ensemble needs the logs' schema")
    members = [describe_member(m, schema) for m in spec.members]
    sha = fingerprint(spec.combine, [m["sha256"] for m in members])
    return {"form": spec.form, "name": spec.name, "spec": to_dict(spec), "input": spec.input, "sha256": sha,
            "combine": spec.combine,
            "members": [{k: m[k] for k in ("sha256", "form", "name", "export") if m.get(k) is not None}
                        for m in members],
            "hidden_dim": None}


class Combined(nn.Module):
    """The members' outputs combined: forward(sparse KJT of `keys`, dense of `dense`) -> logits."""

    def __init__(self, members: list, combine: str, keys: list[str], dense: list[str], multiclass: bool):
        super().__init__()
        self.members, self.combine, self.multiclass = members, combine, multiclass
        # Each member's features as positions in the whole batch: None where it reads them all.
        self.picks = [None if m.keys == keys else [keys.index(k) for k in m.keys] for m in members]
        self.dense_picks = [None if [f.name for f in m.schema.dense] == dense
                            else torch.tensor([dense.index(f.name) for f in m.schema.dense], dtype=torch.long)
                            for m in members]

    def forward(self, sparse, dense: Tensor) -> Tensor:
        zs = []
        for m, pick, dpick in zip(self.members, self.picks, self.dense_picks):
            s = sparse if pick is None else sparse.permute(pick)
            d = dense if dpick is None else dense.index_select(1, dpick.to(dense.device))
            zs.append(m(s, d).logits.float())
        z = torch.stack(zs)  # [N, B, T]
        if self.combine == "mean_logit":
            return z.mean(0)
        if self.multiclass:  # log of the mean softmax over the catalog
            return torch.logsumexp(torch.log_softmax(z, -1), 0) - torch.log(torch.tensor(float(len(zs))))
        p = torch.sigmoid(z).mean(0).clamp(_EPS, 1 - _EPS)
        return torch.log(p) - torch.log1p(-p)


def load(spec: EnsembleSpec, schema: Optional[Schema], load_member: Callable, device: Any = "cpu",
         expect_sha256: Optional[str] = None) -> tuple[nn.Module, str]:
    """Every member loaded by `load_member` (distkd.models.teacher.load_teacher, which checks each
    against the logs' schema); the combined module and its fingerprint. The members are handed in
    rather than imported: teacher.py dispatches an EnsembleSpec here, so this module stays below it."""
    spec = spec.resolved()
    if schema is None:
        raise TeacherError(f"teacher {spec.name}: loading an ensemble needs the logs' schema")
    members = [load_member(m, schema, device) for m in spec.members]
    sha = fingerprint(spec.combine, [m.sha256 for m in members])
    if expect_sha256 is not None and sha != expect_sha256:
        raise TeacherError(f"teacher {spec.name}: its fingerprint here is {sha[:12]}…, expected {expect_sha256[:12]}…: "
                           "a member differs from the one the cache was built with")
    module = Combined(members, spec.combine, [f.name for f in schema.sparse], [f.name for f in schema.dense],
                      multiclass=not schema.binary)
    return module, sha
