"""Decoded rows as plain numpy buffers: what the loader slices, shuffles and batches.

`decode` turns one (sliced) Arrow row group into `Rows`, vectorized column by column:
sparse ids reduced modulo `hash_size`, dense transforms applied, labels as float32 with
NaN for null. `Rows` can be sliced, concatenated and permuted without per-row Python, so
batches that span two row groups, and shuffle windows, cost a few numpy copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from distkd.data.schema import LogsError, Schema

# A sparse feature: (values int64, offsets int64 [n+1] starting at 0), or offsets None
# when every row holds exactly one id (single-valued, no nulls: the fast path).
Jagged = tuple[np.ndarray, "np.ndarray | None"]


@dataclass
class Rows:
    ids: np.ndarray  # int64 [n]
    request: np.ndarray | None  # int64 [n]
    sparse: list[Jagged]  # one per schema.sparse, in order
    dense: np.ndarray  # float32 [n, n_dense]
    labels: np.ndarray  # float32 [n, n_tasks]
    extras: dict[str, np.ndarray]  # float32 [n] or [n, k]

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, a: int, b: int) -> "Rows":
        if a == 0 and b == len(self):
            return self
        return Rows(
            self.ids[a:b],
            None if self.request is None else self.request[a:b],
            [_jslice(j, a, b) for j in self.sparse],
            self.dense[a:b],
            self.labels[a:b],
            {k: v[a:b] for k, v in self.extras.items()},
        )

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(
            self.ids[idx],
            None if self.request is None else self.request[idx],
            [_jtake(j, idx) for j in self.sparse],
            self.dense[idx],
            self.labels[idx],
            {k: v[idx] for k, v in self.extras.items()},
        )

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        p0 = parts[0]
        return Rows(
            np.concatenate([p.ids for p in parts]),
            None if p0.request is None else np.concatenate([p.request for p in parts]),
            [_jconcat([p.sparse[i] for p in parts]) for i in range(len(p0.sparse))],
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.labels for p in parts]),
            {k: np.concatenate([p.extras[k] for p in parts]) for k in p0.extras},
        )


def lengths_of(j: Jagged, n: int) -> np.ndarray:
    values, offsets = j
    return np.ones(n, np.int32) if offsets is None else np.diff(offsets).astype(np.int32)


def _jslice(j: Jagged, a: int, b: int) -> Jagged:
    values, offsets = j
    if offsets is None:
        return values[a:b], None
    off = offsets[a : b + 1]
    return values[off[0] : off[-1]], off - off[0]


def _joffsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def _jtake(j: Jagged, idx: np.ndarray) -> Jagged:
    values, offsets = j
    if offsets is None:
        return values[idx], None
    lengths = np.diff(offsets)[idx]
    new = _joffsets(lengths)
    # Position k of the output row i reads offsets[idx[i]] + (k - new[i]).
    gather = np.repeat(offsets[:-1][idx] - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
    return values[gather], new


def _jconcat(parts: list[Jagged]) -> Jagged:
    if all(off is None for _, off in parts):
        return np.concatenate([v for v, _ in parts]), None
    lengths = np.concatenate([lengths_of(p, len(p[0]) if p[1] is None else len(p[1]) - 1) for p in parts])
    return np.concatenate([v for v, _ in parts]), _joffsets(lengths)


def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _int64(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _sparse(arr: pa.Array, source: str, name: str) -> Jagged:
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        if arr.null_count:
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
            values, offsets = arr.flatten(), _joffsets(lengths)
        else:
            off = arr.offsets.to_numpy()
            values = arr.values.slice(int(off[0]), int(off[-1] - off[0]))
            offsets = off.astype(np.int64) - int(off[0])
        if values.null_count:
            raise LogsError(f"{source}: column '{name}': null id inside a multi-valued feature")
        return _int64(values), offsets
    if arr.null_count:  # only reachable with check=False: a null becomes an empty bag
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        return _int64(arr.drop_null()), _joffsets(valid.astype(np.int64))
    return _int64(arr), None


def _floats(arr: pa.Array) -> np.ndarray:
    """A float (or fixed_size_list of floats) column as float32 [n] or [n, k], NaN for null."""
    if pa.types.is_fixed_size_list(arr.type):
        k = arr.type.list_size
        out = _floats(arr.values.slice(arr.offset * k, len(arr) * k)).reshape(len(arr), k)
        if arr.null_count:
            out = out.copy()
            out[~arr.is_valid().to_numpy(zero_copy_only=False)] = np.nan
        return out
    if not pa.types.is_floating(arr.type) or arr.null_count:
        arr = pc.cast(arr, pa.float32())
    return arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def decode(table: pa.Table, schema: Schema, source: str) -> Rows:
    """Decode the training columns of `table` (a sliced row group) into numpy buffers."""
    n = table.num_rows
    sparse = []
    for f in schema.sparse:
        values, offsets = _sparse(_array(table, f.name), source, f.name)
        if f.hash_size is not None and len(values) and (values.max() >= f.hash_size or values.min() < 0):
            values = np.remainder(values, f.hash_size)
        sparse.append((values, offsets))
    dense = np.empty((n, len(schema.dense)), np.float32)
    for j, f in enumerate(schema.dense):
        dense[:, j] = _floats(_array(table, f.name))
    # log1p(max(x, 0)) in torch, whose vectorized log1p is several times numpy's.
    logs = [j for j, f in enumerate(schema.dense) if f.transform == "log1p"]
    if len(logs) == len(schema.dense):
        torch.from_numpy(dense).clamp_(min=0).log1p_()
    elif logs:
        t = torch.from_numpy(dense)
        t[:, logs] = t[:, logs].clamp_(min=0).log1p_()
    labels = np.empty((n, len(schema.tasks)), np.float32)
    for j, t in enumerate(schema.tasks):
        labels[:, j] = _floats(_array(table, t.label))
    request = _int64(_array(table, schema.request_id)) if schema.request_id else None
    return Rows(_int64(_array(table, schema.id)), request, sparse, dense, labels, {})


def decode_extras(table: pa.Table, prefix: str, columns: list[str], source: str) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        if c not in table.column_names:
            raise LogsError(f"{source}: missing column '{c}'")
        out[f"{prefix}.{c}"] = _floats(_array(table, c))
    return out
