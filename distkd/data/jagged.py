"""The sparse features of decoded rows, laid out so that a batch costs one slice for all of them.

A feature whose rows hold exactly one id each (single-valued, no nulls: nearly all of them)
is a row of one int64 matrix `single` [features, rows]; slicing, permuting and concatenating
rows are then one numpy call for all those features together, and a batch's KeyedJaggedTensor
values (key-major) are that matrix's rows copied once into place. Only multi-valued features
(and, with checks off, a single-valued one holding nulls) keep their own (values, offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A sparse feature: (values int64, offsets int64 [n+1] starting at 0), or offsets None
# when every row holds exactly one id (single-valued, no nulls: the fast path).
Jagged = tuple[np.ndarray, "np.ndarray | None"]


def lengths_of(j: Jagged, n: int) -> np.ndarray:
    values, offsets = j
    return np.ones(n, np.int32) if offsets is None else np.diff(offsets).astype(np.int32)


def joffsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def jslice(j: Jagged, a: int, b: int) -> Jagged:
    values, offsets = j
    if offsets is None:
        return values[a:b], None
    off = offsets[a : b + 1]
    return values[off[0] : off[-1]], off - off[0]


def jtake(j: Jagged, idx: np.ndarray) -> Jagged:
    values, offsets = j
    if offsets is None:
        return values[idx], None
    lengths = np.diff(offsets)[idx]
    new = joffsets(lengths)
    # Position k of the output row i reads offsets[idx[i]] + (k - new[i]).
    gather = np.repeat(offsets[:-1][idx] - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
    return values[gather], new


def jconcat(parts: list[Jagged]) -> Jagged:
    if all(off is None for _, off in parts):
        return np.concatenate([v for v, _ in parts]), None
    lengths = np.concatenate([lengths_of(p, len(p[0]) if p[1] is None else len(p[1]) - 1) for p in parts])
    return np.concatenate([v for v, _ in parts]), joffsets(lengths)


@dataclass
class Sparse:
    """n rows of K sparse features: single-id features as one matrix, the others jagged."""

    single: np.ndarray  # int64 [features without offsets, n]
    multi: list[Jagged]  # the features with offsets, in key order
    is_multi: tuple[bool, ...]  # per key: in `multi` (True) or a row of `single`

    @staticmethod
    def of(features: list[Jagged], n: int) -> "Sparse":
        is_multi = tuple(off is not None for _, off in features)
        single = np.empty((is_multi.count(False), n), np.int64)
        i = 0
        for (values, off), m in zip(features, is_multi):
            if not m:
                single[i] = values
                i += 1
        return Sparse(single, [j for j, m in zip(features, is_multi) if m], is_multi)

    def __len__(self) -> int:
        return self.single.shape[1]  # [0, n] when every feature is jagged

    def features(self) -> list[Jagged]:
        """Each key's (values, offsets), offsets None for a single-id feature (views, no copies)."""
        out, s, m = [], iter(self.single), iter(self.multi)
        for is_m in self.is_multi:
            out.append(next(m) if is_m else (next(s), None))
        return out

    def slice(self, a: int, b: int) -> "Sparse":
        return Sparse(self.single[:, a:b], [jslice(j, a, b) for j in self.multi], self.is_multi)

    def take(self, idx: np.ndarray) -> "Sparse":
        return Sparse(self.single[:, idx], [jtake(j, idx) for j in self.multi], self.is_multi)

    @staticmethod
    def concat(parts: list["Sparse"]) -> "Sparse":
        p0 = parts[0]
        if any(p.is_multi != p0.is_multi for p in parts):  # a null-holding row group (checks off)
            per_key = [p.features() for p in parts]
            return Sparse.of([jconcat([f[k] for f in per_key]) for k in range(len(p0.is_multi))],
                             sum(len(p) for p in parts))
        return Sparse(np.concatenate([p.single for p in parts], axis=1),
                      [jconcat([p.multi[k] for p in parts]) for k in range(len(p0.multi))], p0.is_multi)

    def kjt_arrays(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(values int64, lengths int32, length_per_key) of a key-major KeyedJaggedTensor: the
        single-id features' rows land in place in one copy per run of adjacent such keys."""
        n = len(self)
        per_key, s, m = [], 0, 0
        for is_m in self.is_multi:
            per_key.append(len(self.multi[m][0]) if is_m else n)
            m += is_m
        values = np.empty(sum(per_key), np.int64)
        lengths = np.ones((len(self.is_multi), n), np.int32)
        at, k, m = 0, 0, 0
        while k < len(self.is_multi):
            if self.is_multi[k]:
                v, off = self.multi[m]
                values[at : at + len(v)] = v
                np.subtract(off[1:], off[:-1], out=lengths[k], casting="unsafe")
                at, k, m = at + len(v), k + 1, m + 1
                continue
            run = k
            while run < len(self.is_multi) and not self.is_multi[run]:
                run += 1
            values[at : at + (run - k) * n].reshape(run - k, n)[...] = self.single[s : s + run - k]
            at, s, k = at + (run - k) * n, s + run - k, run
        return values, lengths.reshape(-1), per_key
