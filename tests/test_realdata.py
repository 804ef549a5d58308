"""The real-data converters on small slices: Instacart (distkd.data.instacart) and MovieLens with
its privileged hindsight features. No leakage into the student's features: perturbing a later
row (a later order, a later rating) leaves every earlier row's shared features bit-identical;
the privileged columns are teacher-only, and a student trained on logs whose privileged columns
are corrupted comes out bit-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from distkd.data import instacart
from distkd.data.movielens import PRIVILEGED as ML_PRIVILEGED
from distkd.data.movielens import convert as convert_movielens
from distkd.data.roles import privileged, view
from distkd.data.schema import SPLITS, LogsError, load_schema
from distkd.data.validate import validate_logs
from tests.support import job_for, train
from tests.test_privileged import corrupt

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
INSTACART = SHARED_DATA / "instacart-sample" / instacart.FILE
ML_SMALL = SHARED_DATA / "ml-latest-small"
STUDENT_IC = ["user_prior_orders", "user_prior_items", "user_reorder_rate", "user_mean_basket", "days_since_prior",
              "dow", "hour", "days_bucket", "user"]


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not found")


@pytest.fixture(scope="module")
def ic_slice(tmp_path_factory) -> Path:
    """The order lines of the sample's first 25 users (their complete histories)."""
    _need(INSTACART)
    t = pacsv.read_csv(INSTACART)
    users = np.unique(t.column("user_id").to_numpy())[:25]
    t = t.filter(pa.array(np.isin(t.column("user_id").to_numpy(), users)))
    path = tmp_path_factory.mktemp("ic") / instacart.FILE
    pacsv.write_csv(t, path)
    return path


def _read(out: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / split).glob("*.parquet")))


@pytest.mark.unit
def test_instacart_slice_converts_split_by_each_users_time(ic_slice, tmp_path):
    schema = instacart.convert(ic_slice.parent, tmp_path / "logs", shards=2, row_group_rows=512)
    validate_logs(tmp_path / "logs")
    assert privileged(schema) == list(instacart.PRIVILEGED)
    student = view(schema, role="student")
    assert not set(instacart.PRIVILEGED) & set(student.feature_names + student.training_columns())
    tables = {s: _read(tmp_path / "logs", s) for s in SPLITS}
    c = instacart.read_lines(ic_slice)
    assert sum(t.num_rows for t in tables.values()) == len(c["order_id"])
    # each user's last 2 orders are test, the 2 before valid: in valid/test, every user's prior
    # order count is at least that of any of their train rows
    by_split = {s: (t.column("user").to_numpy(), t.column("user_prior_orders").to_numpy()) for s, t in tables.items()}
    for u in np.unique(by_split["train"][0]):
        tr = by_split["train"][1][by_split["train"][0] == u].max()
        va = by_split["valid"][1][by_split["valid"][0] == u]
        te = by_split["test"][1][by_split["test"][0] == u]
        assert len(np.unique(va)) == 2 and len(np.unique(te)) == 2 and tr < va.min() <= va.max() < te.min()
    first = tables["train"].column("user_prior_orders").to_numpy() == 0
    assert (tables["train"].column("reordered").to_numpy()[first] == 0).all()  # nothing to reorder yet


@pytest.mark.unit
def test_instacart_features_use_only_earlier_orders(ic_slice):
    c = instacart.read_lines(ic_slice)
    base = instacart.features(c)
    u = c["user_id"][0]
    mine = c["user_id"] == u
    k = int(np.median(c["order_number"][mine]))
    later, at = mine & (c["order_number"] > k), mine & (c["order_number"] == k)
    # perturb the user's later orders: labels flipped, cart order reversed, other gaps
    p = {n: v.copy() for n, v in c.items()}
    p["reordered"][later] = 1 - p["reordered"][later]
    p["add_to_cart_order"][later] = p["add_to_cart_order"][later][::-1]
    p["days_since_prior_order"][later] = 3.0
    pert = instacart.features(p)
    earlier = ~later
    for name in STUDENT_IC:
        assert np.array_equal(base[name][earlier], pert[name][earlier]), name
    # and a row's features never read its own order's labels: flip order k's labels only
    q = {n: v.copy() for n, v in c.items()}
    q["reordered"][at] = 1 - q["reordered"][at]
    flipped = instacart.features(q)
    for name in STUDENT_IC:
        assert np.array_equal(base[name][~later], flipped[name][~later]), name
    # the check can fail: the later orders do read order k (its labels are their past)
    assert not np.array_equal(base["user_reorder_rate"][later], flipped["user_reorder_rate"][later])


