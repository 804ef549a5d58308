"""`distkd data drift`: day D of date-partitioned logs against the window of days before it.

A broken upstream day (a feature whose distribution jumps, ids out of range, a label rate that
halves, a day half missing) must stop before it reaches the cache and the student. One
streaming pass over the reference window (the partitions `KEY=D-W .. D-1`, those present),
then one over day D, each row group at a time through the stats pass's sketches
(distkd.data.sketches: moments, a bottom-k row sample, KMV, out-of-range counts), plus label
counts and, on the window's side, the set of table rows its ids looked up. Memory: one row
group, two row samples of 65,536 rows x dense features, one bit set per sparse feature (a byte
per table row, at most 2**24 rows a feature).

The figures, each with a threshold in `DriftConfig` (per-feature thresholds in `features:`):

- `psi` of each dense feature (finite values): population stability index
  sum_i (d_i - r_i) ln(d_i / r_i) over bins cut at the window's quantiles 1/B, 2/B, ...,
  (B-1)/B (B = psi_bins, default 10; quantiles that tie, as a count feature's many zeros do,
  merge their bins), r_i and d_i the shares of the window's and the day's bottom-k row samples
  (distkd.data.sketches.Sample: exact below 65,536 rows, else each share within about
  1/sqrt(65,536) = 0.4% of its value, a PSI noise floor near (B-1)(1/n_r + 1/n_d) < 0.0003),
  a share of 0 counted as 1e-4. 0 is no change; 0.1-0.25 is usually read as a moderate shift,
  above 0.25 a major one (psi_max, default 0.25). A day with no finite value fails.
- `unseen` of each sparse feature: the share of the day's in-range id lookups (each id of a
  multi-valued list counts) whose table row the window never looked up: an embedding the
  student has not trained since. Exact for tables up to 2**24 rows; a larger table folds its
  rows into 2**24 bits by splitmix64, a row then reads as seen when it shares a bit with a seen
  one (probability f, the share of bits set), and the count is divided by (1 - f), which
  removes that bias. Rows: num_embeddings ids as they are, hash_size ids modulo it (strings
  hashed), as the loader looks them up.
- `out_of_range` of each num_embeddings feature: the share of the day's ids outside
  [0, num_embeddings) (the loader refuses a row group holding one: out_of_range_max 0).
- `label_rate_ratio` of each binary task: the day's label rate (positives / labelled rows) over
  the window's; a range (default [0.67, 1.5]).
- `rows_ratio`: the day's rows over the window's mean rows a day (days present); a range
  (default [0.5, 2]).

`check_day(logs, day, cfg) -> DriftReport` is what a daily job calls; `report.failures` name the
feature and figure, `report.to_dict()` is JSON. The command exits 3 when a check fails (2 stays
the exit of an error a user fixes: bad logs, bad config, no window).
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from distkd import storage
from distkd.config import ConfigError, from_dict, read_yaml, to_dict
from distkd.data.hashing import splitmix64
from distkd.data.layout import PartitionRange, partition_of, split_files
from distkd.data.rows import _ids, column_floats, raw_ids
from distkd.data.schema import LogsError, Schema, load_schema
from distkd.data.sketches import Accumulator
from distkd.data.stats import Progress, read_footers, row_groups

logger = logging.getLogger(__name__)

EXIT_FAILED = 3
EPS = 1e-4  # a bin's share when it holds none (PSI's log needs it)
ROWSET_MAX = 1 << 24  # table rows a bit set holds one bit each; larger tables fold


@dataclass
class FeatureLimits:
    """One feature's thresholds in place of the defaults (a long-tail id feature's unseen_max)."""

    psi_max: Optional[float] = None  # null: DriftConfig's
    unseen_max: Optional[float] = None  # null: DriftConfig's
    out_of_range_max: Optional[float] = None  # null: DriftConfig's


@dataclass
class DriftConfig:
    """Day-over-day checks of partitioned logs (`distkd data drift`; the `drift:` section of a
    daily job). A day fails when any figure passes its threshold."""

    window_days: int = 7  # the reference: the days D-window_days .. D-1 that are present
    psi_bins: int = 10  # PSI bins, cut at the window's quantiles 1/bins, 2/bins, ...
    psi_max: float = 0.25  # a dense feature's PSI above this fails (> 0.25: a major shift)
    unseen_max: float = 0.5  # share of the day's id lookups of table rows the window never looked up
    out_of_range_max: float = 0.0  # share of ids outside [0, num_embeddings) (the loader refuses any)
    label_rate_ratio: tuple[float, float] = (0.67, 1.5)  # the day's label rate / the window's, per binary task
    rows_ratio: tuple[float, float] = (0.5, 2.0)  # the day's rows / the window's mean rows a day
    features: dict[str, FeatureLimits] = field(default_factory=dict)  # per-feature thresholds by name

    def validate(self) -> None:
        if self.window_days < 1 or self.psi_bins < 2:
            raise ConfigError("window_days must be >= 1 and psi_bins >= 2")
        for name in ("label_rate_ratio", "rows_ratio"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= 1 <= lo_hi[1]:
                raise ConfigError(f"{name}: [low, high] with 0 <= low <= 1 <= high, got {list(lo_hi)}")

    def limit(self, feature: str, name: str) -> float:
        own = getattr(self.features.get(feature), name, None)
        return getattr(self, name) if own is None else own


def load_config(path: str | None) -> DriftConfig:
    """DriftConfig from a job file's `drift:` section, or from a file that is one; defaults without."""
    if path is None:
        return DriftConfig()
    data = read_yaml(path)
    if "drift" in data:  # a daily job: its other sections are the daily job's to check
        return from_dict(DriftConfig, data["drift"] or {}, f"{path}: drift")
    return from_dict(DriftConfig, data, str(path))


