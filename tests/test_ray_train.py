"""Ray Train on a real Ray cluster of three nodes on this machine: a head and two worker nodes,
separate `ray start` processes on 127.0.0.1 (distkd.bench.ray_local), each worker node with one CPU
and one `distkd_rank` resource, so the two ranks of a TorchTrainer (one `distkd_rank` each) must
land on different nodes. The same distill job runs under the local launcher for reference:
same world size, rows and seed, so the DCP/loader design gives the same weights, to the bit
(tolerance 0), under Ray Train's gloo group too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distkd.bench.ray_local import ray_cluster
from tests.support import ROOT, assert_same_model, cli

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WORKERS = ({"cpus": 1, "resources": {"distkd_rank": 1}},) * 2
ON_WORKER_NODES = "launch.resources_per_worker={distkd_rank: 1}"
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the driver's own address look-ups: 127.0.0.1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_cluster(tmp_path_factory.mktemp("ray-train-cluster"), head_cpus=1, workers=WORKERS) as c:
        yield c


@pytest.fixture(scope="module")
def distill_job(small_logs, kd_cache, tmp_path_factory):
    cache_dir, sha = kd_cache
    path = tmp_path_factory.mktemp("ray-train-job") / "distill.yaml"
    path.write_text(yaml.safe_dump({
        "logs": str(small_logs), "out": str(path.parent / "unused"), "role": "student", "tensorboard": False,
        "nproc": 2,
        "model": {"embedding_dim": 8, "dense_arch": [16], "cross_layers": 0, "deep_arch": [32, 16]},
        "optim": {"embedding_lr": 0.2, "dense_lr": 0.01},
        "train": {"batch_size": 512, "max_steps": 24, "checkpoint_every": 10, "eval_every": 12, "seed": 0},
        "objective": {"kind": "ctr_kd", "teachers": [{"cache": str(cache_dir), "sha256": sha}],
                      "losses": {"hard": 1.0, "mse": 1.0}},
    }))
    return path


@pytest.fixture(scope="module")
def local_run(distill_job):
    out = distill_job.parent / "local"
    r = cli("distill", "--config", str(distill_job), f"out={out}", "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def ranks_of(out: Path) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 2 and summary["replica_drift"] == 0.0
    return summary["ray_train"]["ranks"]


def test_a_killed_rank_is_restarted_by_failure_config_and_resumes(cluster, distill_job, local_run, tmp_path):
    """`distkd distill --ray-address`: two ranks on the two worker nodes, importing this checkout's
    distkd (the raylets' PYTHONPATH). Rank 1's process is SIGKILLed after step 13 (the step-10
    checkpoint committed): Ray Train restarts the worker group (max_failures=1), which resumes
    from step 10 and ends with the local run's weights, to the bit."""
    out = tmp_path / "ray-killed"
    r = cli("--kill", "1:13", "--", "distill", "--config", str(distill_job), f"out={out}", ON_WORKER_NODES,
            "launch.max_failures=1", "--ray-address", cluster, module="tests.faults.train", env_extra=LOOPBACK)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "[fault] SIGKILL rank 1 after step 13 (generation 0)" in log, log[-3000:]
    assert "worker group restart 1" in log and f"resumed from {out / 'checkpoints' / 'step-00000010'}" in log, log[-3000:]
    ranks = ranks_of(out)
    assert [x["rank"] for x in ranks] == [0, 1]
    assert ranks[0]["node_id"] != ranks[1]["node_id"], ranks  # one rank per worker node
    assert all(x["distkd"] == str(ROOT / "distkd") for x in ranks), ranks
    assert json.loads((out / "summary.json").read_text())["ray_train"]["restart"] == 1
    assert_same_model(out, local_run)


def test_submit_distill_to_ray_spreads_the_ranks(cluster, distill_job, local_run, tmp_path):
    """`distkd submit distill --to ray --wait` through the head's Jobs API: the entrypoint starts
    a TorchTrainer on the cluster (RAY_ADDRESS is set there), its ranks on the two worker nodes,
    importing distkd from the job's uploaded working directory."""
    out = tmp_path / "submitted"
    r = cli("submit", "distill", "--to", "ray", "--config", str(distill_job), f"out={out}", ON_WORKER_NODES,
            "--address", cluster.dashboard, "--wait", env_extra=LOOPBACK, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "SUCCEEDED" in r.stdout.splitlines()[-1], r.stdout[-2000:]
    ranks = ranks_of(out)
    assert ranks[0]["node_id"] != ranks[1]["node_id"], ranks
    assert all("runtime_resources" in x["distkd"] for x in ranks), ranks  # the working_dir copy, not this checkout
    assert_same_model(out, local_run)
