"""The serving file's input contract: what a caller must hand the module, written as JSON.

`contract.json` sits beside the serving file(s) and is embedded in each of them (TorchScript
`_extra_files`, torch.export `extra_files`: "contract.json"), so a file that travels alone
still says how to call it. It states the features in order with their tables and hashing,
the dense features with their transforms and statistics (applied inside the module), the
tasks, the exact tensors in and out, and what loading needs (torch only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch

from distkd.config import to_dict
from distkd.data.schema import Schema

CONTRACT_FORMAT = 1
CONTRACT_FILE = "contract.json"
LOADERS = {
    "torchscript": "torch.jit.load(path)",
    "pt2": "torch.export.load(path).module()",
    "onnx": "onnxruntime.InferenceSession(path) (inputs flattened: see onnx_inputs)",
}


def _sparse(schema: Schema) -> list[dict[str, Any]]:
    out = []
    for i, f in enumerate(schema.sparse):
        if f.hash is not None:
            ids = {"type": "string (or binary)", "to_row": f"fnv1a_fmix64(utf-8 bytes, seed={f.hash.seed}) mod "
                   f"{f.hash_size}, done by the caller (distkd/data/hashing.py: FNV-1a 64 from offset basis "
                   "0xcbf29ce484222325 XOR seed, prime 0x100000001b3, then MurmurHash3's fmix64)",
                   "hash": {"function": f.hash.function, "seed": f.hash.seed}}
        elif f.hash_size is not None:
            ids = {"type": "int64", "to_row": f"mod {f.hash_size} (floor modulo), done inside the module"}
        else:
            ids = {"type": "int64", "to_row": f"the id is the row: 0 <= id < {f.num_embeddings}"}
        out.append({"index": i, "name": f.name, "rows": f.rows, "hash_size": f.hash_size,
                    "num_embeddings": f.num_embeddings, "multi_valued": f.multi_valued,
                    "pooling": "mean" if f.multi_valued else "sum", "ids": ids})
    return out


def _dense(schema: Schema) -> list[dict[str, Any]]:
    formulas = {
        "none": "x",
        "log1p": "log1p(max(x, 0))",
        "standardize": "clip((x - mean) / std, -clip, clip) (std 0: x - mean)",
        "log1p_standardize": "clip((log1p(max(x, 0)) - mean) / std, -clip, clip) (std 0: minus mean only)",
        "quantile": "empirical CDF: linear interpolation through params.quantiles at probabilities "
                    "linspace(0, 1, n) (ties: their mean probability), 0 below, 1 above",
    }
    out = []
    for i, f in enumerate(schema.dense):
        d = {"index": i, "name": f.name, "transform": f.transform, "formula": formulas[f.transform],
             "params": to_dict(f.params) if f.params is not None else None}
        if f.transform in ("standardize", "log1p_standardize"):
            d["clip"] = f.z_clip
        out.append(d)
    return out


def contract(schema: Schema, meta: dict[str, Any], export_dir: str) -> dict[str, Any]:
    """The contract of the serving module of the export `meta` (its export.json) for `schema`."""
    tasks = schema.task_names
    return {
        "format": CONTRACT_FORMAT,
        "kind": "distkd-serving-contract",
        "model": {"export": str(export_dir), "sha256": meta["sha256"], "role": meta.get("role"),
                  "parameters": meta.get("parameters"), "schema_fingerprint": schema.fingerprint()},
        "call": "logits = model(sparse, dense)",
        "inputs": {
            "sparse": {
                "form": "dict: {feature name: (values, offsets)}, one entry per feature below, in this order",
                "values": "int64 [N_f]: the ids of all B rows, row after row (see each feature's ids.to_row)",
                "offsets": "int64 [B+1]: row b's ids are values[offsets[b]:offsets[b+1]]; offsets[0] = 0, "
                           "offsets[B] = N_f; a single-valued feature has offsets = 0..B (an empty bag pools to 0)",
                "features": _sparse(schema),
            },
            "dense": {
                "tensor": f"float32 [B, {len(schema.dense)}], columns in this order, RAW values (NaN for missing): "
                          "the module applies each transform itself, with the statistics below",
                "features": _dense(schema),
            },
        },
        "outputs": {"logits": f"float32 [B, {len(tasks)}]: one logit per task, in this order; probability = "
                              "sigmoid(logit)", "tasks": tasks},
        "runtime": {"needs": f"torch (written with {torch.__version__}); not distkd, not torchrec, not fbgemm",
                    "threads": "torch.set_num_threads(n) before the first call sets the CPU threads"},
        "files": {},
    }


def file_entry(fmt: str, path, quantize: Optional[str], sha256: str, size: int, checks: dict) -> dict[str, Any]:
    return {"file": path.name, "format": fmt, "load": LOADERS[fmt], "quantization": quantize,
            "quantization_note": ("embedding tables int8 row-wise (FBGEMM's 8-bit format): uint8 per element, "
                                  "float32 scale and bias per row (w = q * scale + bias); pooled by "
                                  "torch.ops.quantized.embedding_bag_byte_rowwise_offsets (ONNX: plain ops)")
            if quantize else None,
            "bytes": size, "sha256": sha256, "checks": checks}


def example_inputs(schema: Schema, rows: int, seed: int = 0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                     torch.Tensor]:
    """Random inputs of the contract's form (ids in range, bags of 0-3 ids for list features,
    non-negative raw dense): for tracing and for the self-checks of a written file."""
    g = np.random.default_rng(seed)
    sparse = {}
    for f in schema.sparse:
        lengths = g.integers(0, 4, rows) if f.multi_valued else np.ones(rows, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        sparse[f.name] = (torch.from_numpy(g.integers(0, f.rows, int(offsets[-1])).astype(np.int64)),
                          torch.from_numpy(offsets))
    dense = torch.from_numpy(g.exponential(3.0, (rows, len(schema.dense))).astype(np.float32))
    return sparse, dense


def rows_to_inputs(rows, keys: list[str]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Decoded log rows (distkd.data.rows.Rows) in the contract's form (dense as decoded)."""
    n = len(rows)
    sparse = {}
    for k, (values, offsets) in zip(keys, rows.sparse):
        off = np.arange(n + 1, dtype=np.int64) if offsets is None else offsets.astype(np.int64)
        sparse[k] = (torch.from_numpy(np.array(values, np.int64)), torch.from_numpy(np.array(off)))
    return sparse, torch.from_numpy(np.array(rows.dense, np.float32))


def raw_schema(schema: Schema) -> Schema:
    """The schema with every dense transform off: decoding with it gives the raw dense values."""
    return dataclasses.replace(schema, dense=[dataclasses.replace(f, transform="none", clip=None, params=None)
                                              for f in schema.dense])
