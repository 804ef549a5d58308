"""Convert Instacart order lines (order_products_sample.csv, or any CSV with the same columns) into
sharded Parquet logs: task `reorder` = was this product in the basket bought by the user before.

Columns: order_id, user_id, order_number (the user's n-th order, from 1), order_dow,
order_hour_of_day, days_since_prior_order (empty for a user's first order), product_id,
add_to_cart_order, reordered; any other column (the sample's unnamed row number) is ignored.

Instacart has no wall clock shared by users, only each user's own: the order numbers and the
days between orders. So the split is per user and by time: each user's last `holdout` orders are
test, the `holdout` before them valid, the rest train. Rows are written in the order of each
user's clock (days since the user's first order), then user, order, product.

Student features come from the order's own header (day of week, hour, days since the prior
order: known when the user opens the app) and from the user's *earlier* orders only (how many,
their items, their reorder rate, the mean basket): a row's features never see its own order's
other lines or any later order. There is deliberately no user-product purchase count: `reordered`
is by definition "this user bought this product before", so that count is the label itself.

Teacher-only (privileged) features, known only once the order is placed, never when products are
recommended beforehand: `add_to_cart_order` (the product's position in the cart: habitual
reorders are added first), `basket_size` (the order's number of lines) and `cart_position`
(position / size). A teacher trained on them sees the finished basket; a student never reads
them (distkd.data.roles).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from distkd.config import ConfigError
from distkd.data.csv_convert import dense_index, prepare_out, read_csv, write_atomic
from distkd.data.schema import SCHEMA_FILE, SPLITS, TEACHER_ONLY, DenseFeature, LogsError, Schema, SparseFeature, Task

logger = logging.getLogger(__name__)

FILE = "order_products_sample.csv"
COLUMNS = {"order_id": pa.int64(), "user_id": pa.int64(), "order_number": pa.int64(), "order_dow": pa.int64(),
           "order_hour_of_day": pa.int64(), "days_since_prior_order": pa.float64(), "product_id": pa.int64(),
           "add_to_cart_order": pa.float64(), "reordered": pa.float64()}
NULLABLE = ("days_since_prior_order",)  # empty on a user's first order only
DAYS_BUCKETS = 32  # 0..30 days (Instacart caps the gap at 30), 31 = the first order
PRIVILEGED = ("add_to_cart_order", "basket_size", "cart_position")


def source_file(path: str | Path) -> Path:
    """The CSV itself, or a directory holding order_products_sample.csv."""
    p = Path(path)
    return p / FILE if p.is_dir() else p


def read_lines(path: Path) -> dict[str, np.ndarray]:
    """The checked columns as numpy arrays; errors name the file, column, line and value."""
    table = read_csv(path, COLUMNS, "Instacart order lines", nullable=NULLABLE)
    if table.num_rows < 1:
        raise LogsError(f"{path}: no order lines")
    cols = {}
    for name in COLUMNS:
        cols[name] = table.column(name).to_numpy(zero_copy_only=False)  # nulls (days) become NaN
    _check_values(path, cols)
    return cols


def _fail(path: Path, name: str, bad: np.ndarray, values: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        v = values[i].item()
        raise LogsError(f"{path}: column '{name}': value {'empty' if v != v else repr(v)} on line {i + 2} {what}")


def _check_values(path: Path, c: dict[str, np.ndarray]) -> None:
    def integral(name, lo, hi):
        v = c[name]
        _fail(path, name, ~np.isfinite(v) | (v != np.round(v)) | (v < lo) | (v > hi), v,
              f"is not a whole number in [{lo}, {hi}]")

    integral("order_number", 1, 10_000)
    integral("order_dow", 0, 6)
    integral("order_hour_of_day", 0, 23)
    integral("add_to_cart_order", 1, 100_000)
    _fail(path, "reordered", ~np.isin(c["reordered"], (0.0, 1.0)), c["reordered"], "is not 0 or 1")
    days, first = c["days_since_prior_order"], c["order_number"] == 1
    _fail(path, "days_since_prior_order", ~first & ~((days >= 0) & (days <= 365)), days,
          "is not a number of days in [0, 365] (it may be empty only on a user's first order)")
    # one order: one user, order number and header; one (user, order number): one order
    o = np.argsort(c["order_id"], kind="stable")
    same = c["order_id"][o][1:] == c["order_id"][o][:-1]
    for name in ("user_id", "order_number", "order_dow", "order_hour_of_day", "days_since_prior_order"):
        v = c[name][o].astype(np.float64)
        equal = (v[1:] == v[:-1]) | (np.isnan(v[1:]) & np.isnan(v[:-1]))
        _fail(path, name, _at(same & ~equal, o, len(v)), c[name], "differs from an earlier line of the same order_id")
    key = c["user_id"] * 100_000 + c["order_number"]
    k = np.argsort(key, kind="stable")
    clash = (key[k][1:] == key[k][:-1]) & (c["order_id"][k][1:] != c["order_id"][k][:-1])
    _fail(path, "order_id", _at(clash, k, len(key)), c["order_id"],
          "is a second order with the same user_id and order_number")
    pair = np.lexsort((c["product_id"], c["order_id"]))
    dup = (c["order_id"][pair][1:] == c["order_id"][pair][:-1]) & (c["product_id"][pair][1:] == c["product_id"][pair][:-1])
    _fail(path, "product_id", _at(dup, pair, len(key)), c["product_id"], "appears twice in the same order")


def _at(flag_sorted_pairs: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
    """A mask over the file's lines from a flag on consecutive pairs of a sort: the later line of each pair."""
    out = np.zeros(n, bool)
    out[order[1:][flag_sorted_pairs]] = True
    return out


