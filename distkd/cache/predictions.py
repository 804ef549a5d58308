"""Predictions computed elsewhere, as `distkd cache import` reads them.

A predictions file is Parquet holding the logs' id column (`example_id`, an integer) and the
teacher's logits for the logs' tasks, in either form:

    logits          list<float>, large_list<float> or fixed_size_list<float>[T]: the T tasks
                    in the schema's order (float16, float32 or float64)
    <task>, …       one float column per task, named like the schema's tasks

(`logits` is used when a file has both). Any number of files, rows in any order, any row
groups, local or in object storage (a path, a directory, a glob, or a URI with a glob).
`read_chunks` streams a file batch by batch (memory: one batch) and refuses, naming the
file, the row (0-based, within the file) and the example_id: a null id, a row without
exactly T logits, a non-finite logit, or one the cache's dtype cannot hold (fp16 overflow).
"""

from __future__ import annotations

import fnmatch
import glob
import re
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distkd import storage
from distkd.cache.contract import CacheError
from distkd.config import ConfigError

LOGITS = "logits"
_WILD = re.compile(r"[*?\[]")


def _glob(spec: str) -> list[str]:
    if not storage.is_remote(spec):
        return sorted(glob.glob(storage.local_path(spec), recursive=True))
    u = urlsplit(spec)
    parts = u.path.split("/")
    i = next(i for i, p in enumerate(parts) if _WILD.search(p))
    root = urlunsplit((u.scheme, u.netloc, "/".join(parts[:i]) or "/", u.query, ""))
    return [f for f in storage.list_files(root, recursive=True) if _matches(urlsplit(f).path, u.path)]


def _matches(path: str, pattern: str) -> bool:
    """As a local glob: `*` within a folder, `**` across folders."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    a, b = path.split("/"), pattern.split("/")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(x, y) for x, y in zip(a, b))


def find_files(specs: list[str]) -> list[str]:
    """The predictions files that `specs` name: each a file, a directory (its *.parquet, at any
    depth) or a glob, local or a URI; ConfigError for one that names none."""
    out: list[str] = []
    for spec in specs:
        if _WILD.search(urlsplit(spec).path if storage.is_remote(spec) else spec):
            found = [f for f in _glob(spec) if storage.size(f) is not None]
        elif storage.size(spec) is not None:
            found = [spec]
        else:
            found = [f for f in storage.list_files(spec, ".parquet", recursive=True)
                     if not storage.basename(f).startswith(".")]
        if not found:
            raise ConfigError(f"--predictions {spec}: no Parquet files there")
        out.extend(found)
    return list(dict.fromkeys(out))


def count_rows(path: str) -> int:
    """Rows of a predictions file, from its footer."""
    try:
        with storage.open_parquet(path) as pf:
            return pf.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, storage.StorageError):
            raise
        raise CacheError(f"{path}: cannot read the predictions file's Parquet footer: {e}") from None


def _columns(schema: pa.Schema, path: str, id_col: str, tasks: list[str]) -> list[str]:
    """The columns to read: the id and the logits (one list column, or one column per task)."""
    names = schema.names
    if id_col not in names or not pa.types.is_integer(schema.field(id_col).type):
        got = schema.field(id_col).type if id_col in names else "missing"
        raise CacheError(f"{path}: predictions need an integer '{id_col}' column (the logs' id); it is {got}")
    if LOGITS in names:
        t = schema.field(LOGITS).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                or not pa.types.is_floating(t.value_type):
            raise CacheError(f"{path}: column '{LOGITS}' is {t}; expected a list of floats (one a task: {tasks})")
        return [id_col, LOGITS]
    present = [t for t in tasks if t in names]
    if not present:
        raise CacheError(f"{path}: no '{LOGITS}' column and no column per task ({tasks}); "
                         f"the file has {names[:8]}")
    for t in present:
        if not pa.types.is_floating(schema.field(t).type):
            raise CacheError(f"{path}: task column '{t}' is {schema.field(t).type}; expected floats")
    return [id_col, *present]


def _refuse(path: str, row0: int, r: int, ids: np.ndarray, what: str) -> CacheError:
    return CacheError(f"{path} row {row0 + r}: example_id {int(ids[r])} {what}")


def _logits(batch: pa.RecordBatch, path: str, row0: int, ids: np.ndarray, tasks: list[str]) -> np.ndarray:
    """The batch's logits [n, T], as stored (float16/32/64)."""
    n, want = batch.num_rows, len(tasks)
    if LOGITS not in batch.schema.names:
        missing = [t for t in tasks if t not in batch.schema.names]
        if missing:
            raise _refuse(path, row0, 0, ids, f"has logits for {want - len(missing)} tasks: the file has no column "
                          f"for {missing} (the logs have {want} tasks: {tasks})")
        return np.stack([batch.column(t).to_numpy(zero_copy_only=False) for t in tasks], axis=1)
    col = batch.column(LOGITS)
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
    if (bad := np.flatnonzero(lengths != want)).size:
        r = int(bad[0])
        got = "no logits (null)" if lengths[r] < 0 else f"{int(lengths[r])} logits"
        raise _refuse(path, row0, r, ids, f"has {got}; the logs have {want} tasks ({tasks})"
                      + (f" ({bad.size} such rows in this batch)" if bad.size > 1 else ""))
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(n, want)


def _cast(z: np.ndarray, dtype: np.dtype, path: str, row0: int, ids: np.ndarray) -> np.ndarray:
    """`z` in the cache's dtype; a non-finite logit (or null), or one beyond the dtype, refused."""
    if (bad := np.flatnonzero(~np.isfinite(z).all(axis=1))).size:
        r = int(bad[0])
        raise _refuse(path, row0, r, ids, f"has a non-finite logit {z[r].tolist()} (NaN, inf or null)")
    with np.errstate(over="ignore"):  # an overflow is found below and named
        out = z.astype(dtype)
    if (bad := np.flatnonzero(~np.isfinite(out).all(axis=1))).size:
        r = int(bad[0])
        raise _refuse(path, row0, r, ids, f"has logits {z[r].tolist()} beyond the {np.dtype(dtype).name} range; "
                      "import with --dtype fp32")
    return out


def read_chunks(path: str, id_col: str, tasks: list[str], dtype: np.dtype,
                batch_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, example_ids int64 [n], logits [n, T] in `dtype`) of each batch of a file."""
    try:
        with storage.open_parquet(path) as pf:
            cols = _columns(pf.schema_arrow, path, id_col, tasks)
            row0 = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                id_arr = batch.column(id_col)
                if id_arr.null_count:
                    r = int(np.flatnonzero(id_arr.is_null().to_numpy(zero_copy_only=False))[0])
                    raise CacheError(f"{path} row {row0 + r}: example_id is null")
                ids = id_arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                yield row0, ids, _cast(_logits(batch, path, row0, ids, tasks), dtype, path, row0, ids)
                row0 += batch.num_rows
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, storage.StorageError):
            raise
        raise CacheError(f"{path}: cannot read the predictions: {e}") from None