@dataclass
class Check:
    feature: str  # a feature, a task, or "*" for the whole day
    figure: str  # psi, unseen, out_of_range, label_rate_ratio, rows_ratio
    value: Optional[float]  # None: not defined (see detail)
    low: Optional[float]  # passes when low <= value <= high (None: unbounded)
    high: Optional[float]
    ok: bool
    detail: str = ""

    def threshold(self) -> str:
        return f"<= {self.high:g}" if self.low is None else f"[{self.low:g}, {self.high:g}]"

    def describe(self) -> str:
        value = "none" if self.value is None else f"{self.value:.4g}"
        return f"{self.feature} {self.figure} {value} (threshold {self.threshold()}{'; ' + self.detail if self.detail else ''})"


@dataclass
class DriftReport:
    logs: str
    key: str
    day: str
    window: list[str]  # the reference days present
    rows: int
    window_rows: int
    checks: list[Check]
    config: DriftConfig

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {**to_dict(self), "ok": not self.failures}


# -- the figures ------------------------------------------------------------------------------


def psi(reference: np.ndarray, day: np.ndarray, bins: int = 10, eps: float = EPS) -> float:
    """Population stability index of `day` against `reference` (finite values, both non-empty)
    over bins cut at the reference's quantiles 1/bins .. (bins-1)/bins, tied cuts merged."""
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))

    def shares(x: np.ndarray) -> np.ndarray:
        n = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
        return np.maximum(n / len(x), eps)

    r, d = shares(reference), shares(day)
    return float(np.sum((d - r) * np.log(d / r)))


class RowSet:
    """Which rows of a table were looked up: a byte a row, or past `cap` rows, a byte per
    splitmix64(row) % cap (see `unseen_share` for the correction that folding needs)."""

    def __init__(self, rows: int, cap: int = ROWSET_MAX) -> None:
        self.folded = rows > cap
        self.seen = np.zeros(min(rows, cap), np.bool_)

    def _slots(self, rows: np.ndarray) -> np.ndarray:
        if not self.folded:
            return rows
        return (splitmix64(rows.astype(np.int64).view(np.uint64)) % np.uint64(len(self.seen))).astype(np.int64)

    def add(self, rows: np.ndarray) -> None:
        self.seen[self._slots(rows)] = True

    def missing(self, rows: np.ndarray) -> int:
        """How many of `rows` (with repeats) were never added."""
        return int(np.count_nonzero(~self.seen[self._slots(rows)]))

    @property
    def fill(self) -> float:
        return float(np.count_nonzero(self.seen)) / max(len(self.seen), 1)


def unseen_share(missing: int, lookups: int, rowset: RowSet) -> Optional[float]:
    """The share of `lookups` of rows `rowset` never saw, `missing` of them read as unseen: exact
    when the set is not folded, else missing / (1 - fill) (an unseen row reads as seen with
    probability fill), at most 1. None without lookups."""
    if not lookups:
        return None
    share = missing / lookups
    if rowset.folded:
        share = min(1.0, share / max(1.0 - rowset.fill, 1e-12))
    return share


def table_rows(values: pa.Array, f) -> np.ndarray:
    """The table rows non-null ids look up (as the loader does); num_embeddings ids outside the
    table are left out (they are the out_of_range figure)."""
    if f.num_embeddings is None:
        return _ids(values, f)
    v = raw_ids(values, f)
    return v[(v >= 0) & (v < f.rows)].astype(np.int64, copy=False)


