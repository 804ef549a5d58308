"""Convert a MovieLens CSV release (ratings.csv + movies.csv) into sharded Parquet logs.

Works on any release with the standard layout (ml-latest-small, ml-25m, ...):
`ratings.csv` userId,movieId,rating,timestamp and `movies.csv` movieId,title,genres,
with '|'-separated genres and the release year in parentheses at the end of the title.
Everything is vectorized (pyarrow CSV reader, numpy sorts and cumulative sums).

Rows are sorted by (timestamp, userId, movieId); a row's position in that order is its
`example_id`. The split is by time: train ~80%, valid ~10%, test ~10% of the rows, cut
where possible at an hour boundary so no request straddles two splits. Dense features
use only ratings with a strictly earlier timestamp, so they never see the row's label.

`privileged=True` adds teacher-only features (distkd.data.roles): hindsight known to the logs
but never when a movie is recommended, each computed without the row's own rating: the movie's
and the user's like rate over their strictly *later* ratings (and how many there are), and how
many tags the user ever put on the movie (tags.csv, when the release has one; tagging is done
around the rating, so it tells what the user made of the movie). A teacher trained on them sees
the future; a student never reads them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distkd.config import ConfigError
from distkd.data.csv_convert import dense_index, prepare_out, read_csv, write_atomic
from distkd.data.schema import SCHEMA_FILE, SPLITS, TEACHER_ONLY, DenseFeature, LogsError, Schema, SparseFeature, Task

logger = logging.getLogger(__name__)

RATINGS = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
MOVIES = {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
TAGS = {"userId": pa.int64(), "movieId": pa.int64()}
PRIVILEGED = ("movie_future_like_rate", "movie_future_ratings", "user_future_like_rate", "user_tags_on_movie")
LIKE_THRESHOLD = 4.0
# Release years in 5-year buckets: 0 = unknown year, 1 = 1900-1904 (earlier years clipped into it),
# ..., 26 = 2025-2029 (later years clipped into it).
YEAR_MIN, YEAR_MAX, YEAR_STEP = 1900, 2030, 5
YEAR_BUCKETS = (YEAR_MAX - YEAR_MIN) // YEAR_STEP
SPLIT_FRACTIONS = (0.8, 0.9)  # cumulative: train up to 80%, valid up to 90%, test the rest
SECONDS_PER_YEAR = 365.2425 * 86400


def _prior(key: np.ndarray, ts: np.ndarray, liked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many rows with the same key have a strictly earlier timestamp, and how
    many of those were liked. Rows must already be in time order."""
    o = np.argsort(key, kind="stable")  # by key, then time
    k, t = key[o], ts[o]
    idx = np.arange(len(o))
    new_key = np.r_[True, k[1:] != k[:-1]]
    new_run = new_key | np.r_[True, t[1:] != t[:-1]]  # first row of each (key, timestamp) run
    key_start = np.maximum.accumulate(np.where(new_key, idx, 0))
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    likes_before = np.r_[0, np.cumsum(liked[o], dtype=np.int64)]
    count, likes = np.empty(len(o), np.int64), np.empty(len(o), np.int64)
    count[o] = run_start - key_start
    likes[o] = likes_before[run_start] - likes_before[key_start]
    return count, likes


def _cut(hours: np.ndarray, ts: np.ndarray, k: int, lo: int, hi: int) -> int:
    """Cut position near row k: at an hour boundary, else a timestamp boundary, else k itself,
    keeping lo < cut < hi so that no split is empty."""
    for c in (np.searchsorted(hours, hours[k]), np.searchsorted(ts, ts[k])):
        if lo < c < hi:
            return int(c)
    return k


