"""A sharded teacher used online and for recompute and evaluation (issue 24, item 4).

A teacher trained on 2 real ranks and exported sharded (DCP). (a) Distilled online on 2
ranks with the teacher's tables sharded over them: each rank holds only its shards, and the
student's losses equal those of the same run with the teacher replicated on every rank.
(b) `distkd eval`'s teacher metrics with the teacher sharded over 2 ranks equal the
one-process ones. (c) A cache built from the sharded export passes `cache verify --recompute`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from distkd import dist
from distkd.cache.build import CacheJob, build
from distkd.config import ConfigError, from_dict
from distkd.cli import build_parser
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema
from distkd.data.synth import make_schema
from distkd.evaluate import command_line, evaluate_export, evaluate_sharded, job_from_args
from distkd.launch.local import launch
from distkd.models.export import read_meta
from distkd.models.sharded_export import is_table
from distkd.objectives.ctr_kd import CtrKDConfig, OnlineTeacherConfig, TeacherSource
from distkd.train.metrics_logger import read_losses
from distkd.train.prepare import prepare
from tests.support import cli, job_for, train

STUDENT = ["role=student", "model.embedding_dim=8", "model.cross_layers=0", "model.deep_arch=[16,8]",
           "model.dense_arch=[8]"]
# Teacher logits through TorchRec's fused sharded pooling differ from nn.EmbeddingBag's by
# float rounding (~2.4e-7 in fp32); the student's losses over 8 steps moved by 2.3e-10 (relative).
LOSS_TOL = 1e-6
# AUC and logloss of the same logits up to that rounding, over 4,000 test rows.
METRIC_TOL = 1e-6


@pytest.fixture(scope="module")
def teacher(small_logs, tmp_path_factory):
    """A teacher trained 4 steps on 2 ranks, its tables exported sharded (each rank its own)."""
    root = tmp_path_factory.mktemp("online-sharded")
    train(job_for(small_logs, root / "teacher", "train.max_steps=4", "train.eval_every=4", "export.format=sharded"), 2)
    export = root / "teacher" / "export"
    assert read_meta(export)["form"] == "sharded"
    return export


def _held(module: torch.nn.Module) -> tuple[int, int]:
    """(elements of the embedding tables this process holds, elements of the whole tables)."""
    held = total = 0
    for key, value in module.state_dict().items():
        if not is_table(key):
            continue
        total += math.prod(value.size())
        held += sum(s.tensor.numel() for s in value.local_shards()) if isinstance(value, ShardedTensor) else value.numel()
    return held, total


def _distill_rank(prepared) -> dict:
    """Rank worker: the trainer, as `distkd distill` runs it; what this rank's teacher holds."""
    from distkd.train.trainer import Trainer

    env = dist.init()
    trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env)
    teacher = trainer.dmp.module._online[0]
    held = _held(teacher.module)
    summary = trainer.train()
    dist.shutdown()
    return {"held": held, "steps": summary["steps"]}


def _distill(logs, out, export, sharding: str) -> tuple[list[dict], list[dict]]:
    job = job_for(logs, out, *STUDENT, "train.max_steps=8", "train.batch_size=256")
    job.objective = from_dict(CtrKDConfig, {"kind": "ctr_kd", "teachers": [{"export": str(export)}],
                                            "losses": {"hard": 1.0, "soft": 1.0, "mse": 0.1},
                                            "online": {"sharding": sharding, "plan": {"types": "table_wise"}}},
                              "objective")
    ranks = launch(_distill_rank, 2, prepare(job))
    return ranks, read_losses(out)


@pytest.mark.integration
@pytest.mark.slow
def test_online_teacher_sharded_over_two_ranks_trains_the_student_as_a_replicated_one(small_logs, teacher, tmp_path):
    sharded, sharded_losses = _distill(small_logs, tmp_path / "sharded", teacher, "sharded")
    replicated, replicated_losses = _distill(small_logs, tmp_path / "replicated", teacher, "replicated")
    total = sharded[0]["held"][1]
    assert [r["held"] for r in replicated] == [(total, total)] * 2  # a whole copy on every rank
    shares = [held / total for held, _ in (r["held"] for r in sharded)]
    assert sum(held for held, _ in (r["held"] for r in sharded)) == total, shares  # each row on one rank only
    assert all(0.25 < s < 0.75 for s in shares), shares  # about half each (table-wise: whole tables)
    assert [r["steps"] for r in sharded] == [8, 8] and len(sharded_losses) == len(replicated_losses) == 8
    assert [a["step"] for a in sharded_losses] == [b["step"] for b in replicated_losses]
    worst = max(abs(a[t] - b[t]) / max(1.0, abs(b[t]))
                for a, b in zip(sharded_losses, replicated_losses) for t in ("loss", "hard", "soft", "mse"))
    assert worst <= LOSS_TOL, (worst, sharded_losses, replicated_losses)