# -- the passes -------------------------------------------------------------------------------


class Side:
    """One side's pass (the window, or the day): the stats accumulator with its row sample,
    labelled rows and positives per binary task, and for the window the rows its ids looked up;
    for the day, the lookups of rows the window's sets lack."""

    def __init__(self, schema: Schema, reference: Optional["Side"] = None) -> None:
        self.schema, self.reference = schema, reference
        self.acc = Accumulator(schema)
        self.labelled = np.zeros(len(schema.binary), np.int64)
        self.positive = np.zeros(len(schema.binary), np.float64)
        self.rowsets = [RowSet(f.rows) for f in schema.sparse] if reference is None else None
        self.missing = np.zeros(len(schema.sparse), np.int64)
        self.lookups = np.zeros(len(schema.sparse), np.int64)

    def update(self, table: pa.Table) -> None:
        self.acc.update(table)
        for j, t in enumerate(self.schema.binary):
            y = column_floats(table, t.label)
            y = y[~np.isnan(y)]
            self.labelled[j] += len(y)
            self.positive[j] += float(y.sum())
        for j, f in enumerate(self.schema.sparse):
            col = table.column(f.name).combine_chunks()
            rows = table_rows((col.flatten() if f.multi_valued else col).drop_null(), f)
            if self.reference is None:
                self.rowsets[j].add(rows)  # type: ignore[index]
            else:
                self.missing[j] += self.reference.rowsets[j].missing(rows)  # type: ignore[index]
                self.lookups[j] += len(rows)

    def rate(self, j: int) -> Optional[float]:
        return float(self.positive[j] / self.labelled[j]) if self.labelled[j] else None


def _pass(logs: str, schema: Schema, paths: list[str], what: str, reference: Optional[Side] = None) -> Side:
    columns = [schema.id] + schema.feature_names + schema.binary_labels
    shards = read_footers(logs, schema, paths, columns)
    rows = sum(s["rows"] for s in shards)
    logger.info(f"{what}: {len(paths)} shards, {rows:,} rows")
    side = Side(schema, reference)
    for table in row_groups(paths, columns, Progress(rows, True)):
        side.update(table)
    return side


def _window(key: str, day: str, days: int) -> PartitionRange:
    try:
        d = datetime.date.fromisoformat(day)
    except ValueError:
        raise ConfigError(f"--partition {key}={day}: the day must be a date YYYY-MM-DD") from None
    return PartitionRange(key=key, start=str(d - datetime.timedelta(days=days)), end=str(d - datetime.timedelta(days=1)))


def check_day(logs: str, day: str, cfg: DriftConfig, key: str = "dt") -> DriftReport:
    """Day `day` (partition `key`=`day`) of `logs` against the `cfg.window_days` days before it."""
    logs = str(logs)
    cfg.validate()
    schema = load_schema(logs, stats=False)
    unknown = sorted(set(cfg.features) - set(schema.feature_names))
    if unknown:
        raise ConfigError(f"drift.features: {unknown} are not features of {logs}/schema.yaml")
    rng = _window(key, day, cfg.window_days)
    try:
        ref_paths = split_files(logs, "window", {"window": rng})
    except LogsError:
        raise LogsError(f"{logs}: no partitions {rng.describe()}: day {day} has nothing to compare with") from None
    day_paths = split_files(logs, "day", {"day": PartitionRange(key=key, start=day, end=day)})
    present = sorted({partition_of(logs, p, key) for p in ref_paths})
    if len(present) < cfg.window_days:
        logger.warning(f"window {rng.describe()}: {len(present)} of {cfg.window_days} days present")
    ref = _pass(logs, schema, ref_paths, f"window {rng.describe()} ({len(present)} days)")
    cur = _pass(logs, schema, day_paths, f"day {key}={day}", reference=ref)
    checks = [_rows(cfg, cur.acc.rows, ref.acc.rows / len(present))]
    checks += [_label_rate(cfg, t.name, cur.rate(j), ref.rate(j)) for j, t in enumerate(schema.binary)]
    checks += _dense(cfg, schema, ref, cur)
    checks += _sparse(cfg, schema, ref, cur)
    return DriftReport(logs, key, day, present, cur.acc.rows, ref.acc.rows, checks, cfg)


def _ranged(feature: str, figure: str, value: Optional[float], lo_hi, detail: str) -> Check:
    lo, hi = lo_hi
    return Check(feature, figure, value, lo, hi, value is not None and lo <= value <= hi, detail)


