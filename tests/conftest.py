"""Shared fixtures (small but real sharded Parquet logs, teacher exports and caches, an S3 server)
and the marker rule: every test is `unit`, `integration` or `cluster` (and `slow` when it takes
over ~30 s), so that `make test-fast` (-m unit) can run the quick ones alone."""

from __future__ import annotations

import json
import os

# One thread per process: tests start several ranks on two cores. Set before torch is imported
# (by the imports below), which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from distkd.bench.faults import RESULTS_ENV, results_file  # noqa: E402
from distkd.cache.build import CacheJob, build  # noqa: E402
from distkd.data.schema import load_schema  # noqa: E402
from distkd.data.synth import generate  # noqa: E402
from tests.support import BUCKET, cli, make_teacher  # noqa: E402

KINDS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(config, items):
    """Refuse a test without exactly one of KINDS: an unmarked test would fall out of every subset."""
    bad = [f"{item.nodeid}: {kinds or 'none'}" for item in items
           if len(kinds := sorted({m.name for m in item.iter_markers()} & set(KINDS))) != 1]
    if bad:
        raise pytest.UsageError(f"every test needs exactly one of the markers {', '.join(KINDS)} "
                                f"(a module's `pytestmark` will do):\n  " + "\n  ".join(bad))


@pytest.fixture(scope="session")
def small_logs(tmp_path_factory):
    """Synthetic logs (preset 'small'): 40k rows, 4 train shards, row groups of 2,048 rows."""
    out = tmp_path_factory.mktemp("logs") / "small"
    generate(out, rows=40_000, shards=4, seed=0, row_group_rows=2048, preset="small")
    return out


@pytest.fixture(scope="session")
def kd_world(small_logs, tmp_path_factory):
    """Two teacher exports (untrained, seeds 0 and 1) and a cache of `small_logs`' train split by
    teacher 0, built by the real `distkd cache build` in its own process (its own Ray): what the
    bad-input, security and fault tests damage copies of."""
    root = tmp_path_factory.mktemp("kd-world")
    schema = load_schema(small_logs)
    teachers = [(root / f"t{i}", make_teacher(root / f"t{i}", schema, seed=i)) for i in (0, 1)]
    cache = root / "cache"
    r = cli("cache", "build", "--teacher", str(teachers[0][0]), "--logs", str(small_logs), "--out", str(cache),
            "--splits", "train", "--workers", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"logs": small_logs, "teachers": teachers, "cache": cache}


@pytest.fixture(scope="session")
def kd_cache(small_logs, tmp_path_factory):
    """An untrained teacher's export (seed 0) and its logit cache of the train split, built in
    this process on an embedded Ray with one worker: (cache dir, sha256), what the distillation
    launch tests (torchrun nodes, Slurm, Ray Train, sweeps) read."""
    root = tmp_path_factory.mktemp("kd-cache")
    sha = make_teacher(root / "teacher", load_schema(small_logs), seed=0)
    build(CacheJob(teacher=str(root / "teacher"), logs=str(small_logs), out=str(root / "cache"), splits=["train"],
                   workers=1, batch_size=8192))
    return root / "cache", sha


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server in a thread on 127.0.0.1 with the bucket BUCKET; the endpoint and test
    credentials in the environment (one server a module: each starts from an empty bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture
def rows_lost(request):
    """`rows_lost(expected, kept)`: a fault test's rows, a clean run's and those its faulted run
    ended with, for `make bench-faults` to print as its "rows lost" column (distkd.bench.faults
    names the folder in $DISTKD_FAULT_RESULTS; without it nothing is written). The test still
    asserts them itself."""
    def record(expected: int, kept: int) -> None:
        folder = os.environ.get(RESULTS_ENV)
        if folder:
            with open(results_file(folder, request.node.nodeid), "a") as fh:
                fh.write(json.dumps({"test": request.node.nodeid, "expected": int(expected), "kept": int(kept)}) + "\n")

    return record
