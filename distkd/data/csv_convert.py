"""What every converter of a CSV release into logs does the same way (MovieLens, its next-item
variant, Instacart): read the columns with their types, naming the file, column, line and value
of anything wrong; map raw ids to dense indices; prepare the output folder; write each shard
atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from distkd.config import ConfigError
from distkd.data.schema import LogsError
from distkd.storage import atomic_write_bytes

NUMBER = {pa.int64(): r"^\s*[-+]?\d+\s*$", pa.float64(): r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"}


def read_csv(path: Path, columns: dict[str, pa.DataType], what: str, nullable: tuple[str, ...] = ()) -> pa.Table:
    """The `columns` of the CSV at `path` (`what`: what it should be, for the messages); an empty
    value is refused outside `nullable`."""
    if not path.is_file():
        raise LogsError(f"{path}: file not found (expected {what} with columns {list(columns)})")
    try:
        header = pacsv.open_csv(path).schema.names
    except (pa.ArrowException, OSError) as e:
        raise LogsError(f"{path}: cannot read as CSV: {e}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise LogsError(f"{path}: missing column(s) {missing} (header has {header})")
    opts = pacsv.ConvertOptions(column_types=columns, include_columns=list(columns))
    try:
        table = pacsv.read_csv(path, convert_options=opts)
    except (pa.ArrowException, OSError) as e:
        raise LogsError(f"{path}: {bad_value(path, columns, e)}") from None
    for name in columns:
        col = table.column(name)
        if col.null_count and name not in nullable:
            i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise LogsError(f"{path}: column '{name}': empty or null value on line {i + 2}")
    return table


def bad_value(path: Path, columns: dict, error: Exception) -> str:
    """Name the column, line and value behind a CSV conversion error (pyarrow gives only a column index)."""
    for name, dtype in columns.items():
        if dtype not in NUMBER:
            continue
        opts = pacsv.ConvertOptions(column_types={name: pa.string()}, include_columns=[name], strings_can_be_null=True)
        col = pacsv.read_csv(path, convert_options=opts).column(name)
        bad = pc.invert(pc.match_substring_regex(col, NUMBER[dtype])).to_numpy(zero_copy_only=False)
        bad &= col.is_valid().to_numpy(zero_copy_only=False)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"column '{name}': value {col[i].as_py()!r} on line {i + 2} is not a valid {dtype}"
    return f"unparsable value: {' '.join(str(error).split())}"


def dense_index(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Map ids to [0, number of distinct ids), keeping their order (a lookup table when the id range is
    small, as MovieLens userIds are; np.unique otherwise)."""
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo < 1 << 26:
        present = np.zeros(hi - lo + 1, bool)
        present[ids - lo] = True
        return (np.cumsum(present) - 1)[ids - lo], int(present.sum())
    uniq, index = np.unique(ids, return_inverse=True)
    return index, len(uniq)


def prepare_out(src: Path, out: Path, force: bool, remove: bool) -> None:
    """Refuse an output folder that is not empty (unless `force`) or that holds the source; with
    `remove`, clear it (called once before the long read, to fail fast, and again to write)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out}: directory exists and is not empty; pass --force (force=True) to replace it")
        if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
            raise ConfigError(f"{out}: refusing to replace a directory that holds the source {src}")
        if remove:
            shutil.rmtree(out)


def write_atomic(table: pa.Table, path: Path, row_group_rows: int) -> None:
    """A crash never leaves a half file under the final name."""
    atomic_write_bytes(path, lambda fh: pq.write_table(table, fh, row_group_size=row_group_rows))
