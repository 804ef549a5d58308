"""The mergeable sketches `distkd data stats` and `distkd data validate` run over row groups:
exact moments (Chan's formula), a bottom-k row sample for quantiles, a KMV sketch for distinct
ids, and the per-feature `Accumulator` that holds them (what each estimates, and its error,
is in distkd.data.stats's docstring).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from distkd.data.hashing import splitmix64
from distkd.data.rows import _floats, raw_ids
from distkd.data.schema import Schema

SAMPLE_ROWS = 65_536
QUANTILE_POINTS = 201
KMV_K = 4096
SKETCHES = {
    "quantiles": {"method": "bottom-k row sample by splitmix64(example_id)", "rows": SAMPLE_ROWS,
                  "points": QUANTILE_POINTS, "rank_error": 0.01},
    "distinct": {"method": "KMV: k smallest splitmix64(id)", "k": KMV_K,
                 "relative_std_error": round(1 / math.sqrt(KMV_K - 2), 4)},
}


class Moments:
    """Count, mean and sum of squared deviations, merged exactly (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        if len(x):
            mean = float(x.mean())
            self.merge_parts(len(x), mean, float(np.square(x - mean).sum()))

    def merge_parts(self, n: int, mean: float, m2: float) -> None:
        total = self.n + n
        if n == 0:
            return
        d = mean - self.mean
        self.mean += d * n / total
        self.m2 += m2 + d * d * self.n * n / total
        self.n = total

    def merge(self, o: "Moments") -> None:
        self.merge_parts(o.n, o.mean, o.m2)

    def result(self) -> dict:
        if not self.n:
            return {"mean": None, "std": None}
        return {"mean": self.mean, "std": math.sqrt(max(self.m2, 0.0) / self.n)}


class KMV:
    """The k smallest distinct 64-bit hashes: a mergeable distinct-count sketch."""

    def __init__(self, k: int = KMV_K) -> None:
        self.k, self.h = k, np.zeros(0, np.uint64)

    def add(self, h: np.ndarray) -> None:
        if len(self.h) == self.k:
            h = h[h < self.h[-1]]
        if len(h):
            self.h = np.unique(np.concatenate([self.h, h]))[: self.k]

    def merge(self, o: "KMV") -> None:
        self.add(o.h)

    def estimate(self) -> tuple[int, bool]:
        """(distinct count, exact?)"""
        if len(self.h) < self.k:
            return len(self.h), True
        return int(round((self.k - 1) / ((float(self.h[-1]) + 1.0) / 2.0**64))), False


class Sample:
    """Bottom-k rows by key: the same rows whatever order they arrive in."""

    def __init__(self, width: int, k: int = SAMPLE_ROWS) -> None:
        self.k, self.keys, self.values = k, np.zeros(0, np.uint64), np.zeros((0, width), np.float32)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if len(self.keys) == self.k:
            m = keys < self.keys.max()
            keys, values = keys[m], values[m]
        if not len(keys):
            return
        keys, values = np.concatenate([self.keys, keys]), np.concatenate([self.values, values])
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            keys, values = keys[keep], values[keep]
        self.keys, self.values = keys, values

    def merge(self, o: "Sample") -> None:
        self.add(o.keys, o.values)


def _id_hash(v: np.ndarray) -> np.ndarray:
    return splitmix64(v.view(np.uint64) if v.dtype == np.int64 else v)


class Accumulator:
    """Streaming statistics of one split; `update` per row group, `result` for stats.json."""

    def __init__(self, schema: Schema, sample: bool = True) -> None:
        self.schema, self.rows, self.row_groups = schema, 0, 0
        nd = len(schema.dense)
        self.dense = [{"raw": Moments(), "log1p": Moments(), "min": math.inf, "max": -math.inf,
                       "nan": 0, "posinf": 0, "neginf": 0, "null": 0} for _ in range(nd)]
        self.sparse = [{"rows": 0, "ids": 0, "null_rows": 0, "null_ids": 0, "min": None, "max": None,
                        "negative": 0, "out_of_range": 0, "beyond_10x": 0, "kmv": KMV()} for _ in schema.sparse]
        self.sample = Sample(nd) if sample else None

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.row_groups += 1
        for f, acc in zip(self.schema.sparse, self.sparse):
            self._sparse(table.column(f.name).combine_chunks(), f, acc)
        dense = np.empty((table.num_rows, len(self.schema.dense)), np.float32)
        for j, (f, acc) in enumerate(zip(self.schema.dense, self.dense)):
            col = table.column(f.name).combine_chunks()
            dense[:, j] = v = _floats(col)
            finite = np.isfinite(v)
            acc["null"] += col.null_count
            if not finite.all():
                acc["nan"] += int(np.isnan(v).sum()) - col.null_count
                acc["posinf"] += int((v == np.inf).sum())
                acc["neginf"] += int((v == -np.inf).sum())
            x = (v if finite.all() else v[finite]).astype(np.float64)
            if len(x):
                acc["min"], acc["max"] = min(acc["min"], float(x.min())), max(acc["max"], float(x.max()))
                acc["raw"].add(x)
                acc["log1p"].add(np.log1p(np.maximum(x, 0.0)))
        if self.sample is not None:
            ids = table.column(self.schema.id).combine_chunks()
            self.sample.add(_id_hash(ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)), dense)

    @staticmethod
    def _sparse(col: pa.Array, f, acc: dict) -> None:
        acc["rows"] += len(col)
        acc["null_rows"] += col.null_count
        values = col.flatten() if f.multi_valued else col
        if f.multi_valued:
            acc["null_ids"] += values.null_count
        values = values.drop_null()
        acc["ids"] += len(values)
        if not len(values):
            return
        v = raw_ids(values, f)
        if f.hash is not None:
            acc["kmv"].add(_id_hash(v))
            return  # every string hashes into the table
        lo, hi = v.min(), v.max()
        # Small dense id ranges: the distinct ids by bincount, far cheaper than the sketch's unique.
        small = v.dtype == np.int64 and lo >= 0 and hi < 4 * len(v) + 4096
        acc["kmv"].add(_id_hash(np.flatnonzero(np.bincount(v)) if small else v))
        acc["min"] = int(lo) if acc["min"] is None else min(acc["min"], int(lo))
        acc["max"] = int(hi) if acc["max"] is None else max(acc["max"], int(hi))
        if lo < 0:
            acc["negative"] += int((v < 0).sum())
        if hi >= f.rows:
            acc["out_of_range"] += int((v >= f.rows).sum())
            acc["beyond_10x"] += int((v >= 10 * f.rows).sum())

    def merge(self, o: "Accumulator") -> None:
        self.rows += o.rows
        self.row_groups += o.row_groups
        for a, b in zip(self.dense, o.dense):
            a["raw"].merge(b["raw"])
            a["log1p"].merge(b["log1p"])
            a["min"], a["max"] = min(a["min"], b["min"]), max(a["max"], b["max"])
            for k in ("nan", "posinf", "neginf", "null"):
                a[k] += b[k]
        for a, b in zip(self.sparse, o.sparse):
            for k in ("rows", "ids", "null_rows", "null_ids", "negative", "out_of_range", "beyond_10x"):
                a[k] += b[k]
            for k, pick in (("min", min), ("max", max)):
                a[k] = b[k] if a[k] is None else a[k] if b[k] is None else pick(a[k], b[k])
            a["kmv"].merge(b["kmv"])
        if self.sample is not None and o.sample is not None:
            self.sample.merge(o.sample)

    def result(self) -> dict:
        out = {"rows": self.rows, "row_groups": self.row_groups, "dense": {}, "sparse": {}}
        probs = np.linspace(0.0, 1.0, QUANTILE_POINTS)
        for j, (f, a) in enumerate(zip(self.schema.dense, self.dense)):
            n = a["raw"].n
            d = {"count": n, **a["raw"].result(), "min": a["min"] if n else None, "max": a["max"] if n else None,
                 "nan": a["nan"], "posinf": a["posinf"], "neginf": a["neginf"], "null": a["null"],
                 "log1p": a["log1p"].result()}
            if self.sample is not None:
                s = self.sample.values[:, j].astype(np.float64)
                s = s[np.isfinite(s)]
                d["quantiles"] = [float(q) for q in np.quantile(s, probs)] if len(s) else None
            out["dense"][f.name] = d
        for f, a in zip(self.schema.sparse, self.sparse):
            distinct, exact = a["kmv"].estimate()
            out["sparse"][f.name] = {
                "table_rows": f.rows, "hashed": f.hash is not None,
                **{k: a[k] for k in ("rows", "ids", "null_rows", "null_ids", "min", "max", "negative",
                                     "out_of_range", "beyond_10x")},
                "ids_per_row": a["ids"] / a["rows"] if a["rows"] else None,
                "distinct": distinct, "distinct_exact": exact,
            }
        return out
