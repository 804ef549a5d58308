"""Sharded Parquet logs -> batches of KeyedJaggedTensor + dense + labels, one rank's share.

Which rows a rank reads, in what order, is the epoch plan (`distkd.data.plan`): every row
exactly once per epoch across ranks, the same number of non-empty batches on every rank,
rows shuffled within windows of row groups, and a resume that continues the epoch
exactly once even at another world size. The state a checkpoint keeps is tiny:
`{"epoch": e, "generations": [[world, steps], ...]}`.

Memory is bounded: row groups are read a window at a time with only the training
columns (`workers` threads decode up to `workers + 1` windows ahead: distkd.data.decode_pool),
a background thread assembles at most `prefetch` batches ahead, and resuming at step k
decodes nothing before the window holding the rank's row k*batch_size. With `pin_memory`
(a CUDA device: see `distkd.data.batch.transfer_for`) that thread pins each batch, so the
trainer's `to(device, non_blocking=True)` overlaps the copy with compute.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distkd import storage
from distkd.data.aligned import Aligned, SideFiles
from distkd.data.batch import Batch, to_batch
from distkd.data.checked import decode_checked
from distkd.data.decode_pool import ordered
from distkd.data.layout import split_files
from distkd.data.plan import EpochPlan, batch_sizes
from distkd.data.rows import Rows, decode
from distkd.data.arrow_types import check_arrow_schema
from distkd.data.schema import LogsError, Schema

__all__ = ["Aligned", "Batch", "LogLoader", "SideFiles", "split_files"]


def _open(path: str, footer: pq.FileMetaData | None = None) -> pq.ParquetFile:
    try:
        return storage.open_parquet(path, metadata=footer)
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
        workers: int = 1,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_window_row_groups < 1:
            raise ValueError(f"shuffle_window_row_groups must be >= 1, got {shuffle_window_row_groups}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.files = [str(f) for f in files]
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.window = shuffle_window_row_groups if shuffle else 1
        self.prefetch, self.workers, self.pin_memory = prefetch, workers, pin_memory
        self.aligned = list(aligned)
        self._pins = [al.pin() for al in self.aligned]
        self.drop_last, self.check = drop_last, check
        # Shuffle whole requests (runs of equal request_id) rather than rows, so that a
        # listwise loss finds a request's rows side by side in a batch.
        self.keep_requests = keep_requests and schema.request_id is not None
        self.columns = schema.training_columns()
        self.keys = [f.name for f in schema.sparse]

        # Footers only: row counts per row group, types checked once per file.
        counts = []
        self._footers: dict[str, pq.FileMetaData] = {}  # parsed once, reused by every read
        for path in self.files:
            pf = _open(path)
            try:
                if check:
                    check_arrow_schema(schema, pf.schema_arrow, path)
                counts.append(_row_counts(pf))
                self._footers[path] = pf.metadata
            finally:
                pf.close()
            for al in self.aligned:
                self._check_side_footer(al, path, counts[-1])
        self._row0 = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for c in counts]
        units = [(f, g, int(n)) for f, c in enumerate(counts) for g, n in enumerate(c) if n > 0]
        self._units = np.array(units, np.int64).reshape(-1, 3)  # (file, row group, rows)
        self.total_rows = int(self._units[:, 2].sum())

        self._unit_rows = self._units[:, 2].copy()
        self._epoch = 0
        self._before: list[list[int]] = []  # earlier layouts of this epoch (a resume at another world size)
        self._step = 0  # batches yielded so far under this layout
        self._resume = 0  # where the next __iter__ starts
        self._plan = self._make_plan()

    def _make_plan(self) -> EpochPlan:
        return EpochPlan(self._unit_rows, batch_size=self.batch_size, world=self.world_size, rank=self.rank,
                         shuffle=self.shuffle, seed=self.seed, epoch=self._epoch, window=self.window,
                         drop_last=self.drop_last, before=self._before)

    @property
    def num_rows(self) -> int:
        """Rows this rank yields under the current layout (the whole epoch's share when fresh)."""
        return sum(self._plan.sizes)

    def _check_side_footer(self, al: Aligned, path: str, counts: np.ndarray) -> None:
        side = al.side_path(path)
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
        """Steps of the current epoch (those taken under earlier layouts included)."""
        return self._plan.steps_before + len(self._plan.sizes)

    @property
    def step(self) -> int:
        """Steps of the current epoch taken so far."""
        return self._plan.steps_before + self._step

    @property
    def layout_step(self) -> int:
        """Steps taken so far under this run's layout (world size)."""
        return self._step

    def global_batch_rows(self, step: int) -> int:
        """Rows of step `step` (of this layout) summed over all ranks."""
        return sum(s[step] for s in self._plan.all_sizes)

    def full_epoch_steps(self) -> int:
        """Steps of an epoch started afresh at this world size."""
        return len(batch_sizes(self.total_rows, self.world_size, self.rank, self.batch_size, self.drop_last))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A pending resume (load_state_dict) survives only if
        `epoch` is the epoch it was saved in."""
        if epoch != self._epoch:
            self._epoch, self._step, self._resume, self._before = epoch, 0, 0, []
            self._plan = self._make_plan()

    def epoch_step(self, layout_step: int) -> int:
        """The epoch's step at step `layout_step` of this layout."""
        return self._plan.steps_before + layout_step

    def state_dict(self, layout_step: int | None = None) -> dict:
        """Where the epoch stands: after `layout_step` batches of this layout (the consumer's
        position, when it holds batches it has not used yet: a train pipeline), by default after
        the batches yielded."""
        at = self._step if layout_step is None else layout_step
        if not 0 <= at <= self._step:
            raise ValueError(f"loader state: step {at} is not among the {self._step} batches yielded")
        return {"epoch": self._epoch, "generations": [*self._before, [self.world_size, at]]}

    def load_state_dict(self, sd: dict) -> None:
        """Continue the epoch of `sd`, written at any world size (see distkd.data.plan)."""
        gens = [list(map(int, g)) for g in sd["generations"]]
        if not gens or any(len(g) != 2 or g[0] < 1 or g[1] < 0 for g in gens):
            raise ValueError(f"loader state: bad generations {sd['generations']!r}")
        *before, (world, step) = gens
        self._epoch = int(sd["epoch"])
        if world == self.world_size:
            self._before, self._step = before, step
        else:  # another layout: the rows not yet read are cut anew among this run's ranks
            self._before, self._step = gens, 0
        self._plan = self._make_plan()
        if not 0 <= self._step <= len(self._plan.sizes):
            raise ValueError(f"loader state: step {self._step} is outside the epoch's {len(self._plan.sizes)} steps")
        self._resume = self._step

    # -- reading ----------------------------------------------------------------------

    def _read(self, handles: OrderedDict, unit: int, a: int, b: int) -> Rows:
        f, g, _ = (int(x) for x in self._units[unit])
        path = self.files[f]
        table = self._read_group(handles, path, g, self.columns, self._footers.get(path))
        if self.check:  # the whole row group is checked, so decoded whole, then sliced
            rows = decode_checked(table, self.schema, path, g, int(self._row0[f][g])).slice(a, b)
        else:
            rows = decode(table.slice(a, b - a), self.schema, path)
        for al in self.aligned:
            side = al.side_path(path)
            st = self._read_group(handles, side, g, al.read_columns())
            if st.num_rows != table.num_rows:
                raise LogsError(
                    f"{side}: row group {g} has {st.num_rows} rows, {path} has {table.num_rows}"
                )
            al.check(table, st, path, g)
            rows.extras.update(al.decode(st.slice(a, b - a), side))
        return rows

    @staticmethod
    def _read_group(handles: OrderedDict, path: str, g: int, columns: list[str],
                    footer: pq.FileMetaData | None = None) -> pa.Table:
        pf = handles.pop(path, None) or _open(path, footer)
        handles[path] = pf  # most recently used last; keep a few files open
        while len(handles) > 8:
            handles.popitem(last=False)[1].close()
        try:
            return pf.read_row_group(g, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise LogsError(f"{path}: row group {g}: cannot read: {e}") from None

    def _window(self, handles: OrderedDict, r: int, w: int) -> Rows:
        """Window `w` of the first layout's rank `r`: its unit slices decoded, then permuted."""
        win = self._plan.windows[r][w]
        rows = Rows.concat([self._read(handles, u, a, b) for u, a, b in win])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self._epoch, r, w])
            rows = rows.take(_request_permutation(rows.request, rng) if self.keep_requests
                             else rng.permutation(len(rows)))
        return rows

    def _jobs(self, first_row: int) -> list[tuple[int, int, int, int]]:
        """The plan's pieces from this layout's row `first_row` on: (rank, window, lo, hi)."""
        jobs, cursor = [], 0
        for r, w, lo, hi in self._plan.pieces:
            n = hi - lo
            if cursor + n > first_row:  # resume: whole pieces before it are never decoded
                jobs.append((r, w, lo + max(0, first_row - cursor), hi))
            cursor += n
        return jobs

    def _piece(self, handles: OrderedDict, job: tuple[int, int, int, int]) -> Rows:
        r, w, lo, hi = job
        return self._window(handles, r, w).slice(lo, hi)

    def _batches(self, start: int) -> Iterator[Batch]:
        """Decode and yield this rank's batches from step `start` (of this layout) on."""
        sizes = self._plan.sizes
        if start >= len(sizes):
            return
        pieces = ordered(self._piece, self._jobs(int(np.sum(sizes[:start]))), self.workers)
        pending: list[Rows] = []
        have, step = 0, start
        try:
            for rows in pieces:
                pending.append(rows)
                have += len(rows)
                while step < len(sizes) and have >= sizes[step]:
                    batch = to_batch(self._take_front(pending, sizes[step]), self.keys)
                    yield batch.pin_memory() if self.pin_memory else batch
                    have -= sizes[step]
                    step += 1
                if step == len(sizes):
                    return
            raise RuntimeError(f"rank {self.rank} ran out of rows at step {step} of {len(sizes)}")
        finally:
            pieces.close()

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
        gen = self._batches(start)
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
