"""A teacher of the user's own, as a user would write it: plain torch.nn (nn.EmbeddingBag per
feature, an MLP), no TorchRec and no distkd, on the teacher contract's `dict` input form
({feature: (values, offsets)}, dense), returning {"logits", "hidden"}.

Factories (distkd calls them with the logs' schema and the spec's kwargs):

    build(schema, dim=8, hidden=16)      the teacher
    wrong_shape(schema)                  one logit too many per row
    nan_after(schema, calls=2, row=5)    NaN in batch row `row` from its call number `calls` on
"""

from __future__ import annotations

import torch
from torch import nn


class UserTeacher(nn.Module):
    def __init__(self, schema, dim: int = 8, hidden: int = 16, extra_outputs: int = 0):
        super().__init__()
        self.names = [f.name for f in schema.sparse]
        self.bags = nn.ModuleList([
            nn.EmbeddingBag(f.rows, dim, mode="mean" if f.multi_valued else "sum", include_last_offset=True)
            for f in schema.sparse
        ])
        self.mlp = nn.Sequential(nn.Linear(dim * len(self.names) + len(schema.dense), hidden), nn.ReLU())
        self.out = nn.Linear(hidden, len(schema.tasks) + extra_outputs)

    def forward(self, sparse: dict[str, tuple[torch.Tensor, torch.Tensor]], dense: torch.Tensor):
        pooled = [bag(*sparse[name]) for name, bag in zip(self.names, self.bags)]
        h = self.mlp(torch.cat(pooled + [dense], dim=1))
        return {"logits": self.out(h), "hidden": h}


class NaNAfter(UserTeacher):
    def __init__(self, schema, calls: int, row: int):
        super().__init__(schema)
        self.after, self.row, self.calls = calls, row, 0

    def forward(self, sparse, dense):
        out = super().forward(sparse, dense)
        self.calls += 1
        if self.calls > self.after:
            logits = out["logits"].clone()
            logits[self.row, 0] = float("nan")
            out["logits"] = logits
        return out


def build(schema, dim: int = 8, hidden: int = 16) -> nn.Module:
    return UserTeacher(schema, dim, hidden)


def wrong_shape(schema) -> nn.Module:
    return UserTeacher(schema, extra_outputs=1)


def nan_after(schema, calls: int = 2, row: int = 5) -> nn.Module:
    return NaNAfter(schema, calls, row)
