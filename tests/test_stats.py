"""`distkd data stats` and the transforms built on it, on real Parquet logs: the statistics
equal a direct numpy computation (quantiles and distinct counts within their sketches' stated
error), they round-trip through stats.json into the schema and its fingerprint, every decoder
applies the same transform, and `distkd data validate` warns about scales that hurt training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from distkd.cli import main as cli_main
from distkd.config import ConfigError, from_dict, to_dict
from distkd.data.batch import to_batch
from distkd.data.hashing import reference_hash
from distkd.data.loader import LogLoader, split_files
from distkd.data.rows import decode
from distkd.data.schema import (DenseFeature, HashSpec, MissingStats, Schema, SparseFeature, Task,
                                load_schema)
from distkd.data.sketches import QUANTILE_POINTS, Accumulator
from distkd.data.stats import compute_stats
from distkd.data.stats_file import STATS_FILE, read_stats, write_stats
from distkd.data.validate import validate_logs
from tests.support import BUCKET

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DISTKD_NO_PROGRESS": "1"}
RANK_ERROR, DISTINCT_ERROR = 0.01, 0.05  # the sketches' stated bounds (see distkd.data.stats)
MANY = np.random.default_rng(99).choice(10**9, 50_000, replace=False)  # 50,000 distinct raw ids
NAMES = [f"name-{i}" for i in range(20_000)]


def schema_for(**transforms: str) -> Schema:
    dense = ["gauss", "year", "heavy", "plain"]
    return Schema(
        sparse=[SparseFeature("few", num_embeddings=1000), SparseFeature("many", hash_size=1000),
                SparseFeature("multi", num_embeddings=300, multi_valued=True),
                SparseFeature("names", hash_size=5000, hash=HashSpec(seed=3))],
        dense=[DenseFeature(n, transforms.get(n, "none")) for n in dense],
        tasks=[Task("click", "click")],
    )


def table(lo: int, hi: int, dirty: bool = False) -> pa.Table:
    """Rows lo..hi-1; `dirty` adds NaN, +-inf and nulls to `heavy` and null ids (stats count them)."""
    rng = np.random.default_rng(lo)
    n = hi - lo
    heavy = rng.lognormal(1.0, 1.5, n).astype(np.float32)
    lens = rng.integers(0, 4, n)
    cols = {
        "example_id": pa.array(np.arange(lo, hi)),
        "few": pa.array(rng.integers(0, 1000, n)),
        "many": pa.array(MANY[rng.integers(0, len(MANY), n)], mask=(rng.random(n) < 0.05) if dirty else None),
        "multi": pa.array([list(rng.integers(0, 300, k)) for k in lens], pa.list_(pa.int64())),
        "names": pa.array([NAMES[i] for i in rng.integers(0, len(NAMES), n)]),
        "gauss": pa.array((rng.normal(3.0, 2.0, n)).astype(np.float32)),
        "year": pa.array(rng.integers(1922, 1999, n), pa.int16()),  # a release year, raw scale
        "heavy": pa.array(heavy, mask=(rng.random(n) < 0.01) if dirty else None),
        "plain": pa.array(rng.random(n)),  # float64, well scaled
        "click": pa.array(rng.integers(0, 2, n), pa.int8()),
    }
    if dirty:
        h = heavy.copy()
        h[rng.random(n) < 0.01] = np.nan
        h[rng.random(n) < 0.005] = np.inf
        h[rng.random(n) < 0.005] = -np.inf
        cols["heavy"] = pa.array(h, mask=np.asarray(cols["heavy"].is_null()))
    return pa.table(cols)


def write_logs(root: Path, schema: Schema, train_rows: int, shards: int = 2, group: int = 4096,
               dirty: bool = False) -> Path:
    bounds = {"train": (0, train_rows), "valid": (train_rows, train_rows + 500),
              "test": (train_rows + 500, train_rows + 1000)}
    for split, (lo, hi) in bounds.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        k = shards if split == "train" else 1
        edges = np.linspace(lo, hi, k + 1).astype(int)
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            pq.write_table(table(a, b, dirty), root / split / f"part-{i:05d}.parquet", row_group_size=group)
    schema.save(root / "schema.yaml")
    return root


def train_values(root: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((root / "train").glob("*.parquet")))


# -- the statistics ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """150,000 train rows (past the 65,536-row sample) with dirty values, and their stats."""
    root = write_logs(tmp_path_factory.mktemp("big"), schema_for(), 150_000, shards=3, group=10_000, dirty=True)
    return root, compute_stats(str(root), progress=False)


def _finite(col: pa.ChunkedArray) -> np.ndarray:
    v = col.to_numpy().astype(np.float32).astype(np.float64)  # the float32 values decode sees
    return v[np.isfinite(v)]


@pytest.mark.unit
def test_dense_stats_equal_numpy(big):
    root, c = big
    t = train_values(root)
    assert c["rows"] == 150_000 and c["row_groups"] == 15 and len(c["shards"]) == 3
    probs = np.linspace(0, 1, QUANTILE_POINTS)
    for name in ("gauss", "year", "heavy", "plain"):
        x, d = _finite(t.column(name)), c["dense"][name]
        assert d["count"] == len(x)
        assert d["mean"] == pytest.approx(x.mean(), rel=1e-12, abs=1e-12)
        assert d["std"] == pytest.approx(x.std(), rel=1e-10)
        assert (d["min"], d["max"]) == (x.min(), x.max())
        y = np.log1p(np.maximum(x, 0))
        assert d["log1p"]["mean"] == pytest.approx(y.mean(), rel=1e-12)
        assert d["log1p"]["std"] == pytest.approx(y.std(), rel=1e-10)
        # Each quantile's true rank is within the sample's stated error of its probability.
        xs, q = np.sort(x), np.array(d["quantiles"])
        below, upto = np.searchsorted(xs, q, "left") / len(xs), np.searchsorted(xs, q, "right") / len(xs)
        assert (below <= probs + RANK_ERROR).all() and (upto >= probs - RANK_ERROR).all(), name
    h, raw = c["dense"]["heavy"], t.column("heavy")
    v = raw.to_numpy(zero_copy_only=False)
    assert h["null"] == raw.null_count > 0
    assert h["nan"] == int(np.isnan(v).sum()) - raw.null_count > 0
    assert (h["posinf"], h["neginf"]) == (int((v == np.inf).sum()), int((v == -np.inf).sum()))
    assert c["dense"]["gauss"]["nan"] == c["dense"]["gauss"]["null"] == 0


@pytest.mark.unit
def test_sparse_stats_equal_numpy(big):
    root, c = big
    t = train_values(root)
    few, many, multi, names = (c["sparse"][k] for k in ("few", "many", "multi", "names"))
    assert (few["distinct"], few["distinct_exact"]) == (len(np.unique(t.column("few").to_numpy())), True)
    m = t.column("many").drop_null().to_numpy()
    truth = len(np.unique(m))
    assert not many["distinct_exact"] and abs(many["distinct"] - truth) <= DISTINCT_ERROR * truth
    assert many["null_rows"] == t.column("many").null_count > 0 and many["ids"] == len(m)
    assert (many["min"], many["max"]) == (m.min(), m.max())
    assert many["out_of_range"] == int((m >= 1000).sum()) and many["beyond_10x"] == int((m >= 10_000).sum())
    flat = np.concatenate(t.column("multi").to_pylist())
    assert multi["ids"] == len(flat) and multi["ids_per_row"] == pytest.approx(len(flat) / 150_000)
    truth = len(set(t.column("names").to_pylist()))
    assert names["hashed"] and abs(names["distinct"] - truth) <= DISTINCT_ERROR * truth


@pytest.mark.unit
def test_small_split_quantiles_are_exact(tmp_path):
    root = write_logs(tmp_path, schema_for(), 9_000)
    c = compute_stats(str(root), progress=False)
    t = train_values(root)
    for name in ("gauss", "year", "plain"):
        want = np.quantile(_finite(t.column(name)), np.linspace(0, 1, QUANTILE_POINTS))
        assert np.array_equal(c["dense"][name]["quantiles"], want)


@pytest.mark.unit
def test_sketches_merge_and_ignore_row_order(tmp_path):
    """Shards summarized apart and merged give the single pass's result; so does any order."""
    schema = schema_for()
    parts = [table(0, 40_000), table(40_000, 90_000)]
    one, a, b, rev = (Accumulator(schema) for _ in range(4))
    for p in parts:
        for g in range(0, p.num_rows, 7_000):
            one.update(p.slice(g, 7_000))
    a.update(parts[0])
    b.update(parts[1])
    a.merge(b)
    for p in parts[::-1]:
        rev.update(p.take(np.random.default_rng(0).permutation(p.num_rows)))
    want = one.result()
    for got in (a.result(), rev.result()):
        for name, d in want["dense"].items():
            assert got["dense"][name]["quantiles"] == d["quantiles"]
            assert got["dense"][name]["mean"] == pytest.approx(d["mean"], rel=1e-12)
            assert got["dense"][name]["std"] == pytest.approx(d["std"], rel=1e-12)
        assert got["sparse"] == want["sparse"]


