"""Decode a row group and check it against the logs contract in the same few passes.

`check_row_group` (distkd.data.checks) walks the Arrow table column by column. The loader
decodes every row group anyway, so here the checks run on what decode produced, a handful of
vectorised passes for all columns together: one unsigned max per single-id feature row of the
sparse matrix (a negative id is a huge unsigned one, so `max >= num_embeddings` catches both
ways out of range), one sum over the dense matrix (NaN or inf anywhere, a null that became
NaN, a float64 past float32 that became inf, all make it non-finite), and one 0/1/NaN test
over the labels.

They catch exactly what `check_row_group` catches. A column whose decoded values could hide a
violation (hashed or hash_size ids, ids not stored as int64, float64 dense or label values,
multi-class labels) is checked by its own precise function from distkd.data.checks. Any sign
of trouble in the vectorised passes runs the whole `check_row_group`, so the error raised is
the same, message and all; a false alarm (a float32 sum that overflows on large but finite
values) costs that one precise pass and is no error.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distkd.data.checks import (check_binary, check_classes, check_dense, check_row_group, check_sparse)
from distkd.data.rows import Rows, decode, transform
from distkd.data.schema import LogsError, Schema, SparseFeature

__all__ = ["decode_checked"]

_NO_LIMIT = np.uint64(1 << 63)  # ids must be >= 0: as unsigned, below 2**63


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else t


def _id_limit(f: SparseFeature, t: pa.DataType) -> np.uint64 | None:
    """The unsigned bound a decoded id must stay under, or None where decode changes the ids
    (hashing, hash_size, another integer type) and the raw column needs the precise check."""
    if f.hash is not None or f.hash_size is not None or _value_type(t) != pa.int64():
        return None
    return _NO_LIMIT if f.num_embeddings is None else np.uint64(f.num_embeddings)


def _exact_floats(t: pa.DataType) -> bool:
    """Decoding to float32 keeps every value of this type as it is (0/1/NaN tests stay exact)."""
    return pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_float16(t) or pa.types.is_float32(t)


def _clean(rows: Rows, limits: list[np.uint64 | None], dense: list[int], labels: list[int]) -> bool:
    """Whether the vectorised passes see nothing wrong with the columns they cover."""
    if not len(rows):
        return True
    block = rows.block
    single = [lim for lim, m in zip(limits, block.is_multi) if not m]
    rows_checked = [i for i, lim in enumerate(single) if lim is not None]
    if rows_checked:
        mat = block.single if len(rows_checked) == len(single) else block.single[rows_checked]
        if (mat.view(np.uint64).max(axis=1) >= np.array([single[i] for i in rows_checked], np.uint64)).any():
            return False
    multi = [lim for lim, m in zip(limits, block.is_multi) if m]
    for (values, _), lim in zip(block.multi, multi):
        if lim is not None and len(values) and values.view(np.uint64).max() >= lim:
            return False
    if dense:
        mat = rows.dense if len(dense) == rows.dense.shape[1] else rows.dense[:, dense]
        with np.errstate(over="ignore"):  # large finite values: a false alarm, checked precisely
            if not np.isfinite(mat.sum()):
                return False
    if labels:
        lab = rows.labels if len(labels) == rows.labels.shape[1] else rows.labels[:, labels]
        if not ((lab == 0) | (lab == 1) | np.isnan(lab)).all():
            return False
    return True


def decode_checked(table: pa.Table, schema: Schema, source: str, row_group: int, row0: int) -> Rows:
    """`decode(table)` of a whole row group, after checking it as `check_row_group` would."""
    where = (source, row_group, row0)
    types = table.schema
    if table.column(schema.id).null_count or any(table.column(f.name).null_count for f in schema.sparse
                                                  if not f.multi_valued):
        check_row_group(table, schema, *where)  # refused nulls decode to empty bags: look at the table
    try:
        rows = decode(table, schema, source, transformed=False)
    except LogsError:
        check_row_group(table, schema, *where)
        raise
    limits = [_id_limit(f, types.field(f.name).type) for f in schema.sparse]
    f64 = [pa.types.is_float64(types.field(f.name).type) for f in schema.dense]
    labels = [j for j, t in enumerate(schema.binary) if _exact_floats(types.field(t.label).type)]
    if not _clean(rows, limits, [j for j, x in enumerate(f64) if not x], labels):
        check_row_group(table, schema, *where)  # raises, with the message it always had
    # The columns the vectorised passes cannot vouch for, in check_row_group's order.
    for f, lim in zip(schema.sparse, limits):
        if lim is None:
            check_sparse(table, f, where)
    for f, x in zip(schema.dense, f64):
        if x:
            check_dense(table, f, where)
    for t in schema.classes:
        check_classes(table, t, where)
    for j, t in enumerate(schema.binary):
        if j not in labels:
            check_binary(table, t, where)
    transform(rows.dense, schema, source)
    return rows