@pytest.mark.integration
@pytest.mark.slow
def test_eval_teacher_metrics_sharded_over_two_ranks_equal_one_process(small_logs, teacher):
    """`distkd eval --nproc 2`'s teacher path against the one-process one: the same rows, the
    same metrics, and every third row's probability (the calibration sample) in the same order."""
    schema = load_schema(small_logs)
    files = split_files(small_logs, "test")
    one, p1, y1 = evaluate_export(teacher, LogLoader(files, schema, 500, prefetch=0), stride=3)
    two, p2, y2 = evaluate_sharded(teacher, files, schema, 500, stride=3, nproc=2)
    assert two["nproc"] == 2 and two["rows"] == one["rows"] == 4_000 and two["sha256"] == one["sha256"]
    assert any(not spec.startswith("data_parallel") for spec in two["plan"].values()), two["plan"]  # really sharded
    worst = {f"{t}.{m}": abs(v - two["metrics"][t][m]) for t, ms in one["metrics"].items() for m, v in ms.items()}
    assert max(worst.values()) <= METRIC_TOL, worst
    assert p1.shape == p2.shape == (1_334, 2) and np.array_equal(y1, y2, equal_nan=True)
    assert np.abs(p1 - p2).max() <= METRIC_TOL, np.abs(p1 - p2).max()


@pytest.mark.unit
def test_eval_nproc_reaches_the_job_and_its_command_line(tmp_path):
    args = build_parser().parse_args(["eval", "--logs", "l", "--teacher", "t", "--kd", "k", "--hard", "h",
                                      "--out", str(tmp_path), "--nproc", "2"])
    job = job_from_args(args)
    assert job.nproc == 2 and "--nproc 2" in command_line(job)
    with pytest.raises(ConfigError, match="nproc must be >= 1"):
        job_from_args(build_parser().parse_args(["eval", "--logs", "l", "--teacher", "t", "--kd", "k", "--hard", "h",
                                                 "--out", str(tmp_path), "--nproc", "0"]))


@pytest.mark.integration
@pytest.mark.slow
def test_cache_from_a_sharded_export_passes_verify_recompute(small_logs, teacher, tmp_path):
    """The cache worker and `cache verify --recompute` each load the sharded export on one
    process (DCP into plain tensors): the recomputed fp32 logits equal the cached ones bit for bit."""
    cache = tmp_path / "cache"
    build(CacheJob(teacher=str(teacher), logs=str(small_logs), out=str(cache), splits=["test"], workers=1,
                   batch_size=1024, dtype="fp32"))
    r = cli("cache", "verify", "--cache", str(cache), "--logs", str(small_logs), "--recompute", "1", "--seed", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cache verify: recomputed 2 of 2 row groups" in r.stderr and "largest difference 0 ulp of fp32" in r.stderr, \
        r.stderr[-3000:]
    assert json.loads((cache / "manifest.json").read_text())["teacher"]["sha256"] == read_meta(teacher)["sha256"]


@pytest.mark.unit
def test_auto_shards_an_export_that_is_sharded_or_run_on_several_ranks():
    export, factory = TeacherSource(export="e"), TeacherSource(factory="m:f", weights="w")
    auto = OnlineTeacherConfig()
    assert not auto.sharded(export, "file", 1)
    assert auto.sharded(export, "sharded", 1) and auto.sharded(export, "file", 2)
    assert not auto.sharded(factory, None, 4)  # a module of your own always loads whole
    assert not OnlineTeacherConfig("replicated").sharded(export, "sharded", 4)
    assert OnlineTeacherConfig("sharded").sharded(export, "file", 1)


@pytest.mark.unit
def test_a_run_resumes_with_its_teacher_laid_out_otherwise(tmp_path):
    """How the online teacher is laid out is not what the run trains: not in its identity."""
    from distkd.train.trainer import run_identity

    schema = make_schema("small")
    ids = []
    for sharding in ("replicated", "sharded"):
        job = job_for(tmp_path, tmp_path / "out", *STUDENT)
        job.objective = from_dict(CtrKDConfig, {"kind": "ctr_kd", "teachers": [{"export": "e"}],
                                                "online": {"sharding": sharding}}, "objective")
        ids.append(run_identity(job, schema, job.model))
    assert ids[0] == ids[1] and ids[0]["objective"]["teachers"][0]["export"] == "e"
