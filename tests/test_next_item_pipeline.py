"""Next-item distillation through the real pipeline: synthetic next-item logs, a next-item
teacher trained by the trainer, its top-k cache built on Ray, students distilled from it on two
gloo ranks, and the evaluation report with the oracle."""

from __future__ import annotations

import json

import pytest
import torch

from distkd.cache import read_manifest
from distkd.cache.build import CacheJob, TopKSpec, build
from distkd.cache.reader import open_cache
from distkd.cache.topk import TopKFormat, topk_ids
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema
from distkd.data.synth_next_item import generate
from distkd.models.export import load_export, read_meta
from tests.support import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "model={kind: next_item, embedding_dim: 8}"
COMMON = ["tensorboard=false", "train.batch_size=512", "optim.dense_lr=0.01", "optim.embedding_lr=0.1",
          "train.eval_batch_size=4000"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40k rows over a 2,000-item catalog, a teacher (dim 32, one epoch, one rank), and its
    top-32 cache with 8 sampled tail items per row."""
    root = tmp_path_factory.mktemp("next-item")
    logs = root / "logs"
    generate(logs, rows=40_000, shards=2, seed=0, row_group_rows=4096, preset="small", workers=1)
    r = cli("teacher", "train", "--nproc", "1", f"logs={logs}", f"out={root / 'teacher'}", *COMMON,
            "model={kind: next_item, embedding_dim: 32}", "train.epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    export = root / "teacher" / "export"
    build(CacheJob(teacher=str(export), logs=str(logs), out=str(root / "cache"), splits=["train"], workers=1,
                   batch_size=2048, topk=TopKSpec(k=32, tail=8)))
    return logs, export, root / "cache", read_meta(export)["sha256"]


def test_the_cache_holds_the_teachers_own_top_k(world):
    logs, export, cache, sha = world
    content = read_manifest(cache).content
    assert content.topk == TopKFormat(num_items=2000, k=32, tail=8, proposal="teacher", tau=1.0)
    model, _ = load_export(export)
    view = open_cache(cache, logs, "train", teacher_sha256=sha, name="t")
    loader = LogLoader(split_files(logs, "train"), load_schema(logs), 2048, aligned=[view])
    rows = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch.sparse, batch.dense).logits
            values, ids = topk_ids(logits, 32)
            torch.testing.assert_close(batch.extras["t.topk_ids"], ids, rtol=0, atol=0)
            # fp16 logits relative to the row's largest; the top-1 is exactly 0
            torch.testing.assert_close(batch.extras["t.topk_logits"], (values - values[:, :1]).half().float(),
                                       rtol=0, atol=0)
            full = torch.logsumexp(logits - values[:, :1], 1)
            torch.testing.assert_close(batch.extras["t.lse"], full, rtol=0, atol=2e-3)
            assert (batch.extras["t.tail_logq"] <= 0).all() and batch.extras["t.tail_ids"].shape == (len(batch), 8)
            rows += len(batch)
    assert rows == 32_000
    s = json.loads((cache / "manifest.json").read_text())["totals"]
    assert s["values_per_row"] == 40 and s["bytes_per_row_per_task"] < 4.5  # bytes per cached entry


def test_two_rank_distillation_every_term_falls(world, tmp_path):
    logs, _, cache, sha = world
    objective = (f"objective={{kind: next_item_kd, teachers: [{{cache: {cache}, sha256: {sha}}}], k: 32, "
                 "losses: {hard: 0.2, topk_kl: 0.8, tail_kl: 0.3, ranking: 0.1}}")
    r = cli("distill", "--nproc", "2", f"logs={logs}", f"out={tmp_path / 'kd'}", *COMMON, MODEL, "train.epochs=2",
            objective)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert s["replica_drift"] == 0.0 and s["rows"] == 2 * 32_000
    for term in ("hard", "topk_kl", "tail_kl", "ranking"):
        assert s["loss"]["last"][term] < s["loss"]["first"][term], (term, s["loss"])
    assert s["test"]["next_item"]["recall@10"] > 0.2


def test_a_cache_of_another_k_or_catalog_is_refused(world, tmp_path):
    logs, _, cache, sha = world
    r = cli("distill", "--nproc", "1", f"logs={logs}", f"out={tmp_path / 'kd'}", *COMMON, MODEL,
            f"objective={{kind: next_item_kd, teachers: [{{cache: {cache}}}], k: 64}}")
    assert r.returncode == 2 and "holds the teacher's top-32; objective.k asks top-64" in r.stderr, r.stderr[-2000:]
    other = tmp_path / "other-logs"
    generate(other, rows=8_000, shards=1, seed=0, row_group_rows=4096, preset="small", num_items=1500, workers=1)
    r = cli("distill", "--nproc", "1", f"logs={other}", f"out={tmp_path / 'kd2'}", *COMMON, MODEL,
            f"objective={{kind: next_item_kd, teachers: [{{cache: {cache}}}]}}")
    assert r.returncode == 2 and f"{cache}: built for logs with schema" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "kd").exists() and not (tmp_path / "kd2").exists()


def test_sampled_softmax_hard_student_and_the_report(world, tmp_path):
    """A hard-label student with a sampled softmax (logQ-corrected) trains; the report compares
    teacher, KD and hard on Recall@K / NDCG@K / MRR with the oracle and η on Recall@10."""
    logs, export, cache, sha = world
    r = cli("student", "train", "--nproc", "1", f"logs={logs}", f"out={tmp_path / 'hard'}", *COMMON, MODEL,
            "objective={kind: hard, sampled_negatives: 256}", "train.epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("distill", "--nproc", "1", f"logs={logs}", f"out={tmp_path / 'kd'}", *COMMON, MODEL, "train.epochs=2",
            f"objective={{kind: next_item_kd, teachers: [{{cache: {cache}}}]}}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("eval", "--logs", str(logs), "--teacher", str(export), "--kd", str(tmp_path / "kd" / "export"),
            "--hard", str(tmp_path / "hard" / "export"), "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "report" / "result.json").read_text())
    models = result["models"]
    assert set(models) == {"teacher", "student-KD", "student-hard", "oracle"}
    for name in models:
        m = models[name]["metrics"]["next_item"]
        assert {"recall@10", "ndcg@10", "mrr", "recall@50"} <= set(m), name
    oracle = models["oracle"]["metrics"]["next_item"]["recall@10"]["mean"]
    assert oracle >= models["teacher"]["metrics"]["next_item"]["recall@10"]["mean"] - 0.02
    assert set(result["eta"]["next_item"]) == {"recall@10", "ndcg@10"}
    assert (tmp_path / "report" / "recall_at_k_next_item.png").is_file()
    assert "Recall@10" in (tmp_path / "report" / "report.md").read_text()
