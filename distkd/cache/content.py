"""What a cache file holds, one strategy per kind of teacher, chosen once from the manifest.

    CtrLogits     per-task logits, fp16 or fp32, and optionally the teacher's last hidden
                  layer (fp16):  logits fixed_size_list<float16 | float32>[T],
                                 hidden fixed_size_list<float16>[H]
    NextItemTopK  a next-item teacher's top-k of the catalog, log-sum-exp and sampled tail
                  (the columns and their packing: distkd.cache.topk)

Each owns the files' Arrow schema and Parquet options, encoding a batch of teacher output into
columns (`encode` per batch, `table` per row group), decoding for the loader, validating a
file's schema, what recomputation compares, and the per-row accounting. The build, worker,
reader, recompute and verify ask `codec_for(manifest.content)` and hold no branch on the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import pyarrow as pa
import torch

from distkd.cache.contract import CacheError, Content
from distkd.cache.topk import TopKFormat, pack, select, unpack
from distkd.data.rows import decode_extras
from distkd.models.teacher import TeacherOutput
from distkd.models.teacher_spec import TeacherError

DTYPES = {"fp16": pa.float16(), "fp32": pa.float32()}
_CTR_OPTIONS = dict(compression="zstd", use_dictionary=False, write_statistics=False)


class ContentCodec(Protocol):
    hidden: bool  # ask the teacher for its hidden layer
    values_per_row: int  # cached values a row: a task's logit, or a top-k or tail item

    @property
    def schema(self) -> pa.Schema: ...

    def parquet_options(self) -> dict[str, Any]: ...

    def encode(self, out: TeacherOutput, rng: torch.Generator) -> Any:
        """One batch's teacher output, reduced to what is cached (TeacherError with `row` on a
        value the cache cannot hold)."""

    def table(self, parts: list[Any]) -> pa.Table:
        """A row group's columns from its batches' `encode` results, in order."""

    def decode(self, table: pa.Table, name: str, columns: list[str], source: str) -> dict[str, np.ndarray]:
        """The loader's extras `{name}.{column}` of a cache row group (or a slice of one)."""

    def comparable(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The values recomputation compares, in the cache's dtype (`*_ids`: compared exactly)."""

    def position(self, column: str, index: int) -> str:
        """What entry `index` of a `comparable` column is, for messages."""

    def read_columns(self, hidden: bool) -> list[str]: ...

    def describe(self, per_value: float) -> str:
        """A one-line size: bytes per cached value and what a value is."""


def codec_for(content: Content) -> ContentCodec:
    """The strategy of a manifest's content."""
    if content.topk is not None:
        return NextItemTopK(content.topk)
    return CtrLogits(tuple(content.tasks), content.dtype, content.hidden_dim if content.hidden else None)


def row_group_rng(checksum: str) -> torch.Generator:
    """Random draws (a top-k cache's tail) seeded by the row group's id checksum: a rebuild or a
    recomputation draws the same items."""
    return torch.Generator().manual_seed(int(checksum, 16) % 2**63)


def score(teacher, codec: ContentCodec, batches: list, checksum: str, device: torch.device) -> pa.Table:
    """A row group's cache columns: the teacher over its batches, each encoded. A TeacherError's
    `row` is made relative to the row group."""
    rng, parts, a = row_group_rng(checksum), [], 0
    for batch in batches:
        try:
            out = teacher(batch.sparse.to(device, non_blocking=True), batch.dense.to(device, non_blocking=True),
                          hidden=codec.hidden)
            parts.append(codec.encode(out, rng))
        except TeacherError as e:
            e.row = None if e.row is None else a + e.row
            raise
        a += len(batch)
    return codec.table(parts)


def check_schema(want: pa.Schema, got: pa.Schema, where: str) -> None:
    """Every column of `want` is in `got` with its type."""
    for f in want:
        i = got.get_field_index(f.name)
        if i < 0 or got.field(i).type != f.type:
            raise CacheError(f"{where}: column '{f.name}' is {got.field(i).type if i >= 0 else 'missing'}, "
                             f"expected {f.type}")


def _rows(arr: pa.ChunkedArray, dtype) -> np.ndarray:
    col = arr.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(col), -1)


