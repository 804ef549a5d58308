"""Distillation for real: a trained teacher, its cache built on an embedded Ray, and
students distilled on two gloo ranks through the CLI and the trainer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distkd.cache.build import CacheJob, build
from distkd.config import from_dict
from distkd.models.export import read_meta
from distkd.objectives.ctr_kd import CtrKDConfig
from tests.support import cli, job_for, train

pytestmark = pytest.mark.integration

MODEL = ["model.embedding_dim=16", "model.cross_layers=0", "model.deep_arch=[32,16]", "model.dense_arch=[16]"]


@pytest.fixture(scope="module")
def teacher_and_cache(small_logs, tmp_path_factory):
    """A teacher trained for one epoch on one rank, and its logit cache (with hidden layer)."""
    root = tmp_path_factory.mktemp("kd")
    train(job_for(small_logs, root / "teacher", *MODEL, "model.embedding_dim=32", "model.deep_arch=[48,24]",
                  "train.epochs=1"), 1)
    export = root / "teacher" / "export"
    build(CacheJob(teacher=str(export), logs=str(small_logs), out=str(root / "cache"), splits=["train"],
                   hidden=True, workers=1, batch_size=4096))
    return export, root / "cache", read_meta(export)["sha256"]


def distill_job(logs, out, *overrides, objective: dict):
    job = job_for(logs, out, "role=student", *MODEL, *overrides)
    job.objective = from_dict(CtrKDConfig, {"kind": "ctr_kd", **objective}, "objective")
    return job


def fell(s: dict, term: str) -> bool:
    """The term's mean over the run's last ten steps is below that of its first ten."""
    return s["loss"]["last"][term] < s["loss"]["first"][term]


@pytest.mark.slow  # two-rank trainings
def test_every_loss_term_trains_on_two_ranks(small_logs, teacher_and_cache, tmp_path):
    _, cache, sha = teacher_and_cache
    cfg = {
        "teachers": [{"cache": str(cache), "sha256": sha}],
        "temperature": 2.0,
        "losses": {"hard": 1.0, "soft": 1.0, "mse": 0.1, "listwise": 1.0, "hint": 0.1},
        "unlabeled": True,
    }
    s = train(distill_job(small_logs, tmp_path / "kd", "train.epochs=2", objective=cfg), 2)
    assert s["replica_drift"] == 0.0
    for term in ("hard", "soft", "mse", "listwise", "hint"):
        assert fell(s, term), (term, s["loss"])
    # The hint projection maps the student's hidden layer (16 units) onto the teacher's (24).
    state = torch.load(tmp_path / "kd" / "export" / "model.pt", weights_only=True)["state_dict"]
    assert state["hint.weight"].shape == (24, 16)


@pytest.mark.slow  # two-rank trainings
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
    s = train(distill_job(small_logs, tmp_path / "kd", "train.epochs=1", objective=cfg), 2)
    assert s["replica_drift"] == 0.0
    assert fell(s, "soft") and fell(s, "hard"), s["loss"]
    state = torch.load(tmp_path / "kd" / "export" / "model.pt", weights_only=True)["state_dict"]
    assert "aux_head.weight" in state


def test_teacher_only_student_learns_from_unlabeled_rows_too(small_logs, teacher_and_cache, tmp_path):
    """No hard-label term: the student learns from the teacher alone, on every row."""
    _, cache, _ = teacher_and_cache
    cfg = {"teachers": [{"cache": str(cache)}], "losses": {"hard": 0.0, "soft": 0.0, "mse": 1.0}}
    s = train(distill_job(small_logs, tmp_path / "kd", "train.epochs=1", objective=cfg), 1)
    assert s["loss"]["last"]["mse"] < 0.5 * s["loss"]["first"]["mse"], s["loss"]
    assert s["rows"] == 32_000  # every row, labelled or not


@pytest.mark.slow  # two-rank trainings
def test_distillation_is_deterministic_for_a_seed(small_logs, teacher_and_cache, tmp_path):
    _, cache, _ = teacher_and_cache
    runs = []
    for name in ("a", "b"):
        job = distill_job(small_logs, tmp_path / name, "train.max_steps=12", "train.seed=3",
                          objective={"teachers": [{"cache": str(cache)}]})
        train(job, 2)
        runs.append(torch.load(tmp_path / name / "export" / "model.pt", weights_only=True)["state_dict"])
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_a_cache_from_another_teacher_is_refused(small_logs, teacher_and_cache, tmp_path):
    _, cache, sha = teacher_and_cache
    other = "0" * 64
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(json.dumps({"logs": str(small_logs), "out": str(tmp_path / "kd"),
                               "objective": {"kind": "ctr_kd", "teachers": [{"cache": str(cache), "sha256": other}]}}))
    r = cli("distill", "--config", str(cfg), "--nproc", "2")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{cache}: holds logits of teacher {sha[:12]}" in r.stderr and f"expected teacher {other[:12]}" in r.stderr
    assert not (tmp_path / "kd").exists()


def test_an_incomplete_cache_is_refused(small_logs, teacher_and_cache, tmp_path):
    _, cache, _ = teacher_and_cache
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    victim = sorted((broken / "train").glob("*.parquet"))[1]
    victim.unlink()
    r = cli("distill", f"logs={small_logs}", f"out={tmp_path / 'kd'}",
            f"objective={{kind: ctr_kd, teachers: [{{cache: {broken}}}]}}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{victim}: missing (committed in manifest.json)" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "kd").exists()


def test_distill_needs_a_distill_section(small_logs, tmp_path):
    r = cli("distill", f"logs={small_logs}", f"out={tmp_path / 'kd'}")
    assert r.returncode == 2 and "needs an objective that learns from a teacher" in r.stderr, r.stderr
