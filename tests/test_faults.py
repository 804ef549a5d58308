"""Faults injected for real, small scale: two cache builds racing for one directory while a
distillation's loader reads the cache as it grows, and the disk filling (a small tmpfs) while a
cache file or a checkpoint is written. Worker and driver SIGKILLs, a NaN teacher, ranks killed
under torchrun and a crash mid-checkpoint are tests/test_cache.py's, test_teacher_contract.py's,
test_restarts.py's and test_checkpoint.py's; a Ray head killed mid-build and an S3 server failing
uploads are test_faults_cluster.py's (see README, Reliability).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from distkd.bench.faults import clean_rows, kept_rows
from distkd.cache import CacheError, open_cache, read_manifest
from distkd.cache.manifest import temp_files
from distkd.cache.verify import verify_cache
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema
from distkd.train.checkpoint import committed
from tests.support import ROOT, SMALL_MODEL, cli

pytestmark = pytest.mark.integration

WAIT_S = 240


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path` (a disk that fills); skipped where mount is not permitted."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a full disk needs one): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def build_args(teacher, logs, out) -> list[str]:
    return ["cache", "build", "--teacher", str(teacher), "--logs", str(logs), "--out", str(out), "--splits", "train",
            "--workers", "1"]


def read_all(cache: Path, logs: Path, schema) -> torch.Tensor:
    """The logits a distillation's loader joins from `cache` for the train split of `logs`."""
    aligned = open_cache(cache, logs, "train")
    return torch.cat([b.extras["teacher.logits"] for b in LogLoader(split_files(logs, "train"), schema, 4096,
                                                                     aligned=[aligned])])


