"""Next-item teacher and student: a history-pooling retrieval model over an item catalog.

    history ids --EmbeddingBagCollection (MEAN)--> pooled history  [B, D] --+
    context ids --EmbeddingBagCollection (SUM)---> context vectors [B, D] --+-- sum, or MLP tower --> query q [B, D]
    dense       --Linear------------------------->  dense vector  [B, D] --+
    logits = q @ E_items^T + b_items                                                  [B, N]

The input tables (history, context) are TorchRec tables, created on the meta device by
default, so `DistributedModelParallel` shards them (table-wise / column-wise on gloo). The
output item table `E_items` [N, D] and bias [N] are plain parameters: DMP leaves them to DDP,
replicated on every rank, so full-catalog scoring is a local matmul and needs no collective. For
20k x 64 that is 5 MB of gradient all-reduced a step; a catalog too large to replicate would
shard it row-wise and score sampled items only (`score`).

Teacher and student differ only in their `NextItemConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Literal, NamedTuple, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.mlp import MLP

from distkd.config import ConfigError


@dataclass
class NextItemConfig:
    kind: Literal["next_item"] = field(default="next_item", kw_only=True)  # keyword-only: positional args stay the sizes
    embedding_dim: int = 64
    # Hidden widths of an MLP on the concatenated pooled features; [] = their sum (the pooling
    # model, which is the synthetic truth's family).
    tower: list[int] = field(default_factory=list)
    item_bias: bool = True
    # Uniform half-width of the input tables; None: sqrt(3 / dim), rows of unit norm on average.
    embedding_init: Optional[float] = None
    output_init_std: float = 0.01  # small: the softmax starts near uniform (over the item bias)

    def init_range(self) -> float:
        return self.embedding_init if self.embedding_init is not None else math.sqrt(3.0 / self.embedding_dim)

    def validate(self) -> None:
        if self.embedding_dim <= 0 or any(w <= 0 for w in self.tower):
            raise ConfigError("embedding_dim and tower widths must be positive")


class Feature(NamedTuple):
    name: str
    rows: int
    multi_valued: bool = False


def as_features(features: Iterable[Any]) -> list[Feature]:
    """Features from schema.SparseFeature objects, schema dicts or `Feature`s."""
    out = []
    for f in features:
        if isinstance(f, dict):
            rows = f.get("num_embeddings") or f.get("hash_size")
            out.append(Feature(f["name"], int(rows), bool(f.get("multi_valued", False))))
        elif isinstance(f, Feature):
            out.append(f)
        else:
            out.append(Feature(f.name, int(f.rows), bool(f.multi_valued)))
    return out


def table_name(feature: str) -> str:
    return f"t_{feature}"  # as distkd.models.ranking, so plans and constraints read the same


class NextItemOutput(NamedTuple):
    """A NamedTuple so DDP finds the output tensors (see ranking.ModelOutput)."""

    logits: Optional[torch.Tensor]  # [B, N] over the whole catalog (None when not asked for)
    query: torch.Tensor  # [B, D]


class NextItemModel(nn.Module):
    def __init__(self, features: Iterable[Any], num_items: int, cfg: NextItemConfig, item_feature: str = "history",
                 n_dense: int = 0, device: Optional[torch.device] = None, sparse_device: Optional[torch.device] = None):
        super().__init__()
        cfg.validate()
        self.cfg, self.num_items, self.item_feature = cfg, num_items, item_feature
        feats = as_features(features)
        self.features = [f.name for f in feats]
        hist = {f.name: f for f in feats}.get(item_feature)
        if hist is None or hist.rows != num_items:
            raise ValueError(f"feature '{item_feature}' must be a feature with num_items={num_items} rows")
        dim, a = cfg.embedding_dim, cfg.init_range()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=table_name(f.name), embedding_dim=dim, num_embeddings=f.rows, feature_names=[f.name],
                    weight_init_min=-a, weight_init_max=a, init_fn=partial(nn.init.uniform_, a=-a, b=a),
                    pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM,
                )
                for f in feats
            ],
            device=sparse_device if sparse_device is not None else torch.device("meta"),
        )
        self.dense_proj = nn.Linear(n_dense, dim, device=device) if n_dense else None
        if cfg.tower:
            width = dim * (len(feats) + (1 if n_dense else 0))
            self.tower = nn.Sequential(MLP(width, cfg.tower, device=device), nn.Linear(cfg.tower[-1], dim, device=device))
        else:
            self.tower = None
        self.item_embedding = nn.Parameter(torch.randn(num_items, dim, device=device) * cfg.output_init_std)
        self.item_bias = nn.Parameter(torch.zeros(num_items, device=device)) if cfg.item_bias else None

    @property
    def hidden_dim(self) -> None:
        """No hidden layer is cached for feature distillation of a next-item teacher."""
        return None

    def query(self, sparse: KeyedJaggedTensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = self.ebc(sparse).to_dict()  # by name: a sharded EBC orders its output by shard
        vectors = [pooled[name] for name in self.features]
        if self.dense_proj is not None:
            vectors.append(self.dense_proj(dense))
        if self.tower is not None:
            return self.tower(torch.cat(vectors, dim=1))
        return torch.stack(vectors, dim=0).sum(0)

    def forward(self, sparse: KeyedJaggedTensor, dense: Optional[torch.Tensor] = None,
                full_logits: bool = True) -> NextItemOutput:
        q = self.query(sparse, dense)
        if not full_logits:
            return NextItemOutput(None, q)
        logits = q @ self.item_embedding.t()
        if self.item_bias is not None:
            logits = logits + self.item_bias
        return NextItemOutput(logits, q)

    def score(self, query: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Logits of given items: ids [S] (shared by the batch) -> [B, S]; ids [B, S] -> [B, S]."""
        e = self.item_embedding[item_ids]
        s = query @ e.t() if item_ids.dim() == 1 else torch.einsum("bd,bsd->bs", query, e)
        if self.item_bias is not None:
            s = s + self.item_bias[item_ids]
        return s


def count_parameters(features: Iterable[Any], num_items: int, cfg: NextItemConfig, n_dense: int = 0,
                     item_feature: str = "history") -> dict[str, int]:
    """Parameter counts without materializing anything: input tables, item table (+ bias), dense, total."""
    feats = as_features(features)
    emb = sum(f.rows for f in feats) * cfg.embedding_dim
    with torch.device("meta"):
        model = NextItemModel(feats, num_items, cfg, item_feature, n_dense, device=torch.device("meta"))
    item = model.item_embedding.numel() + (model.item_bias.numel() if model.item_bias is not None else 0)
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("ebc.", "item_")))
    return {"embedding": emb, "item": item, "dense": dense, "total": emb + item + dense}


def kjt_from_lists(features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from {name: (values int64, lengths int32 [B])} (tests, small loops)."""
    keys = list(features)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([features[k][0] for k in keys]),
        lengths=torch.cat([features[k][1].to(torch.int32) for k in keys]),
    )