@pytest.mark.unit
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop_columns(["add_to_cart_order"]), r"missing column\(s\) \['add_to_cart_order'\]"),
    (lambda t: _set(t, "order_dow", 3, 9), r"column 'order_dow': value 9 on line 5 is not a whole number in \[0, 6\]"),
    (lambda t: _set(t, "reordered", 2, 0.5), r"column 'reordered': value 0.5 on line 4 is not 0 or 1"),
    (lambda t: _set(t, "days_since_prior_order", None, None), r"column 'days_since_prior_order'.*may be empty only"),
    (lambda t: _set(t, "product_id", 1, None), r"column 'product_id': empty or null value on line 3"),
    (lambda t: _dup_product(t), r"column 'product_id': .* appears twice in the same order"),
])
def test_instacart_bad_input_names_the_column_and_line(ic_slice, tmp_path, edit, message):
    bad = tmp_path / "bad.csv"
    pacsv.write_csv(edit(pacsv.read_csv(ic_slice)), bad)
    with pytest.raises(LogsError, match=message):
        instacart.convert(bad, tmp_path / "logs")


def _set(t: pa.Table, name: str, row, value) -> pa.Table:
    col = t.column(name).to_pylist()
    if row is None:  # the first line of a non-first order
        row = next(i for i, o in enumerate(t.column("order_number").to_pylist()) if o > 1)
    col[row] = value
    typ = pa.float64() if isinstance(value, float) or value is None else t.column(name).type
    return t.set_column(t.schema.get_field_index(name), name, pa.array(col, typ))


def _dup_product(t: pa.Table) -> pa.Table:
    return _set(t, "product_id", 1, t.column("product_id")[0].as_py())


# --- MovieLens with privileged (hindsight) features --------------------------------------


@pytest.fixture(scope="module")
def ml_slice(tmp_path_factory) -> Path:
    """ml-latest-small's first 40 users (ratings and tags), every movie."""
    _need(ML_SMALL / "ratings.csv")
    out = tmp_path_factory.mktemp("mlslice")
    for name in ("ratings.csv", "tags.csv"):
        t = pacsv.read_csv(ML_SMALL / name)
        pacsv.write_csv(t.filter(pa.array(t.column("userId").to_numpy() <= 40)), out / name)
    (out / "movies.csv").write_bytes((ML_SMALL / "movies.csv").read_bytes())
    return out


def _all(out: Path) -> pa.Table:
    return pa.concat_tables(_read(out, s) for s in SPLITS)


@pytest.mark.unit
def test_movielens_privileged_features_are_teacher_only_and_default_has_none(ml_slice, tmp_path):
    plain = convert_movielens(ml_slice, tmp_path / "plain", shards=2)
    priv = convert_movielens(ml_slice, tmp_path / "priv", shards=2, privileged=True)
    assert privileged(plain) == [] and privileged(priv) == list(ML_PRIVILEGED)
    assert view(priv, role="student").fingerprint() == plain.fingerprint()  # the student's logs are the plain ones
    validate_logs(tmp_path / "priv")
    a, b = _all(tmp_path / "plain"), _all(tmp_path / "priv")
    for name in plain.feature_names + ["liked"]:
        assert a.column(name).equals(b.column(name)), name
    assert b.column("user_tags_on_movie").to_numpy().sum() > 0  # the slice's tags are found


