"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own
`ray start --block` process on 127.0.0.1 with its own CPUs and custom resources, in a private
temp dir, every port picked free. Torn down by signalling the processes started here, then
killing what is left of their sessions by pid (never by name).

Used by `make bench-faults` (distkd.bench.faults_scale: a head to SIGKILL mid-build) and by the
cluster tests (Ray Train across nodes, sweeps, the head-kill fault). Loopback only: nothing it
starts listens beyond 127.0.0.1.
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
from contextlib import contextmanager
from pathlib import Path

from distkd.dist import free_ports

# The folder holding this distkd: put on the Ray processes' path, so that workers started by the
# raylets import this copy (and, from a checkout, the tests' fault seams next to it).
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
# `ray start`, kept on loopback. Ray rewrites --node-ip-address 127.0.0.1 to the machine's outside
# address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it 0 refuses to start worker nodes.
# So every process gets it 0 (their own address look-ups say 127.0.0.1), and in these `ray start`
# processes alone the worker-node check passes and 127.0.0.1 is taken as given.
RAY_START = ("import sys; import ray._private.ray_constants as c, ray._private.services as s; "
             "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a process started with start_new_session, and its children)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # after "(comm)": state ppid pgrp session
                pids.append(int(d.name))
    return pids


def ray_env() -> dict[str, str]:
    """The environment of the cluster's processes and of drivers that join it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", "DISTKD_NO_PROGRESS": "1",
                "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    return env


NODE_PORTS = 6  # the ports _ports gives one node
HEAD_PORTS = 5  # and the head's own: GCS, dashboard, client server, two metrics exporters


def _ports(port) -> list[str]:
    """One node's ports, drawn from `port` (an iterator over distinct free ports)."""
    return [f"--dashboard-agent-listen-port={next(port)}", f"--dashboard-agent-grpc-port={next(port)}",
            f"--runtime-env-agent-port={next(port)}", f"--metrics-export-port={next(port)}",
            f"--node-manager-port={next(port)}", f"--object-manager-port={next(port)}",
            "--min-worker-port=0", "--max-worker-port=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start did not come up within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop `ray start --block` processes started with start_new_session (the last first): SIGTERM
    each, then SIGKILL what is left of their sessions, by pid."""
    for proc in reversed(procs):  # workers first, the head last
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    left = []
    while time.monotonic() < deadline:
        left = [p for proc in procs for p in session_pids(proc.pid) if p != os.getpid()]
        if not left:
            break
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of session `sid` (a `ray start --block` we started): GCS, raylet,
    agents, workers. By pid, nothing else."""
    pids = [p for p in session_pids(sid) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def kill_head_once_committed(driver: subprocess.Popen, err_path: Path, head: "Cluster", wait_s: float,
                             settle_s: float = 0.0, commit_timeout_s: float = 600) -> tuple[int | None, float]:
    """Once the build `driver` (stderr in `err_path`) has committed its first shard, and `settle_s`
    later, SIGKILL every process of `head`; wait up to `wait_s` for the driver. Returns (its exit
    code, None if it had not exited; seconds from the kill); the driver is killed if still running.
    RuntimeError if it ended or committed nothing within `commit_timeout_s`, or the head was gone."""
    try:
        deadline = time.monotonic() + commit_timeout_s
        while " rows in " not in err_path.read_text():  # the first shard is committed
            if driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no shard committed (exit {driver.poll()}):\n{err_path.read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(settle_s)
        if not kill_session(head.sids[0]):
            raise RuntimeError("no process of the head to kill")
        killed = time.monotonic()
        try:
            rc = driver.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - killed
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


@contextmanager
def ray_cluster(logdir: Path, head_cpus: int = 1, workers: tuple[dict, ...] = (), dashboard: bool = True):
    """Yields the GCS address (127.0.0.1:PORT) of a head with `head_cpus` CPUs and one worker
    node per entry of `workers` ({"cpus": n, "resources": {...}}); a dashboard only on the head
    (127.0.0.1, for the Jobs API), yielded as `cluster.dashboard` (None with dashboard=False:
    one process fewer to start on a loaded machine, for runs that need no Jobs API)."""
    temp_dir = tempfile.mkdtemp(prefix="dkr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # every port of every node distinct: drawn at once (ports drawn one by one can repeat)
    ports = iter(free_ports(HEAD_PORTS + NODE_PORTS * (1 + len(workers))))
    env, port, dash_port = ray_env(), next(ports), next(ports)
    procs: list[subprocess.Popen] = []
    try:
        head = [sys.executable, "-c", RAY_START, "start", "--head", "--block", f"--num-cpus={head_cpus}",
                f"--port={port}", f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}", f"--ray-client-server-port={next(ports)}",
                f"--temp-dir={temp_dir}", *_ports(ports)]
        procs.append(_start(head, logdir / "head.log", {**env, "DASHBOARD_METRIC_PORT": str(next(ports)),
                                                         "AUTOSCALER_METRIC_PORT": str(next(ports))}))
        for i, w in enumerate(workers):
            # a temp dir per node, as each machine of a real cluster has: nodes sharing the head's
            # would share one runtime_resources folder, where each node's agent deletes and unpacks a
            # job's working_dir again, from under the processes another node started in it
            node_dir = os.path.join(temp_dir, f"w{i}")
            cmd = [sys.executable, "-c", RAY_START, "start", "--block", f"--address=127.0.0.1:{port}",
                   f"--num-cpus={w.get('cpus', 1)}", f"--resources={json.dumps(w.get('resources', {}))}",
                   f"--temp-dir={node_dir}", *_ports(ports)]
            procs.append(_start(cmd, logdir / f"worker-{i}.log", env))
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}" if dashboard else None,
                      [p.pid for p in procs])
    finally:
        stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)


class Cluster(str):
    """The GCS address, with the dashboard's URL and the session ids of the `ray start` processes
    (the head's first)."""

    def __new__(cls, address: str, dashboard: str | None, sids: list[int]):
        obj = super().__new__(cls, address)
        obj.dashboard, obj.sids = dashboard, sids
        return obj
