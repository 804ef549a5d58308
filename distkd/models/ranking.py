"""Teacher and student: one DLRM / DCN-v2 style ranking model built from the schema.

    sparse ids --EmbeddingBagCollection--> pooled embeddings (one per feature, dim D) --+
    dense     --bottom MLP---------------> dense embedding (dim D) ----------------------+
         interaction "dot" (DLRM): pairwise dot products of all F+1 vectors, plus the dense embedding
         interaction "cat":        the concatenation of all F+1 vectors
    --> low-rank cross layers (DCN-v2, optional) --> top MLP --> hidden --> one logit per task
                                                                    \\--> auxiliary distillation head (optional)

The teacher and the student differ only in their `ModelConfig` (embedding dim,
cross layers, MLP widths). Embedding tables are created on the meta device so that
`DistributedModelParallel` materializes only the shards a rank owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional

import math
from functools import partial

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP

from distkd.data.schema import Schema
from distkd.config import ConfigError


@dataclass
class ModelConfig:
    kind: Literal["ranking"] = field(default="ranking", kw_only=True)  # keyword-only: positional args stay the sizes
    embedding_dim: int = 96
    interaction: Literal["dot", "cat"] = "dot"
    dense_arch: list[int] = field(default_factory=lambda: [128])  # the last layer is embedding_dim
    cross_layers: int = 2
    cross_rank: int = 64
    deep_arch: list[int] = field(default_factory=lambda: [512, 256, 128])
    aux_head: bool = False  # a separate head for the teacher's target (ExFM-style)
    aux_grad_scale: float = 1.0  # scales the aux head's gradient into the shared layers
    hint_dim: Optional[int] = None  # a learned projection of the hidden layer onto a teacher's layer
    # Uniform init half-width of the embedding tables; None: so that the dot product of two
    # fresh embeddings has std ~0.3 whatever the dim (TorchRec's default, ±1/sqrt(rows), makes
    # dot interactions of large tables start near zero and learn slowly).
    embedding_init: Optional[float] = None

    def init_range(self) -> float:
        if self.embedding_init is not None:
            return self.embedding_init
        return math.sqrt(3.0) * math.sqrt(0.3 / math.sqrt(self.embedding_dim))

    def validate(self) -> None:

        if self.embedding_dim <= 0 or any(d <= 0 for d in self.dense_arch + self.deep_arch):
            raise ConfigError("layer sizes must be positive")
        if self.cross_layers < 0 or (self.cross_layers and self.cross_rank <= 0):
            raise ConfigError("cross_layers must be >= 0 and cross_rank > 0")
        if not self.deep_arch:
            raise ConfigError("deep_arch needs at least one layer")


def table_name(feature: str) -> str:
    return f"t_{feature}"


def embedding_configs(schema: Schema, cfg: ModelConfig) -> list[EmbeddingBagConfig]:
    a = cfg.init_range()
    return [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=cfg.embedding_dim,
            weight_init_min=-a,  # read by the sharded (FBGEMM) tables
            weight_init_max=a,
            init_fn=partial(nn.init.uniform_, a=-a, b=a),  # read by data-parallel and unsharded tables
            num_embeddings=f.rows,
            feature_names=[f.name],
            # A list feature's embedding is the mean of its ids', whatever the list's length.
            pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM,
        )
        for f in schema.sparse
    ]


class ModelOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DDP must find the output tensors (pytree) to
    all-reduce gradients; a dataclass output silently leaves them rank-local."""

    logits: torch.Tensor  # [B, tasks], the serving head
    hidden: torch.Tensor  # [B, H], the last deep layer (feature distillation hint)
    aux_logits: Optional[torch.Tensor] = None  # [B, tasks], the distillation head if configured
    hint: Optional[torch.Tensor] = None  # [B, teacher H], the hidden layer projected for feature distillation


