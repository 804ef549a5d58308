"""Teacher and student: one DCN-v2 style ranking model built from the schema.

    sparse ids --EmbeddingBagCollection--> pooled embeddings (one per feature) --+
    dense     --MLP------------------------> dense embedding ----------------------+--concat--> x0
    x0 --low-rank cross layers (DCN-v2)--> deep MLP --> hidden --> one logit per task
                                                           \\--> auxiliary distillation head (optional)

The teacher and the student differ only in their `ModelConfig` (embedding dim,
cross layers, MLP widths). Embedding tables are created on the meta device so that
`DistributedModelParallel` materializes only the shards a rank owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP

from distkd.schema import Schema


@dataclass
class ModelConfig:
    embedding_dim: int = 64
    dense_arch: list[int] = field(default_factory=lambda: [128, 64])
    cross_layers: int = 3
    cross_rank: int = 64
    deep_arch: list[int] = field(default_factory=lambda: [512, 256])
    aux_head: bool = False  # a separate head for the teacher's target (ExFM-style)

    def validate(self) -> None:
        from distkd.config import ConfigError

        if self.embedding_dim <= 0 or any(d <= 0 for d in self.dense_arch + self.deep_arch):
            raise ConfigError("layer sizes must be positive")
        if self.cross_layers < 0 or (self.cross_layers and self.cross_rank <= 0):
            raise ConfigError("cross_layers must be >= 0 and cross_rank > 0")
        if not self.deep_arch:
            raise ConfigError("deep_arch needs at least one layer")


def table_name(feature: str) -> str:
    return f"t_{feature}"


def embedding_configs(schema: Schema, dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=dim,
            num_embeddings=f.rows,
            feature_names=[f.name],
        )
        for f in schema.sparse
    ]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, tasks], the serving head
    hidden: torch.Tensor  # [B, H], the last deep layer (feature distillation hint)
    aux_logits: Optional[torch.Tensor] = None  # [B, tasks], the distillation head if configured


class RankingModel(nn.Module):
    def __init__(self, schema: Schema, cfg: ModelConfig, device: Optional[torch.device] = None,
                 sparse_device: Optional[torch.device] = None):
        super().__init__()
        self.schema, self.cfg = schema, cfg
        n_sparse, n_dense, n_tasks = len(schema.sparse), len(schema.dense), len(schema.tasks)
        self.ebc = EmbeddingBagCollection(
            tables=embedding_configs(schema, cfg.embedding_dim),
            device=sparse_device if sparse_device is not None else torch.device("meta"),
        )
        self.dense_arch = MLP(max(n_dense, 1), cfg.dense_arch, device=device) if n_dense else None
        in_features = n_sparse * cfg.embedding_dim + (cfg.dense_arch[-1] if n_dense else 0)
        self.cross = LowRankCrossNet(in_features, cfg.cross_layers, cfg.cross_rank) if cfg.cross_layers else None
        if self.cross is not None and device is not None:
            self.cross.to(device)
        self.deep = MLP(in_features, cfg.deep_arch, device=device)
        self.head = nn.Linear(cfg.deep_arch[-1], n_tasks, device=device)
        self.aux_head = nn.Linear(cfg.deep_arch[-1], n_tasks, device=device) if cfg.aux_head else None
        self.aux_grad_scale = 1.0

    @property
    def hidden_dim(self) -> int:
        return self.cfg.deep_arch[-1]

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> ModelOutput:
        pooled = self.ebc(sparse).values()  # [B, n_sparse * dim], features in schema order
        parts = [pooled]
        if self.dense_arch is not None:
            parts.insert(0, self.dense_arch(dense))
        x = torch.cat(parts, dim=1)
        if self.cross is not None:
            x = self.cross(x)
        hidden = self.deep(x)
        aux = None
        if self.aux_head is not None:
            aux = self.aux_head(_scale_grad(hidden, self.aux_grad_scale))
        return ModelOutput(logits=self.head(hidden), hidden=hidden, aux_logits=aux)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; scales the gradient flowing back into the shared layers."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def count_parameters(schema: Schema, cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts without materializing the tables (embeddings, dense, total)."""
    emb = sum(f.rows for f in schema.sparse) * cfg.embedding_dim
    with torch.device("meta"):
        model = RankingModel(schema, cfg, device=torch.device("meta"))
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ebc."))
    return {"embedding": emb, "dense": dense, "total": emb + dense}
