"""The teacher contract for real: a teacher that is not a distkd model (tests/user_teacher, plain
torch.nn on the dict input form), given as a factory + weights and as a torch.export program,
cached on an embedded Ray; refusals of a wrong-shaped and a NaN-emitting teacher; `cache
verify --recompute`; online distillation from a factory teacher through the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distkd.cache import CacheError, read_manifest
from distkd.cache.build import CacheJob, build, job_from_args
from distkd.cache.recompute import ulp_distance
from distkd.cache.verify import verify_cache
from distkd.cli import build_parser, main as cli_main
from distkd.config import ConfigError
from distkd.data.batch import to_batch
from distkd.data.loader import split_files
from distkd.data.rows import decode
from distkd.data.schema import load_schema
from distkd.models.export import sha256_file
from distkd.models.teacher import describe, kjt_to_dict, load_teacher
from distkd.models.teacher_spec import TeacherError, TeacherSpec
from tests.support import cli, distkd_log
from tests.user_teacher import build as user_build

FACTORY = "tests.user_teacher:build"


@pytest.fixture(scope="module")
def ray_session():
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def user(small_logs, tmp_path_factory):
    """The user's module (seeded), its weights file and the same module as a torch.export program."""
    root = tmp_path_factory.mktemp("user-teacher")
    schema = load_schema(small_logs)
    torch.manual_seed(0)
    module = user_build(schema, dim=8, hidden=16).eval()
    torch.save(module.state_dict(), root / "weights.pt")
    batch = next(_batches(small_logs, schema, "train/part-00000.parquet", 0))
    example = (kjt_to_dict(batch.sparse, [f.name for f in schema.sparse]), batch.dense)
    from torch.export import Dim

    rows = Dim("batch")
    shapes = ({k: ({0: Dim(f"ids{i}")}, {0: rows + 1}) for i, k in enumerate(example[0])}, {0: rows})
    torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes), root / "teacher.pt2")
    return module, root / "weights.pt", root / "teacher.pt2"


def _batches(logs, schema, rel, g0=None, batch_size=8192):
    """The batches a cache worker scores for shard `rel` (row group g0 only, or all), in order."""
    path = str(Path(logs) / rel)
    with pq.ParquetFile(path) as pf:
        for g in range(pf.num_row_groups) if g0 is None else [g0]:
            rows = decode(pf.read_row_group(g, columns=schema.training_columns()), schema, path)
            for a in range(0, len(rows), batch_size):
                yield to_batch(rows.slice(a, min(a + batch_size, len(rows))), [f.name for f in schema.sparse])


def _cached(cache, rel, column="logits", dtype=np.float32):
    t = pq.read_table(Path(cache) / rel, columns=[column]).column(column).combine_chunks()
    return t.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(t), -1)


def _factory(weights, name=FACTORY, **kw) -> TeacherSpec:
    return TeacherSpec(factory=name, weights=str(weights), input="dict", kwargs=kw.pop("kwargs", {"dim": 8}), **kw)


@pytest.fixture(scope="module")
def factory_cache(ray_session, small_logs, user, tmp_path_factory):
    _, weights, _ = user
    out = tmp_path_factory.mktemp("factory-cache") / "c"
    spec = _factory(weights, hidden_dim=16)
    s = build(CacheJob(teacher=spec, logs=str(small_logs), out=str(out), splits=["train", "test"], dtype="fp32",
                       hidden=True, workers=1))
    return out, s, spec


@pytest.fixture(scope="module")
def program_cache(ray_session, small_logs, user, tmp_path_factory):
    _, _, program = user
    out = tmp_path_factory.mktemp("program-cache") / "c"
    s = build(CacheJob(teacher=TeacherSpec(program=str(program), input="dict"), logs=str(small_logs), out=str(out),
                       splits=["train"], workers=1))
    return out, s


# -- a teacher of the user's own caches its own forward -------------------------------------