@pytest.mark.slow
def test_two_builds_race_while_a_reader_reads_the_growing_cache(kd_world, tmp_path, rows_lost):
    """A cache of two train shards; the logs gain two more. Build A extends the cache; build B,
    started while A runs, is refused naming the lock's holder and writes nothing; a reader of the
    first two shards joins the same logits before, during and after, and every manifest it reads
    is whole, naming only files that are complete."""
    small, (t0, _) = kd_world["logs"], kd_world["teachers"][0]
    logs, view, cache = tmp_path / "logs", tmp_path / "view", tmp_path / "cache"
    for d in (logs, view):
        shutil.copytree(small, d, ignore=shutil.ignore_patterns("part-00002.parquet", "part-00003.parquet"))
    shutil.copytree(kd_world["cache"], cache, ignore=shutil.ignore_patterns(".lock", ".readers", "part-00002.parquet",
                                                                               "part-00003.parquet"))
    m = json.loads((cache / "manifest.json").read_text())
    for rel in ("train/part-00002.parquet", "train/part-00003.parquet"):
        del m["shards"][rel]
        m["splits"]["train"].remove(rel)
    (cache / "manifest.json").write_text(json.dumps(m))
    schema = load_schema(view)
    want = read_all(cache, view, schema)
    for name in ("part-00002.parquet", "part-00003.parquet"):  # the logs grow
        shutil.copy(small / "train" / name, logs / "train" / name)

    err = open(tmp_path / "a.err", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTKD_NO_PROGRESS": "1"}
    env.pop("RAY_ADDRESS", None)
    a = subprocess.Popen([sys.executable, "-m", "distkd.cli", *build_args(t0, logs, cache)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + WAIT_S
        while "shards planned" not in (tmp_path / "a.err").read_text():  # A holds the lock, its plan is written
            assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.err").read_text()[-3000:]
            time.sleep(0.2)
        seen, errors = [len(read_manifest(cache).shards)], []

        def reader() -> None:  # a distillation's loader, reading while A extends the cache
            try:
                while a.poll() is None and time.monotonic() < deadline:
                    m = read_manifest(cache)  # never a torn manifest
                    for rel, e in m.shards.items():  # every file it names is there whole
                        assert (cache / rel).stat().st_size == e.output.bytes, rel
                    seen.append(len(m.shards))
                    torch.testing.assert_close(read_all(cache, view, schema), want, rtol=0, atol=0)
                    time.sleep(0.5)  # leave the build its CPU
            except BaseException as e:  # reported by the test's thread
                errors.append(e)

        thread = threading.Thread(target=reader)
        thread.start()
        b = cli(*build_args(t0, logs, cache), timeout=WAIT_S)
        b_ended_first = a.poll() is None
        thread.join(timeout=WAIT_S)
        assert not thread.is_alive(), "the reader did not stop within its deadline"
        assert not errors, errors
        assert b_ended_first, "build A ended before B tried: the race was not run"
        assert b.returncode == 2, b.stderr[-3000:]
        assert f"{cache}: a cache build is running in this directory (lock {cache / '.lock'} held by pid {a.pid}" in b.stderr
        assert a.wait() == 0, (tmp_path / "a.err").read_text()[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        err.close()
    assert len(seen) >= 3 and seen[0] == 2 and seen == sorted(seen) and seen[-1] <= 4, seen
    m = read_manifest(cache)
    assert m.complete and len(m.shards) == 4 and sorted(m.builds[-1].computed) == [
        "train/part-00002.parquet", "train/part-00003.parquet"]
    assert len(m.builds) == len(json.loads((kd_world["cache"] / "manifest.json").read_text())["builds"]) + 1
    clean = read_manifest(kd_world["cache"]).shards
    rows_lost(clean_rows(clean), kept_rows(m.shards, clean))
    for rel in m.shards:  # the grown cache is byte for byte a build from scratch
        assert m.shards[rel].output.sha256 == clean[rel].output.sha256, rel
    torch.testing.assert_close(read_all(cache, view, schema), want, rtol=0, atol=0)
    verify_cache(cache, logs, t0)


@pytest.mark.slow
def test_the_disk_filling_while_a_cache_file_is_written(kd_world, tmp_path, rows_lost):
    """48 KiB: the lock, the manifest and one 26 KB cache file fit, a second does not. The build
    stops naming the file, publishes nothing of it, and leaves a valid manifest whose files are whole."""
    small, (t0, _) = kd_world["logs"], kd_world["teachers"][0]
    with tmpfs(tmp_path / "disk", "48k") as disk:
        out = disk / "cache"
        r = cli(*build_args(t0, small, out), timeout=WAIT_S)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "cannot write the cache file: No space left on device; nothing of this shard is published" in r.stderr
        assert "Traceback" not in r.stderr.split("distkd: error:")[-1]
        m = read_manifest(out)
        assert not m.complete and len(m.shards) < 4
        clean = read_manifest(kd_world["cache"]).shards
        # what the build committed is kept whole (the rest was never published: a rerun computes it)
        rows_lost(sum(clean[rel].output.rows for rel in m.shards), kept_rows(m.shards, clean))
        for rel, e in m.shards.items():
            assert e.output.sha256 == clean[rel].output.sha256, rel
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == sorted(m.shards)
        assert not temp_files(out)
        with pytest.raises(CacheError) as e:
            verify_cache(out, small)
        assert f"{len(m.shards)} shards" not in str(e.value) and "not committed" in str(e.value)


def test_the_disk_filling_while_a_checkpoint_is_written(small_logs, tmp_path):
    """512 KiB: the step-2 checkpoint (~330 KB) fits, step 4's does not. The run stops naming the
    checkpoint, its partial folder is removed, and step 2 is still the one a resume uses."""
    with tmpfs(tmp_path / "disk", "512k") as disk:
        out = disk / "run"
        r = cli("student", "train", "--nproc", "1", f"logs={small_logs}", f"out={out}", "tensorboard=false",
                "train.batch_size=512", "train.checkpoint_every=2", "train.max_steps=8", *SMALL_MODEL,
                timeout=WAIT_S)
        assert r.returncode != 0, r.stderr[-3000:]
        assert (f"{out / 'checkpoints' / 'step-00000004'}: cannot write the checkpoint: No space left on device; "
                "nothing of it is published, the last committed checkpoint (step-00000002)") in r.stderr, r.stderr[-3000:]
        assert [p.name for p in committed(out / "checkpoints")] == ["step-00000002"]
        assert not list((out / "checkpoints").glob(".*"))  # the partial folder is gone
        assert not (out / "export").exists()
