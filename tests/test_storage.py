"""Storage locations: local paths and s3:// URIs, with atomic commits on both.

The S3 side is real: moto's S3 server over HTTP on 127.0.0.1, pyarrow's S3FileSystem, the
endpoint taken from AWS_ENDPOINT_URL. One embedded Ray session, started after the endpoint
is in the environment, serves the cache builds (its workers inherit that environment).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from distkd import storage
from distkd.bench.faults import clean_rows, kept_rows
from distkd.cache import CacheError, open_cache, read_manifest
from distkd.cache.build import CacheJob, build
from distkd.cache.verify import verify_cache
from distkd.cli import main as cli_main
from distkd.config import ConfigError
from distkd.models.export import write_export
from distkd.data.loader import LogLoader, split_files
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.data.schema import load_schema
from tests.support import BUCKET, ROOT, s3_keys



# -- local paths ----------------------------------------------------------------------------

@pytest.mark.unit
def test_local_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not storage.is_remote("runs/logs") and not storage.is_remote(tmp_path)
    assert not storage.is_remote(f"file://{tmp_path}") and storage.is_remote("s3://b/k")
    assert storage.join("runs", "train", "a.parquet") == str(Path("runs/train/a.parquet"))
    assert storage.absolute("runs/../logs") == str(tmp_path / "logs")
    assert storage.absolute(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.relative("logs", tmp_path / "logs" / "train" / "a.parquet") == "train/a.parquet"
    assert storage.relative("logs", tmp_path / "other") is None
    assert storage.basename(tmp_path / "a.parquet") == "a.parquet"

    storage.write_atomic("logs/train/b.parquet", lambda fh: fh.write(b"bb"))
    storage.write_atomic(f"file://{tmp_path}/logs/train/a.parquet", lambda fh: fh.write(b"a"))
    storage.write_atomic("logs/train/.hidden", lambda fh: fh.write(b""))
    assert storage.list_files("logs/train", ".parquet") == [str(Path("logs/train/a.parquet")),
                                                            str(Path("logs/train/b.parquet"))]
    assert len(storage.list_files("logs", recursive=True)) == 3 and storage.list_files("nothing") == []
    assert storage.size("logs/train/b.parquet") == 2 and storage.size("logs/train/zz") is None
    assert storage.read_text("logs/train/b.parquet") == "bb"
    with storage.open_input("logs/train/b.parquet") as f:
        assert f.size() == 2 and f.read() == b"bb"

    def fail(fh):
        fh.write(b"half of it")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        storage.write_atomic("logs/train/b.parquet", fail)
    assert storage.read_text("logs/train/b.parquet") == "bb"  # the old content, whole
    assert sorted(p.name for p in (tmp_path / "logs" / "train").iterdir()) == [".hidden", "a.parquet", "b.parquet"]
    storage.delete("logs/train/b.parquet")
    storage.delete("logs/train/b.parquet")  # nothing there: no error
    assert storage.size("logs/train/b.parquet") is None


# -- an S3 server on 127.0.0.1 --------------------------------------------------------------

@pytest.mark.cluster
def test_write_atomic_on_s3(s3):
    loc = f"s3://{BUCKET}/atomic/obj.bin"
    storage.write_atomic(loc, lambda fh: fh.write(b"first"))
    assert storage.read_text(loc) == "first" and storage.size(loc) == 5

    def fail(fh):  # the failure comes after bytes went into the stream
        fh.write(b"x" * 100_000)
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        storage.write_atomic(loc, fail)
    assert storage.read_text(loc) == "first"  # the committed object, untouched
    with pytest.raises(RuntimeError):
        storage.write_atomic(f"s3://{BUCKET}/atomic/new.bin", fail)
    assert s3_keys("atomic") == ["atomic/obj.bin"]  # nothing at the new key, no temporary key left
    assert storage.size(f"s3://{BUCKET}/atomic/new.bin") is None
    storage.write_atomic(f"s3://{BUCKET}/atomic/new.bin", lambda fh: fh.write(b"ok"), tag="t1")
    assert s3_keys("atomic") == ["atomic/new.bin", "atomic/obj.bin"]
    assert storage.list_files(f"s3://{BUCKET}/atomic", ".bin") == [f"s3://{BUCKET}/atomic/new.bin", loc]
    storage.delete(f"s3://{BUCKET}/atomic/new.bin")
    storage.delete(f"s3://{BUCKET}/atomic/new.bin")
    assert s3_keys("atomic") == ["atomic/obj.bin"]


@pytest.mark.cluster
def test_synth_writes_logs_to_s3(s3, tmp_path, capsys):
    """The data stage writes straight to a bucket: the same bytes as on a local disk."""
    from distkd.data.synth import generate

    uri = f"s3://{BUCKET}/synth"
    args = ["data", "synth", "--preset", "small", "--rows", "3000", "--shards", "2", "--workers", "1"]
    assert cli_main(args + ["--out", uri]) == 0
    assert "oracle AUC" in capsys.readouterr().out  # the summary read the shards back from S3
    assert cli_main(["data", "validate", uri]) == 0  # every shard and row group, read from S3
    assert "3,000 rows checked" in capsys.readouterr().out
    generate(tmp_path / "local", 3000, shards=2, preset="small")
    keys = s3_keys("synth")
    assert keys == ["synth/schema.yaml", "synth/test/part-00000.parquet", "synth/train/part-00000.parquet",
                    "synth/train/part-00001.parquet", "synth/valid/part-00000.parquet"]
    for key in keys:
        with storage.open_input(f"s3://{BUCKET}/{key}") as f:
            assert f.read() == (tmp_path / "local" / key.split("/", 1)[1]).read_bytes(), key
    with pytest.raises(FileExistsError, match="--force"):
        generate(uri, 3000, shards=2, preset="small")
    generate(uri, 2000, shards=1, preset="small", force=True)  # replaces every object under it
    assert s3_keys("synth") == ["synth/schema.yaml", "synth/test/part-00000.parquet",
                              "synth/train/part-00000.parquet", "synth/valid/part-00000.parquet"]


@pytest.fixture(scope="module")
def s3_logs(s3, small_logs):
    uri = f"s3://{BUCKET}/logs"
    pafs.copy_files(str(small_logs), uri)
    return uri


@pytest.mark.cluster
def test_loader_streams_s3_logs(s3_logs, small_logs):
    schema = load_schema(s3_logs)
    assert schema == load_schema(small_logs)
    files = split_files(s3_logs, "train")
    assert files == [f"{s3_logs}/train/part-0000{i}.parquet" for i in range(4)]
    got, want = (LogLoader(split_files(logs, "train"), schema, 3000, shuffle=True, seed=7, world_size=2, rank=1)
                 for logs in (s3_logs, small_logs))
    assert len(got) == len(want)
    n = 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.example_id, b.example_id, rtol=0, atol=0)
        torch.testing.assert_close(a.dense, b.dense, rtol=0, atol=0)
        torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a.sparse.values(), b.sparse.values(), rtol=0, atol=0)
        torch.testing.assert_close(a.sparse.lengths(), b.sparse.lengths(), rtol=0, atol=0)
        n += len(a)
    assert n == 16_000


# -- the cache on S3 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory, small_logs):
    torch.manual_seed(0)
    schema = load_schema(small_logs)
    cfg = ModelConfig(embedding_dim=8, dense_arch=[8], cross_layers=1, cross_rank=4, deep_arch=[16, 8])
    model = RankingModel(schema, cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    out = tmp_path_factory.mktemp("teacher") / "export"
    return str(out), write_export(out, "teacher", schema, cfg, model.state_dict())["sha256"]


@pytest.fixture(scope="module")
def ray_session(s3):
    """Started after `s3` put the endpoint in the environment: its workers inherit it."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_cache(ray_session, small_logs, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "local"
    assert build(CacheJob(teacher=teacher[0], logs=str(small_logs), out=str(out), splits=["train"]))["complete"]
    return out


