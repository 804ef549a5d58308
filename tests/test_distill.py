"""Distillation for real: a trained teacher, its cache built on an embedded Ray, and
students distilled on two gloo ranks through the CLI and the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from distkd import dist
from distkd.cache.build import CacheJob, build
from distkd.config import load
from distkd.models.export import read_meta
from distkd.train.trainer import TrainJob, train

MODEL = ["model.embedding_dim=16", "model.cross_layers=0", "model.deep_arch=[32,16]", "model.dense_arch=[16]"]
COMMON = ["tensorboard=false", "train.batch_size=512", "optim.dense_lr=0.01", "optim.embedding_lr=0.2"]


@pytest.fixture(scope="module")
def teacher_and_cache(small_logs, tmp_path_factory):
    """A teacher trained for one epoch on one rank, and its logit cache (with hidden layer)."""
    root = tmp_path_factory.mktemp("kd")
    job = load(TrainJob, None, [f"logs={small_logs}", f"out={root / 'teacher'}", *COMMON, *MODEL,
                                "model.embedding_dim=32", "model.deep_arch=[48,24]", "train.epochs=1"])
    dist.launch(train, 1, job, False)
    export = root / "teacher" / "export"
    build(CacheJob(teacher=str(export), logs=str(small_logs), out=str(root / "cache"), splits=["train"],
                   hidden=True, workers=1, batch_size=4096), log=lambda m: None)
    return export, root / "cache", read_meta(export)["sha256"]


def distill_job(logs, out, cache, *overrides, distill=None) -> TrainJob:
    job = load(TrainJob, None, [f"logs={logs}", f"out={out}", "role=student", *COMMON, *MODEL, *overrides])
    job.distill = distill or {"teachers": [{"cache": str(cache)}]}
    return job


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTKD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "distkd.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_every_loss_term_trains_on_two_ranks(small_logs, teacher_and_cache, tmp_path):
    _, cache, sha = teacher_and_cache
    cfg = {
        "teachers": [{"cache": str(cache), "sha256": sha}],
        "temperature": 2.0,
        "losses": {"hard": 1.0, "soft": 1.0, "mse": 0.1, "listwise": 1.0, "hint": 0.1},
        "unlabeled": True,
    }
    s = dist.launch(train, 2, distill_job(small_logs, tmp_path / "kd", cache, "train.epochs=2", distill=cfg), False)[0]
    assert s["replica_drift"] == 0.0
    for term in ("hard", "soft", "mse", "listwise", "hint"):
        assert s["parts_last"][term] < s["parts_first"][term], (term, s["parts_first"], s["parts_last"])
    # The hint projection maps the student's hidden layer (16 units) onto the teacher's (24).
    state = torch.load(tmp_path / "kd" / "export" / "model.pt", weights_only=True)["state_dict"]
    assert state["hint.weight"].shape == (24, 16)


def test_aux_head_with_two_weighted_teachers(small_logs, teacher_and_cache, tmp_path):
    """ExFM-style auxiliary head (the serving head learns from labels, the aux head from
    two weighted caches): everything trains and the replicas stay in sync."""
    _, cache, _ = teacher_and_cache
    second = tmp_path / "cache-copy"
    shutil.copytree(cache, second)
    cfg = {
        "teachers": [{"cache": str(cache), "weight": 3.0}, {"cache": str(second), "weight": 1.0}],
        "losses": {"hard": 1.0, "soft": 1.0},
        "aux_head": True,
        "aux_grad_scale": 0.5,
    }
    s = dist.launch(train, 2, distill_job(small_logs, tmp_path / "kd", cache, "train.epochs=1", distill=cfg), False)[0]
    assert s["replica_drift"] == 0.0
    assert s["parts_last"]["soft"] < s["parts_first"]["soft"]
    assert s["parts_last"]["hard"] < s["parts_first"]["hard"]
    state = torch.load(tmp_path / "kd" / "export" / "model.pt", weights_only=True)["state_dict"]
    assert "aux_head.weight" in state


def test_teacher_only_student_learns_from_unlabeled_rows_too(small_logs, teacher_and_cache, tmp_path):
    """No hard-label term: the student learns from the teacher alone, on every row."""
    _, cache, _ = teacher_and_cache
    cfg = {"teachers": [{"cache": str(cache)}], "losses": {"hard": 0.0, "soft": 0.0, "mse": 1.0}}
    s = dist.launch(train, 1, distill_job(small_logs, tmp_path / "kd", cache, "train.epochs=1", distill=cfg), False)[0]
    assert s["parts_last"]["mse"] < 0.5 * s["parts_first"]["mse"]


def test_distillation_is_deterministic_for_a_seed(small_logs, teacher_and_cache, tmp_path):
    _, cache, _ = teacher_and_cache
    runs = []
    for name in ("a", "b"):
        job = distill_job(small_logs, tmp_path / name, cache, "train.max_steps=12", "train.seed=3")
        dist.launch(train, 2, job, False)
        runs.append(torch.load(tmp_path / name / "export" / "model.pt", weights_only=True)["state_dict"])
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_a_cache_from_another_teacher_is_refused(small_logs, teacher_and_cache, tmp_path):
    _, cache, sha = teacher_and_cache
    other = "0" * 64
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(json.dumps({"logs": str(small_logs), "out": str(tmp_path / "kd"),
                               "distill": {"teachers": [{"cache": str(cache), "sha256": other}]}}))
    r = cli("distill", "--config", str(cfg), "--nproc", "2")
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(cache) in r.stderr and "teacher" in r.stderr
    assert not (tmp_path / "kd").exists()


def test_an_incomplete_cache_is_refused(small_logs, teacher_and_cache, tmp_path):
    _, cache, _ = teacher_and_cache
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    victim = sorted((broken / "train").glob("*.parquet"))[1]
    victim.unlink()
    r = cli("distill", f"logs={small_logs}", f"out={tmp_path / 'kd'}",
            f"distill={{teachers: [{{cache: {broken}}}]}}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert victim.name in r.stderr or "incomplete" in r.stderr or "missing" in r.stderr, r.stderr[-2000:]


def test_distill_needs_a_distill_section(small_logs, tmp_path):
    r = cli("distill", f"logs={small_logs}", f"out={tmp_path / 'kd'}")
    assert r.returncode == 2 and "distill:" in r.stderr
