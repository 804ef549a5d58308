"""The logit cache on real Ray: build, verify, resume, refusals, and real faults.

One embedded Ray session (num_cpus=2) serves the in-process builds; a Ray head started on
127.0.0.1 serves the builds run through the command line with --ray-address / RAY_ADDRESS.
Teachers are real exports of untrained models (fixed seeds).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distkd.cache import CacheError, open_cache, read_manifest
from distkd.cache.build import CacheJob, build, job_from_args
from distkd.cache.lock import BuildLock
from distkd.cache.pool import plan_pool
from distkd.cache.verify import verify_cache
from distkd.dist import free_port
from distkd.cli import main as cli_main
from distkd.models.export import load_export
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import LogsError, load_schema
from distkd.bench.faults import clean_rows, kept_rows
from distkd.bench.ray_local import session_pids
from tests.faults.cache import kill_each_shard_class, kill_worker_class
from tests.support import LOOPBACK, ROOT, distkd_log, listening, make_teacher

TRAIN_ROWS = 32_000  # small_logs' train split


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, small_logs):
    root = tmp_path_factory.mktemp("teachers")
    schema = load_schema(small_logs)
    return {i: (str(root / f"t{i}"), make_teacher(root / f"t{i}", schema, seed=i)) for i in (0, 1)}


@pytest.fixture(scope="module")
def ray_session():
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def built(ray_session, small_logs, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    summary = build(CacheJob(teacher=teachers[0][0], logs=str(small_logs), out=str(out)))
    return out, summary


def _job(teachers, logs, out, i=0, **kw) -> CacheJob:
    return CacheJob(teacher=teachers[i][0], logs=str(logs), out=str(out), **kw)


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# -- build, verify, read ------------------------------------------------------------------

@pytest.mark.integration
def test_build_then_verify(built, small_logs, teachers):
    out, s = built
    assert s["complete"] and s["rows"] == 40_000 and s["computed"] == 6 and s["skipped"] == 0
    assert s["bytes_per_row_per_task"] <= 2.5
    m = read_manifest(out)
    assert m.teacher.sha256 == teachers[0][1] and m.complete
    # the pool's actors run with glibc's arenas capped (their memory stays flat over shards)
    assert [w["malloc_arena_max"] for w in m.builds[-1].workers] == ["2"] * len(m.builds[-1].workers)
    for split in ("train", "valid", "test"):
        for log in split_files(small_logs, split):
            side = out / split / Path(log).name
            with pq.ParquetFile(log) as a, pq.ParquetFile(side) as b:
                assert [a.metadata.row_group(g).num_rows for g in range(a.num_row_groups)] == [
                    b.metadata.row_group(g).num_rows for g in range(b.num_row_groups)]
                assert b.schema_arrow.field("logits").type == pa.list_(pa.float16(), 2)
    v = verify_cache(out, small_logs, teachers[0][0])
    assert v["rows"] == 40_000 and v["shards"] == 6


@pytest.mark.integration
def test_cached_logits_are_the_teachers_forward(built, small_logs, teachers):
    out, _ = built
    model, meta = load_export(teachers[0][0])
    schema = load_schema(small_logs)
    aligned = open_cache(out, small_logs, "train", teacher_sha256=meta["sha256"])
    loader = LogLoader(split_files(small_logs, "train"), schema, 3000, aligned=[aligned], shuffle=True, seed=3)
    seen = 0
    with torch.no_grad():
        for batch in loader:
            want = model(batch.sparse, batch.dense).logits
            got = batch.extras["teacher.logits"]
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16 rounding
            seen += len(batch)
    assert seen == 32_000


@pytest.mark.integration
def test_rerun_skips_everything(built, teachers, small_logs):
    out, _ = built
    before = read_manifest(out).shards
    s = build(_job(teachers, small_logs, out))  # no Ray needed: nothing to compute
    assert s["computed"] == 0 and s["skipped"] == 6 and s["complete"]
    assert read_manifest(out).shards == before


# -- refusals -----------------------------------------------------------------------------

@pytest.mark.integration
def test_other_teacher_is_refused(built, teachers, small_logs):
    out, _ = built
    with pytest.raises(CacheError, match=r"holds logits of teacher .*build into a new cache directory"):
        build(_job(teachers, small_logs, out, i=1))
    with pytest.raises(CacheError, match="expected teacher"):
        open_cache(out, small_logs, "train", teacher_sha256=teachers[1][1])
    with pytest.raises(CacheError, match="holds logits of teacher"):
        verify_cache(out, small_logs, teachers[1][0])
    with pytest.raises(CacheError, match="has dtype='fp16', this build asks dtype='fp32'"):
        build(_job(teachers, small_logs, out, dtype="fp32"))
    with pytest.raises(CacheError, match="built without the teacher's hidden layer"):
        open_cache(out, small_logs, "train", hidden=True)


@pytest.mark.integration
def test_modified_log_shard_is_detected_and_refused(built, teachers, small_logs, tmp_path):
    out, _ = built
    logs = tmp_path / "logs"
    shutil.copytree(small_logs, logs)
    cache = _copy_cache(out, tmp_path / "cache")
    victim = logs / "train" / "part-00001.parquet"
    with pq.ParquetFile(victim) as pf:  # same rows and row groups; row group 1 in another order
        groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]
    groups[1] = groups[1].take(np.arange(groups[1].num_rows)[::-1])
    with pq.ParquetWriter(victim, groups[0].schema, compression="zstd") as w:
        for t in groups:
            w.write_table(t, row_group_size=t.num_rows)
    with pytest.raises(CacheError) as e:
        verify_cache(cache, logs)
    assert "part-00001" in str(e.value)
    with distkd_log() as msgs, pytest.raises(CacheError):
        verify_cache(cache, logs)
    assert any("row group 1: example_id checksum" in m for m in msgs), msgs
    with pytest.raises(CacheError, match="part-00001.parquet changed since its logits were cached"):
        build(_job(teachers, logs, cache))
    with pytest.raises(CacheError, match="changed since its logits were cached"):
        open_cache(cache, logs, "train")
    # The per-row-group check the loader runs: a misaligned row group never passes.
    aligned = open_cache(cache, small_logs, "train")
    with pq.ParquetFile(small_logs / "train" / "part-00001.parquet") as pf:
        table = pf.read_row_group(1)
    aligned.check(table, table, str(small_logs / "train" / "part-00001.parquet"), 1)
    with pytest.raises(CacheError, match="row group 1: example_id checksum"):
        aligned.check(groups[1], table, str(small_logs / "train" / "part-00001.parquet"), 1)


@pytest.mark.integration
def test_concurrent_build_is_refused(built, teachers, small_logs):
    out, _ = built
    with BuildLock(out):  # another driver holds the directory
        with pytest.raises(CacheError, match="a cache build is running in this directory"):
            build(_job(teachers, small_logs, out))
        with pytest.raises(CacheError, match="a cache build is running"):
            verify_cache(out, small_logs)
    assert build(_job(teachers, small_logs, out))["computed"] == 0


@pytest.mark.integration
def test_missing_teacher_export_is_a_clear_error(small_logs, tmp_path, capsys):
    rc = cli_main(["cache", "build", "--teacher", str(tmp_path / "no-export"), "--logs", str(small_logs),
                   "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "no-export: no export.json" in err and "Traceback" not in err


@pytest.mark.integration
def test_open_cache_refuses_incomplete_cache(built, small_logs, tmp_path):
    out, _ = built
    cache = _copy_cache(out, tmp_path / "cache")
    m = json.loads((cache / "manifest.json").read_text())
    del m["shards"]["train/part-00002.parquet"]
    m["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"1 of 4 shards of split 'train' are not cached: "
                                         r"\['train/part-00002.parquet'\]; extend the cache"):
        open_cache(cache, small_logs, "train")
    assert open_cache(cache, small_logs, "valid").columns == ["logits"]
    with pytest.raises(CacheError, match="train/part-00002.parquet: not committed"):
        verify_cache(cache, small_logs)
    with pytest.raises(LogsError, match="no Parquet shards .* for split 'other'"):
        open_cache(cache, small_logs, "other")


# -- faults -------------------------------------------------------------------------------

@pytest.mark.integration
def test_worker_killed_mid_shard_costs_one_retry(built, teachers, small_logs, tmp_path, rows_lost):
    out, _ = built
    with distkd_log() as logs:
        s = build(_job(teachers, small_logs, tmp_path / "cache", splits=["train"]), worker=kill_worker_class(tmp_path))
    assert (tmp_path / "killed-0").exists(), "the fault never fired"
    assert s["complete"] and s["computed"] == 4 and s["rows"] == 32_000
    assert any("died on" in line and "retrying the shard" in line for line in logs), logs
    m = read_manifest(tmp_path / "cache")
    attempts = {rel: e.timings.attempt for rel, e in m.shards.items()}
    assert sorted(attempts.values()) == [1, 1, 1, 2], attempts
    assert not list((tmp_path / "cache").glob("*/.*.tmp-*"))
    verify_cache(tmp_path / "cache", small_logs)
    # Every row exactly once: the same bytes as the clean build's files.
    clean = read_manifest(out).shards
    rows_lost(clean_rows(clean, "train/"), kept_rows(m.shards, clean))
    for rel, e in m.shards.items():
        assert e.output.sha256 == clean[rel].output.sha256, rel
        assert e.input.ids == clean[rel].input.ids, rel


@pytest.mark.slow
@pytest.mark.integration
def test_one_worker_killed_on_every_shard_still_builds_every_row_once(built, teachers, small_logs, tmp_path, rows_lost):
    """One worker, SIGKILLed on the first attempt of each of the 4 shards: more deaths than
    max_attempts, none twice on one shard. Each death costs its shard one retry; the build does
    not run out of restarts."""
    out, _ = built
    with distkd_log() as logs:
        s = build(_job(teachers, small_logs, tmp_path / "cache", splits=["train"], workers=1, max_attempts=2),
                  worker=kill_each_shard_class(tmp_path))
    assert len(list(tmp_path.glob("killed-*"))) == 4, "the fault did not fire on every shard"
    assert s["complete"] and s["computed"] == 4 and s["rows"] == 32_000
    assert sum("died on" in line for line in logs) == 4, logs
    m = read_manifest(tmp_path / "cache")
    assert sorted(e.timings.attempt for e in m.shards.values()) == [2, 2, 2, 2]
    assert not list((tmp_path / "cache").glob("*/.*.tmp-*"))
    verify_cache(tmp_path / "cache", small_logs)
    clean = read_manifest(out).shards
    rows_lost(clean_rows(clean, "train/"), kept_rows(m.shards, clean))
    for rel, e in m.shards.items():
        assert e.output.sha256 == clean[rel].output.sha256, rel


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1; stopped by signalling the `ray start --block` process we started."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # A private temp dir (short: Ray's socket paths must fit 107 bytes), so that this head is
    # never recorded as the machine's "current cluster" that other ray.init() calls would join.
    temp_dir = tempfile.mkdtemp(prefix="distkd-ray-", dir="/tmp")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
           # every port picked free (Ray's fixed defaults would collide with another head here)
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
           f"--temp-dir={temp_dir}", "--block"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Loopback only (as tests/test_submit_live.py): without it Ray rewrites 127.0.0.1 to the
    # machine's outside address and binds GCS, raylet and agents on every interface.
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DASHBOARD_METRIC_PORT": str(free_port()),
                "AUTOSCALER_METRIC_PORT": str(free_port())})
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    ports = listening(session_pids(proc.pid))
    if not any(p == port for _, p, _ in ports) or not all(a in LOOPBACK for a, _, _ in ports):
        proc.kill()
        pytest.fail(f"the Ray head must listen on loopback only (its GCS on {port}): {ports}")
    yield address
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started, nothing else
        proc.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(args: list[str], env_extra: dict[str, str], module: str = "distkd.cli") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the driver's own address look-ups: 127.0.0.1, as the head's
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.cluster
def test_ray_address_build_resumes_after_driver_kill(ray_head, teachers, small_logs, tmp_path, capsys, rows_lost):
    out = tmp_path / "cache"
    args = ["cache", "build", "--teacher", teachers[0][0], "--logs", str(small_logs), "--out", str(out),
            "--splits", "train", "--dtype", "fp32", "--hidden"]
    # 1: through --ray-address; the driver SIGKILLs itself right after its first commit.
    r = _cli(["--kill-driver-after", "1", "--", *args, "--ray-address", ray_head], {}, module="tests.faults.cache")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    m = read_manifest(out)
    # two workers on the 2-CPU head: whichever shard finished first is the one committed
    assert len(m.shards) == 1 and not m.complete, m.shards
    (done, first), = m.shards.items()
    # 2: through RAY_ADDRESS; resumes, computes only the three shards not committed.
    r = _cli(args, {"RAY_ADDRESS": ray_head})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 already committed (skipped), 3 to compute" in r.stderr, r.stderr[-3000:]
    m = read_manifest(out)
    rest = sorted(f"train/part-0000{i}.parquet" for i in range(4) if f"train/part-0000{i}.parquet" != done)
    assert m.complete and sorted(m.builds[-1].computed) == rest, m.builds[-1]
    assert m.shards[done] == first
    verify_cache(out, small_logs, teachers[0][0])
    rc = cli_main(["cache", "verify", "--cache", str(out), "--logs", str(small_logs), "--teacher", teachers[1][0]])
    assert rc == 2 and "holds logits of teacher" in capsys.readouterr().err
    # fp32 logits are the teacher's exactly; the hidden layer comes back as fp16-rounded float32.
    model, _ = load_export(teachers[0][0])
    aligned = open_cache(out, small_logs, "train", teacher_sha256=teachers[0][1], hidden=True)
    loader = LogLoader(split_files(small_logs, "train"), load_schema(small_logs), 8192, aligned=[aligned])
    kept = 0  # rows whose cached logits are the teacher's forward
    with torch.no_grad():
        for batch in loader:
            o = model(batch.sparse, batch.dense)
            torch.testing.assert_close(batch.extras["teacher.logits"], o.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.extras["teacher.hidden"], o.hidden, atol=2e-3, rtol=2e-3)
            kept += len(o.logits)
    rows_lost(TRAIN_ROWS, kept)
    assert kept == TRAIN_ROWS


# -- job and pool sizing ------------------------------------------------------------------

@pytest.mark.unit
def test_job_yaml_and_flags(tmp_path):
    cfg = tmp_path / "cache.yaml"
    cfg.write_text("teacher: t\nlogs: l\nout: o\ndtype: fp32\nworkers: 3\nsplits: [train]\n")
    ns = Namespace(config=str(cfg), overrides=["batch_size=1024"], teacher=None, logs="L", out=None, ray_address=None,
                   workers=None, threads_per_worker=2, device=None, dtype=None, hidden=True, batch_size=None,
                   max_attempts=None, splits="train,valid")
    job = job_from_args(ns)
    assert (job.teacher, job.logs, job.dtype, job.workers, job.threads_per_worker, job.hidden, job.batch_size,
            job.splits) == ("t", "L", "fp32", 3, 2, True, 1024, ["train", "valid"])


@pytest.mark.unit
def test_pool_sizing_takes_every_cpu():
    assert (plan_pool({"CPU": 2}, None, None).workers, plan_pool({"CPU": 2}, None, None).threads) == (2, 1)
    assert plan_pool({"CPU": 1}, None, None).workers == 1
    assert plan_pool({"CPU": 16}, None, None).workers == 16
    p = plan_pool({"CPU": 16}, None, 4)
    assert (p.workers, p.threads, p.num_cpus) == (4, 4, 4.0)
    p = plan_pool({"CPU": 16}, 2, None)
    assert (p.workers, p.threads) == (2, 8)
    assert plan_pool({"CPU": 4}, 8, None).workers == 4
    p = plan_pool({"CPU": 8, "GPU": 2}, None, None)
    assert (p.workers, p.num_gpus, p.device) == (2, 1, "cuda") and p.workers * p.num_cpus <= 8
    assert plan_pool({"CPU": 8, "GPU": 2}, None, None, device="cpu").device == "cpu"
