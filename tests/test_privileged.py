"""Teacher-only (privileged) features: teachers read them, a student job never does.

The student's loader does not read their columns, its model has no table for them, its export
(and serving contract) cannot name them, and naming one in a student job is refused. The proof
that a student never reads them: corrupt those columns in a copy of the logs and the student
trains to the same bits.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distkd.config import ConfigError
from distkd.data.layout import split_files
from distkd.data.loader import LogLoader
from distkd.data.roles import privileged, view
from distkd.data.schema import SHARED, TEACHER_ONLY, Schema, load_schema
from distkd.data.synth import generate, make_schema
from distkd.evaluate import evaluate_models
from distkd.models.export import load_export, read_meta, write_export
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.serve.contract import contract
from distkd.train.prepare import prepare
from tests.support import job_for, train

PRIVILEGED = ["C3", "I2"]  # one sparse, one dense feature marked teacher-only
TINY = ModelConfig(embedding_dim=8, dense_arch=[8], cross_layers=0, deep_arch=[16, 8])


def with_roles(schema: Schema, teacher_only: list[str]) -> Schema:
    for f in [*schema.sparse, *schema.dense]:
        f.role = TEACHER_ONLY if f.name in teacher_only else SHARED
    return schema


def corrupt(src, dst, columns: list[str], seed: int = 1) -> None:
    """A copy of the logs whose `columns` are replaced, row group by row group, with other values
    of the same type (ids shuffled within the row group, dense values random)."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    for path in sorted(dst.rglob("*.parquet")):
        pf = pq.ParquetFile(path)
        groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]
        schema = pf.schema_arrow
        pf.close()
        with pq.ParquetWriter(path, schema) as w:
            for t in groups:
                for c in columns:
                    i = t.schema.get_field_index(c)
                    col = t.column(c)
                    if pa.types.is_floating(col.type):
                        new = pa.array(rng.normal(50, 30, len(t)).astype(np.float32), col.type)
                    else:
                        new = col.take(pa.array(rng.permutation(len(t))))
                    t = t.set_column(i, c, new)
                w.write_table(t)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Small synthetic logs whose schema marks C3 and I2 teacher-only, and a copy with those two
    columns corrupted."""
    root = tmp_path_factory.mktemp("privileged")
    generate(root / "logs", rows=6_000, shards=2, seed=0, row_group_rows=1024, preset="small")
    with_roles(load_schema(root / "logs"), PRIVILEGED).save(root / "logs" / "schema.yaml")
    corrupt(root / "logs", root / "corrupt", PRIVILEGED)
    return root / "logs", root / "corrupt"


@pytest.mark.unit
def test_a_schema_without_roles_keeps_its_fingerprint():
    # what these presets' fingerprints were before roles existed (the commit this branch started from)
    assert make_schema("small").fingerprint() == "101aad05bf1fe5bd"
    assert make_schema("criteo").fingerprint() == "45f26556340c25e7"
    marked = with_roles(make_schema("small"), ["C3"])
    assert marked.fingerprint() != make_schema("small").fingerprint()
    assert "role" not in str(make_schema("small").spec()) and "teacher_only" in str(marked.spec())


@pytest.mark.unit
def test_views_by_role():
    schema = with_roles(make_schema("small"), PRIVILEGED)
    assert privileged(schema) == PRIVILEGED
    assert view(schema, role="teacher") is schema
    student = view(schema, role="student")
    assert not set(PRIVILEGED) & set(student.feature_names + student.training_columns())
    assert student.feature_names == [n for n in schema.feature_names if n not in PRIVILEGED]
    # a student's view is the schema of logs that never had those features
    plain = make_schema("small")
    plain.sparse = [f for f in plain.sparse if f.name != "C3"]
    plain.dense = [f for f in plain.dense if f.name != "I2"]
    assert student.fingerprint() == plain.fingerprint()
    assert view(schema, ["C1", "C3"], "teacher").feature_names == ["C1", "C3"]
    for named in (["C1", "C3"], ["I2"]):
        with pytest.raises(ConfigError, match=rf"\['{named[-1]}'\] are teacher-only"):
            view(schema, named, "student")
    with pytest.raises(ConfigError, match=r"\['C99'\] are not features"):
        view(schema, ["C99"], "teacher")


@pytest.mark.integration
def test_a_student_job_reads_no_privileged_column(logs, tmp_path):
    clean, _ = logs
    p = prepare(job_for(clean, tmp_path / "s", "role=student"))
    assert not set(PRIVILEGED) & set(p.schema.feature_names)
    loader = LogLoader(split_files(clean, "train"), p.schema, 512)
    assert not set(PRIVILEGED) & set(loader.columns)  # never read from Parquet
    assert set(PRIVILEGED) <= set(prepare(job_for(clean, tmp_path / "t")).schema.feature_names)  # a teacher's
    with pytest.raises(ConfigError, match=r"features: \['C3'\] are teacher-only"):
        prepare(job_for(clean, tmp_path / "s2", "role=student", "features=[C1,C2,C3]"))


@pytest.mark.integration
def test_corrupting_privileged_columns_changes_nothing_for_a_student(logs, tmp_path):
    clean, dirty = logs
    full = load_schema(clean)
    # the corruption is real: the teacher's batches (every feature) differ
    a = next(iter(LogLoader(split_files(clean, "train"), full, 256, prefetch=0)))
    b = next(iter(LogLoader(split_files(dirty, "train"), full, 256, prefetch=0)))
    assert not torch.equal(a.dense, b.dense) and not torch.equal(a.sparse.values(), b.sparse.values())
    runs = []
    for name, where in (("clean", clean), ("dirty", dirty)):
        s = train(job_for(where, tmp_path / name, "role=student", "train.max_steps=6", "train.eval_every=3",
                          "model.embedding_dim=8", "model.deep_arch=[16,8]", "model.dense_arch=[8]",
                          "model.cross_layers=0"), 1)
        runs.append((s, torch.load(tmp_path / name / "export" / "model.pt", weights_only=True)))
    (s0, p0), (s1, p1) = runs
    assert s0["test"] == s1["test"] and s0["valid"] == s1["valid"] and s0["loss"] == s1["loss"]
    assert p0["state_dict"].keys() == p1["state_dict"].keys()
    assert all(torch.equal(p0["state_dict"][k], p1["state_dict"][k]) for k in p0["state_dict"])
    assert not any("C3" in k for k in p0["state_dict"])  # no table for it
    # the export states only the shared features; so does its serving contract
    meta = read_meta(tmp_path / "clean" / "export")
    assert meta["features"] == [n for n in full.feature_names if n not in PRIVILEGED]
    model, _ = load_export(tmp_path / "clean" / "export")
    c = contract(model.schema, meta, str(tmp_path / "clean" / "export"))
    named = [f["name"] for f in c["inputs"]["sparse"]["features"] + c["inputs"]["dense"]["features"]]
    assert named == meta["features"]


@pytest.mark.integration
def test_eval_scores_the_teacher_with_them_and_students_without(logs, tmp_path):
    clean, _ = logs
    full = load_schema(clean)
    exports = {}
    for name, schema in (("teacher", full), ("student", view(full, role="student"))):
        torch.manual_seed(0)
        model = RankingModel(schema, TINY, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
        write_export(tmp_path / name, name, schema, TINY, model.state_dict())
        exports[name] = str(tmp_path / name)
    r = evaluate_models(clean, {"teacher": [exports["teacher"]], "student-KD": [exports["student"]],
                                "student-hard": [exports["student"]]}, split="test", batch_size=1024)
    assert set(PRIVILEGED) <= set(r["models"]["teacher"]["exports"][0]["features"])
    for name in ("student-KD", "student-hard"):
        assert not set(PRIVILEGED) & set(r["models"][name]["exports"][0]["features"])
        assert r["models"][name]["exports"][0]["rows"] == r["models"]["teacher"]["exports"][0]["rows"]
    # logs whose C3 and I2 are not teacher-only are other logs to the teacher (its roles are in its
    # fingerprint); the student reads the same shared features of both
    other = tmp_path / "other"
    generate(other, rows=2_000, shards=1, seed=0, row_group_rows=1024, preset="small")
    with pytest.raises(ConfigError, match="exported for schema"):
        evaluate_models(other, {"teacher": [exports["teacher"]]}, split="test")
    assert evaluate_models(other, {"teacher": [exports["student"]]}, split="test")["rows"] > 0