@pytest.mark.integration
def test_factory_teacher_caches_its_own_forward(factory_cache, small_logs, user):
    out, s, spec = factory_cache
    module, weights, _ = user
    assert s["complete"] and s["rows"] == 36_000
    m = read_manifest(out)
    t = m.teacher.record
    assert t["form"] == "factory" and t["spec"]["factory"] == FACTORY and t["weights_sha256"] == sha256_file(weights)
    assert set(t["source"]) == {"user_teacher/__init__.py"}
    assert t["sha256"] == describe(spec)["sha256"] and m.content.hidden_dim == 16
    schema = load_schema(small_logs)
    keys = [f.name for f in schema.sparse]
    with torch.no_grad():
        for split in ("train", "test"):
            for log in split_files(small_logs, split):
                rel = f"{split}/{Path(log).name}"
                want = [module(kjt_to_dict(b.sparse, keys), b.dense) for b in _batches(small_logs, schema, rel)]
                logits = torch.cat([w["logits"] for w in want]).numpy()
                hidden = torch.cat([w["hidden"] for w in want]).numpy().astype(np.float16)
                np.testing.assert_array_equal(_cached(out, rel), logits)  # fp32: the forward itself
                np.testing.assert_array_equal(_cached(out, rel, "hidden", np.float16), hidden)
    verify_cache(out, small_logs, spec)


@pytest.mark.integration
def test_program_teacher_caches_the_same_logits(program_cache, small_logs, user):
    out, s = program_cache
    module, _, program = user
    t = read_manifest(out).teacher.record
    assert s["complete"] and t["form"] == "program" and t["sha256"] == sha256_file(program)
    schema = load_schema(small_logs)
    keys = [f.name for f in schema.sparse]
    with torch.no_grad():
        for log in split_files(small_logs, "train"):
            rel = f"train/{Path(log).name}"
            want = torch.cat([module(kjt_to_dict(b.sparse, keys), b.dense)["logits"]
                              for b in _batches(small_logs, schema, rel)])
            np.testing.assert_array_equal(_cached(out, rel, dtype=np.float16), want.numpy().astype(np.float16))


