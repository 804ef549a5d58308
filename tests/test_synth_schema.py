"""The synthetic generator (determinism, oracle column, splits) and the schema/config loaders."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from distkd.config import ConfigError, apply_overrides, load
from distkd.data.synth import generate
from distkd.data.schema import load_schema
from distkd.train.job import TrainJob

pytestmark = pytest.mark.unit


def _read(logs, split):
    return pq.ParquetDataset(sorted((logs / split).glob("*.parquet"))).read()


def _files(logs):
    return {p.relative_to(logs): p.read_bytes() for p in sorted(logs.rglob("*.parquet"))}


def test_generation_is_deterministic_by_seed_and_independent_of_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, rows=6_000, shards=2, seed=7, row_group_rows=1_000, preset="small", workers=1)
    generate(b, rows=6_000, shards=2, seed=7, row_group_rows=1_000, preset="small", workers=2)
    generate(c, rows=6_000, shards=2, seed=8, row_group_rows=1_000, preset="small", workers=1)
    assert _files(a) == _files(b)
    assert _read(a, "train").equals(_read(b, "train"))
    assert not _read(a, "train").column("clicked").equals(_read(c, "train").column("clicked"))


def test_splits_ids_labels_and_oracle(small_logs):
    schema = load_schema(small_logs)
    tables = {s: _read(small_logs, s) for s in ("train", "valid", "test")}
    assert [t.num_rows for t in tables.values()] == [32_000, 4_000, 4_000]
    ids = np.concatenate([t.column("example_id").to_numpy() for t in tables.values()])
    assert len(np.unique(ids)) == len(ids) == 40_000
    # 10% of train rows are logged without labels; valid and test are fully labelled.
    missing = tables["train"].column("clicked").null_count / tables["train"].num_rows
    assert 0.08 < missing < 0.12
    assert tables["test"].column("clicked").null_count == 0
    # The oracle column is the probability the labels were drawn from: calibrated and predictive.
    assert schema.eval_columns == ["p_click", "p_conversion"]
    t = tables["test"]
    p = t.column("p_click").to_numpy()
    y = t.column("clicked").to_numpy()
    assert ((p > 0) & (p < 1)).all()
    assert abs(p.mean() - y.mean()) < 0.02
    assert binary_auroc(torch.from_numpy(p), torch.from_numpy(y).long()).item() > 0.75


def test_rows_of_a_request_share_their_context(small_logs):
    t = _read(small_logs, "train")
    req, ctx = t.column("request_id").to_numpy(), t.column("C1").to_numpy()
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    sizes = np.diff(np.r_[starts, len(req)])
    assert sizes.max() > 1
    for s, n in zip(starts[:200], sizes[:200]):
        assert (ctx[s:s + n] == ctx[s]).all()


def test_generate_refuses_to_overwrite(tmp_path):
    generate(tmp_path / "x", rows=2_000, shards=1, preset="small")
    with pytest.raises(FileExistsError, match="--force"):
        generate(tmp_path / "x", rows=2_000, shards=1, preset="small")


@pytest.mark.parametrize(
    "text, match",
    [
        ("sparse: []\ndense: []\ntasks: [{name: a, label: y}]\n", "at least one sparse feature"),
        ("sparse: [{name: s, num_embeddings: 10}]\ndense: []\ntasks: []\n", "at least one task"),
        ("sparse: [{name: s}]\ndense: []\ntasks: [{name: a, label: y}]\n", "num_embeddings or hash_size"),
        ("sparse: [{name: s, num_embeddings: ten}]\ndense: []\ntasks: [{name: a, label: y}]\n",
         r"sparse\[0\]\.num_embeddings: expected an integer"),
        ("sparse: [{name: s, num_embeddings: 10}]\ndense: [{name: d, transform: sqrt}]\ntasks: [{name: a, label: y}]\n",
         r"dense\[0\]\.transform: must be one of"),
        ("sparse: [{name: s, num_embeddings: 10}]\ndense: [{name: s}]\ntasks: [{name: a, label: y}]\n",
         "named more than once"),
        ("sparse: [{name: s, num_embeddings: 10, colour: red}]\ndense: []\ntasks: [{name: a, label: y}]\n",
         "unknown field"),
        ("sparse: [\n", "not valid YAML"),
    ],
)
def test_schema_errors_name_the_file_and_field(tmp_path, text, match):
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_schema(path)
    assert str(path) in str(err.value)


def test_overrides_reach_nested_fields_and_list_items(tmp_path):
    job = load(TrainJob, None, ["train.batch_size=64", "model.deep_arch=[8, 4]",
                                "objective={kind: ctr_kd, teachers: [{cache: a}, {cache: b}]}",
                                "objective.teachers.1.weight=3"])
    assert job.train.batch_size == 64 and job.model.deep_arch == [8, 4]
    assert job.objective.kind == "ctr_kd" and job.objective.teachers[1].cache == "b"
    assert job.objective.teachers[1].weight == 3.0
    with pytest.raises(ConfigError, match=r"objective\.kind: must be one of \['hard', 'ctr_kd', 'next_item_kd'\], got 'kd'"):
        load(TrainJob, None, ["objective={kind: kd}"])
    with pytest.raises(ConfigError, match=r"objective: unknown field\(s\) \['teachers'\]"):
        load(TrainJob, None, ["objective={teachers: [{cache: a}]}"])  # kind: hard, the default, has none
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"a": [1]}, ["a.5=2"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["nonsense"])
    bad = tmp_path / "job.yaml"
    bad.write_text("train:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*train\.epochs: expected an integer"):
        load(TrainJob, bad)
