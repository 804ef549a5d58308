"""Decoded rows as plain numpy buffers: what the loader slices, shuffles and batches.

`decode` turns one (sliced) Arrow row group into `Rows`, vectorized column by column:
sparse ids reduced modulo `hash_size` (string ids hashed into it), dense values cast to
float32 and transformed, labels as float32 with NaN for null (or NaN). It is where every
caller (the training loader, the cache build's workers, evaluation) turns logs into model
inputs, so all apply the same transforms, from the schema they are given (its parameters
included: see distkd.data.schema). `Rows` can be sliced, concatenated and permuted without
per-row Python, so batches that span two row groups, and shuffle windows, cost a few numpy
copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from distkd.data.hashing import hash_ids, hash_strings
from distkd.data.jagged import Jagged, Sparse, joffsets
from distkd.data.schema import STANDARDIZED, LogsError, MissingStats, Schema, SparseFeature


@dataclass
class Rows:
    ids: np.ndarray  # int64 [n]
    request: np.ndarray | None  # int64 [n]
    block: Sparse  # the sparse features (schema.sparse, in order): see distkd.data.jagged
    dense: np.ndarray  # float32 [n, n_dense]
    labels: np.ndarray  # float32 [n, binary tasks], NaN for none
    extras: dict[str, np.ndarray]  # float32 [n] or [n, k] (int64 for cached item ids)
    classes: np.ndarray | None = None  # int64 [n, multiclass tasks], -1 for none

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sparse(self) -> list[Jagged]:
        """One (values, offsets) per schema.sparse feature, offsets None for one id a row."""
        return self.block.features()

    def slice(self, a: int, b: int) -> "Rows":
        if a == 0 and b == len(self):
            return self
        return Rows(
            self.ids[a:b],
            None if self.request is None else self.request[a:b],
            self.block.slice(a, b),
            self.dense[a:b],
            self.labels[a:b],
            {k: v[a:b] for k, v in self.extras.items()},
            None if self.classes is None else self.classes[a:b],
        )

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(
            self.ids[idx],
            None if self.request is None else self.request[idx],
            self.block.take(idx),
            self.dense[idx],
            self.labels[idx],
            {k: v[idx] for k, v in self.extras.items()},
            None if self.classes is None else self.classes[idx],
        )

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        p0 = parts[0]
        return Rows(
            np.concatenate([p.ids for p in parts]),
            None if p0.request is None else np.concatenate([p.request for p in parts]),
            Sparse.concat([p.block for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.labels for p in parts]),
            {k: np.concatenate([p.extras[k] for p in parts]) for k in p0.extras},
            None if p0.classes is None else np.concatenate([p.classes for p in parts]),
        )


def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _int64(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


_INT64 = pa.int64().id


def raw_ids(arr: pa.Array, f: SparseFeature) -> np.ndarray:
    """The ids of a null-free array as the table sees them before any modulo: int64 (uint64
    where an unsigned id is past int64), or, for a hashed feature, the 64-bit string hash."""
    if f.hash is not None:
        return hash_strings(arr, f.hash.seed)
    if isinstance(arr, pa.DictionaryArray):
        return raw_ids(arr.dictionary, f)[arr.indices.to_numpy(zero_copy_only=False)]
    v = arr.to_numpy(zero_copy_only=False)
    if v.dtype == np.uint64 and len(v) and v.max() > np.iinfo(np.int64).max:
        return v
    return v.astype(np.int64, copy=False)


def _ids(arr: pa.Array, f: SparseFeature) -> np.ndarray:
    """Table rows of a null-free id array: int64, hashed or reduced modulo hash_size."""
    if f.hash is not None:
        return hash_ids(arr, f.hash.seed, f.hash_size)  # type: ignore[arg-type]
    if arr.type.id == _INT64:  # the canonical type: as it always was
        values = _int64(arr)
    else:
        values = raw_ids(arr, f)
        if values.dtype == np.uint64:  # past int64: only a hash_size can bring it into a table
            values = (values % np.uint64(f.rows)).astype(np.int64)
    if f.hash_size is not None and len(values) and (values.max() >= f.hash_size or values.min() < 0):
        values = np.remainder(values, f.hash_size)
    return values


def _sparse(arr: pa.Array, source: str, f: SparseFeature) -> Jagged:
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        if arr.null_count:
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
            values, offsets = arr.flatten(), joffsets(lengths)
        else:
            off = arr.offsets.to_numpy()
            values = arr.values.slice(int(off[0]), int(off[-1] - off[0]))
            offsets = off.astype(np.int64) - int(off[0])
        if values.null_count:
            raise LogsError(f"{source}: column '{f.name}': null id inside a multi-valued feature")
        return _ids(values, f), offsets
    if arr.null_count:  # only reachable with check=False: a null becomes an empty bag
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        return _ids(arr.drop_null(), f), joffsets(valid.astype(np.int64))
    return _ids(arr, f), None


def _floats(arr: pa.Array) -> np.ndarray:
    """A numeric, bool or dictionary (or fixed_size_list of floats) column as float32 [n] or
    [n, k], NaN for null. A finite float64 past float32 becomes inf (checks refuse it first)."""
    if pa.types.is_fixed_size_list(arr.type):
        k = arr.type.list_size
        out = _floats(arr.values.slice(arr.offset * k, len(arr) * k)).reshape(len(arr), k)
        if arr.null_count:
            out = out.copy()
            out[~arr.is_valid().to_numpy(zero_copy_only=False)] = np.nan
        return out
    if isinstance(arr, pa.DictionaryArray):
        arr = arr.dictionary_decode()
    if not pa.types.is_floating(arr.type) or arr.null_count:
        arr = pc.cast(arr, pa.float32() if not pa.types.is_float64(arr.type) else pa.float64(), safe=False)
    v = arr.to_numpy(zero_copy_only=False)
    if v.dtype == np.float32:
        return v
    with np.errstate(over="ignore"):
        return v.astype(np.float32)


def column_floats(table: pa.Table, name: str) -> np.ndarray:
    """Column `name` of a table (any type labels or dense features may have) as float32, NaN for null."""
    return _floats(_array(table, name))


def _standardize(dense: np.ndarray, schema: Schema, cols: list[int]) -> None:
    """z = (x - mean) / std clipped to +-clip, in place; mean and std of log1p values for
    log1p_standardize (the log1p is already applied). A constant feature (std 0) becomes 0."""
    fs = [schema.dense[j] for j in cols]
    mean = [f.params.mean for f in fs]  # type: ignore[union-attr]
    inv = [1.0 / f.params.std if f.params.std > 0 else 1.0 for f in fs]  # type: ignore[union-attr]
    clip = [f.z_clip for f in fs]
    t = torch.from_numpy(dense)
    if len(cols) == dense.shape[1]:  # one broadcast pass each over the whole matrix
        c = torch.tensor(clip)
        t.sub_(torch.tensor(mean)).mul_(torch.tensor(inv)).clamp_(min=-c, max=c)
        return
    for j, m, k, c in zip(cols, mean, inv, clip):  # column views: no gather, no scatter
        t[:, j].sub_(m).mul_(k).clamp_(-c, c)


def _quantile(x: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """The empirical CDF at x, in [0, 1]: piecewise linear through the stored quantiles, a run
    of equal quantiles (a value many rows share) mapping to the middle of its probabilities."""
    q = np.asarray(quantiles, np.float64)
    u, inv = np.unique(q, return_inverse=True)
    p = np.bincount(inv, np.linspace(0.0, 1.0, len(q))) / np.bincount(inv)
    return np.interp(x, u, p).astype(np.float32)


def transform(dense: np.ndarray, schema: Schema, source: str) -> None:
    """Apply every dense feature's transform in place."""
    missing = schema.missing_stats()
    if missing:
        f = next(f for f in schema.dense if f.name == missing[0])
        raise MissingStats(f"{source}: dense feature '{f.name}': transform '{f.transform}' needs statistics the "
                           "schema does not carry; run `distkd data stats LOGS` and load it with load_schema(LOGS)")
    # log1p(max(x, 0)) in torch, whose vectorized log1p is several times numpy's.
    logs = [j for j, f in enumerate(schema.dense) if f.transform in ("log1p", "log1p_standardize")]
    if len(logs) == len(schema.dense):
        torch.from_numpy(dense).clamp_(min=0).log1p_()
    elif logs:
        t = torch.from_numpy(dense)
        t[:, logs] = t[:, logs].clamp_(min=0).log1p_()
    z = [j for j, f in enumerate(schema.dense) if f.transform in STANDARDIZED]
    if z:
        _standardize(dense, schema, z)
    for j, f in enumerate(schema.dense):
        if f.transform == "quantile":
            dense[:, j] = _quantile(dense[:, j], f.params.quantiles)  # type: ignore[union-attr, arg-type]


