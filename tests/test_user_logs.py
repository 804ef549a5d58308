"""Logs as a user has them, end to end through the real CLI: Parquet written the way pandas
writes it (float64 columns, string ids, float labels with NaN for "no label") into daily
Hive partitions, then validate, stats, a teacher on a window of days, a cache of every day,
a next day arriving and the cache extended by that day only (byte for byte what a build
from scratch writes), a student window over the new day refused until the cache has it,
then distillation; and `cache gc` that never removes a cache in use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distkd.cache import read_manifest
from distkd.cache.gc import gc
from distkd.cache.lock import BuildLock
from distkd.cache.reader import open_cache
from tests.support import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAYS = [f"2026-11-0{d}" for d in range(1, 7)]  # days 1-5 at first, day 6 arrives later
ROWS_PER_DAY = 3000
SCHEMA = """\
# written by hand, as a user would: string ids hashed, raw-scale dense standardized from stats
sparse:
  - {name: user, hash_size: 4096, hash: {function: fnv1a_fmix64, seed: 0}}
  - {name: item, num_embeddings: 400}
  - {name: tags, hash_size: 64, multi_valued: true, hash: {seed: 0}}
dense:
  - {name: price, transform: log1p_standardize}
  - {name: year, transform: standardize}
tasks:
  - {name: click, label: clicked}