def _rows(cfg: DriftConfig, rows: int, mean: float) -> Check:
    return _ranged("*", "rows_ratio", rows / mean if mean else None, cfg.rows_ratio,
                   f"day {rows:,} rows, window {mean:,.0f} a day")


def _label_rate(cfg: DriftConfig, task: str, day: Optional[float], ref: Optional[float]) -> Check:
    detail = f"day {_g(day)}, window {_g(ref)}"
    if ref is None or ref == 0:  # nothing to compare with: passes unless positives appeared from none
        return Check(task, "label_rate_ratio", None, *cfg.label_rate_ratio, ref is None or not day,
                     detail + " (window has no labelled rows)" if ref is None else detail)
    return _ranged(task, "label_rate_ratio", None if day is None else day / ref, cfg.label_rate_ratio, detail)


def _dense(cfg: DriftConfig, schema: Schema, ref: Side, cur: Side) -> list[Check]:
    out = []
    for j, f in enumerate(schema.dense):
        r, d = (s.acc.sample.values[:, j] for s in (ref, cur))  # type: ignore[union-attr]
        r, d = r[np.isfinite(r)], d[np.isfinite(d)]
        limit = cfg.limit(f.name, "psi_max")
        if not len(r):
            out.append(Check(f.name, "psi", None, None, limit, True, "the window has no finite value"))
        elif not len(d):
            out.append(Check(f.name, "psi", None, None, limit, False, "the day has no finite value"))
        else:
            value = psi(r.astype(np.float64), d.astype(np.float64), cfg.psi_bins)
            out.append(Check(f.name, "psi", value, None, limit, value <= limit,
                             f"mean {float(d.mean()):.4g} vs {float(r.mean()):.4g}"))
    return out


def _sparse(cfg: DriftConfig, schema: Schema, ref: Side, cur: Side) -> list[Check]:
    out = []
    for j, (f, a) in enumerate(zip(schema.sparse, cur.acc.sparse)):
        if f.num_embeddings is not None:
            bad, limit = a["negative"] + a["out_of_range"], cfg.limit(f.name, "out_of_range_max")
            share = bad / a["ids"] if a["ids"] else 0.0
            out.append(Check(f.name, "out_of_range", share, None, limit, share <= limit,
                             f"{bad:,} of {a['ids']:,} ids outside [0, {f.num_embeddings:,})"))
        rowset = ref.rowsets[j]  # type: ignore[index]
        share, limit = unseen_share(int(cur.missing[j]), int(cur.lookups[j]), rowset), cfg.limit(f.name, "unseen_max")
        detail = f"{int(cur.missing[j]):,} of {int(cur.lookups[j]):,} lookups" + (
            f"; folded, {rowset.fill:.1%} of bits set" if rowset.folded else "")
        out.append(Check(f.name, "unseen", share, None, limit, share is None or share <= limit, detail))
    return out


def _g(x: Optional[float]) -> str:
    return "none" if x is None else f"{x:.4g}"


def format_table(report: DriftReport) -> str:
    window = f"{report.window[0]}..{report.window[-1]}" if report.window else "-"
    lines = [f"{report.key}={report.day} against {window} ({len(report.window)} days): "
             f"{len(report.failures)} of {len(report.checks)} checks fail"]
    w = max([len("feature")] + [len(c.feature) for c in report.checks])
    lines.append(f"{'feature':<{w}}  {'figure':<16} {'value':>10} {'threshold':>14}  ok")
    for c in report.checks:
        lines.append(f"{c.feature:<{w}}  {c.figure:<16} {_g(c.value):>10} {c.threshold():>14}  "
                     f"{'ok' if c.ok else 'FAIL'}  {c.detail}")
    return "\n".join(lines)


def run(args) -> int:
    key, _, day = args.partition.partition("=")
    if not key or not day or ".." in day:
        raise ConfigError(f"--partition: KEY=DAY, e.g. dt=2026-11-08, got {args.partition!r}")
    cfg = load_config(args.config)
    if args.window is not None:
        cfg.window_days = args.window
    report = check_day(args.logs, day, cfg, key=key)
    print(format_table(report))
    if args.json:
        text = json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n"
        storage.write_atomic(args.json, lambda fh: fh.write(text.encode()))
        logger.info(f"wrote {args.json}")
    if report.failures:
        first = report.failures[0]
        logger.error(f"distkd: drift: {key}={day} fails {len(report.failures)} check(s); first: {first.describe()}")
        return EXIT_FAILED
    logger.info(f"{key}={day}: every check passes ({len(report.checks)})")
    return 0
