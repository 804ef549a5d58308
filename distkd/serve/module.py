"""The serving module: a distkd ranking model as plain torch, with its dense transforms inside.

    logits = ServingModel(model)(sparse, dense)
      sparse: {feature: (values int64 [N_f], offsets int64 [B+1])}, keys in the schema's order
      dense:  float32 [B, n_dense], RAW values (NaN for missing): the module applies the
              schema's transforms (log1p, standardize with its statistics, quantile) itself
      logits: float32 [B, tasks] (the serving head; probability = sigmoid(logit))

The sparse form is the teacher contract's `dict` form (distkd.models.teacher). Ids are
table rows: features with `hash_size` are reduced modulo it inside (raw non-negative or
negative int64 ids work); string ids must be hashed by the caller (fnv1a_fmix64 with the
feature's seed, then modulo hash_size: distkd/data/hashing.py, restated in the contract).

Nothing here is TorchRec: the EmbeddingBagCollection becomes one `F.embedding_bag` per
table (the op TorchRec's unsharded EBC calls, so predictions are bit-identical), the MLPs
and DCN-v2 cross layers become the same linear algebra, and the module scripts
(TorchScript) and exports (`torch.export`) to a file that loads with torch alone.
`quantize="int8"` stores every table in FBGEMM's 8-bit row-wise format (uint8 per element, a
float32 scale and bias per row, as TorchRec's quantized EmbeddingBagCollection does) and pools
with torch's fused op; `portable=True` keeps the same bytes but dequantizes with plain ops
(for ONNX).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec import KeyedJaggedTensor

from distkd.data.schema import STANDARDIZED, Schema
from distkd.config import from_dict
from distkd.models.export import load_export
from distkd.models.ranking import ModelConfig

QUANTIZATIONS = ("int8",)


class FloatBag(nn.Module):
    """One float32 table, pooled by sum or mean over each bag (offsets with the last one)."""

    def __init__(self, weight: Tensor, mode: str):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.mode = mode

    def forward(self, values: Tensor, offsets: Tensor) -> Tensor:
        return F.embedding_bag(values, self.weight, offsets, mode=self.mode, include_last_offset=True)


class Int8Bag(nn.Module):
    """A table in FBGEMM's 8-bit row-wise format, as TorchRec's quantized tables hold it: per
    row, D uint8 values then a float32 scale and bias (w = q * scale + bias; bias = the row's
    min, scale = its range / 255), pooled by torch's own fused op (ATen, no fbgemm_gpu)."""

    def __init__(self, weight: Tensor, mode: str):
        super().__init__()
        self.register_buffer("packed", torch.ops.quantized.embedding_bag_byte_prepack(weight.detach().float().contiguous()))
        self.mean = mode == "mean"

    def forward(self, values: Tensor, offsets: Tensor) -> Tensor:
        out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            self.packed, values, offsets, False, 0, False, None, None, True)
        if self.mean:  # the op sums whatever mode it is given: divide here (an empty bag stays 0)
            out = out / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(out.dtype)
        return out


class Int8BagPortable(nn.Module):
    """The same quantized table (same bytes) dequantized with ops every runtime has (ONNX has
    no fused 8-bit embedding bag): gather the looked-up rows, q * scale + bias, then pool."""

    def __init__(self, weight: Tensor, mode: str):
        super().__init__()
        packed = torch.ops.quantized.embedding_bag_byte_prepack(weight.detach().float().contiguous())
        d = packed.shape[1] - 8
        scale_bias = packed[:, d:].contiguous().view(torch.float32)  # [rows, 2]
        self.register_buffer("q", packed[:, :d].clone())
        self.register_buffer("scale", scale_bias[:, :1].clone())
        self.register_buffer("bias", scale_bias[:, 1:].clone())
        self.mode = mode

    def forward(self, values: Tensor, offsets: Tensor) -> Tensor:
        rows = self.q.index_select(0, values).float() * self.scale.index_select(0, values) \
            + self.bias.index_select(0, values)
        ids = torch.arange(values.shape[0], dtype=values.dtype, device=values.device)
        return F.embedding_bag(ids, rows, offsets, mode=self.mode, include_last_offset=True)