"""


def write_day(logs: Path, day: str, seed: int, first_id: int) -> None:
    """One day: two row groups of a click model over string users, items, tags, price, year."""
    rng = np.random.default_rng(seed)
    n = ROWS_PER_DAY
    users = rng.integers(0, 800, n)
    items = rng.integers(0, 400, n)
    year = rng.integers(1922, 1999, n).astype(np.float64)
    price = rng.lognormal(3.0, 1.0, n)
    tags = [[f"tag-{t}" for t in rng.integers(0, 40, k)] for k in rng.integers(0, 4, n)]
    logit = (np.sin(users) + np.cos(items * 0.7) + (year - 1960) / 20 - np.log1p(price) / 3
             + np.array([0.3 * len(t) for t in tags]))
    clicked = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    clicked[rng.random(n) < 0.1] = np.nan  # no label
    table = pa.table({
        "example_id": pa.array(np.arange(first_id, first_id + n), pa.int64()),
        "user": pa.array([f"u{u}" for u in users]),
        "item": pa.array(items.astype(np.int32)),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "price": pa.array(price),  # float64
        "year": pa.array(year),  # float64, 1922-1998: raw scale
        "clicked": pa.array(clicked),  # float64 with NaN
    })
    d = logs / f"dt={day}"
    d.mkdir(parents=True)
    pq.write_table(table, d / "part-00000.parquet", row_group_size=n // 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    logs = root / "logs"
    logs.mkdir()
    (logs / "schema.yaml").write_text(SCHEMA)
    for i, day in enumerate(DAYS[:5]):
        write_day(logs, day, seed=i, first_id=i * ROWS_PER_DAY)
    return root, logs


def window(train: tuple[str, str], valid: str, test: str) -> dict:
    return {"train": {"key": "dt", "start": train[0], "end": train[1]},
            "valid": {"key": "dt", "start": valid, "end": valid}, "test": {"key": "dt", "start": test, "end": test}}


def job_file(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


MODEL = {"embedding_dim": 8, "dense_arch": [8], "cross_layers": 0, "deep_arch": [16]}
TRAIN = {"batch_size": 512, "epochs": 1, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def cached(world):
    """validate, stats, a teacher on days 1-3 (valid 4, test 5), a cache of every day there is."""
    root, logs = world
    r = cli("data", "validate", str(logs))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dt=2026-11-05" in r.stdout and "OK" in r.stdout
    assert "transform 'log1p_standardize' needs statistics" in r.stderr and "distkd data stats" in r.stderr

    r = cli("data", "stats", str(logs), "--partition", "dt=2026-11-01..2026-11-03")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((logs / "stats.json").read_text())["content"]
    assert stats["partition"] == {"key": "dt", "start": "2026-11-01", "end": "2026-11-03"}
    assert stats["rows"] == 3 * ROWS_PER_DAY and 1950 < stats["dense"]["year"]["mean"] < 1970

    teacher = job_file(root / "teacher.yaml", logs=str(logs), out=str(root / "teacher"), role="teacher", nproc=1,
                       tensorboard=False, model={**MODEL, "embedding_dim": 16, "deep_arch": [32]},
                       train=TRAIN, partitions=window(("2026-11-01", "2026-11-03"), "2026-11-04", "2026-11-05"))
    r = cli("teacher", "train", "--config", str(teacher))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((root / "teacher" / "summary.json").read_text())
    assert summary["rows"] == 3 * ROWS_PER_DAY  # every row of the window, labelled or not
    assert 2600 < summary["test"]["click"]["rows"] < 2800  # the labelled rows of day 5 (10% have NaN)
    assert summary["test"]["click"]["auc"] > 0.6

    cache_job = dict(teacher=str(root / "teacher" / "export"), logs=str(logs), out=str(root / "cache"),
                     splits=["all"], partitions={"all": {"key": "dt"}}, by_teacher=True, workers=1)
    cache = job_file(root / "cache.yaml", **cache_job)
    r = cli("cache", "build", "--config", str(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    sha = json.loads((root / "teacher" / "export" / "export.json").read_text())["sha256"]
    cache_dir = root / "cache" / sha[:12]
    assert sorted(read_manifest(cache_dir).shards) == [f"dt={d}/part-00000.parquet" for d in DAYS[:5]]
    return cache, cache_dir, sha


def test_a_users_logs_from_validate_to_distillation(world, cached):
    root, logs = world
    cache, cache_dir, sha = cached
    # Day 6 arrives. A student whose window reaches it is refused before any rank starts.
    write_day(logs, DAYS[5], seed=5, first_id=5 * ROWS_PER_DAY)
    student = dict(logs=str(logs), role="student", nproc=1, tensorboard=False, model=MODEL, train=TRAIN,
                   partitions=window(("2026-11-03", "2026-11-05"), "2026-11-06", "2026-11-06"),
                   objective={"kind": "ctr_kd", "teachers": [{"cache": str(root / "cache"), "sha256": sha}],
                              "losses": {"hard": 1.0, "mse": 1.0}})
    early = {**student, "partitions": window(("2026-11-04", "2026-11-06"), "2026-11-05", "2026-11-05")}
    r = cli("distill", "--config", str(job_file(root / "early.yaml", out=str(root / "kd-early"), **early)))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "1 of 3 shards of split 'train' (dt in [2026-11-04, 2026-11-06]) are not cached: " \
           "['dt=2026-11-06/part-00000.parquet']" in r.stderr, r.stderr[-2000:]
    assert not (root / "kd-early").exists()

    r = cli("cache", "status", "--cache", str(root / "cache"), "--logs", str(logs), "--teacher-sha256", sha)
    rows = {line.split()[0]: line.split()[1:4] for line in r.stdout.splitlines()[2:]}
    assert r.returncode == 0 and rows["dt=2026-11-06"] == ["0", "1", "0"], r.stdout  # cached, missing, stale
    assert all(rows[f"dt={d}"] == ["1", "0", "0"] for d in DAYS[:5]), r.stdout

    # The next build computes day 6 only; every file is the one a build from scratch writes.
    r = cli("cache", "build", "--config", str(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 shards planned, 5 already committed (skipped), 1 to compute" in r.stderr, r.stderr[-2000:]
    assert "split 'all' gained 1 shard(s) since the last build (first: dt=2026-11-06/part-00000.parquet)" in r.stderr
    r = cli("cache", "build", "--config", str(cache), f"out={root / 'scratch'}")
    assert r.returncode == 0, r.stderr[-3000:]
    grown, scratch = read_manifest(cache_dir), read_manifest(root / "scratch" / sha[:12])
    assert sorted(grown.shards) == sorted(scratch.shards) and len(grown.shards) == 6
    for rel in grown.shards:
        assert (cache_dir / rel).read_bytes() == (root / "scratch" / sha[:12] / rel).read_bytes(), rel
    r = cli("cache", "verify", "--cache", str(cache_dir), "--logs", str(logs))
    assert r.returncode == 0, r.stderr[-2000:]

    distill = job_file(root / "distill.yaml", out=str(root / "kd"), **student)
    r = cli("distill", "--config", str(distill))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((root / "kd" / "summary.json").read_text())
    assert s["rows"] == 3 * ROWS_PER_DAY and s["loss"]["last"]["mse"] < s["loss"]["first"]["mse"]

    # A day that disappears is dropped from the cache at the next build, never used.
    shutil.rmtree(logs / "dt=2026-11-01")
    r = cli("cache", "build", "--config", str(cache))
    assert r.returncode == 0 and "log shard dt=2026-11-01/part-00000.parquet is gone" in r.stderr, r.stderr[-2000:]
    m = read_manifest(cache_dir)
    assert "dt=2026-11-01/part-00000.parquet" in m.dropped and len(m.shards) == 5
    assert not list(cache_dir.glob("dt=2026-11-01/*.parquet"))


def test_gc_keeps_the_newest_and_never_one_in_use(world, cached, tmp_path):
    """Three caches under a root (copies, built at different times): gc --keep 1 removes the
    older ones only while nothing holds them; a reader's pin or a build's lock keeps one."""
    root, logs = world
    caches = tmp_path / "root"
    src = cached[1]
    for i, name in enumerate(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]):
        shutil.copytree(src, caches / name, ignore=shutil.ignore_patterns(".lock", ".readers"))
        m = json.loads((caches / name / "manifest.json").read_text())
        m["builds"][-1]["started_at"] = f"2026-11-2{i}T00:00:00+0000"
        (caches / name / "manifest.json").write_text(json.dumps(m))
    oldest, middle = caches / "aaaaaaaaaaaa", caches / "bbbbbbbbbbbb"
    view = open_cache(oldest, logs, "test", partitions={"test": _range("2026-11-05")})
    pin = view.pin()  # what a distillation's loader holds while it reads
    with BuildLock(middle):  # a build extending the middle one
        result = gc(caches, keep=1)
    assert result["removed"] == [] and sorted(result["in_use"]) == [str(oldest), str(middle)]
    pin.release()
    result = gc(caches, keep=1)
    assert sorted(result["removed"]) == [str(oldest), str(middle)] and result["kept"] == [str(caches / "cccccccccccc")]
    assert not oldest.exists() and (caches / "cccccccccccc" / "manifest.json").is_file()


def _range(day: str):
    from distkd.data.layout import PartitionRange

    return PartitionRange(key="dt", start=day, end=day)