@pytest.mark.cluster
def test_cache_on_s3_interrupted_resumed_verified(ray_session, s3_logs, small_logs, teacher, local_cache, capsys,
                                                   rows_lost):
    cache = f"s3://{BUCKET}/cache"
    args = ["cache", "build", "--teacher", teacher[0], "--logs", s3_logs, "--out", cache, "--splits", "train"]
    local = read_manifest(local_cache).shards
    # 1: the real command line, on this Ray session; the driver SIGKILLs itself after its first commit.
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    r = subprocess.run([sys.executable, "-m", "tests.faults.cache", "--kill-driver-after", "1", "--", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "object storage has no build lock" in r.stderr
    m = read_manifest(cache)
    assert not m.complete and len(m.shards) == 1, m.shards  # whichever worker finished first
    done = set(m.shards)
    for rel, e in m.shards.items():  # what the manifest claims is there, whole
        assert storage.size(f"{cache}/{rel}") == e.output.bytes
        assert e.output.sha256 == local[rel].output.sha256
    with pytest.raises(CacheError, match=r"3 of 4 shards of split 'train' are not cached"):
        open_cache(cache, s3_logs, "train")

    # 2: rerun; it computes only the shards the manifest does not hold.
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert "1 already committed (skipped), 3 to compute" in err, err[-3000:]
    m = read_manifest(cache)
    assert m.complete and m.logs == s3_logs
    assert sorted(m.builds[-1].computed) == sorted(set(local) - done)
    assert s3_keys("cache") == ["cache/manifest.json"] + [f"cache/train/part-0000{i}.parquet" for i in range(4)]
    # The same bytes as the local build's files: the same logits, row groups and metadata.
    rows_lost(clean_rows(local), kept_rows(m.shards, local))
    for rel, e in m.shards.items():
        assert e.output.sha256 == local[rel].output.sha256, rel
        assert e.input == local[rel].input, rel

    # 3: verify and read it from S3.
    assert verify_cache(cache, s3_logs, teacher[0])["rows"] == 32_000
    assert cli_main(["cache", "verify", "--cache", cache, "--logs", s3_logs, "--teacher", teacher[0]]) == 0
    schema = load_schema(s3_logs)
    remote = LogLoader(split_files(s3_logs, "train"), schema, 4096,
                       aligned=[open_cache(cache, s3_logs, "train", teacher_sha256=teacher[1])])
    here = LogLoader(split_files(small_logs, "train"), schema, 4096,
                     aligned=[open_cache(local_cache, small_logs, "train", teacher_sha256=teacher[1])])
    for a, b in zip(remote, here, strict=True):
        torch.testing.assert_close(a.example_id, b.example_id, rtol=0, atol=0)
        torch.testing.assert_close(a.extras["teacher.logits"], b.extras["teacher.logits"], rtol=0, atol=0)
    open_cache(cache, small_logs, "train", teacher_sha256=teacher[1])  # the same logs, local: also fine
    s = build(CacheJob(teacher=teacher[0], logs=s3_logs, out=cache, splits=["train"]))
    assert s["computed"] == 0 and s["skipped"] == 4 and s["complete"]


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.cluster
def test_readable_errors(s3, s3_logs, teacher, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=f"s3://{BUCKET}/no-logs/schema.yaml: cannot read: no such object"):
        load_schema(f"s3://{BUCKET}/no-logs")
    rc = cli_main(["cache", "build", "--teacher", teacher[0], "--logs", f"s3://{BUCKET}/no-logs",
                   "--out", f"s3://{BUCKET}/c2"])
    err = capsys.readouterr().err
    assert rc == 2 and f"s3://{BUCKET}/no-logs/schema.yaml" in err, err
    assert cli_main(["cache", "verify", "--cache", f"s3://{BUCKET}/nothing", "--logs", s3_logs]) == 2
    assert "s3://distkd-test/nothing: no manifest.json" in capsys.readouterr().err
    assert cli_main(["cache", "build", "--teacher", "s3://b/t", "--logs", s3_logs]) == 2
    assert "--teacher.export: s3://b/t: must be a path every worker can open" in capsys.readouterr().err

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    rc = cli_main(["cache", "verify", "--cache", f"s3://{BUCKET}/cache", "--logs", s3_logs])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"s3://{BUCKET}/cache/manifest.json" in err and f"S3 endpoint: http://127.0.0.1:{dead}" in err, err