class Quantile(nn.Module):
    """Dense column `col` -> its empirical CDF: `np.interp` through the stored quantiles (as
    distkd.data.rows._quantile does), in float64, then float32."""

    def __init__(self, col: int, quantiles: list[float]):
        super().__init__()
        q = np.asarray(quantiles, np.float64)
        u, inv = np.unique(q, return_inverse=True)
        p = np.bincount(inv, np.linspace(0.0, 1.0, len(q))) / np.bincount(inv)
        slope = np.diff(p) / np.diff(u) if len(u) > 1 else np.zeros(1)
        self.col = col
        self.register_buffer("u", torch.from_numpy(u))
        self.register_buffer("p", torch.from_numpy(p))
        self.register_buffer("slope", torch.from_numpy(np.asarray(slope, np.float64)))

    def forward(self, x: Tensor) -> Tensor:
        x = x.double()
        n = self.u.shape[0]
        if n == 1:  # np.interp through one point: that point's value, NaN included
            return torch.full_like(x, 1.0).mul(self.p[0]).float()
        # searchsorted(u, x, right=True) - 1, as a comparison (ONNX has no searchsorted)
        j = ((x.unsqueeze(1) >= self.u).sum(1) - 1).clamp(0, max(n - 2, 0))
        y = self.slope[j] * (x - self.u[j]) + self.p[j]
        y = torch.where(x < self.u[0], self.p[0], y)
        y = torch.where(x >= self.u[n - 1], self.p[n - 1], y)
        return torch.where(torch.isnan(x), x, y).float()


class Cross(nn.Module):
    """One DCN-v2 low-rank cross layer (torchrec LowRankCrossNet): x0 * (W (V x) + b) + x."""

    def __init__(self, v: Tensor, w: Tensor, b: Tensor):
        super().__init__()
        self.register_buffer("v", v.detach().clone())
        self.register_buffer("w", w.detach().clone())
        self.register_buffer("b", b.detach().clone())

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * (F.linear(F.linear(x, self.v), self.w) + self.b) + x


def _linears(state: dict[str, Tensor], prefix: str) -> nn.ModuleList:
    """The nn.Linear layers of a torchrec MLP (`prefix._mlp.i._linear`), weights copied."""
    out = nn.ModuleList()
    i = 0
    while f"{prefix}._mlp.{i}._linear.weight" in state:
        w, b = state[f"{prefix}._mlp.{i}._linear.weight"], state[f"{prefix}._mlp.{i}._linear.bias"]
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w)
        lin.bias.data.copy_(b)
        out.append(lin)
        i += 1
    return out