# -- stats.json, the schema and its fingerprint -----------------------------------------------

TRANSFORMS = {"gauss": "standardize", "year": "standardize", "heavy": "log1p_standardize", "plain": "quantile"}


@pytest.fixture
def logs(tmp_path):
    return write_logs(tmp_path, schema_for(**TRANSFORMS), 6_000, group=1024)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distkd.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


@pytest.mark.integration
def test_transform_without_stats_is_a_clear_error(logs):
    with pytest.raises(MissingStats, match=r"dense feature 'gauss' \(and 3 more\): transform 'standardize' needs "
                                           r"statistics .*run `distkd data stats"):
        load_schema(logs)
    r = cli("data", "inspect", str(logs))
    assert r.returncode == 2 and "distkd data stats" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(MissingStats, match="dense feature 'gauss'"):  # a schema built in code, decoded as is
        decode(pq.read_table(logs / "train" / "part-00000.parquet"), load_schema(logs, stats=False), "x")


@pytest.mark.integration
def test_stats_round_trip_into_schema_and_fingerprint(logs):
    r = cli("data", "stats", str(logs))
    assert r.returncode == 0, r.stderr
    assert "gauss" in r.stdout and "wrote" in r.stderr and "parameters from this file" in r.stderr  # the table; log lines
    doc = read_stats(logs)
    c = doc["content"]
    assert json.loads((logs / STATS_FILE).read_text())["fingerprint"] == doc["fingerprint"]
    schema = load_schema(logs)
    g, y, h, p = schema.dense
    assert (g.params.mean, g.params.std) == (c["dense"]["gauss"]["mean"], c["dense"]["gauss"]["std"])
    assert (h.params.mean, h.params.std) == (c["dense"]["heavy"]["log1p"]["mean"], c["dense"]["heavy"]["log1p"]["std"])
    assert p.params.quantiles == c["dense"]["plain"]["quantiles"]
    # Exports keep the schema as to_dict(schema): the parameters travel with it.
    again = from_dict(Schema, json.loads(json.dumps(to_dict(schema))), "export")
    assert again == schema and again.fingerprint() == schema.fingerprint()
    assert schema.fingerprint() != load_schema(logs, stats=False).fingerprint()

    fp = schema.fingerprint()
    c["dense"]["plain"]["mean"] += 1.0  # not a parameter of plain's transform (quantile)
    write_stats(str(logs), c)
    assert load_schema(logs).fingerprint() == fp
    c["dense"]["gauss"]["mean"] += 1e-9  # a parameter: a different transform, a different schema
    write_stats(str(logs), c)
    assert load_schema(logs).fingerprint() != fp
    yaml_text = (logs / "schema.yaml").read_text()
    (logs / "schema.yaml").write_text(yaml_text.replace("name: year\n  transform: standardize",
                                                        "name: year\n  transform: standardize\n  clip: 3.0"))
    assert load_schema(logs).dense[1].clip == 3.0

    text = (logs / STATS_FILE).read_text()
    (logs / STATS_FILE).write_text(text.replace(f'"count": {c["dense"]["gauss"]["count"]}', '"count": 1', 1))
    with pytest.raises(ConfigError, match="does not match its fingerprint"):
        load_schema(logs)