class RankingModel(nn.Module):
    def __init__(self, schema: Schema, cfg: ModelConfig, device: Optional[torch.device] = None,
                 sparse_device: Optional[torch.device] = None):
        super().__init__()
        self.schema, self.cfg = schema, cfg
        self.features = [f.name for f in schema.sparse]
        n_sparse, n_dense, n_tasks = len(schema.sparse), len(schema.dense), len(schema.binary)
        self.ebc = EmbeddingBagCollection(
            tables=embedding_configs(schema, cfg),
            device=sparse_device if sparse_device is not None else torch.device("meta"),
        )
        dim = cfg.embedding_dim
        self.dense_arch = MLP(n_dense, cfg.dense_arch + [dim], device=device) if n_dense else None
        n_vectors = n_sparse + (1 if n_dense else 0)
        if cfg.interaction == "dot":
            # a buffer (moved with the module, not saved): no device test in forward, which keeps
            # the model FX-traceable for TorchRec's train pipelines
            self.register_buffer("pairs", torch.triu_indices(n_vectors, n_vectors, offset=1), persistent=False)
            in_features = n_vectors * (n_vectors - 1) // 2 + (dim if n_dense else 0)
        else:
            in_features = n_vectors * dim
        self.cross = (LowRankCrossNet(in_features, cfg.cross_layers, cfg.cross_rank).to(device or "cpu")
                      if cfg.cross_layers else None)
        self.deep = MLP(in_features, cfg.deep_arch, device=device)
        self.head = nn.Linear(cfg.deep_arch[-1], n_tasks, device=device)
        self.aux_head = nn.Linear(cfg.deep_arch[-1], n_tasks, device=device) if cfg.aux_head else None
        self.hint = nn.Linear(cfg.deep_arch[-1], cfg.hint_dim, device=device) if cfg.hint_dim else None

    @property
    def hidden_dim(self) -> int:
        return self.cfg.deep_arch[-1]

    def interaction_columns(self) -> list[str]:
        """A name for each column of the interaction's output (what the cross layers and the
        first deep layer read): `<dense>[d]` and `A*B` (dot), `A[d]` (cat). A warm start whose
        features changed maps these layers' weights by these names."""
        dim, has_dense = self.cfg.embedding_dim, self.dense_arch is not None
        vectors = (["<dense>"] if has_dense else []) + self.features
        if self.cfg.interaction == "cat":
            return [f"{v}[{d}]" for v in vectors for d in range(dim)]
        ij = torch.triu_indices(len(vectors), len(vectors), offset=1).t().tolist()
        pairs = ["*".join(sorted((vectors[i], vectors[j]))) for i, j in ij]  # symmetric: named whatever the order
        return [f"<dense>[{d}]" for d in range(dim if has_dense else 0)] + pairs

    def interaction_readers(self) -> dict[str, int]:
        """The parameters with one index per interaction column, and along which dimension."""
        readers = {"deep._mlp.0._linear.weight": 1}
        for layer in range(self.cfg.cross_layers if self.cross is not None else 0):
            readers.update({f"cross.V_kernels.{layer}": 1, f"cross.W_kernels.{layer}": 0, f"cross.bias.{layer}": 0})
        return readers

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> ModelOutput:
        # A sharded EBC orders its output by shard, not by feature: look features up by name.
        pooled = self.ebc(sparse).to_dict()
        vectors = [torch.stack([pooled[name] for name in self.features], dim=1)]  # [B, F, D]
        dense_emb = None
        if self.dense_arch is not None:
            dense_emb = self.dense_arch(dense)
            vectors.insert(0, dense_emb.unsqueeze(1))
        stacked = torch.cat(vectors, dim=1)  # [B, F+1, D]
        if self.cfg.interaction == "dot":
            gram = torch.bmm(stacked, stacked.transpose(1, 2))
            x = gram[:, self.pairs[0], self.pairs[1]]
            if dense_emb is not None:
                x = torch.cat([dense_emb, x], dim=1)
        else:
            x = stacked.flatten(1)
        if self.cross is not None:
            x = self.cross(x)
        hidden = self.deep(x)
        aux = None
        if self.aux_head is not None:
            aux = self.aux_head(_scale_grad(hidden, self.cfg.aux_grad_scale))
        hint = self.hint(hidden) if self.hint is not None else None
        return ModelOutput(logits=self.head(hidden), hidden=hidden, aux_logits=aux, hint=hint)


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
