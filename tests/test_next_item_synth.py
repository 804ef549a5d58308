"""The synthetic next-item logs: layout, determinism, and the known true distribution."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distkd.data import synth_next_item as sn
from distkd.data.synth_layout import SPLIT_SHARE

pytestmark = pytest.mark.unit


def _read(logs, split):
    return pa.concat_tables(pq.read_table(p) for p in sorted((logs / split).glob("*.parquet")))


def _files(logs):
    return {p.relative_to(logs): p.read_bytes() for p in sorted(logs.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ni") / "logs"
    sn.generate(out, rows=6_000, shards=2, seed=3, row_group_rows=1_000, preset="small")
    return out


def test_layout_schema_and_ranges(logs):
    p = sn.PRESETS["small"]
    tables = {s: _read(logs, s) for s in SPLIT_SHARE}
    assert [t.num_rows for t in tables.values()] == [4_800, 600, 600]
    assert all(t.schema.equals(sn.arrow_schema()) for t in tables.values())
    ids = np.concatenate([t.column("example_id").to_numpy() for t in tables.values()])
    assert np.array_equal(np.sort(ids), np.arange(6_000))
    pf = pq.ParquetFile(sorted((logs / "train").glob("*.parquet"))[0])
    assert [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)] == [1_000, 1_000, 400]
    hist = tables["train"].column(sn.HISTORY).combine_chunks()
    lengths = np.diff(hist.offsets.to_numpy())
    assert lengths.min() >= 1 and lengths.max() <= p.max_history
    assert 0 <= hist.values.to_numpy().min() and hist.values.to_numpy().max() < p.num_items
    assert tables["train"].column(sn.SURFACE).to_numpy().max() < p.surfaces
    labels = tables["train"].column(sn.LABEL)
    assert 0.05 < labels.null_count / len(labels) < 0.15  # unlabeled train rows
    assert tables["test"].column(sn.LABEL).null_count == 0
    assert labels.drop_null().to_numpy().max() < p.num_items
    schema = yaml.safe_load((logs / sn.SCHEMA_FILE).read_text())
    assert schema == sn.schema_dict("small")
    assert schema["tasks"][0]["kind"] == "multiclass" and schema["tasks"][0]["num_classes"] == p.num_items
    truth = sn.load_truth(logs)
    assert truth.preset == p and np.array_equal(truth.bias, sn.Truth("small", seed=3).bias)


def test_deterministic_by_seed_and_independent_of_workers(logs, tmp_path):
    b, c = tmp_path / "b", tmp_path / "c"
    sn.generate(b, rows=6_000, shards=2, seed=3, row_group_rows=1_000, preset="small", workers=2)
    sn.generate(c, rows=6_000, shards=2, seed=4, row_group_rows=1_000, preset="small")
    assert _files(logs) == _files(b)
    assert not _read(logs, "test").column(sn.LABEL).equals(_read(c, "test").column(sn.LABEL))
    with pytest.raises(FileExistsError):
        sn.generate(c, rows=6_000, shards=2, preset="small")


def test_oracle_columns_match_the_true_distribution(logs):
    truth = sn.Truth("small", seed=3)
    table = _read(logs, "test")
    lp = truth.log_probs_table(table)
    assert lp.shape == (600, truth.num_items)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-4)
    y = table.column(sn.LABEL).to_numpy()
    at = lp[np.arange(len(y)), y]
    np.testing.assert_allclose(table.column("oracle_logp").to_numpy(), at, atol=2e-4)
    rank = (lp > at[:, None] + 1e-5).sum(1)
    got = table.column("oracle_rank").to_numpy()
    assert np.mean(np.abs(got - rank) <= 1) > 0.99  # float32 ties aside


def test_labels_are_draws_from_the_truth():
    truth = sn.Truth("small", seed=5)
    table = truth.sample(20_000, np.random.default_rng(0), 0)
    lp = truth.log_probs_table(table)
    y = table.column(sn.LABEL).to_numpy()
    # E[log p(label)] = -entropy, and P(rank < 10) = the true mass of the top 10, per row.
    logp = lp[np.arange(len(y)), y]
    entropy = -(np.exp(lp) * lp).sum(1)
    assert abs(logp.mean() + entropy.mean()) < 4 * logp.std() / math.sqrt(len(y))
    top10 = np.sort(lp, 1)[:, -10:]
    hit = table.column("oracle_rank").to_numpy() < 10
    expect = np.exp(top10).sum(1)
    assert abs(hit.mean() - expect.mean()) < 4 * math.sqrt(expect.mean() * (1 - expect.mean()) / len(y))
    # The history carries signal: the truth beats popularity alone by a clear margin.
    popular = np.argsort(-truth.bias)[:10]
    assert expect.mean() > np.exp(lp[:, popular]).sum(1).mean() + 0.05


def test_default_preset_sizes():
    truth = sn.Truth("default", seed=0)
    assert truth.num_items == 20_000 and sn.schema_dict()["sparse"][0]["num_embeddings"] == 20_000
    assert sn.resolve_preset("default", num_items=50_000).num_items == 50_000
