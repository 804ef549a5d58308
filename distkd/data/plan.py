"""The epoch plan: which rows each rank reads, in what order, and how a resume continues it.

The unit of reading is a row group. Each epoch has one global order of units (file order,
or a permutation seeded by (seed, epoch)); the concatenated rows of that order are cut
into `world` contiguous ranges whose sizes differ by at most one. A rank's range is read in
windows of `window` consecutive unit slices, each window's rows permuted (when shuffling)
by a generator seeded by (seed, epoch, rank, window). Every rank gets the same number of
non-empty batches, so DDP collectives never wait on a rank that ran out.

Resuming at another world size. A checkpoint records, for the epoch under way, the layouts
it ran under: `generations = [[world, steps], ...]`. The rows not yet read are a
deterministic sequence: each rank's range with its first `steps` batches removed,
concatenated in rank order. A resume with M ranks cuts that sequence into M contiguous
ranges again (and a resume after that repeats the step). So across any number of
restarts, at any world sizes, every row of the epoch is read exactly once; with the same
world size the cut falls where the ranges already were, and every rank continues exactly
where it stopped. A sequence is a list of pieces `(rank, window, lo, hi)`: rows [lo, hi)
of a permuted window of the epoch's first layout.
"""

from __future__ import annotations

import math

import numpy as np

Segment = tuple[int, int, int]  # (unit index, first row, end row) of a unit (row group)
Piece = tuple[int, int, int, int]  # (rank of the first layout, window, lo, hi)


def unit_order(n_units: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_units) if shuffle else np.arange(n_units)


def range_of(n: int, world: int, rank: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def rank_segments(unit_rows: np.ndarray, order: np.ndarray, lo: int, hi: int) -> list[Segment]:
    """Slices of the units, in epoch order, covering rows [lo, hi) of the concatenation."""
    rows = unit_rows[order]
    starts = np.concatenate([[0], np.cumsum(rows)])
    out = []
    for i in range(max(0, int(np.searchsorted(starts, lo, side="right")) - 1), len(order)):
        s = int(starts[i])
        if s >= hi:
            break
        a, b = max(lo, s) - s, min(hi, s + int(rows[i])) - s
        if b > a:
            out.append((int(order[i]), a, b))
    return out


def batch_sizes(n: int, world: int, rank: int, batch_size: int, drop_last: bool) -> list[int]:
    """This rank's batch sizes when `n` rows are cut into `world` ranges (see the module doc)."""
    rows = [range_of(n, world, r)[1] - range_of(n, world, r)[0] for r in range(world)]
    if drop_last:
        return [batch_size] * (min(rows) // batch_size)
    steps = math.ceil(max(rows) / batch_size)
    if min(rows) < steps:
        raise ValueError(
            f"{n} rows cannot give {world} ranks {steps} non-empty batches each at batch_size "
            f"{batch_size}; use drop_last=True or a larger batch size"
        )
    r = rows[rank]
    sizes = [batch_size] * (steps - 1) + [r - batch_size * (steps - 1)] if steps else []
    if sizes and sizes[-1] == 0:  # one row short of the longest rank: never yield an empty batch
        sizes[-2] -= 1
        sizes[-1] = 1
    return sizes


def cut(pieces: list[Piece], lo: int, hi: int) -> list[Piece]:
    """Rows [lo, hi) of the sequence `pieces`."""
    out, at = [], 0
    for r, w, a, b in pieces:
        n = b - a
        if at + n > lo and at < hi:
            out.append((r, w, a + max(0, lo - at), a + min(n, hi - at)))
        at += n
        if at >= hi:
            break
    return out


def length(pieces: list[Piece]) -> int:
    return sum(b - a for _, _, a, b in pieces)


class EpochPlan:
    """One rank's share of one epoch, under the layouts the epoch ran under so far."""

    def __init__(self, unit_rows: np.ndarray, *, batch_size: int, world: int, rank: int, shuffle: bool,
                 seed: int, epoch: int, window: int, drop_last: bool, before: list[list[int]] | None = None):
        """`before`: the earlier layouts of this epoch, [[world, steps taken], ...] (empty: none)."""
        before = [list(map(int, g)) for g in (before or [])]
        base = before[0][0] if before else world
        order = unit_order(len(unit_rows), shuffle, seed, epoch)
        n = int(unit_rows.sum())
        self.windows: list[list[list[Segment]]] = []  # [base rank][window] -> segments
        seq: list[Piece] = []
        for r in range(base):
            segs = rank_segments(unit_rows, order, *range_of(n, base, r))
            wins = [segs[i:i + window] for i in range(0, len(segs), window)]
            self.windows.append(wins)
            seq += [(r, w, 0, sum(b - a for _, a, b in win)) for w, win in enumerate(wins)]
        for g_world, g_steps in before:
            m = length(seq)
            rest = []
            for q in range(g_world):
                taken = sum(batch_sizes(m, g_world, q, batch_size, drop_last)[:g_steps])
                lo, hi = range_of(m, g_world, q)
                rest += cut(seq, lo + taken, hi)
            seq = rest
        m = length(seq)
        self.all_sizes = [batch_sizes(m, world, q, batch_size, drop_last) for q in range(world)]
        self.sizes = self.all_sizes[rank]
        self.pieces = cut(seq, *range_of(m, world, rank))
        self.before = before
        self.steps_before = sum(s for _, s in before)
        self.remaining_rows = m

    def window_rows(self, r: int, w: int) -> int:
        return sum(b - a for _, a, b in self.windows[r][w])