def decode(table: pa.Table, schema: Schema, source: str, *, transformed: bool = True) -> Rows:
    """Decode the training columns of `table` (a sliced row group) into numpy buffers; with
    `transformed=False` the dense values are left as read (see `transform`)."""
    n = table.num_rows
    sparse = Sparse.of([_sparse(_array(table, f.name), source, f) for f in schema.sparse], n)
    dense = np.empty((n, len(schema.dense)), np.float32)
    for j, f in enumerate(schema.dense):
        dense[:, j] = _floats(_array(table, f.name))
    if transformed:
        transform(dense, schema, source)
    labels = np.empty((n, len(schema.binary)), np.float32)
    for j, t in enumerate(schema.binary):
        labels[:, j] = _floats(_array(table, t.label))
    classes = None
    if schema.classes:
        classes = np.empty((n, len(schema.classes)), np.int64)
        for j, t in enumerate(schema.classes):
            arr = _array(table, t.label)
            if isinstance(arr, pa.DictionaryArray):
                arr = arr.dictionary_decode()
            classes[:, j] = pc.fill_null(pc.cast(arr, pa.int64()), -1).to_numpy(zero_copy_only=False)
    request = _int64(_array(table, schema.request_id)) if schema.request_id else None
    return Rows(_int64(_array(table, schema.id)), request, sparse, dense, labels, {}, classes)


def decode_extras(table: pa.Table, prefix: str, columns: list[str], source: str) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        if c not in table.column_names:
            raise LogsError(f"{source}: missing column '{c}'")
        out[f"{prefix}.{c}"] = _floats(_array(table, c))
    return out
