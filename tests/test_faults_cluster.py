"""Faults of what a cache build runs on, injected for real: the Ray head of a separate cluster
killed mid-build (every process of its `ray start` session SIGKILLed), and the object store
failing uploads (moto's S3 server behind a proxy in this process that answers 503 once, then 500
to every upload of one shard). Each: a clear error and a bounded exit, nothing half-published,
a valid manifest, and a rerun on a healthy cluster / store that computes only what is missing and
ends byte for byte equal to a clean build (tests/conftest.py's kd_world cache).
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distkd import storage
from distkd.bench.faults import clean_rows, kept_rows
from distkd.bench.ray_local import kill_head_once_committed, ray_cluster, ray_env
from distkd.cache import read_manifest
from distkd.cache.verify import verify_cache
from tests.support import BUCKET, ROOT, cli, s3_keys

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SHARDS = [f"train/part-0000{i}.parquet" for i in range(4)]
EXIT_BOUND_S = 30  # from the head's death to the driver's exit (Ray itself would give up only after 60s)


def build_args(teacher, logs, out) -> list[str]:
    return ["cache", "build", "--teacher", str(teacher), "--logs", str(logs), "--out", str(out), "--splits", "train",
            "--workers", "1"]


def assert_whole(cache: str, clean: dict, m: dict) -> None:
    """Every shard the manifest names is there at its size, with a clean build's bytes."""
    for rel, e in m.shards.items():
        assert storage.size(storage.join(cache, rel)) == e.output.bytes, rel
        assert e.output.sha256 == clean[rel].output.sha256, rel
        assert e.input.ids == clean[rel].input.ids, rel


def test_the_ray_head_killed_mid_build_fails_clearly_and_the_rerun_resumes(kd_world, tmp_path, rows_lost):
    small, (t0, _) = kd_world["logs"], kd_world["teachers"][0]
    clean = read_manifest(kd_world["cache"]).shards
    out = tmp_path / "cache"
    env = ray_env()  # as the cluster's own processes: loopback, this checkout on the path
    err_path = tmp_path / "driver.err"
    with ray_cluster(tmp_path, head_cpus=2, dashboard=False) as head:
        # 1: a build slow enough to break in the middle (half a second after each row group), through --ray-address
        with open(err_path, "w") as err:
            driver = subprocess.Popen([sys.executable, "-m", "tests.faults.cache", "--slow-row-groups", "0.5", "--",
                                       *build_args(t0, small, out), "--ray-address", head], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err)
        # the next shard is half computed when the head dies
        rc, took = kill_head_once_committed(driver, err_path, head, EXIT_BOUND_S + 30, settle_s=1.0,
                                            commit_timeout_s=120)
    stderr = err_path.read_text()
    print(f"the driver exited {took:.1f}s after the head was killed")
    assert rc == 2 and took < EXIT_BOUND_S, (rc, took, stderr[-3000:])
    assert f"distkd: error: lost the Ray cluster at {head}: its GCS has not answered" in stderr, stderr[-3000:]
    assert "rerun the build" in stderr and "Traceback" not in stderr, stderr[-3000:]
    m = read_manifest(out)  # a valid manifest: the last one written, every shard it names whole
    assert not m.complete and 1 <= len(m.shards) < 4, m.shards.keys()
    assert_whole(str(out), clean, m)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == sorted(m.shards)
    done = sorted(m.shards)

    # 2: a new head; the rerun computes only the shards the manifest does not hold
    with ray_cluster(tmp_path, head_cpus=2, dashboard=False) as head2:
        r = cli(*build_args(t0, small, out), "--ray-address", head2, env_extra={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done)} already committed (skipped), {4 - len(done)} to compute" in r.stderr, r.stderr[-3000:]
    m = read_manifest(out)
    assert m.complete and sorted(m.builds[-1].computed) == [s for s in SHARDS if s not in done]
    assert_whole(str(out), clean, m)
    rows_lost(clean_rows(clean), kept_rows(m.shards, clean))
    assert sorted(m.shards) == SHARDS
    assert verify_cache(out, small, t0)["rows"] == 32_000


