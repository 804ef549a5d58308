"""`distkd eval` for real: exports written by the export contract, the real loader, real plots."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from distkd.config import ConfigError
from distkd.evaluate import (HARD, KD, ORACLE, TEACHER, calibration_curve, evaluate_models,
                             gap_recovered, job_from_args, run, seed_pairs)
from distkd.models.export import load_export, write_export
from distkd.data.loader import LogLoader, split_files
from distkd.metrics import METRICS, TaskMetrics
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.report import format_comparison, write_report
from distkd.data.schema import load_schema
from tests.support import job_for, train

CPU = torch.device("cpu")
STUDENT = ModelConfig(embedding_dim=4, dense_arch=[8], cross_layers=0, deep_arch=[8])
TEACHER_CFG = ModelConfig(embedding_dim=8, dense_arch=[8], cross_layers=1, cross_rank=4, deep_arch=[16])


def _model(schema, cfg, seed: int) -> RankingModel:
    """A real, untrained model of `cfg` (seeded)."""
    torch.manual_seed(seed)
    return RankingModel(schema, cfg, device=CPU, sparse_device=CPU).eval()


def _export(d, role, schema, cfg, model, seed):
    return write_export(d, role, schema, cfg, model.state_dict(), extra={"job": {"train": {"seed": seed}}})


def _trained(logs, out, role, cfg: ModelConfig, seed: int, steps: int) -> str:
    """A model trained by the real trainer (one rank, `steps` steps, seeded); its export."""
    arch = [f"model.embedding_dim={cfg.embedding_dim}", f"model.dense_arch={cfg.dense_arch}",
            f"model.cross_layers={cfg.cross_layers}", f"model.cross_rank={cfg.cross_rank}",
            f"model.deep_arch={cfg.deep_arch}"]
    train(job_for(logs, out, f"role={role}", *arch, f"train.seed={seed}", f"train.max_steps={steps}",
                  "train.batch_size=1024", "optim.dense_lr=0.02", "optim.embedding_lr=0.1"), 1)
    return str(out / "export")


@pytest.fixture(scope="module")
def exports(small_logs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    schema = load_schema(small_logs)
    dirs = {TEACHER: [_trained(small_logs, root / "teacher", "teacher", TEACHER_CFG, 0, 30)],
            KD: [_trained(small_logs, root / f"kd{s}", "student", STUDENT, s, 8) for s in (0, 1)],
            HARD: [str(root / "hard0"), str(root / "hard1")]}
    for s in (0, 1):
        _export(dirs[HARD][s], "student", schema, STUDENT, _model(schema, STUDENT, 10 + s), s)
    return dirs


@pytest.fixture(scope="module")
def result(small_logs, exports):
    return evaluate_models(small_logs, exports, "test", batch_size=1500)


@pytest.mark.integration
def test_metrics_equal_a_direct_computation(small_logs, exports, result):
    schema = load_schema(small_logs)
    for name, i in ((TEACHER, 0), (KD, 1)):
        model, meta = load_export(exports[name][i])
        direct = TaskMetrics(schema.task_names)
        with torch.no_grad():
            for batch in LogLoader(split_files(small_logs, "test"), schema, 4096):
                direct.update(model(batch.sparse, batch.dense).logits, batch.labels)
        entry = result["models"][name]["exports"][i]
        assert entry["sha256"] == meta["sha256"] and entry["seed"] == i
        assert entry["parameters"] == sum(t.numel() for t in model.state_dict().values())
        assert entry["rows"] == 4_000 and entry["rows_per_s"] > 0
        for task, ms in direct.compute().items():
            assert entry["metrics"][task]["rows"] == ms["rows"]
            for m in METRICS:
                assert entry["metrics"][task][m] == pytest.approx(ms[m], rel=1e-5, abs=1e-6), (name, task, m)
    # Seeds reduce to mean, sample std and n.
    kd = result["models"][KD]
    aucs = [e["metrics"]["click"]["auc"] for e in kd["exports"]]
    cell = kd["metrics"]["click"]["auc"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(np.mean(aucs))
    assert cell["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert result["models"][TEACHER]["metrics"]["click"]["auc"]["std"] is None  # one seed: no spread
    assert result["models"][TEACHER]["parameters"]["mean"] > result["models"][KD]["parameters"]["mean"]


@pytest.mark.unit
def test_gap_recovered_on_hand_numbers():
    assert gap_recovered(0.75, 0.70, 0.80) == pytest.approx(0.5)
    assert gap_recovered(0.80, 0.70, 0.80) == pytest.approx(1.0)
    assert gap_recovered(0.68, 0.70, 0.80) == pytest.approx(-0.2)
    assert gap_recovered(0.45, 0.50, 0.40) == pytest.approx(0.5)  # logloss: lower is better, still positive
    assert gap_recovered(0.75, 0.70, 0.70005) is None  # |gap| < 1e-4: undefined, not 1000
    assert gap_recovered(float("nan"), 0.7, 0.8) is None and gap_recovered(None, 0.7, 0.8) is None


@pytest.mark.unit
def test_seed_pairs_by_seed_then_position():
    e = lambda s, v: {"seed": s, "v": v}  # noqa: E731
    t = [e(0, "t")]
    pairs = seed_pairs(t, [e(1, "k1"), e(0, "k0")], [e(0, "h0"), e(1, "h1")])
    assert [(lab, k["v"], h["v"]) for lab, _, k, h in pairs] == [("seed 0", "k0", "h0"), ("seed 1", "k1", "h1")]
    pairs = seed_pairs(t, [e(None, "k1"), e(None, "k2")], [e(None, "h1"), e(None, "h2")])
    assert [(lab, k["v"], h["v"]) for lab, _, k, h in pairs] == [("#1", "k1", "h1"), ("#2", "k2", "h2")]
    assert seed_pairs(t, [e(None, "k")], [e(None, "h1"), e(None, "h2")]) == []


@pytest.mark.integration
def test_eta_in_the_result(result):
    models = result["models"]
    for task in result["tasks"]:
        mean = {n: models[n]["metrics"][task]["auc"]["mean"] for n in (TEACHER, KD, HARD)}
        eta = result["eta"][task]["auc"]
        assert eta["value"] == gap_recovered(mean[KD], mean[HARD], mean[TEACHER])
        assert [p["pair"] for p in eta["pairs"]] == ["seed 0", "seed 1"]
        for s, p in enumerate(eta["pairs"]):
            auc = lambda n: models[n]["exports"][0 if n == TEACHER else s]["metrics"][task]["auc"]  # noqa: E731
            assert p["eta"] == gap_recovered(auc(KD), auc(HARD), auc(TEACHER))
        assert "logloss" in result["eta"][task]


@pytest.mark.integration
def test_oracle_row_from_the_true_probabilities(small_logs, result):
    oracle = result["models"][ORACLE]
    table = pq.ParquetDataset(split_files(small_logs, "test")).read(columns=["clicked", "p_click"])
    y = table.column("clicked").to_numpy(zero_copy_only=False).astype(np.float64)
    p = table.column("p_click").to_numpy()
    keep = ~np.isnan(y)
    want = binary_auroc(torch.from_numpy(p[keep]), torch.from_numpy(y[keep]).long()).item()
    assert oracle["metrics"]["click"]["auc"]["mean"] == pytest.approx(want, abs=1e-6)
    assert oracle["metrics"]["click"]["auc"]["mean"] > result["models"][HARD]["metrics"]["click"]["auc"]["mean"]
    assert "oracle" in format_comparison(result)


@pytest.mark.unit
def test_calibration_curve_on_hand_numbers():
    p = np.array([0.1] * 10 + [0.8] * 10, np.float32)
    y = np.array([1] + [0] * 9 + [1] * 6 + [0] * 3 + [np.nan], np.float32)
    c = calibration_curve(p, y, bins=15)
    assert c["pred"] == pytest.approx([0.1, 0.8]) and c["obs"] == pytest.approx([0.1, 6 / 9])
    assert c["count"] == [10, 9]


@pytest.mark.integration
def test_report_files(result, exports, tmp_path):
    path = write_report(result, tmp_path / "report")
    text = path.read_text()
    for name in (TEACHER, KD, HARD, ORACLE):
        assert f"| {name} |" in text
    assert "η (AUC)" in text and "How to read this" in text
    for dirs in exports.values():
        for d in dirs:
            assert load_export(d)[1]["sha256"] in text  # inputs named, so the report can be reproduced
    for png in ("calibration_click.png", "calibration_conversion.png", "auc.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "report" / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["models"][KD]["metrics"]["click"]["auc"]["n"] == 2  # strict JSON: NaN written as null
    assert not [p for p in (tmp_path / "report").iterdir() if ".tmp-" in p.name]


@pytest.mark.integration
def test_bad_inputs_are_refused_naming_the_path(small_logs, exports, tmp_path):
    schema = load_schema(small_logs)
    schema.sparse[0].num_embeddings += 1  # a model for other logs
    other = tmp_path / "other"
    write_export(other, "student", schema, STUDENT, _model(schema, STUDENT, 0).state_dict())
    with pytest.raises(ConfigError, match=rf"{other}: exported for schema .* but the logs"):
        evaluate_models(small_logs, {TEACHER: exports[TEACHER], KD: [str(other)]})
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'nope'}: no such export directory"):
        evaluate_models(small_logs, {TEACHER: [str(tmp_path / "nope")]})
    with pytest.raises(ConfigError, match="not a model export"):
        evaluate_models(small_logs, {TEACHER: [str(tmp_path)]})


@pytest.mark.integration
def test_cli_end_to_end(small_logs, exports, tmp_path, capsys):
    from distkd.cli import build_parser

    teacher_run = str(exports[TEACHER][0]).removesuffix("/export")  # a training run directory is accepted
    args = build_parser().parse_args(["eval", "--logs", str(small_logs), "--teacher", teacher_run, "--kd", *exports[KD],
                              "--hard", *exports[HARD], "--out", str(tmp_path / "r"), "--batch-size", "2000"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "student-KD" in out and "η (AUC)" in out and f"report: {tmp_path / 'r' / 'report.md'}" in out
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert saved["command"].startswith("distkd eval --logs") and saved["batch_size"] == 2000
    assert "distkd eval --logs" in (tmp_path / "r" / "report.md").read_text()

    # A YAML job, overrides, then flags on top.
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"logs: {small_logs}\nteacher: {teacher_run}\nkd: {exports[KD]}\nhard: {exports[HARD]}\nout: x\n")
    parser = build_parser()
    job = job_from_args(parser.parse_args(["eval", "--config", str(cfg), "batch_size=123", "--out", "y"]))
    assert (job.kd, job.batch_size, job.out, job.split) == (exports[KD], 123, "y", "test")
    with pytest.raises(ConfigError, match="missing hard"):
        job_from_args(parser.parse_args(["eval", "--logs", "l", "--teacher", "t", "--kd", "k", "--out", "o"]))
    with pytest.raises(ConfigError, match="unknown field"):
        job_from_args(parser.parse_args(["eval", "--config", str(cfg), "nope=1"]))


@pytest.mark.unit
def test_no_oracle_from_columns_that_are_not_probabilities(small_logs):
    """MovieLens keeps `rating` as an evaluation column: it must never pose as an oracle."""
    import dataclasses

    from distkd.evaluate import oracle_metrics
    from distkd.data.loader import split_files
    from distkd.data.schema import load_schema

    schema = load_schema(small_logs)
    rating_only = dataclasses.replace(schema, eval_columns=["rating"], tasks=schema.tasks[:1])
    assert oracle_metrics(split_files(small_logs, "test"), rating_only) is None
    assert oracle_metrics(split_files(small_logs, "test"), schema) is not None
