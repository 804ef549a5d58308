"""Sharded Parquet logs -> batches of KeyedJaggedTensor + dense + labels, one rank's share.

The unit of reading is a row group. Each epoch has one global order of units (file order,
or a permutation seeded by (seed, epoch)); the concatenated rows of that order are cut
into `world_size` contiguous ranges whose sizes differ by at most one, and a rank reads
only the units overlapping its range. So across ranks every row is read exactly once per
epoch, and every rank yields the same number of non-empty batches (DDP collectives never
wait on a rank that ran out).

With shuffle, rows are also permuted within windows of `shuffle_window_row_groups`
consecutive units of the rank's sequence, seeded by (seed, epoch, rank, window). The
permutation depends only on row counts, so resuming at step k decodes from the window
holding the rank's row k*batch_size on, nothing before.

Memory is bounded: row groups are read one at a time with only the training columns, a
background thread decodes at most `prefetch` batches ahead.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distkd import storage
from distkd.data.batch import Batch, to_batch
from distkd.data.checks import check_row_group
from distkd.data.rows import Rows, decode, decode_extras
from distkd.data.schema import LogsError, Schema, check_arrow_schema

__all__ = ["Aligned", "Batch", "LogLoader", "split_files"]


@dataclass
class Aligned:
    """A side file per log shard with the same rows and row groups (e.g. cached teacher logits)."""

    name: str
    path_for: Callable[[str], str]  # log shard path -> side file path
    columns: list[str]  # float columns (or fixed_size_list of floats) -> extras[f"{name}.{col}"]
    # (log row group table, side row group table, log path, row group index): raise on misalignment
    check: Callable[[pa.Table, pa.Table, str, int], None] | None = None
    check_columns: Sequence[str] = ()  # more side columns to read, only for `check` (e.g. example_id)

    def read_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.columns, *self.check_columns]))


def split_files(logs_dir: str | Path, split: str) -> list[str]:
    """Sorted Parquet shard paths (or URIs, see distkd.storage) of `logs_dir/split`; LogsError
    if there are none."""
    d = storage.join(logs_dir, split)
    files = storage.list_files(d, ".parquet")
    if not files:
        raise LogsError(f"{d}: no Parquet shards (*.parquet) for split '{split}'")
    return files


def _open(path: str) -> pq.ParquetFile:
    try:
        return storage.open_parquet(path)
    except (OSError, pa.ArrowException) as e:
        raise LogsError(f"{path}: cannot read Parquet footer: {e}") from None


def _row_counts(pf: pq.ParquetFile) -> np.ndarray:
    md = pf.metadata
    return np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)], np.int64)


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _request_permutation(request: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of rows that moves runs of equal request_id as blocks."""
    starts = np.flatnonzero(np.r_[True, request[1:] != request[:-1]])
    lengths = np.diff(np.r_[starts, len(request)])
    order = rng.permutation(len(starts))
    # Row index of each output position: block start + offset within the block.
    block_of = np.repeat(order, lengths[order])
    offset = np.arange(len(request)) - np.repeat(np.cumsum(lengths[order]) - lengths[order], lengths[order])
    return starts[block_of] + offset