@pytest.mark.integration
def test_every_decoder_applies_the_same_transform(logs):
    from distkd.models.export import load_export, write_export
    from distkd.models.ranking import ModelConfig, RankingModel

    assert cli("data", "stats", str(logs)).returncode == 0
    text = (logs / "schema.yaml").read_text()
    (logs / "schema.yaml").write_text(text.replace("name: year\n  transform: standardize",
                                                   "name: year\n  transform: standardize\n  clip: 1.5"))
    schema = load_schema(logs)
    c = read_stats(logs)["content"]["dense"]
    files = split_files(logs, "train")
    raw = pa.concat_tables(pq.read_table(f, columns=schema.training_columns()) for f in files)
    rows = decode(raw, schema, "train")

    # The formulas, from the stored statistics.
    x = {n: raw.column(n).to_numpy().astype(np.float32).astype(np.float64) for n in TRANSFORMS}
    z = lambda v, d, k: np.clip((v - d["mean"]) / d["std"], -k, k)  # noqa: E731
    # float32 arithmetic: (x - mean) with x near 1960 is exact to ~1e-4, so z to ~1e-5.
    np.testing.assert_allclose(rows.dense[:, 0], z(x["gauss"], c["gauss"], 5.0), atol=1e-5)
    np.testing.assert_allclose(rows.dense[:, 1], z(x["year"], c["year"], 1.5), atol=1e-5)
    assert rows.dense[:, 1].max() == pytest.approx(1.5) and rows.dense[:, 1].min() == pytest.approx(-1.5)
    np.testing.assert_allclose(rows.dense[:, 2], z(np.log1p(np.maximum(x["heavy"], 0)), c["heavy"]["log1p"], 5.0),
                               atol=1e-5)
    q, xp = rows.dense[:, 3], x["plain"]
    assert 0.0 <= q.min() and q.max() <= 1.0
    assert (np.diff(q[np.argsort(xp)]) >= 0).all()
    ecdf = np.searchsorted(np.sort(xp), xp, "right") / len(xp)
    assert np.abs(q - ecdf).max() < 0.02

    # The training loader (also what evaluation reads through), batch by batch, in file order.
    loader = np.concatenate([b.dense.numpy() for b in LogLoader(files, schema, 1000)])
    assert np.array_equal(loader, rows.dense)

    # The cache build's workers decode with the teacher export's schema: the same values, the
    # same model outputs.
    cfg = ModelConfig(embedding_dim=8, dense_arch=[8], cross_layers=0, deep_arch=[8])
    torch.manual_seed(0)
    model = RankingModel(schema, cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    write_export(logs / "export", "teacher", schema, cfg, model.state_dict())
    exported, meta = load_export(logs / "export")
    assert meta["schema_fingerprint"] == schema.fingerprint() == exported.schema.fingerprint()
    again = decode(raw, exported.schema, "train")
    assert np.array_equal(again.dense, rows.dense)
    keys = [f.name for f in schema.sparse]
    batch = next(iter(LogLoader(files, schema, 512)))
    mine = to_batch(again.slice(0, 512), keys)
    with torch.no_grad():
        assert torch.equal(exported(batch.sparse, batch.dense).logits, exported(mine.sparse, mine.dense).logits)


@pytest.mark.integration
def test_standardize_every_column(tmp_path):
    """All dense columns standardized: decode's whole-matrix path gives the per-column formula."""
    logs = write_logs(tmp_path, schema_for(**{n: "standardize" for n in TRANSFORMS}), 3_000, group=1024)
    assert cli("data", "stats", str(logs)).returncode == 0
    schema, c = load_schema(logs), read_stats(logs)["content"]["dense"]
    t = pq.read_table(logs / "train" / "part-00000.parquet", columns=schema.training_columns())
    got = decode(t, schema, "x").dense
    for j, name in enumerate(TRANSFORMS):
        x = t.column(name).to_numpy().astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(got[:, j], np.clip((x - c[name]["mean"]) / c[name]["std"], -5, 5), atol=1e-5)


# -- validate's warnings ----------------------------------------------------------------------


@pytest.mark.integration
def test_validate_warns_on_raw_scale_and_misfit_tables(tmp_path):
    schema = schema_for()
    schema.sparse += [SparseFeature("huge", num_embeddings=200_000)]
    root = write_logs(tmp_path, schema, 6_000, group=1024)
    for split in ("train", "valid", "test"):  # a table of 200,000 rows for 40 distinct ids
        for f in (root / split).glob("*.parquet"):
            t = pq.read_table(f)
            pq.write_table(t.append_column("huge", pa.array(t.column("example_id").to_numpy() % 40)), f,
                           row_group_size=1024)
    r = cli("data", "validate", str(root))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 4, r.stderr
    year, heavy, many, huge = warnings
    assert "dense feature 'year' has no transform and mean 19" in year and "std 22" in year and "max |x| 1998" in year
    assert "dense feature 'heavy' has no transform and std 18" in heavy  # lognormal: a heavy tail
    assert "sparse feature 'many'" in many and "of ids are >= 10x hash_size 1,000" in many
    assert "sparse feature 'huge': 40 distinct ids in train for a table of 200,000 rows" in huge
    # gauss (mean 3, std 2), plain (in [0, 1)), few, multi, names: well fitted, no warning.


@pytest.mark.integration
def test_validate_warns_on_missing_and_stale_stats(logs):
    s = validate_logs(logs)
    assert any("needs statistics" in w and "distkd data stats" in w for w in s["warnings"])
    assert cli("data", "stats", str(logs)).returncode == 0
    assert not any("stats" in w for w in validate_logs(logs)["warnings"])
    shard = logs / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 2000), shard)
    assert any("computed from other train shards" in w for w in validate_logs(logs)["warnings"])