@dataclass(frozen=True)
class CtrLogits:
    tasks: tuple[str, ...]
    dtype: str  # fp16 | fp32
    hidden_dim: Optional[int] = None  # cache the hidden layer too

    @property
    def hidden(self) -> bool:
        return self.hidden_dim is not None

    @property
    def values_per_row(self) -> int:
        return len(self.tasks)

    @property
    def schema(self) -> pa.Schema:
        fields = [pa.field("logits", pa.list_(DTYPES[self.dtype], len(self.tasks)), nullable=False)]
        if self.hidden_dim:
            fields.append(pa.field("hidden", pa.list_(pa.float16(), self.hidden_dim), nullable=False))
        return pa.schema(fields)

    def parquet_options(self) -> dict[str, Any]:
        return dict(_CTR_OPTIONS)

    def encode(self, out: TeacherOutput, rng: torch.Generator) -> tuple[np.ndarray, Optional[np.ndarray]]:
        z = out.logits.float().cpu().numpy()
        with np.errstate(over="ignore"):  # an overflow is found below and named
            logits = z.astype(self.dtype_np)
        if not np.isfinite(logits).all():  # finite in the teacher's dtype, not in fp16
            r = int(np.argwhere(~np.isfinite(logits))[0][0])
            e = TeacherError(f"teacher logits {z[r].tolist()} exceed the {self.dtype} range; cache with dtype fp32")
            e.row = r
            raise e
        hidden = out.hidden.float().cpu().numpy().astype(np.float16) if self.hidden else None
        return logits, hidden

    @property
    def dtype_np(self):
        return np.float16 if self.dtype == "fp16" else np.float32

    def table(self, parts: list[tuple[np.ndarray, Optional[np.ndarray]]]) -> pa.Table:
        if not parts:
            return self.schema.empty_table()
        cols = {"logits": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([p[0] for p in parts]).reshape(-1)),
                                                            len(self.tasks))}
        if self.hidden:
            cols["hidden"] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([p[1] for p in parts]).reshape(-1)), self.hidden_dim)
        return pa.table(cols, schema=self.schema)

    def decode(self, table: pa.Table, name: str, columns: list[str], source: str) -> dict[str, np.ndarray]:
        return decode_extras(table, name, columns, source)

    def comparable(self, table: pa.Table) -> dict[str, np.ndarray]:
        out = {"logits": _rows(table.column("logits"), self.dtype_np)}
        if self.hidden:
            out["hidden"] = _rows(table.column("hidden"), np.float16)
        return out

    def position(self, column: str, index: int) -> str:
        return f"task '{self.tasks[index]}'" if column == "logits" else f"hidden unit {index}"

    def read_columns(self, hidden: bool) -> list[str]:
        return ["logits", "hidden"] if hidden else ["logits"]

    def describe(self, per_value: float) -> str:
        return f"{per_value:.2f} bytes/row/task ({len(self.tasks)} tasks)"


@dataclass(frozen=True)
class NextItemTopK:
    fmt: TopKFormat
    hidden = False  # a next-item teacher's hidden layer is not cached

    @property
    def values_per_row(self) -> int:
        return self.fmt.k + self.fmt.tail

    @property
    def schema(self) -> pa.Schema:
        return self.fmt.arrow_schema()

    def parquet_options(self) -> dict[str, Any]:
        return self.fmt.parquet_options()

    def encode(self, out: TeacherOutput, rng: torch.Generator) -> pa.Table:
        return pack(select(out.logits.float().cpu(), self.fmt, rng), self.fmt)

    def table(self, parts: list[pa.Table]) -> pa.Table:
        return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def decode(self, table: pa.Table, name: str, columns: list[str], source: str) -> dict[str, np.ndarray]:
        """{name}.topk_ids int64 [B, k], .topk_logits, .lse and with a tail .tail_ids, .tail_logits,
        .tail_logq (distkd.cache.topk.unpack)."""
        top = unpack(table, self.fmt)
        names = {"ids": "topk_ids", "logits": "topk_logits"}
        return {f"{name}.{names.get(k, k)}": v.numpy() for k, v in top._asdict().items() if v is not None}

    def comparable(self, table: pa.Table) -> dict[str, np.ndarray]:
        top = unpack(table, self.fmt)
        out = {"topk_ids": top.ids.numpy(), "topk_logits": top.logits.numpy().astype(np.float16)}
        if self.fmt.tail:
            out["tail_ids"] = top.tail_ids.numpy()
        return out

    def position(self, column: str, index: int) -> str:
        return f"{'top-k' if column.startswith('topk') else 'tail'} position {index}"

    def read_columns(self, hidden: bool) -> list[str]:
        return list(self.schema.names)

    def describe(self, per_value: float) -> str:
        tail = f" + {self.fmt.tail} tail" if self.fmt.tail else ""
        return f"{per_value:.2f} bytes per cached entry (top-{self.fmt.k}{tail} of {self.fmt.num_items:,} items)"