class LogLoader:
    def __init__(
        self,
        files: Sequence[str],
        schema: Schema,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window_row_groups: int = 4,
        prefetch: int = 2,
        aligned: Sequence[Aligned] = (),
        drop_last: bool = False,
        check: bool = True,
        keep_requests: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_window_row_groups < 1:
            raise ValueError(f"shuffle_window_row_groups must be >= 1, got {shuffle_window_row_groups}")
        self.files = [str(f) for f in files]
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.window = shuffle_window_row_groups if shuffle else 1
        self.prefetch = prefetch
        self.aligned = list(aligned)
        self.drop_last, self.check = drop_last, check
        # Shuffle whole requests (runs of equal request_id) rather than rows, so that a
        # listwise loss finds a request's rows side by side in a batch.
        self.keep_requests = keep_requests and schema.request_id is not None
        self.columns = schema.training_columns()
        self.keys = [f.name for f in schema.sparse]

        # Footers only: row counts per row group, types checked once per file.
        counts = []
        for path in self.files:
            pf = _open(path)
            try:
                if check:
                    check_arrow_schema(schema, pf.schema_arrow, path)
                counts.append(_row_counts(pf))
            finally:
                pf.close()
            for al in self.aligned:
                self._check_side_footer(al, path, counts[-1])
        self._row0 = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for c in counts]
        units = [(f, g, int(n)) for f, c in enumerate(counts) for g, n in enumerate(c) if n > 0]
        self._units = np.array(units, np.int64).reshape(-1, 3)  # (file, row group, rows)
        self.total_rows = int(self._units[:, 2].sum())

        n, w = self.total_rows, world_size
        rank_rows = [(r + 1) * n // w - r * n // w for r in range(w)]
        if drop_last:
            steps = min(rank_rows) // batch_size
            sizes = [batch_size] * steps
        else:
            steps = math.ceil(max(rank_rows) / batch_size)
            if min(rank_rows) < steps:
                raise ValueError(
                    f"{n} rows cannot give {w} ranks {steps} non-empty batches each at batch_size "
                    f"{batch_size}; use drop_last=True or a larger batch size"
                )
            r = rank_rows[rank]
            sizes = [batch_size] * (steps - 1) + [r - batch_size * (steps - 1)] if steps else []
            if sizes and sizes[-1] == 0:  # one row short of the longest rank: never yield an empty batch
                sizes[-2] -= 1
                sizes[-1] = 1
        self._sizes = sizes
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._rank_range = (rank * n // w, (rank + 1) * n // w)
        self.num_rows = int(self._starts[-1])
        self._epoch = 0
        self._step = 0  # batches yielded so far in this epoch
        self._resume = 0  # where the next __iter__ starts

    def _check_side_footer(self, al: Aligned, path: str, counts: np.ndarray) -> None:
        side = al.path_for(path)
        spf = _open(side)
        try:
            got = _row_counts(spf)
            missing = [c for c in al.read_columns() if spf.schema_arrow.get_field_index(c) < 0]
        finally:
            spf.close()
        if not np.array_equal(got, counts):
            raise LogsError(
                f"{side}: '{al.name}' side file is not aligned with {path}: row groups of "
                f"{got.tolist()} rows, the log shard has {counts.tolist()}"
            )
        if missing:
            raise LogsError(f"{side}: missing column(s) {missing} for '{al.name}'")

    # -- epoch plan -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sizes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A pending resume (load_state_dict) survives only if
        `epoch` is the epoch it was saved in."""
        if epoch != self._epoch:
            self._epoch, self._step, self._resume = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "step": self._step}

    def load_state_dict(self, sd: dict) -> None:
        step = int(sd["step"])
        if not 0 <= step <= len(self):
            raise ValueError(f"step {step} is outside this loader's epoch of {len(self)} steps")
        self._epoch, self._step, self._resume = int(sd["epoch"]), step, step

    def _segments(self, epoch: int) -> list[tuple[int, int, int]]:
        """This rank's (unit index, first row, end row) slices, in epoch order."""
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._units))
        rows = self._units[order, 2]
        starts = np.concatenate([[0], np.cumsum(rows)])
        lo, hi = self._rank_range
        out = []
        for i in range(np.searchsorted(starts, lo, side="right") - 1, len(order)):
            s = int(starts[i])
            if s >= hi:
                break
            a, b = max(lo, s) - s, min(hi, s + int(rows[i])) - s
            if b > a:
                out.append((int(order[i]), a, b))
        return out

    # -- reading ----------------------------------------------------------------------

    def _read(self, handles: OrderedDict, unit: int, a: int, b: int) -> Rows:
        f, g, _ = (int(x) for x in self._units[unit])
        path = self.files[f]
        table = self._read_group(handles, path, g, self.columns)
        if self.check:
            check_row_group(table, self.schema, path, g, int(self._row0[f][g]))
        rows = decode(table.slice(a, b - a), self.schema, path)
        for al in self.aligned:
            side = al.path_for(path)
            st = self._read_group(handles, side, g, al.read_columns())
            if st.num_rows != table.num_rows:
                raise LogsError(
                    f"{side}: row group {g} has {st.num_rows} rows, {path} has {table.num_rows}"
                )
            if al.check is not None:
                al.check(table, st, path, g)
            rows.extras.update(decode_extras(st.slice(a, b - a), al.name, al.columns, side))
        return rows

    @staticmethod
    def _read_group(handles: OrderedDict, path: str, g: int, columns: list[str]) -> pa.Table:
        pf = handles.pop(path, None) or _open(path)
        handles[path] = pf  # most recently used last; keep a few files open
        while len(handles) > 8:
            handles.popitem(last=False)[1].close()
        try:
            return pf.read_row_group(g, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise LogsError(f"{path}: row group {g}: cannot read: {e}") from None

    def _batches(self, start: int, epoch: int) -> Iterator[Batch]:
        """Decode and yield this rank's batches from step `start` on."""
        sizes = self._sizes
        if start >= len(sizes):
            return
        first_row = int(self._starts[start])
        segs = self._segments(epoch)
        handles: OrderedDict = OrderedDict()
        pending: list[Rows] = []
        have, step, cursor = 0, start, 0
        try:
            for wi in range(0, len(segs), self.window):
                win = segs[wi : wi + self.window]
                n = sum(b - a for _, a, b in win)
                if cursor + n <= first_row:  # resume: skip whole windows without decoding
                    cursor += n
                    continue
                rows = Rows.concat([self._read(handles, u, a, b) for u, a, b in win])
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch, self.rank, wi // self.window])
                    rows = rows.take(_request_permutation(rows.request, rng) if self.keep_requests
                                     else rng.permutation(n))
                skip = max(0, first_row - cursor)
                cursor += n
                pending.append(rows.slice(skip, n))
                have += n - skip
                while step < len(sizes) and have >= sizes[step]:
                    yield to_batch(self._take_front(pending, sizes[step]), self.keys)
                    have -= sizes[step]
                    step += 1
                if step == len(sizes):
                    return
            raise RuntimeError(f"rank {self.rank} ran out of rows at step {step} of {len(sizes)}")
        finally:
            for pf in handles.values():
                pf.close()

    @staticmethod
    def _take_front(pending: list[Rows], size: int) -> Rows:
        parts, need = [], size
        while need:
            head = pending[0]
            if len(head) <= need:
                parts.append(pending.pop(0))
                need -= len(head)
            else:
                parts.append(head.slice(0, need))
                pending[0] = head.slice(need, len(head))
                need = 0
        return Rows.concat(parts)

    # -- iteration --------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        start, self._resume = self._resume, 0
        self._step = start
        gen = self._batches(start, self._epoch)
        if self.prefetch <= 0:
            for batch in gen:
                self._step += 1
                yield batch
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=_produce, args=(gen, q, stop), name="distkd-loader", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    item = q.get(timeout=1.0)
                except queue.Empty:
                    if not worker.is_alive():
                        raise RuntimeError("loader thread exited without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                self._step += 1
                yield item
        finally:
            stop.set()
            worker.join()


def _produce(gen: Iterator[Batch], q: queue.Queue, stop: threading.Event) -> None:
    """Background thread: decode ahead into `q`; stop when the consumer sets `stop`."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for batch in gen:
            if not put(batch):
                return
        put(_END)
    except BaseException as e:  # re-raised in the consumer
        put(_Failure(e))
    finally:
        gen.close()
