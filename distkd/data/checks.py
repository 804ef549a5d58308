"""Vectorized checks of one decoded row group against the logs contract.

The loader runs them on every row group it decodes (cheap: a few min/max and null
counts per column), `distkd data validate` runs them on every shard. Each failure
raises `LogsError` naming the file, row group, column and first bad row (row index
within the file). Columns of the accepted non-canonical types (see distkd.data.schema) are
checked on the values decode will produce: dictionaries decoded, float64 against float32's
range, float labels with NaN as "no label".
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distkd.data.schema import DenseFeature, LogsError, Schema, SparseFeature, Task


def _first_true(mask: pa.Array | np.ndarray) -> int:
    arr = mask.to_numpy(zero_copy_only=False) if not isinstance(mask, np.ndarray) else mask
    return int(np.flatnonzero(arr)[0])


F32_MAX = float(np.finfo(np.float32).max)


def _plain(col: pa.Array) -> pa.Array:
    return col.dictionary_decode() if isinstance(col, pa.DictionaryArray) else col


def _where(source: str, row_group: int, row0: int, column: str, i: int) -> str:
    return f"{source}: row group {row_group}, column '{column}', row {row0 + i}"


def check_row_group(table: pa.Table, schema: Schema, source: str, row_group: int = 0, row0: int = 0) -> None:
    """Raise LogsError on the first contract violation in `table` (one row group).

    `row0` is the file row index of the table's first row, so messages point at the row.
    """
    where = (source, row_group, row0)
    check_ids(table, schema, where)
    for f in schema.sparse:
        check_sparse(table, f, where)
    for f in schema.dense:
        check_dense(table, f, where)
    for t in schema.classes:
        check_classes(table, t, where)
    for t in schema.binary:
        check_binary(table, t, where)


Where = tuple[str, int, int]  # (source, row group, file row of the table's first row)


def check_ids(table: pa.Table, schema: Schema, where: Where) -> None:
    ids = table.column(schema.id)
    if ids.null_count:
        i = _first_true(pc.is_null(ids).combine_chunks())
        raise LogsError(f"{_where(*where, schema.id, i)}: null {schema.id}")


def check_sparse(table: pa.Table, f: SparseFeature, where: Where) -> None:
    col = table.column(f.name).combine_chunks()
    if f.multi_valued:
        values = col.flatten()
        # Which row a bad flattened value belongs to: searchsorted on the offsets.
        offsets = col.offsets.to_numpy()
        offsets = offsets - offsets[0]  # flatten() starts at the first list's values
        if values.null_count:
            j = _first_true(pc.is_null(values))
            i = int(np.searchsorted(offsets, j, side="right") - 1)
            raise LogsError(f"{_where(*where, f.name, i)}: null id inside a multi-valued list")
    else:
        if col.null_count:
            i = _first_true(pc.is_null(col))
            raise LogsError(f"{_where(*where, f.name, i)}: null id in a single-valued feature")
        values, offsets = col, None
    if len(values) == 0 or f.hash is not None:  # any string hashes into the table
        return
    v = _plain(values).to_numpy(zero_copy_only=False)
    lo, hi = v.min(), v.max()
    bad = None
    if lo < 0:
        bad, what = v < 0, "negative id"
    elif f.num_embeddings is not None and hi >= f.num_embeddings:
        bad, what = v >= f.num_embeddings, f"id out of range [0, {f.num_embeddings})"
    if bad is not None:
        j = int(np.flatnonzero(bad)[0])
        i = j if offsets is None else int(np.searchsorted(offsets, j, side="right") - 1)
        raise LogsError(f"{_where(*where, f.name, i)}: {what}: {int(v[j])}")


def check_dense(table: pa.Table, f: DenseFeature, where: Where) -> None:
    col = _plain(table.column(f.name).combine_chunks())
    if col.null_count:
        i = _first_true(pc.is_null(col))
        raise LogsError(f"{_where(*where, f.name, i)}: null dense value")
    if not pa.types.is_floating(col.type):
        return  # integers: always finite, and within float32's range
    v = col.to_numpy(zero_copy_only=False)
    finite = np.isfinite(v)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise LogsError(f"{_where(*where, f.name, i)}: dense value is {v[i]}")
    if v.dtype == np.float64 and len(v) and max(v.max(), -v.min()) > F32_MAX:
        i = int(np.flatnonzero(np.abs(v) > F32_MAX)[0])
        raise LogsError(f"{_where(*where, f.name, i)}: dense value {float(v[i])!r} overflows float32")


def check_classes(table: pa.Table, t: Task, where: Where) -> None:
    col = _plain(table.column(t.label).combine_chunks())
    v = col.to_numpy(zero_copy_only=False) if not col.null_count else pc.fill_null(col, 0).to_numpy()
    bad = (v < 0) | (v >= t.num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LogsError(f"{_where(*where, t.label, i)}: class {int(v[i])} is not in "
                        f"[0, {t.num_classes}) (num_classes of task '{t.name}')")


def check_binary(table: pa.Table, t: Task, where: Where) -> None:
    col = _plain(table.column(t.label).combine_chunks())
    if pa.types.is_boolean(col.type):
        return
    bad = pc.and_(pc.not_equal(col, 0), pc.not_equal(col, 1))
    if pa.types.is_floating(col.type):  # NaN, like null, is a row without a label
        bad = pc.and_(bad, pc.invert(pc.is_nan(col)))
    bad = pc.and_(pc.is_valid(col), bad)
    if pc.any(bad).as_py():
        i = _first_true(pc.fill_null(bad, False))
        raise LogsError(f"{_where(*where, t.label, i)}: label {col[i].as_py()} is not 0, 1 or null")