def features(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per line: the student's features from the user's earlier orders, the privileged ones, and
    the user's clock (days since the first order) for the split and the row order."""
    n = len(c["order_id"])
    uidx, n_users = dense_index(c["user_id"])
    # one row per order, in (user, order number) order
    okey = uidx * 100_000 + c["order_number"]
    orders, line_order = np.unique(okey, return_inverse=True)
    o_user = orders // 100_000
    size = np.bincount(line_order, minlength=len(orders))
    reorders = np.bincount(line_order, weights=c["reordered"], minlength=len(orders))
    first_line = np.zeros(len(orders), np.int64)
    first_line[line_order[::-1]] = np.arange(n)[::-1]
    gap = np.nan_to_num(c["days_since_prior_order"][first_line])
    new_user = np.r_[True, o_user[1:] != o_user[:-1]]
    start = np.maximum.accumulate(np.where(new_user, np.arange(len(orders)), 0))

    def before(x):  # per order: the sum of x over the same user's strictly earlier orders
        cum = np.r_[0, np.cumsum(x)]
        return cum[np.arange(len(orders))] - cum[start]

    prior_orders = np.arange(len(orders)) - start
    prior_items, prior_reorders = before(size), before(reorders)
    clock = before(gap) + gap  # days from the user's first order to this one
    last = np.maximum.reduceat(prior_orders, np.flatnonzero(new_user))[np.cumsum(new_user) - 1]
    po = lambda x: x[line_order]  # noqa: E731  per order -> per line
    days = c["days_since_prior_order"]
    return {
        "user": uidx.astype(np.int64), "users": n_users,
        "dow": c["order_dow"].astype(np.int64), "hour": c["order_hour_of_day"].astype(np.int64),
        "days_bucket": np.where(np.isnan(days), DAYS_BUCKETS - 1, np.clip(np.nan_to_num(days), 0, 30)).astype(np.int64),
        "user_prior_orders": po(prior_orders).astype(np.float64),
        "user_prior_items": po(prior_items).astype(np.float64),
        "user_reorder_rate": po((prior_reorders + 1) / (prior_items + 2)),  # Laplace-smoothed
        "user_mean_basket": po(np.where(prior_orders > 0, prior_items / np.maximum(prior_orders, 1), 0.0)),
        "days_since_prior": np.nan_to_num(days),
        "add_to_cart_order": c["add_to_cart_order"],
        "basket_size": po(size).astype(np.float64),
        "cart_position": (c["add_to_cart_order"] - 1) / po(size),
        "clock": po(clock), "orders_left": po(last - prior_orders),  # 0 on the user's last order
    }


def make_schema(n_users: int, n_products: int) -> Schema:
    return Schema(
        sparse=[SparseFeature("user", num_embeddings=n_users), SparseFeature("product", num_embeddings=n_products),
                SparseFeature("dow", num_embeddings=7), SparseFeature("hour", num_embeddings=24),
                SparseFeature("days_bucket", num_embeddings=DAYS_BUCKETS)],
        dense=[DenseFeature("user_prior_orders", "log1p"), DenseFeature("user_prior_items", "log1p"),
               DenseFeature("user_reorder_rate"), DenseFeature("user_mean_basket", "log1p"),
               DenseFeature("days_since_prior", "log1p"),
               DenseFeature("add_to_cart_order", "log1p", role=TEACHER_ONLY),
               DenseFeature("basket_size", "log1p", role=TEACHER_ONLY),
               DenseFeature("cart_position", role=TEACHER_ONLY)],
        tasks=[Task("reorder", "reordered")],
        request_id="request_id",
    )


def convert(src: str | Path, out_dir: str | Path, shards: int = 4, row_group_rows: int = 16_384, holdout: int = 2,
            force: bool = False) -> Schema:
    """Convert the order lines at `src` (file or directory) into logs at `out_dir`; returns the schema."""
    return _convert(src, out_dir, shards, row_group_rows, holdout, force)[0]


def _convert(src, out_dir, shards, row_group_rows, holdout, force) -> tuple[Schema, dict]:
    path, out = source_file(src), Path(out_dir)
    if shards < 1 or row_group_rows < 1 or holdout < 1:
        raise ConfigError(f"shards ({shards}), row_group_rows ({row_group_rows}) and holdout ({holdout}) must be positive")
    prepare_out(path.parent, out, force, remove=False)
    c = read_lines(path)
    f = features(c)
    pidx, n_products = dense_index(c["product_id"])
    split = np.where(f["orders_left"] < holdout, 2, np.where(f["orders_left"] < 2 * holdout, 1, 0))
    if np.bincount(split, minlength=3).min() == 0:
        raise LogsError(f"{path}: with holdout {holdout} a split is empty (users need more than {2 * holdout} orders)")
    # split, then each user's clock, user, order, product: users interleaved by their own time
    order = np.lexsort((pidx, c["order_number"], f["user"], f["clock"], split))
    schema = make_schema(f["users"], n_products)
    schema.validate()
    n = len(order)
    # request: one order; numbered in the written order
    oid = c["order_id"][order]
    request = np.cumsum(np.r_[True, oid[1:] != oid[:-1]]) - 1
    columns = {"example_id": np.arange(n, dtype=np.int64), "user": f["user"][order], "product": pidx[order],
               **{k: f[k][order] for k in ("dow", "hour", "days_bucket", "user_prior_orders", "user_prior_items",
                                           "user_reorder_rate", "user_mean_basket", "days_since_prior",
                                           *PRIVILEGED)},
               "reordered": c["reordered"][order].astype(np.int8), "request_id": request}
    arrow = schema.arrow_schema()
    assert arrow.names == list(columns), (arrow.names, list(columns))
    prepare_out(path.parent, out, force, remove=True)
    bounds = np.searchsorted(split[order], [0, 1, 2, 3])
    summary = {"users": f["users"], "products": n_products, "orders": int(len(np.unique(oid))), "rows": n, "splits": {}}
    for s, name in enumerate(SPLITS):
        a, b = int(bounds[s]), int(bounds[s + 1])
        (out / name).mkdir(parents=True)
        nshards = min(b - a, shards if name == "train" else max(1, shards // 4))
        edges = a + np.arange(nshards + 1) * (b - a) // nshards
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            table = pa.Table.from_arrays([pa.array(v[lo:hi], type=arrow.field(k).type) for k, v in columns.items()],
                                         schema=arrow)
            write_atomic(table, out / name / f"part-{i:05d}.parquet", row_group_rows)
        summary["splits"][name] = {"rows": b - a, "shards": int(nshards),
                                   "reordered": float(columns["reordered"][a:b].mean())}
    schema.save(out / SCHEMA_FILE)  # written last: a directory without it is incomplete
    return schema, summary


def run(args) -> int:
    t0 = time.perf_counter()
    schema, s = _convert(args.path, args.out, args.shards, args.row_group_rows, args.holdout, args.force)
    logger.info(f"converted {source_file(args.path)} -> {args.out} in {time.perf_counter() - t0:.1f}s: "
                f"{s['rows']:,} order lines, {s['orders']:,} orders, {s['users']:,} users, {s['products']:,} products")
    for split, d in s["splits"].items():
        logger.info(f"  {split:<6} {d['rows']:>9,} rows {d['shards']:>3} shards  reordered {d['reordered']:.3f}")
    logger.info(f"  teacher-only: {', '.join(PRIVILEGED)}; task reorder: label 'reordered'")
    logger.info(f"  schema: {Path(args.out) / SCHEMA_FILE}")
    return 0
