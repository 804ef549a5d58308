"""Convert a MovieLens CSV release into next-movie (multi-class) logs.

One row per rating, as in distkd.data.movielens (same sort, same `example_id`, same movie index =
rank of movieId in movies.csv, same time split), but the task is the movie itself:

    history     list<int64>  the user's last L movies rated at a strictly earlier timestamp, oldest first
    user, hour, weekday      int64 context
    next_movie  int64        the label: the movie rated (index into movies.csv, num_classes = #movies)
    rating      float32      evaluation only

"Strictly earlier": MovieLens users often rate many movies in the same second, and inside one
second the order is only the sort's tie-break (movieId); a history that included those would
leak that artifact. Rows whose history is shorter than `min_history` (a user's first second) are
dropped. Vectorized: one stable sort per user, then the history windows as one gather.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import yaml

from distkd.config import ConfigError
from distkd.data.csv_convert import dense_index, prepare_out, read_csv, write_atomic
from distkd.data.movielens import MOVIES, RATINGS, SPLIT_FRACTIONS, _cut
from distkd.data.schema import SCHEMA_FILE, SPLITS, LogsError
from distkd.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

LABEL = "next_movie"


def arrow_schema() -> pa.Schema:
    return pa.schema([pa.field("example_id", pa.int64(), nullable=False), pa.field("history", pa.list_(pa.int64())),
                      pa.field("user", pa.int64()), pa.field("hour", pa.int64()), pa.field("weekday", pa.int64()),
                      pa.field(LABEL, pa.int64()), pa.field("rating", pa.float32())])


def schema_dict(n_users: int, n_movies: int) -> dict:
    """The logs' schema: distkd.data.schema's fields plus a multi-class task."""
    sparse = [("history", n_movies, True), ("user", n_users, False), ("hour", 24, False), ("weekday", 7, False)]
    return {
        "sparse": [{"name": n, "num_embeddings": r, "hash_size": None, "multi_valued": m} for n, r, m in sparse],
        "dense": [],
        "tasks": [{"name": LABEL, "label": LABEL, "kind": "multiclass", "num_classes": n_movies, "item_feature": "history"}],
        "id": "example_id",
        "request_id": None,
        "eval_columns": ["rating"],
        "version": 1,
    }


def history_windows(user: np.ndarray, ts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows in time order: (start, end) positions, in the per-user order `argsort(user, stable)`,
    of each row's last `length` rows of the same user with a strictly earlier timestamp, and that order."""
    o = np.argsort(user, kind="stable")
    u, t = user[o], ts[o]
    idx = np.arange(len(o))
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_run = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    start, end = np.empty(len(o), np.int64), np.empty(len(o), np.int64)
    start[o] = np.maximum(user_start, run_start - length)
    end[o] = run_start
    return start, end, o


