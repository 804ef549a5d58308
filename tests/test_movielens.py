"""MovieLens conversion: the real ml-latest-small (row counts, time split, labels, genres,
validation, refusal to overwrite) and a tiny hand-written release (remapping, years, priors)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from distkd.config import ConfigError
from distkd import storage
from distkd.data.movielens import convert
from distkd.data.validate import validate_logs
from distkd.data.schema import SPLITS, LogsError, load_schema

pytestmark = pytest.mark.unit

ML_SMALL = Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"


def _read_split(out: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / split).glob("*.parquet")))


# --- the real ml-latest-small -------------------------------------------------------------


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    if not (ML_SMALL / "ratings.csv").is_file():
        pytest.skip(f"MovieLens ml-latest-small not found at {ML_SMALL}")
    out = tmp_path_factory.mktemp("ml") / "logs"
    schema = convert(ML_SMALL, out, shards=4, row_group_rows=8192)
    splits = {s: _read_split(out, s) for s in SPLITS}
    # Independently of the converter: ratings in (timestamp, userId, movieId) order.
    csv = pacsv.read_csv(ML_SMALL / "ratings.csv")
    csv = csv.take(pc.sort_indices(csv, [("timestamp", "ascending"), ("userId", "ascending"),
                                         ("movieId", "ascending")]))
    return out, schema, splits, csv


def test_rows_add_up_and_shards(ml):
    out, schema, splits, csv = ml
    rows = {s: t.num_rows for s, t in splits.items()}
    assert sum(rows.values()) == csv.num_rows == 100_836
    assert 0.78 < rows["train"] / 100_836 < 0.82 and 0.08 < rows["valid"] / 100_836 < 0.12
    assert {s: len(list((out / s).glob("*.parquet"))) for s in SPLITS} == {"train": 4, "valid": 1, "test": 1}
    # temporary names are `.<name>.tmp-<tag>` (distkd.storage.temp_name): none may be left
    assert storage.is_temp(storage.temp_name("part-00000.parquet"))
    assert not [p for p in out.rglob("*") if storage.is_temp(p.name)]
    ids = np.concatenate([splits[s].column("example_id").to_numpy() for s in SPLITS])
    assert (ids == np.arange(100_836)).all()  # unique, and in time order across shards and splits


def test_split_by_time(ml):
    _, _, splits, csv = ml
    ts_sorted = csv.column("timestamp").to_numpy()
    ts = {s: ts_sorted[t.column("example_id").to_numpy()] for s, t in splits.items()}
    assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()
    for s in SPLITS:
        assert (np.diff(ts[s]) >= 0).all()
        t = splits[s]
        assert (t.column("hour").to_numpy() == (ts[s] // 3600) % 24).all()
        i = t.num_rows // 2
        weekday = datetime.datetime.fromtimestamp(int(ts[s][i]), datetime.timezone.utc).weekday()
        assert t.column("weekday")[i].as_py() == weekday


def test_labels_match_ratings(ml):
    out, schema, splits, csv = ml
    assert [(t.name, t.label) for t in schema.tasks] == [("like", "liked")]
    expected = pc.sum(pc.greater_equal(pacsv.read_csv(ML_SMALL / "ratings.csv").column("rating"), 4.0)).as_py()
    liked = np.concatenate([splits[s].column("liked").to_numpy() for s in SPLITS])
    assert splits["train"].schema.field("liked").type == pa.int8()
    assert liked.sum() == expected
    ratings = csv.column("rating").to_numpy()
    for t in splits.values():
        assert (t.column("liked").to_numpy() == (ratings[t.column("example_id").to_numpy()] >= 4)).all()


def test_features_and_cardinalities(ml):
    out, schema, splits, csv = ml
    movies = pacsv.read_csv(ML_SMALL / "movies.csv")
    genres = set(pc.list_flatten(pc.split_pattern(movies.column("genres"), "|")).to_pylist())
    sizes = {f.name: f.rows for f in schema.sparse}
    assert sizes["user"] == len(pc.unique(csv.column("userId"))) == 610
    assert sizes["movie"] == movies.num_rows == 9742
    assert sizes["genres"] == len(genres) == 20  # 19 genres and "(no genres listed)"
    assert [f.name for f in schema.sparse if f.multi_valued] == ["genres"]
    table = pa.concat_tables(splits.values())
    lengths = pc.list_value_length(table.column("genres")).to_numpy()
    assert lengths.min() >= 1 and lengths.max() > 1
    assert load_schema(out) == schema
    # Dense features only look at strictly earlier ratings: each user's first rating has no history.
    user = table.column("user").to_numpy()
    first = np.unique(user, return_index=True)[1]
    assert (table.column("user_prior_ratings").to_numpy()[first] == 0).all()
    assert (table.column("user_like_rate").to_numpy()[first] == 0.5).all()
    # A request is one user's ratings within one clock hour.
    hours = csv.column("timestamp").to_numpy()[table.column("example_id").to_numpy()] // 3600
    groups = np.unique(np.stack([table.column("request_id").to_numpy(), user, hours]), axis=1)
    assert groups.shape[1] == len(np.unique(groups[0])) == np.unique(groups[1:], axis=1).shape[1]


def test_output_validates(ml):
    out, _, splits, _ = ml
    summary = validate_logs(out)
    assert summary["rows"] == 100_836
    assert summary["splits"]["train"]["rows"] == splits["train"].num_rows
    assert summary["splits"]["train"]["row_groups"] >= 8  # ~20k rows per shard, 8192-row groups


def test_refuses_to_overwrite(ml):
    out = ml[0]
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ConfigError, match="not empty"):
        convert(ML_SMALL, out)
    assert sorted(p.name for p in out.rglob("*")) == before


# --- a tiny hand-written release -----------------------------------------------------------

MOVIES = """movieId,title,genres
30,Babylon 5 (1993-1998),Sci-Fi
10,"Heat, The (1995)",Action|Crime
5,Toy Story (1995) ,Animation|Children
7,Untitled,(no genres listed)
20,Old One (1899),Drama
"""
MON = 4 * 86400  # 1970-01-05, a Monday
RATINGS = f"""userId,movieId,rating,timestamp
100,10,4.5,{MON + 3600}
7,5,3.0,{MON + 5 * 3600}
7,10,5.0,{MON + 5 * 3600 + 60}
42,30,4.0,{MON + 9 * 3600}
42,7,1.0,{MON + 9 * 3600}
100,20,4.0,{MON + 86400 + 2 * 3600}
7,30,2.5,{MON + 2 * 86400}
42,5,4.0,{MON + 3 * 86400}
100,5,3.5,{MON + 4 * 86400}
7,7,4.0,{MON + 5 * 86400}
"""


def _release(tmp_path, ratings=RATINGS, movies=MOVIES) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ratings.csv").write_text(ratings)
    (src / "movies.csv").write_text(movies)
    return src


def test_tiny_release_remapping_and_years(tmp_path):
    schema = convert(_release(tmp_path), tmp_path / "out", shards=2, row_group_rows=2)
    t = pa.concat_tables(_read_split(tmp_path / "out", s) for s in SPLITS)
    assert t.num_rows == 10 and t.column("example_id").to_pylist() == list(range(10))
    assert {f.name: f.rows for f in schema.sparse} == {
        "user": 3, "movie": 5, "genres": 7, "year_bucket": 27, "hour": 24, "weekday": 7}
    # users 7, 42, 100 -> 0, 1, 2; movies 5, 7, 10, 20, 30 -> 0..4 (rank of movieId over movies.csv)
    assert t.column("user").to_pylist() == [2, 0, 0, 1, 1, 2, 0, 1, 2, 0]
    assert t.column("movie").to_pylist() == [2, 0, 2, 1, 4, 3, 4, 0, 0, 1]
    # genre vocabulary, sorted: (no genres listed), Action, Animation, Children, Crime, Drama, Sci-Fi
    assert t.column("genres").to_pylist()[:5] == [[1, 4], [2, 3], [1, 4], [0], [6]]
    # 0 unknown year; 1995 -> 1 + 95 // 5 = 20; 1993 (from "1993-1998") -> 19; 1899 clipped to 1
    assert t.column("year_bucket").to_pylist()[:6] == [20, 20, 20, 0, 19, 1]
    assert t.column("hour").to_pylist()[:6] == [1, 5, 5, 9, 9, 2]
    assert t.column("weekday").to_pylist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert t.column("liked").to_pylist() == [1, 0, 1, 0, 1, 1, 0, 1, 0, 1]
    # Prior counts see only strictly earlier timestamps: user 42's two same-second ratings both see 0.
    assert t.column("user_prior_ratings").to_pylist() == [0, 0, 1, 0, 0, 1, 2, 2, 2, 3]
    assert t.column("user_like_rate").to_pylist()[2] == pytest.approx(1 / 3)  # 0 of 1 liked, smoothed
    assert t.column("movie_prior_ratings").to_pylist() == [0, 0, 1, 0, 0, 0, 1, 1, 2, 1]
    assert t.column("request_id").to_pylist()[:5] == [0, 1, 1, 2, 2]
    assert t.column("years_since_release").to_pylist()[3] == 0.0  # unknown year
    assert t.column("years_since_release").to_pylist()[0] == 0.0  # rated "before" its 1995 release: clipped
    assert t.column("years_since_release").to_pylist()[5] == pytest.approx(1970 - 1899, abs=0.1)
    rows = [validate_logs(tmp_path / "out")["splits"][s]["rows"] for s in SPLITS]
    assert sum(rows) == 10 and min(rows) >= 1


@pytest.mark.parametrize("ratings,movies,problem", [
    (None, MOVIES, r"ratings.csv: file not found"),
    ("userId,movieId,timestamp\n1,5,100\n", MOVIES, r"ratings.csv: missing column\(s\) \['rating'\]"),
    ("userId,movieId,rating,timestamp\n1,5,abc,100\n", MOVIES,
     r"ratings.csv: column 'rating': value 'abc' on line 2 is not a valid double"),
    ("userId,movieId,rating,timestamp\n1,5,4.0,\n", MOVIES, r"ratings.csv: column 'timestamp': empty .* line 2"),
    ("userId,movieId,rating,timestamp\n1,5,4.0,1\n1,99,4.0,2\n2,5,3,3\n", MOVIES,
     r"ratings.csv: column 'movieId': 99 on line 3 is not in .*movies.csv"),
    (RATINGS, MOVIES + "5,Again (2000),Drama\n", r"movies.csv: column 'movieId': 5 appears more than once"),
])
def test_bad_release_is_a_clear_error(tmp_path, ratings, movies, problem):
    src = _release(tmp_path, ratings or "", movies)
    if ratings is None:
        (src / "ratings.csv").unlink()
    with pytest.raises(LogsError, match=problem):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_force_replaces_but_never_the_source(tmp_path):
    src = _release(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    convert(src, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "schema.yaml").is_file()
    with pytest.raises(ConfigError, match="holds the source"):
        convert(src, tmp_path, force=True)
    assert (src / "ratings.csv").is_file()
