"""Distillation as two nodes on this machine: two `torchrun --nnodes 2` agents, started as
separate processes, meet through the c10d rendezvous and run `distkd distill` as one job
(one gloo rank each), the way the Slurm and PyTorchJob templates launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml

from distkd.train.checkpoint import latest
from distkd.dist import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_distill_on_two_torchrun_nodes(small_logs, kd_cache, tmp_path):
    cache_dir, sha = kd_cache
    out = tmp_path / "kd"
    job = tmp_path / "distill.yaml"
    job.write_text(yaml.safe_dump({
        "logs": str(small_logs), "out": str(out), "role": "student", "tensorboard": False,
        "model": {"embedding_dim": 8, "dense_arch": [16], "cross_layers": 0, "deep_arch": [32, 16]},
        "optim": {"embedding_lr": 0.2, "dense_lr": 0.01},
        "train": {"batch_size": 512, "max_steps": 12, "checkpoint_every": 5, "seed": 0},
        "objective": {"kind": "ctr_kd", "teachers": [{"cache": str(cache_dir), "sha256": sha}],
                      "losses": {"hard": 1.0, "mse": 1.0}},
    }))
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"distkd-{uuid.uuid4().hex[:8]}",
           "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.5",
           "-m", "distkd.cli", "distill", "--config", str(job)]
    env = {**os.environ, "DISTKD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    nodes = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # no --node-rank: the rendezvous orders the nodes
    logs = []
    for p in nodes:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            pytest.fail("torchrun nodes did not finish:\n" + "\n".join(q.communicate()[0][-3000:] for q in nodes))
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["replica_drift"] == 0.0  # the dense layers stayed identical on both nodes
    assert summary["loss"]["last"]["mse"] < summary["loss"]["first"]["mse"]
    assert summary["test"]["click"]["rows"] == 4_000  # evaluation covered the split once, over both nodes
    assert (out / "export" / "model.pt").is_file() and (out / "export" / "export.json").is_file()
    last = latest(out / "checkpoints")
    assert last is not None and last.name.endswith("12")
    assert sorted(p.name for p in last.glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]
    assert json.loads((last / "COMMITTED").read_text())["world_size"] == 2
    # exactly one node logged as rank 0 (it wrote the export); the other trained silently
    assert sum("export: " in log for log in logs) == 1, logs
