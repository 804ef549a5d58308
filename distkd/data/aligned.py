"""Side files aligned with the log shards (cached teacher logits, ...): what the loader joins.

A side file has the same rows and row groups as its log shard, so the join is positional;
`Aligned.check` verifies it per row group (a cache compares example ids or checksums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from distkd.data.rows import decode_extras

__all__ = ["Aligned", "SideFiles"]


class Aligned:
    """A side file per log shard with the same rows and row groups (e.g. cached teacher logits).

    Subclasses say where a shard's side file is and how to check that a side row group holds
    the log's rows; instances travel to ranks (pickled), so they hold plain data."""

    name: str
    columns: list[str]  # float columns (or fixed_size_list of floats) -> extras[f"{name}.{col}"]
    check_columns: Sequence[str] = ()  # more side columns to read, only for `check` (e.g. example_id)

    def side_path(self, log_path: str) -> str:
        raise NotImplementedError

    def pin(self):
        """Called once by each loader that reads these files; what it returns is held for the
        loader's life (a cache holds a reader lock against garbage collection)."""
        return None

    def check(self, log_table: pa.Table, side_table: pa.Table, log_path: str, g: int) -> None:
        """Raise on misalignment of row group `g` (default: row counts only, checked by the loader)."""

    def read_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.columns, *self.check_columns]))

    def decode(self, table: pa.Table, source: str) -> dict[str, np.ndarray]:
        """The batch extras of a side row group (slice): `{name}.{column}` as float32."""
        return decode_extras(table, self.name, self.columns, source)


@dataclass
class SideFiles(Aligned):
    """An `Aligned` from functions (module-level ones, to be picklable)."""

    name: str
    path_for: Callable[[str], str]  # log shard path -> side file path
    columns: list[str]
    check_fn: Callable[[pa.Table, pa.Table, str, int], None] | None = None
    check_columns: Sequence[str] = ()

    def side_path(self, log_path: str) -> str:
        return self.path_for(log_path)

    def check(self, log_table: pa.Table, side_table: pa.Table, log_path: str, g: int) -> None:
        if self.check_fn is not None:
            self.check_fn(log_table, side_table, log_path, g)