@pytest.mark.integration
def test_fingerprint_covers_weights_source_and_kwargs(small_logs, user, tmp_path, monkeypatch):
    _, weights, _ = user
    base = describe(_factory(weights))["sha256"]
    assert describe(_factory(weights, kwargs={"dim": 8, "hidden": 16}))["sha256"] != base
    state = torch.load(weights, weights_only=True)
    state["out.bias"] = state["out.bias"] + 1e-6
    torch.save(state, tmp_path / "other.pt")
    assert describe(_factory(tmp_path / "other.pt"))["sha256"] != base
    # The same package, one comment added to its source: another teacher.
    pkg = tmp_path / "pkgs" / "my_teacher"
    shutil.copytree(Path(__file__).parent / "user_teacher", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    spec = _factory(weights, name="my_teacher:build")
    first = describe(spec)["sha256"]
    assert first != base  # the import path is part of it
    (pkg / "__init__.py").write_text((pkg / "__init__.py").read_text() + "\n# changed\n")
    assert describe(spec)["sha256"] != first
    # A worker whose copy of the package differs refuses to load it.
    with pytest.raises(TeacherError, match="its fingerprint here is .* expected"):
        load_teacher(spec, load_schema(small_logs), expect_sha256=first)


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.integration
def test_wrong_shaped_teacher_is_refused_on_its_first_batch(ray_session, small_logs, user, tmp_path):
    _, weights, _ = user
    state = torch.load(weights, weights_only=True)
    bigger = user_build(load_schema(small_logs), dim=8).__class__(load_schema(small_logs), extra_outputs=1).state_dict()
    bigger.update({k: v for k, v in state.items() if not k.startswith("out.")})
    torch.save(bigger, tmp_path / "w3.pt")
    spec = _factory(tmp_path / "w3.pt", name="tests.user_teacher:wrong_shape", kwargs={})
    with pytest.raises(CacheError) as e:
        build(CacheJob(teacher=spec, logs=str(small_logs), out=str(tmp_path / "c"), splits=["train"], workers=1))
    msg = str(e.value)
    assert "train/part-00000.parquet: row group 0: teacher tests.user_teacher:wrong_shape" in msg, msg
    assert ("returned a float32 tensor of shape [2048, 3]; expected floating logits of shape [2048, 2] "
            "(rows × tasks ['click', 'conversion'])") in msg, msg
    assert read_manifest(tmp_path / "c").shards == {}


@pytest.mark.integration
def test_nan_in_a_later_row_group_stops_the_build(ray_session, small_logs, user, tmp_path):
    _, weights, _ = user
    out = tmp_path / "c"
    spec = _factory(weights, name="tests.user_teacher:nan_after", kwargs={"calls": 2, "row": 5})
    with pytest.raises(CacheError) as e:
        build(CacheJob(teacher=spec, logs=str(small_logs), out=str(out), splits=["train"], workers=1))
    msg = str(e.value)
    assert msg.startswith(f"{small_logs / 'train' / 'part-00000.parquet'}: row group 2, row 5 (row 4101 of the shard): "
                          "teacher tests.user_teacher:nan_after"), msg
    assert "returned nan in logits at batch row 5 (task 'click'); nothing of this shard is published" in msg, msg
    m = read_manifest(out)  # still a valid manifest: the shard is not in it, nor its file, nor a temporary
    assert "train/part-00000.parquet" not in m.shards and not m.complete
    assert not (out / "train" / "part-00000.parquet").exists() and not list(out.glob("*/.*"))
    with pytest.raises(CacheError, match="part-00000.parquet: not committed"):
        verify_cache(out, small_logs)


@pytest.mark.integration
def test_a_factory_that_fails_on_the_workers_is_one_error(ray_session, small_logs, user, tmp_path):
    _, weights, _ = user
    with pytest.raises(CacheError) as e:
        build(CacheJob(teacher=_factory(weights, kwargs={"dim": 8, "depth": 3}), logs=str(small_logs),
                       out=str(tmp_path / "c"), splits=["test"], workers=1, max_attempts=1))
    assert "every cache worker died" in str(e.value), str(e.value)
    assert ("teacher factory tests.user_teacher:build: calling it with ['depth', 'dim', 'schema'] raised TypeError"
            in str(e.value)), str(e.value)


@pytest.mark.integration
def test_bad_specs_are_one_line_errors(small_logs, user, tmp_path, capsys):
    _, weights, program = user
    rc = cli_main(["cache", "build", "--teacher-factory", "no_such_pkg.mod:build", "--teacher-weights", str(weights),
                   "--logs", str(small_logs), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "module no_such_pkg.mod is not importable here" in err and "Traceback" not in err, err
    rc = cli_main(["cache", "build", "--teacher", "x", "--teacher-program", str(program), "--logs", str(small_logs),
                   "--out", str(tmp_path / "c")])
    assert rc == 2 and "give exactly one of export, factory (with weights) or program" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="factory and weights go together"):
        TeacherSpec(factory=FACTORY).validate()
    with pytest.raises(TeacherError, match="returned a dict without logits"):
        t = load_teacher(_factory(weights), load_schema(small_logs))
        t.check({"scores": torch.zeros(2, 2)}, 2)


@pytest.mark.integration
def test_flags_and_yaml_name_the_same_spec(small_logs, user, tmp_path):
    _, weights, program = user
    args = build_parser().parse_args(["cache", "build", "--teacher-factory", FACTORY, "--teacher-weights", str(weights),
                                      "--teacher-input", "dict", "--teacher-kwargs", "{dim: 8}", "--logs", "l",
                                      "--out", "o"])
    job = job_from_args(args)
    assert job.teacher == TeacherSpec(factory=FACTORY, weights=str(weights), input="dict", kwargs={"dim": 8})
    cfg = tmp_path / "cache.yaml"
    cfg.write_text(f"teacher: {{program: {program}, input: dict}}\nlogs: l\nout: o\n")
    job = job_from_args(build_parser().parse_args(["cache", "build", "--config", str(cfg)]))
    assert job.teacher == TeacherSpec(program=str(program), input="dict")
    job = job_from_args(build_parser().parse_args(["cache", "build", "--config", str(cfg), "--teacher", "exp"]))
    assert job.teacher == "exp"  # a plain export path, as before


# -- verification that re-runs the teacher -------------------------------------------------

@pytest.mark.integration
def test_recompute_passes_on_an_intact_cache(factory_cache, program_cache, small_logs, capsys):
    out, _, spec = factory_cache
    with distkd_log() as logs:
        v = verify_cache(out, small_logs, spec, recompute=0.5, seed=3)["recompute"]
    total = 4 * 4 + 2  # row groups of train (4 shards × 4) and test (1 × 2)
    assert (v["seed"], v["row_groups"], v["of"], v["max_ulp"], v["max_abs"]) == (3, math.ceil(total / 2), total, 0, 0.0)
    assert any("recomputed 9 of 18 row groups (fraction 0.5, seed 3" in line for line in logs), logs
    assert verify_cache(out, small_logs, spec, recompute=0.5, seed=3)["recompute"]["sampled"] == v["sampled"]
    # fp16, with the teacher the manifest names (the program), through the CLI.
    rc = cli_main(["cache", "verify", "--cache", str(program_cache[0]), "--logs", str(small_logs),
                   "--recompute", "1", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "recomputed 16 of 16 row groups (fraction 1.0, seed 1" in err and "0 ulp of fp16" in err, err


@pytest.mark.integration
def test_recompute_catches_logits_changed_by_an_ulp(program_cache, small_logs, tmp_path, capsys):
    """One row group's logits moved by one fp16 ulp, the file's sha256 and size fixed in the
    manifest: every other check passes; recomputation does not."""
    src, _ = program_cache
    cache = tmp_path / "cache"
    shutil.copytree(src, cache, ignore=shutil.ignore_patterns(".lock"))
    rel = "train/part-00002.parquet"
    path = cache / rel
    with pq.ParquetFile(path) as pf:
        schema, kv = pf.schema_arrow, pf.metadata.metadata
        groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]
    import pyarrow as pa

    col = groups[1].column("logits").combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).copy()
    values[::7] = np.nextafter(values[::7], np.float16(np.inf))
    groups[1] = pa.table({"logits": pa.FixedSizeListArray.from_arrays(pa.array(values), 2)}, schema=schema)
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False, write_statistics=False) as w:
        for t in groups:
            w.write_table(t, row_group_size=t.num_rows)
        w.add_key_value_metadata({b"distkd.cache": kv[b"distkd.cache"]})  # its footer: ids, teacher
    m = json.loads((cache / "manifest.json").read_text())
    m["shards"][rel]["output"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (cache / "manifest.json").write_text(json.dumps(m))
    assert verify_cache(cache, small_logs)["shards"] == 4  # sha256, sizes, ids: all fine
    with pytest.raises(CacheError) as e:
        verify_cache(cache, small_logs, recompute=1.0, seed=0)
    assert f"{path}: row group 1, row 0 (task 'click')" in str(e.value), str(e.value)
    assert "1 ulp of fp16 apart (tolerance 0); written by another build of the teacher" in str(e.value)
    assert verify_cache(cache, small_logs, recompute=1.0, seed=0, tolerance=1)["recompute"]["max_ulp"] == 1
    rc = cli_main(["cache", "verify", "--cache", str(cache), "--logs", str(small_logs), "--recompute", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "1 ulp of fp16 apart" in err and "Traceback" not in err, err


@pytest.mark.unit
def test_ulp_distance():
    a = np.array([0.0, -0.0, 1.0, -1.0, 65504.0], np.float16)
    b = np.array([-0.0, np.float16(2**-24), np.nextafter(np.float16(1), np.float16(2)), 1.0, np.inf], np.float16)
    assert ulp_distance(a, b).tolist() == [0, 1, 1, 2 * 15360, 1]


# -- online distillation from a teacher of your own -----------------------------------------

@pytest.mark.integration
def test_online_distillation_with_a_factory_teacher(small_logs, user, tmp_path):
    _, weights, _ = user
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(json.dumps({
        "logs": str(small_logs), "out": str(tmp_path / "kd"), "role": "student", "tensorboard": False,
        "model": {"embedding_dim": 8, "dense_arch": [8], "cross_layers": 0, "deep_arch": [16]},
        "train": {"batch_size": 512, "max_steps": 6},
        "objective": {"kind": "ctr_kd", "teachers": [
            {"factory": FACTORY, "weights": str(weights), "input": "dict", "kwargs": {"dim": 8}, "hidden_dim": 16}],
            "losses": {"hard": 1.0, "soft": 1.0, "hint": 0.1}},
    }))
    r = cli("distill", "--config", str(cfg), "--nproc", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert summary["steps"] == 6 and {"hard", "soft", "hint"} <= set(summary["loss"]["last"]), summary["loss"]
    assert (tmp_path / "kd" / "export" / "model.pt").is_file()