def convert_next(src_dir: str | Path, out_dir: str | Path, history: int = 20, min_history: int = 1,
                 shards: int = 4, row_group_rows: int = 65_536, force: bool = False) -> dict:
    """Write next-movie logs of the MovieLens release in `src_dir` into `out_dir`; returns the schema dict
    (with a `summary`)."""

    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise LogsError(f"{src}: directory not found (expected a MovieLens release: ratings.csv, movies.csv)")
    if history < 1 or min_history < 0 or shards < 1 or row_group_rows < 1:
        raise ConfigError("history >= 1, min_history >= 0, shards and row_group_rows >= 1 are required")
    prepare_out(src, out, force, remove=False)
    rpath, mpath = src / "ratings.csv", src / "movies.csv"
    ratings, movies = read_csv(rpath, RATINGS, "a MovieLens CSV"), read_csv(mpath, MOVIES, "a MovieLens CSV")
    movie_ids = np.sort(movies.column("movieId").to_numpy())
    if len(dup := np.flatnonzero(movie_ids[1:] == movie_ids[:-1])):
        raise LogsError(f"{mpath}: column 'movieId': {movie_ids[dup[0]]} appears more than once")
    m = ratings.column("movieId").to_numpy()
    midx = np.searchsorted(movie_ids, m)
    unknown = (midx >= len(movie_ids)) | (movie_ids[np.minimum(midx, len(movie_ids) - 1)] != m)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise LogsError(f"{rpath}: column 'movieId': {m[i]} on line {i + 2} is not in {mpath}")
    order = pc.sort_indices(ratings, [(c, "ascending") for c in ("timestamp", "userId", "movieId")]).to_numpy()
    u, r, ts = ratings.column("userId").to_numpy()[order], ratings.column("rating").to_numpy()[order], \
        ratings.column("timestamp").to_numpy()[order]
    midx = midx[order]
    uidx, n_users = dense_index(u)

    start, end, by_user = history_windows(uidx, ts, history)
    keep = np.flatnonzero(end - start >= max(min_history, 0))
    n = len(keep)
    if n < 3:
        raise LogsError(f"{rpath}: {n} ratings with a history; train, valid and test need at least 3")
    lengths = (end - start)[keep]
    offsets = np.r_[0, np.cumsum(lengths)]
    pos = np.repeat(start[keep] - offsets[:-1], lengths) + np.arange(offsets[-1])  # per-user positions
    values = midx[by_user][pos]
    ts_k = ts[keep]
    hours = ts_k // 3600
    c1 = _cut(hours, ts_k, min(max(1, int(n * SPLIT_FRACTIONS[0])), n - 2), 0, n - 1)
    c2 = _cut(hours, ts_k, min(max(c1 + 1, int(n * SPLIT_FRACTIONS[1])), n - 1), c1, n)
    columns = {"example_id": keep.astype(np.int64), "history": None, "user": uidx[keep].astype(np.int64),
               "hour": hours % 24, "weekday": (ts_k // 86400 + 3) % 7, LABEL: midx[keep].astype(np.int64),
               "rating": r[keep].astype(np.float32)}
    schema = arrow_schema()
    prepare_out(src, out, force, remove=True)
    summary = {"users": n_users, "movies": len(movie_ids), "rows": n, "dropped": len(order) - n, "history": history,
               "min_history": min_history, "splits": {}}
    for split, (a, b) in zip(SPLITS, [(0, c1), (c1, c2), (c2, n)]):
        (out / split).mkdir(parents=True)
        nshards = min(b - a, shards if split == "train" else max(1, shards // 4))
        edges = a + np.arange(nshards + 1) * (b - a) // nshards
        for i, (s, e) in enumerate(zip(edges[:-1], edges[1:])):
            hist = pa.ListArray.from_arrays(pa.array((offsets[s:e + 1] - offsets[s]).astype(np.int32)),
                                            pa.array(values[offsets[s]:offsets[e]]))
            arrays = [hist if c is None else pa.array(c[s:e], type=schema.field(name).type) for name, c in columns.items()]
            write_atomic(pa.Table.from_arrays(arrays, schema=schema), out / split / f"part-{i:05d}.parquet", row_group_rows)
        summary["splits"][split] = {"rows": int(b - a), "shards": int(nshards), "from": int(ts_k[a]), "to": int(ts_k[b - 1])}
    meta = schema_dict(n_users, len(movie_ids))
    text = yaml.safe_dump(meta, sort_keys=False)
    atomic_write_bytes(out / SCHEMA_FILE, lambda fh: fh.write(text.encode()))  # last: marks the directory complete
    return {**meta, "summary": summary}


def run(args) -> int:
    t0 = time.perf_counter()
    s = convert_next(args.path, args.out, args.history, args.min_history, args.shards, args.row_group_rows, args.force)["summary"]
    logger.info(f"converted {args.path} -> {args.out} in {time.perf_counter() - t0:.1f}s: {s['rows']:,} next-movie rows "
                f"({s['dropped']:,} without history dropped), {s['users']:,} users, {s['movies']:,} movies")
    for split, d in s["splits"].items():
        logger.info(f"  {split:<6} {d['rows']:>10,} rows {d['shards']:>3} shards")
    return 0