def _genre_lists(genres: pa.ChunkedArray) -> tuple[pa.ListArray, list[str]]:
    """'A|B' strings -> list<int64> of genre-vocabulary indices (empty names dropped), and the
    sorted vocabulary; '(no genres listed)' is a genre like any other."""
    split = pc.split_pattern(genres.combine_chunks(), "|")
    flat = pc.utf8_trim_whitespace(split.flatten())
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(len(split)), np.diff(split.offsets.to_numpy()))
    offsets = np.r_[0, np.cumsum(np.bincount(row[keep], minlength=len(split)))].astype(np.int32)
    flat = flat.filter(pa.array(keep))
    vocab = sorted(pc.unique(flat).to_pylist())
    ids = pc.index_in(flat, value_set=pa.array(vocab, pa.string())).cast(pa.int64())
    return pa.ListArray.from_arrays(pa.array(offsets), ids), vocab


def convert(src_dir: str | Path, out_dir: str | Path, shards: int = 4, row_group_rows: int = 65_536,
            force: bool = False, privileged: bool = False) -> Schema:
    """Convert the MovieLens release in `src_dir` into a logs directory `out_dir`; returns its schema.
    `privileged`: also the teacher-only hindsight features (module docstring)."""
    return _convert(src_dir, out_dir, shards, row_group_rows, force, privileged)[0]