# -- object storage failing uploads ---------------------------------------------------------

class FaultyS3:
    """An HTTP proxy in front of the S3 server: each request goes upstream unchanged, except
    uploads (PUT, POST) whose path contains a key in `once` (answered 503 the first time) or
    in `always` (answered 500 every time). `failed` lists what it refused."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        self.once: set[str] = set()
        self.always: set[str] = set()
        self.failed: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raw = b""
                    while True:  # forwarded as it came, chunk framing included
                        line = self.rfile.readline()
                        raw += line
                        n = int(line.split(b";")[0].strip() or b"0", 16)
                        if n == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(n + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                status = proxy.verdict(self.command, self.path)
                if status:
                    code = "ServiceUnavailable" if status == 503 else "InternalError"
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected by the test</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def verdict(self, method: str, path: str) -> int | None:
        if method not in ("PUT", "POST"):
            return None
        with self.lock:
            for key in sorted(self.always):
                if key in path:
                    self.failed.append((method, path, 500))
                    return 500
            for key in sorted(self.once):
                if key in path:
                    self.once.discard(key)
                    self.failed.append((method, path, 503))
                    return 503
        return None

    def __enter__(self) -> "FaultyS3":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_object_store_failing_an_upload_publishes_nothing_half(s3, kd_world, rows_lost):
    small, (t0, _) = kd_world["logs"], kd_world["teachers"][0]
    clean = read_manifest(kd_world["cache"]).shards
    prefix = "faulty-cache"
    cache = f"s3://{BUCKET}/{prefix}"
    with FaultyS3(s3) as proxy:
        # the first upload of shard 0 meets a 503 (transient); every upload of shard 2 a 500
        proxy.once.add(f"/{prefix}/train/.part-00000.parquet")
        proxy.always.add(f"/{prefix}/train/.part-00002.parquet")
        proxy.always.add(f"/{prefix}/train/part-00002.parquet")
        r = cli(*build_args(t0, small, cache), env_extra={"AWS_ENDPOINT_URL": proxy.endpoint}, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert [s for _, _, s in proxy.failed][:1] == [503] and 500 in [s for _, _, s in proxy.failed], proxy.failed
    assert len([f for f in proxy.failed if f[2] == 500]) > 1, f"the S3 client did not retry: {proxy.failed}"
    err = r.stderr.split("distkd: error:")[-1]
    assert f"{cache}/train/part-00002.parquet" in err and "Traceback" not in err, r.stderr[-3000:]
    assert f"S3 endpoint: {proxy.endpoint}" in err, err
    # nothing half: the final keys are the manifest and whole shards, no temporary key is left
    m = read_manifest(cache)
    assert not m.complete and sorted(m.shards) == SHARDS[:2], m.shards.keys()
    assert_whole(cache, clean, m)
    assert s3_keys(prefix) == [f"{prefix}/manifest.json"] + [f"{prefix}/{s}" for s in SHARDS[:2]]
    assert m.shards["train/part-00000.parquet"].timings.attempt == 1  # the 503 cost no shard retry

    # the store healthy again (no proxy): the rerun computes shards 2 and 3 and the cache verifies
    r = cli(*build_args(t0, small, cache), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 already committed (skipped), 2 to compute" in r.stderr, r.stderr[-3000:]
    m = read_manifest(cache)
    assert m.complete and m.builds[-1].computed == SHARDS[2:]
    assert_whole(cache, clean, m)
    rows_lost(clean_rows(clean), kept_rows(m.shards, clean))
    assert s3_keys(prefix) == [f"{prefix}/manifest.json"] + [f"{prefix}/{s}" for s in SHARDS]
    assert verify_cache(cache, small, t0)["rows"] == 32_000  # what `distkd cache verify` runs