@pytest.mark.unit
def test_movielens_shared_features_never_see_a_later_rating(ml_slice, tmp_path):
    ratings = pacsv.read_csv(ml_slice / "ratings.csv")
    ts = ratings.column("timestamp").to_numpy()
    cut = np.quantile(ts, 0.7)
    r = ratings.column("rating").to_numpy().copy()
    r[ts > cut] = np.where(r[ts > cut] >= 4, 1.0, 5.0)  # every later rating flips like/dislike
    pert = ml_slice.parent / "pert"
    pert.mkdir(exist_ok=True)
    pacsv.write_csv(ratings.set_column(2, "rating", pa.array(r)), pert / "ratings.csv")
    for name in ("movies.csv", "tags.csv"):
        (pert / name).write_bytes((ml_slice / name).read_bytes())
    schema = convert_movielens(ml_slice, tmp_path / "a", shards=1, privileged=True)
    convert_movielens(pert, tmp_path / "b", shards=1, privileged=True)
    a, b = _all(tmp_path / "a"), _all(tmp_path / "b")
    # rows are in time order either way; the converter keeps no timestamp, so find the early ones by count
    early = np.arange(a.num_rows) < int((ts <= cut).sum())
    shared = view(schema, role="student").feature_names
    for name in shared:
        x, y = a.column(name).to_numpy(zero_copy_only=False), b.column(name).to_numpy(zero_copy_only=False)
        assert all(np.array_equal(i, j) for i, j in zip(x[early], y[early])), name
    # the hindsight features do read later ratings: that is why they are teacher-only
    assert not np.array_equal(a.column("movie_future_like_rate").to_numpy()[early],
                              b.column("movie_future_like_rate").to_numpy()[early])


@pytest.mark.integration
def test_corrupting_instacart_privileged_columns_changes_nothing_for_a_student(ic_slice, tmp_path):
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    instacart.convert(ic_slice, clean, shards=2, row_group_rows=512)
    corrupt(clean, dirty, list(instacart.PRIVILEGED))
    assert not _read(clean, "train").column("add_to_cart_order").equals(_read(dirty, "train").column("add_to_cart_order"))
    runs = []
    for name, logs in (("clean", clean), ("dirty", dirty)):
        s = train(job_for(logs, tmp_path / f"s-{name}", "role=student", "train.max_steps=6", "train.eval_every=3",
                          "model.embedding_dim=8", "model.deep_arch=[16,8]", "model.dense_arch=[8]",
                          "model.cross_layers=0"), 1)
        runs.append((s, torch.load(tmp_path / f"s-{name}" / "export" / "model.pt", weights_only=True)))
    (s0, p0), (s1, p1) = runs
    assert s0["test"] == s1["test"] and s0["valid"] == s1["valid"] and s0["loss"] == s1["loss"]
    assert all(torch.equal(p0["state_dict"][k], p1["state_dict"][k]) for k in p0["state_dict"])
    assert load_schema(clean).fingerprint() == load_schema(dirty).fingerprint()


# --- the study's own pieces (distkd.bench.realdata) -----------------------------------------


@pytest.mark.unit
def test_every_study_searches_the_same_drawn_shared_settings(tmp_path):
    from distkd.bench import realdata as rd

    shared = rd.draws(rd.SHARED, 6, 0)
    assert shared == rd.draws(rd.SHARED, 6, 0) and len({str(p) for p in shared}) == 6
    assert shared[:3] == rd.draws(rd.SHARED, 3, 0)  # a smaller budget is a prefix of the larger one
    for p in shared:
        for key, spec in rd.SHARED.items():
            kind, v = next(iter(spec.items()))
            assert p[key] in v if kind == "choice" else v[0] <= p[key] <= v[1]
    assert not set(rd.KD_ONLY) & set(rd.SHARED)  # a KD trial adds its loss weight, changes nothing shared
    doc = tmp_path / "realdata.md"
    doc.write_text(f"# Real data\n\nbefore\n\n{rd.BEGIN}\nold table\n{rd.END}\n\nafter\n")
    rd.write_doc(doc, "| new |", "python -m distkd.bench.realdata")
    text = doc.read_text()
    assert "old table" not in text and "| new |" in text and "before" in text and "after" in text
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        rd.write_doc(doc, "| new |", "cmd")
