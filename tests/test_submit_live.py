"""`distkd submit cache --to ray --wait` against a real Ray head and its Jobs API.

The head (with its dashboard, which serves the Jobs API) is started here on loopback only,
in a private temp dir, on ports picked free; the job runs the cache stage through
`jobs/demo/cache.yaml` with overrides, the way a user submits it, and the cache it wrote is
checked with `distkd cache verify`. The head is torn down by signalling the `ray start
--block` process this test started, then killing whatever is left of its session by pid
(distkd.bench.ray_local.stop).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distkd.bench.ray_local import session_pids, stop
from distkd.cli import main as cli_main
from distkd.dist import free_ports
from distkd.data.schema import load_schema
from tests.support import LOOPBACK, ROOT, listening, make_teacher

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_jobs_head(tmp_path_factory):
    """A one-node Ray head with its dashboard (the Jobs API), loopback only; yields the Jobs
    API address and the head's session id."""
    log = tmp_path_factory.mktemp("ray-jobs-head") / "head.log"
    temp_dir = tempfile.mkdtemp(prefix="dkj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray's fixed default ports (52365, 10001, 44217, 44227) would collide with another head on
    # this machine: every port is picked free here, all distinct, workers get random ones.
    dashboard, gcs, agent, agent_grpc, runtime_env, metrics, client, dash_metrics, autoscaler = free_ports(9)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", "--min-worker-port=0", "--max-worker-port=0",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        # Ray rewrites 127.0.0.1 to the machine's outside address and binds GCS, raylet and agents
        # on every interface; in single-node mode (the one it uses on macOS) it keeps to loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "DASHBOARD_METRIC_PORT": str(dash_metrics),
        "AUTOSCALER_METRIC_PORT": str(autoscaler),
        # the job's entrypoint runs `python -m distkd.cli ...`: this interpreter, as on a cluster image
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{dashboard}", proc.pid
    finally:
        stop([proc])  # the head's session only, by pid
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def teacher(small_logs, tmp_path_factory):
    """An untrained teacher's export (fixed seed): the cache only needs a deterministic forward."""
    out = tmp_path_factory.mktemp("teacher") / "export"
    make_teacher(out, load_schema(small_logs), seed=0)
    return out


def submit(address: str, *overrides: str) -> subprocess.Popen:
    """`distkd submit cache --to ray --wait` with jobs/demo/cache.yaml, started in the background."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "distkd.cli", "submit", "cache", "--to", "ray", "--address", address,
                             "--config", "jobs/demo/cache.yaml", "--wait", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Exit status, stdout (the job's logs, then its status line) and stderr of a submit."""
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err[-3000:]


def test_cache_stage_through_the_jobs_api(ray_jobs_head, small_logs, teacher, tmp_path):
    """Two jobs at once: the cache stage, and one whose teacher is not there. Each `--wait` streams
    its own job's logs and exits with its status; the cache verifies."""
    address, sid = ray_jobs_head
    good, bad = tmp_path / "cache", tmp_path / "bad"
    jobs = [submit(address, f"teacher={teacher}", f"logs={small_logs}", f"out={good}", "splits=[train,valid]",
                   "batch_size=4096"),
            submit(address, f"teacher={tmp_path / 'no-such-teacher'}", f"logs={small_logs}", f"out={bad}")]
    (rc, out, err), (bad_rc, bad_out, bad_err) = finish(jobs[0]), finish(jobs[1])

    assert rc == 0, out + err
    assert out.startswith("submitted raysubmit_") and "SUCCEEDED" in out.splitlines()[-1], out + err
    assert "cache: Ray cluster 2 CPU" in out, out  # the job's own logs came back
    assert cli_main(["cache", "verify", "--cache", str(good), "--logs", str(small_logs), "--teacher", str(teacher)]) == 0

    # an error only the cluster can see (submit checks the job file, not the cluster's paths):
    # exit status 2, as `distkd cache build` itself gives
    assert bad_rc == 2, bad_out + bad_err
    assert "no-such-teacher: no export.json" in bad_out and "FAILED" in bad_out.splitlines()[-1], bad_out + bad_err
    assert not bad.exists()

    # Nothing of the head (GCS, raylet, dashboard, agents, the jobs' workers) listens beyond loopback.
    ports = listening(session_pids(sid))
    assert any(port == int(address.rsplit(":", 1)[1]) for _, port, _ in ports), ports
    assert all(addr in LOOPBACK for addr, _, _ in ports), ports