@pytest.mark.unit
def test_no_warnings_on_well_scaled_synthetic_logs(small_logs):
    assert validate_logs(small_logs)["warnings"] == []


@pytest.mark.unit
def test_string_ids_hash_as_defined(logs):
    """The ids a hashed feature decodes to are the documented function, mod hash_size."""
    schema = load_schema(logs, stats=False)
    schema.dense = [DenseFeature(f.name) for f in schema.dense]
    t = pq.read_table(logs / "train" / "part-00000.parquet", columns=schema.training_columns())
    got = decode(t, schema, "x").sparse[3][0]
    assert got.tolist() == [reference_hash(s, 3) % 5000 for s in t.column("names").to_pylist()]


@pytest.mark.cluster
def test_stats_on_object_storage(s3, tmp_path, monkeypatch):
    """stats.json is written to and read back from s3:// (the `s3` fixture: moto on 127.0.0.1)."""
    monkeypatch.setenv("DISTKD_NO_PROGRESS", "1")
    local = write_logs(tmp_path / "logs", schema_for(**TRANSFORMS), 3_000, group=1024)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    pafs.copy_files(str(local), f"{BUCKET}/stats/logs", destination_filesystem=fs)
    uri = f"s3://{BUCKET}/stats/logs"
    with pytest.raises(MissingStats, match=f"{uri}/stats.json does not exist"):
        load_schema(uri)
    assert cli_main(["data", "stats", uri]) == 0
    assert cli_main(["data", "stats", str(local)]) == 0
    assert read_stats(uri) == read_stats(local)
    assert load_schema(uri) == load_schema(local)
    assert validate_logs(uri)["warnings"] == validate_logs(local)["warnings"]