class ServingModel(nn.Module):
    def __init__(self, schema: Schema, model_cfg, state_dict: dict[str, Tensor], quantize: Optional[str] = None,
                 portable: bool = False):
        super().__init__()
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize: {quantize!r} is not one of {list(QUANTIZATIONS)}")
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        bag = FloatBag if quantize is None else Int8BagPortable if portable else Int8Bag
        self.features: List[str] = [f.name for f in schema.sparse]
        self.modulo: List[int] = [f.hash_size if f.hash_size is not None else 0 for f in schema.sparse]
        self.bags = nn.ModuleList([bag(state[f"ebc.embedding_bags.t_{f.name}.weight"],
                                       "mean" if f.multi_valued else "sum") for f in schema.sparse])
        n_dense = len(schema.dense)
        self.n_dense = n_dense
        # Dense transforms as masks and per-column constants (float32, as the loader uses them).
        log1p = [f.transform in ("log1p", "log1p_standardize") for f in schema.dense]
        zs = [f.transform in STANDARDIZED for f in schema.dense]
        mean = [f.params.mean if z else 0.0 for f, z in zip(schema.dense, zs)]  # type: ignore[union-attr]
        inv = [(1.0 / f.params.std if f.params.std > 0 else 1.0) if z else 1.0  # type: ignore[union-attr]
               for f, z in zip(schema.dense, zs)]
        clip = [f.z_clip if z else 0.0 for f, z in zip(schema.dense, zs)]
        self.register_buffer("log1p_mask", torch.tensor(log1p, dtype=torch.bool))
        self.register_buffer("z_mask", torch.tensor(zs, dtype=torch.bool))
        self.register_buffer("z_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("z_inv", torch.tensor(inv, dtype=torch.float32))
        self.register_buffer("z_clip", torch.tensor(clip, dtype=torch.float32))
        self.any_log1p, self.any_z = any(log1p), any(zs)
        self.any_quantile = any(f.transform == "quantile" for f in schema.dense)
        self.quantiles = nn.ModuleList([Quantile(j, f.params.quantiles) for j, f in enumerate(schema.dense)  # type: ignore
                                        if f.transform == "quantile"])
        self.dense_arch = _linears(state, "dense_arch") if n_dense else nn.ModuleList()
        self.has_dense = n_dense > 0
        self.dot = model_cfg.interaction == "dot"
        n_vectors = len(schema.sparse) + (1 if n_dense else 0)
        self.register_buffer("pairs", torch.triu_indices(n_vectors, n_vectors, offset=1))
        self.cross = nn.ModuleList([Cross(state[f"cross.V_kernels.{i}"], state[f"cross.W_kernels.{i}"],
                                          state[f"cross.bias.{i}"]) for i in range(model_cfg.cross_layers)])
        self.deep = _linears(state, "deep")
        self.head = nn.Linear(state["head.weight"].shape[1], state["head.weight"].shape[0])
        self.head.weight.data.copy_(state["head.weight"])
        self.head.bias.data.copy_(state["head.bias"])
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def transform(self, dense: Tensor) -> Tensor:
        """Raw dense float32 [B, n] -> the model's input (distkd.data.rows._transform's math)."""
        x = dense
        if self.any_log1p:
            x = torch.where(self.log1p_mask, x.clamp(min=0).log1p(), x)
        if self.any_z:
            z = torch.maximum(torch.minimum((x - self.z_mean) * self.z_inv, self.z_clip), -self.z_clip)
            x = torch.where(self.z_mask, z, x)
        if self.any_quantile:
            x = x.clone()  # never write into the caller's tensor
            for q in self.quantiles:
                x[:, q.col] = q(x[:, q.col])
        return x

    def score(self, sparse: Dict[str, Tuple[Tensor, Tensor]], dense: Tensor) -> Tensor:
        """Logits from transformed dense (the teacher contract's dict form)."""
        pooled: List[Tensor] = []
        for i, bag in enumerate(self.bags):
            values, offsets = sparse[self.features[i]]
            if self.modulo[i] > 0:
                values = torch.remainder(values, self.modulo[i])
            pooled.append(bag(values, offsets))
        vectors = [torch.stack(pooled, dim=1)]
        dense_emb = dense
        if self.has_dense:
            for lin in self.dense_arch:
                dense_emb = torch.relu(lin(dense_emb))
            vectors.insert(0, dense_emb.unsqueeze(1))
        stacked = torch.cat(vectors, dim=1)
        if self.dot:
            gram = torch.bmm(stacked, stacked.transpose(1, 2))
            x = gram[:, self.pairs[0], self.pairs[1]]
            if self.has_dense:
                x = torch.cat([dense_emb, x], dim=1)
        else:
            x = stacked.flatten(1)
        x0 = x
        for layer in self.cross:
            x = layer(x0, x)
        for lin in self.deep:
            x = torch.relu(lin(x))
        return self.head(x)

    def forward(self, sparse: Dict[str, Tuple[Tensor, Tensor]], dense: Tensor) -> Tensor:
        return self.score(sparse, self.transform(dense))


def from_export(export_dir, quantize: Optional[str] = None, portable: bool = False):
    """(ServingModel, the RankingModel it mirrors, export metadata) of a distkd export
    (sha256-verified)."""

    model, meta = load_export(export_dir)
    cfg = from_dict(ModelConfig, meta["model"], f"{export_dir}:model")
    return ServingModel(model.schema, cfg, model.state_dict(), quantize, portable), model, meta


@torch.no_grad()
def check_against(module: ServingModel, model, sparse: Dict[str, Tuple[Tensor, Tensor]], dense: Tensor) -> float:
    """The largest |logit difference| between the serving module and the distkd model on one
    batch (raw dense in; the model gets it transformed): 0.0 for a float module."""

    keys = module.features
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat([sparse[k][0] for k in keys]),
                            lengths=torch.cat([sparse[k][1].diff() for k in keys]).int())
    want = model(kjt, module.transform(dense)).logits
    return float((module(sparse, dense) - want).abs().max())
