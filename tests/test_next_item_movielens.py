"""MovieLens next-movie conversion: a hand-written release (exact histories) and ml-latest-small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from distkd.config import ConfigError
from distkd.data.movielens_next import LABEL, arrow_schema, convert_next
from distkd.data.schema import SPLITS

pytestmark = pytest.mark.unit

ML_SMALL = Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"


def _read(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for s in SPLITS for p in sorted((out / s).glob("*.parquet")))


def _release(tmp_path: Path) -> Path:
    src = tmp_path / "ml"
    src.mkdir(exist_ok=True)
    (src / "movies.csv").write_text("movieId,title,genres\n10,A (1990),Drama\n20,B (1991),Comedy\n"
                                    "30,C (1992),Drama\n40,D (1993),Action\n")
    # user 7: 10 at t=100, then 20 and 30 in the same second, then 40; user 8: 30, 10, 20.
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                     "7,10,4.0,100\n7,30,3.0,200\n7,20,5.0,200\n7,40,2.0,300\n"
                                     "8,30,4.0,150\n8,10,1.0,250\n8,20,4.5,4000\n")
    return src


def test_histories_are_strictly_earlier_and_last_l(tmp_path):
    out = tmp_path / "out"
    meta = convert_next(_release(tmp_path), out, history=2, shards=1)
    t = _read(out)
    assert t.schema.equals(arrow_schema())
    # Sorted (timestamp, user, movie): 0 (7,10,100) 1 (8,30,150) 2 (7,20,200) 3 (7,30,200) 4 (8,10,250)
    # 5 (7,40,300) 6 (8,20,4000); first-second rows have no history and are dropped.
    rows = {r["example_id"]: r for r in t.to_pylist()}
    assert sorted(rows) == [2, 3, 4, 5, 6]
    # movie index = rank of movieId: 10 -> 0, 20 -> 1, 30 -> 2, 40 -> 3
    assert rows[2]["history"] == [0] and rows[2][LABEL] == 1  # not 30, rated in the same second
    assert rows[3]["history"] == [0] and rows[3][LABEL] == 2
    assert rows[5]["history"] == [1, 2] and rows[5][LABEL] == 3  # the last 2 (by the sort's order)
    assert rows[4]["history"] == [2] and rows[6]["history"] == [2, 0]
    assert rows[6]["user"] == 1 and rows[6]["rating"] == 4.5
    assert meta["tasks"][0] == {"name": LABEL, "label": LABEL, "kind": "multiclass", "num_classes": 4,
                                "item_feature": "history"}
    assert yaml.safe_load((out / "schema.yaml").read_text())["sparse"][0]["num_embeddings"] == 4
    kept = convert_next(_release(tmp_path), tmp_path / "all", history=2, min_history=0, shards=1)
    assert kept["summary"]["rows"] == 7 and kept["summary"]["dropped"] == 0
    with pytest.raises(ConfigError):
        convert_next(_release(tmp_path), out)  # not empty, no force


@pytest.mark.skipif(not (ML_SMALL / "ratings.csv").is_file(), reason="ml-latest-small not available")
def test_ml_latest_small(tmp_path):
    out = tmp_path / "out"
    meta = convert_next(ML_SMALL, out, history=20, shards=4, row_group_rows=8192)
    s = meta["summary"]
    assert s["movies"] == 9_742 and s["users"] == 610 and s["rows"] + s["dropped"] == 100_836
    splits = {sp: pa.concat_tables(pq.read_table(p) for p in sorted((out / sp).glob("*.parquet"))) for sp in SPLITS}
    n = {sp: t.num_rows for sp, t in splits.items()}
    assert 0.78 < n["train"] / s["rows"] < 0.82 and 0.08 < n["valid"] / s["rows"] < 0.12
    t = _read(out)
    ids = t.column("example_id").to_numpy()
    assert (np.diff(ids) > 0).all()  # unique, in time order across shards and splits
    csv = pacsv.read_csv(ML_SMALL / "ratings.csv")
    csv = csv.take(pc.sort_indices(csv, [("timestamp", "ascending"), ("userId", "ascending"), ("movieId", "ascending")]))
    ts = csv.column("timestamp").to_numpy()
    movies = np.sort(pacsv.read_csv(ML_SMALL / "movies.csv").column("movieId").to_numpy())
    midx = np.searchsorted(movies, csv.column("movieId").to_numpy())
    users = csv.column("userId").to_numpy()
    assert (t.column(LABEL).to_numpy() == midx[ids]).all()
    ts_split = {sp: ts[tb.column("example_id").to_numpy()] for sp, tb in splits.items()}
    assert ts_split["train"].max() <= ts_split["valid"].min() and ts_split["valid"].max() <= ts_split["test"].min()
    hist = t.column("history").combine_chunks()
    lengths = np.diff(hist.offsets.to_numpy())
    assert lengths.min() >= 1 and lengths.max() == 20
    # Independently, for a sample of rows: the user's last 20 movies with an earlier timestamp.
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ids), 200, replace=False):
        e = ids[i]
        earlier = np.flatnonzero((users == users[e]) & (ts < ts[e]))
        assert hist[i].as_py() == midx[earlier[-20:]].tolist()