def _future(key: np.ndarray, ts: np.ndarray, liked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many rows with the same key have a strictly later timestamp, and how many of
    those were liked (`_prior` run backwards in time). Rows must be in time order."""
    count, likes = _prior(key[::-1], -ts[::-1], liked[::-1])
    return count[::-1], likes[::-1]


def _tag_counts(path: Path, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """Per rating (userId, movieId): how many tags that user put on that movie; 0 without tags.csv."""
    if not path.is_file():
        logger.info(f"{path}: not found; user_tags_on_movie is 0 everywhere")
        return np.zeros(len(users), np.int64)
    tags = read_csv(path, TAGS, "a MovieLens CSV")
    tu, tm = tags.column("userId").to_numpy(), tags.column("movieId").to_numpy()
    shift = int(max(movies.max(), tm.max())) + 1
    keys, counts = np.unique(tu * shift + tm, return_counts=True)
    want = users * shift + movies
    i = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    return np.where(keys[i] == want, counts[i], 0)


def _convert(src_dir, out_dir, shards, row_group_rows, force, privileged=False) -> tuple[Schema, dict]:
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise LogsError(f"{src}: directory not found (expected a MovieLens release: ratings.csv, movies.csv)")
    if shards < 1 or row_group_rows < 1:
        raise ConfigError(f"shards ({shards}) and row_group_rows ({row_group_rows}) must be positive")
    prepare_out(src, out, force, remove=False)  # fail fast, before the (long) read
    rpath, mpath = src / "ratings.csv", src / "movies.csv"
    ratings, movies = read_csv(rpath, RATINGS, "a MovieLens CSV"), read_csv(mpath, MOVIES, "a MovieLens CSV")

    # Movies: dense index = rank of movieId; release year from the title; genre lists.
    by_id = np.argsort(movies.column("movieId").to_numpy(), kind="stable")
    movies = movies.take(pa.array(by_id))
    movie_ids = movies.column("movieId").to_numpy()
    dup = np.flatnonzero(movie_ids[1:] == movie_ids[:-1])
    if len(dup):
        raise LogsError(f"{mpath}: column 'movieId': {movie_ids[dup[0]]} appears more than once")
    title = pc.utf8_trim_whitespace(movies.column("title").combine_chunks())
    year = pc.struct_field(pc.extract_regex(title, r"\((?P<y>\d{4})(?:\s*[-\x{2013}]\s*\d{0,4})?\)$"), [0])
    year = pc.cast(pc.if_else(pc.equal(year, ""), None, year), pa.float64()).to_numpy(zero_copy_only=False)
    known = ~np.isnan(year)  # to_numpy turns null years into NaN
    movie_bucket = np.where(known, 1 + (np.clip(np.nan_to_num(year), YEAR_MIN, YEAR_MAX - 1) - YEAR_MIN) // YEAR_STEP,
                            0).astype(np.int64)
    genre_lists, genre_vocab = _genre_lists(movies.column("genres"))

    # Ratings: check, map movies, sort by (timestamp, userId, movieId); example_id = position.
    u, m = ratings.column("userId").to_numpy(), ratings.column("movieId").to_numpy()
    r, ts = ratings.column("rating").to_numpy(), ratings.column("timestamp").to_numpy()
    n = len(u)
    if n < 3:
        raise LogsError(f"{rpath}: {n} ratings; train, valid and test need at least 3")
    if not np.isfinite(r).all():
        raise LogsError(f"{rpath}: column 'rating': value {r[~np.isfinite(r)][0]} on line "
                        f"{int(np.flatnonzero(~np.isfinite(r))[0]) + 2} is not a finite number")
    midx = np.searchsorted(movie_ids, m)
    unknown = (midx >= len(movie_ids)) | (movie_ids[np.minimum(midx, len(movie_ids) - 1)] != m)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise LogsError(f"{rpath}: column 'movieId': {m[i]} on line {i + 2} is not in {mpath}")
    order = pc.sort_indices(ratings, [(c, "ascending") for c in ("timestamp", "userId", "movieId")]).to_numpy()
    u, midx, r, ts = u[order], midx[order], r[order], ts[order]
    uidx, n_users = dense_index(u)
    liked = (r >= LIKE_THRESHOLD).astype(np.int8)
    hours = ts // 3600
    # request_id: one user's ratings within one clock hour, numbered in time order.
    key = (hours - hours[0]) * n_users + uidx
    o = np.argsort(key, kind="stable")
    request = np.empty(n, np.int64)
    request[o] = np.cumsum(np.r_[True, key[o][1:] != key[o][:-1]]) - 1
    # Dense features from strictly earlier ratings only.
    uc, ul = _prior(uidx, ts, liked)
    mc, ml = _prior(midx, ts, liked)
    row_year = year[midx]
    # Years from the start of the release year to the rating; 0 for an unknown year or a rating before release.
    since = np.where(np.isnan(row_year), 0.0, np.maximum(0.0, ts / SECONDS_PER_YEAR + 1970 - np.nan_to_num(row_year)))

    k1 = min(max(1, int(n * SPLIT_FRACTIONS[0])), n - 2)
    c1 = _cut(hours, ts, k1, 0, n - 1)
    c2 = _cut(hours, ts, min(max(c1 + 1, int(n * SPLIT_FRACTIONS[1])), n - 1), c1, n)
    bounds = dict(zip(SPLITS, [(0, c1), (c1, c2), (c2, n)]))

    schema = Schema(
        sparse=[SparseFeature("user", num_embeddings=n_users),
                SparseFeature("movie", num_embeddings=len(movie_ids)),
                SparseFeature("genres", num_embeddings=max(1, len(genre_vocab)), multi_valued=True),
                SparseFeature("year_bucket", num_embeddings=YEAR_BUCKETS + 1),
                SparseFeature("hour", num_embeddings=24),
                SparseFeature("weekday", num_embeddings=7)],
        dense=[DenseFeature("user_prior_ratings", "log1p"), DenseFeature("movie_prior_ratings", "log1p"),
               DenseFeature("user_like_rate"), DenseFeature("movie_like_rate"),
               DenseFeature("years_since_release", "log1p")],
        tasks=[Task("like", "liked")],
        request_id="request_id",
        eval_columns=["rating"],
    )
    if privileged:
        schema.dense += [DenseFeature("movie_future_like_rate", role=TEACHER_ONLY),
                         DenseFeature("movie_future_ratings", "log1p", role=TEACHER_ONLY),
                         DenseFeature("user_future_like_rate", role=TEACHER_ONLY),
                         DenseFeature("user_tags_on_movie", "log1p", role=TEACHER_ONLY)]
    schema.validate()
    columns = {
        "example_id": np.arange(n, dtype=np.int64), "user": uidx.astype(np.int64), "movie": midx,
        "genres": None, "year_bucket": movie_bucket[midx], "hour": hours % 24, "weekday": (ts // 86400 + 3) % 7,
        "user_prior_ratings": uc, "movie_prior_ratings": mc,
        "user_like_rate": (ul + 1) / (uc + 2), "movie_like_rate": (ml + 1) / (mc + 2),  # Laplace-smoothed
        "years_since_release": since,
        **(_hindsight(src / "tags.csv", u, movie_ids[midx], uidx, midx, ts, liked) if privileged else {}),
        "liked": liked, "request_id": request, "rating": r,
    }
    arrow = schema.arrow_schema()
    assert arrow.names == list(columns), (arrow.names, list(columns))

    prepare_out(src, out, force, remove=True)
    summary = {"users": n_users, "movies": len(movie_ids), "genres": len(genre_vocab), "rows": n, "splits": {}}
    for split, (a, b) in bounds.items():
        (out / split).mkdir(parents=True)
        nshards = min(b - a, shards if split == "train" else max(1, shards // 4))
        edges = a + np.arange(nshards + 1) * (b - a) // nshards
        for i, (s, e) in enumerate(zip(edges[:-1], edges[1:])):
            arrays = [genre_lists.take(pa.array(midx[s:e])) if c is None else
                      pa.array(c[s:e], type=arrow.field(name).type) for name, c in columns.items()]
            write_atomic(pa.Table.from_arrays(arrays, schema=arrow), out / split / f"part-{i:05d}.parquet",
                          row_group_rows)
        summary["splits"][split] = {"rows": int(b - a), "shards": int(nshards),
                                    "liked": float(liked[a:b].mean()), "from": int(ts[a]), "to": int(ts[b - 1])}
    schema.save(out / SCHEMA_FILE)  # written last: a directory without it is incomplete
    return schema, summary


def _hindsight(tags: Path, users, movies, uidx, midx, ts, liked) -> dict[str, np.ndarray]:
    """The privileged columns (PRIVILEGED, in order): none of them reads the row's own rating."""
    mc, ml = _future(midx, ts, liked)
    uc, ul = _future(uidx, ts, liked)
    return {"movie_future_like_rate": (ml + 1) / (mc + 2), "movie_future_ratings": mc,
            "user_future_like_rate": (ul + 1) / (uc + 2), "user_tags_on_movie": _tag_counts(tags, users, movies)}


def run(args) -> int:
    t0 = time.perf_counter()
    schema, s = _convert(args.path, args.out, args.shards, args.row_group_rows, args.force, args.privileged)
    logger.info(f"converted {args.path} -> {args.out} in {time.perf_counter() - t0:.1f}s: {s['rows']:,} ratings, "
                f"{s['users']:,} users, {s['movies']:,} movies, {s['genres']} genres")
    logger.info(f"  {'split':<6} {'rows':>12} {'shards':>6} {'liked':>6}  time range (UTC)")
    for split, d in s["splits"].items():
        span = " .. ".join(time.strftime("%Y-%m-%d %H:%M", time.gmtime(d[k])) for k in ("from", "to"))
        logger.info(f"  {split:<6} {d['rows']:>12,} {d['shards']:>6} {d['liked']:>6.3f}  {span}")
    sparse = ", ".join(f"{f.name}={f.rows}{' (multi)' if f.multi_valued else ''}" for f in schema.sparse)
    logger.info(f"  sparse: {sparse}")
    logger.info(f"  dense: {', '.join(f.name + (' (teacher-only)' if f.role == TEACHER_ONLY else '') for f in schema.dense)}; task like: label 'liked' = rating >= 4")
    logger.info(f"  schema: {Path(args.out) / SCHEMA_FILE}")
    return 0
