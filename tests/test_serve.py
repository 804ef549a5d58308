"""A servable student for real: a trained student exported by `distkd export` as TorchScript and
torch.export files (float and int8), loaded and run in a Python where distkd and TorchRec cannot
be imported, giving the trained model's predictions; the dense transforms inside the module
match the loader's; latency measured side by side; serving figures in the eval report."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from distkd.cli import build_parser, main as cli_main
from distkd.data.batch import to_batch
from distkd.data.loader import split_files
from distkd.data.rows import decode, transform
from distkd.data.schema import DenseFeature, DenseParams, Schema, SparseFeature, Task, load_schema
from distkd.evaluate import HARD, KD, TEACHER, evaluate_models, job_from_args, command_line
from distkd.models.export import load_export, write_export
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.report import format_comparison, write_report
from distkd.serve import latency
from distkd.serve.contract import CONTRACT_FILE, raw_schema, rows_to_inputs
from distkd.serve.module import ServingModel
from tests.support import job_for, train

STUDENT = ["role=student", "model.embedding_dim=8", "model.dense_arch=[8]", "model.cross_layers=1",
           "model.cross_rank=4", "model.deep_arch=[16]"]
INT8_LOGIT_TOL = 0.05  # int8 row-wise tables: |Δ logit| vs the float model on real rows (seen: ~0.01)
INT8_AUC_TOL = 0.002  # and AUC per task on the test split


@pytest.fixture(scope="module")
def models(small_logs, tmp_path_factory):
    """A student trained by the real trainer (one rank, 40 steps) and an untrained, larger teacher."""
    root = tmp_path_factory.mktemp("serve")
    train(job_for(small_logs, root / "student", *STUDENT, "train.max_steps=40", "train.batch_size=1024",
                  "train.seed=0"), 1)
    schema = load_schema(small_logs)
    torch.manual_seed(1)
    cfg = ModelConfig(embedding_dim=16, dense_arch=[16], cross_layers=1, cross_rank=8, deep_arch=[32, 16])
    teacher = RankingModel(schema, cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    write_export(root / "teacher", "teacher", schema, cfg, teacher.state_dict())
    return {"student": root / "student" / "export", "teacher": root / "teacher"}


def _test_rows(logs):
    """(raw rows, transformed rows) of every row group of the test split, in order."""
    schema = load_schema(logs)
    raw = raw_schema(schema)
    for path in split_files(logs, "test"):
        with pq.ParquetFile(path) as pf:
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=schema.training_columns())
                yield decode(t, raw, path), decode(t, schema, path)


@torch.no_grad()
def _model_logits(export_dir, logs) -> tuple[torch.Tensor, torch.Tensor]:
    """The distkd model's logits and the labels over the test split (transformed dense)."""
    model, _ = load_export(export_dir)
    keys = [f.name for f in model.schema.sparse]
    out, labels = [], []
    for _, rows in _test_rows(logs):
        b = to_batch(rows, keys)
        out.append(model(b.sparse, b.dense).logits)
        labels.append(b.labels)
    return torch.cat(out), torch.cat(labels)


def _first_row_logits(export_dir, logs) -> torch.Tensor:
    """The distkd model's logits for the test split's first row alone: a batch of one, which
    BLAS may round differently from the same row inside a larger batch (torch 2.11 does)."""
    model, _ = load_export(export_dir)
    rows = next(_test_rows(logs))[1].slice(0, 1)
    b = to_batch(rows, [f.name for f in model.schema.sparse])
    return model(b.sparse, b.dense).logits


def _auc(logits, labels, j):
    keep = ~torch.isnan(labels[:, j])
    return binary_auroc(logits[keep, j], labels[keep, j].long()).item()


@pytest.mark.integration
def test_serving_module_is_the_model_on_real_rows(models, small_logs):
    """Raw dense in (transforms inside), plain EmbeddingBags: bit-identical to the trained model."""
    module = ServingModel(*_parts(models["student"]))
    keys = module.features
    want, _ = _model_logits(models["student"], small_logs)
    with torch.no_grad():
        got = torch.cat([module(*rows_to_inputs(raw, keys)) for raw, _ in _test_rows(small_logs)])
    assert torch.equal(got, want)


def _parts(export_dir):
    model, meta = load_export(export_dir)
    return model.schema, ModelConfig(**meta["model"]), model.state_dict()


@pytest.mark.unit
def test_dense_transforms_match_the_loader():
    """Every transform, with statistics, NaN, negatives, ties and values past the quantiles."""
    dense = [DenseFeature("a"), DenseFeature("b", "log1p"),
             DenseFeature("c", "standardize", clip=2.5, params=DenseParams(mean=1.5, std=0.7)),
             DenseFeature("d", "log1p_standardize", params=DenseParams(mean=0.9, std=1.3)),
             DenseFeature("e", "standardize", params=DenseParams(mean=3.0, std=0.0)),
             DenseFeature("f", "quantile", params=DenseParams(quantiles=[0.0, 1.0, 1.0, 1.0, 2.5, 7.0, 40.0])),
             DenseFeature("g", "quantile", params=DenseParams(quantiles=[5.0, 5.0]))]
    schema = Schema(sparse=[SparseFeature("s", num_embeddings=3)], dense=dense, tasks=[Task("t", "y")])
    cfg = ModelConfig(embedding_dim=4, dense_arch=[4], cross_layers=0, deep_arch=[4])
    module = ServingModel(schema, cfg, RankingModel(schema, cfg, device=torch.device("cpu"),
                                                    sparse_device=torch.device("cpu")).state_dict())
    g = np.random.default_rng(0)
    raw = (g.standard_normal((4000, len(dense))) * 8).astype(np.float32)
    raw[::5] = g.choice([0.0, 1.0, 2.5, 5.0, 7.0, 40.0, -3.0, 1e9], size=raw[::5].shape)
    raw[3::17, :] = np.nan
    want = raw.copy()
    transform(want, schema, "test")
    np.testing.assert_array_equal(module.transform(torch.from_numpy(raw)).numpy(), want)
    scripted = torch.jit.script(module)
    np.testing.assert_array_equal(scripted.transform(torch.from_numpy(raw)).numpy(), want)


SERVER = textwrap.dedent("""
    import importlib.abc, json, sys
    sys.path.append(sys.argv[1])  # the site directory with torch, its .pth files not run (python -S)

    class Gone(importlib.abc.MetaPathFinder):  # as on a server: neither installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("distkd", "torchrec", "fbgemm_gpu"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Gone())
    try:
        import distkd
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"distkd is importable here: {distkd.__file__}")
    import torch

    inputs = torch.load(sys.argv[2], weights_only=True)
    out, contracts = {}, {}
    for path in sys.argv[4:]:
        if path.endswith(".ts"):
            extra = {"contract.json": ""}
            model = torch.jit.load(path, _extra_files=extra)
            contracts[path] = json.loads(extra["contract.json"])
        else:
            model = torch.export.load(path).module()
        with torch.no_grad():
            out[path] = torch.cat([model(sparse, dense) for sparse, dense in inputs])
            out[path + "@1"] = model({k: (v[:int(o[1])], o[:2]) for k, (v, o) in inputs[0][0].items()},
                                     inputs[0][1][:1])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("distkd", "torchrec", "fbgemm_gpu"))
    torch.save({"logits": out, "contracts": json.dumps(contracts), "loaded": loaded}, sys.argv[3])
""")


@pytest.mark.integration
def test_exported_files_run_without_distkd(models, small_logs, tmp_path, capsys):
    out = tmp_path / "serve"
    assert cli_main(["export", str(models["student"]), "--out", str(out), "--format", "torchscript,pt2"]) == 0
    assert cli_main(["export", str(models["student"]), "--out", str(out), "--format", "torchscript,pt2",
                     "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "student-int8.ts: torchscript" in printed and "contract.json: the input contract" in printed, printed
    contract = json.loads((out / CONTRACT_FILE).read_text())
    assert sorted(contract["files"]) == ["student-int8.pt2", "student-int8.ts", "student.pt2", "student.ts"]
    schema = load_schema(small_logs)
    assert [f["name"] for f in contract["inputs"]["sparse"]["features"]] == [f.name for f in schema.sparse]
    assert [f["transform"] for f in contract["inputs"]["dense"]["features"]] == [f.transform for f in schema.dense]
    assert contract["outputs"]["tasks"] == schema.task_names
    assert contract["model"]["sha256"] == load_export(models["student"])[1]["sha256"]
    for name, f in contract["files"].items():
        assert f["bytes"] == (out / name).stat().st_size
    assert contract["files"]["student-int8.ts"]["bytes"] < contract["files"]["student.ts"]["bytes"]

    keys = [f.name for f in schema.sparse]
    torch.save([rows_to_inputs(raw, keys) for raw, _ in _test_rows(small_logs)], tmp_path / "inputs.pt")
    files = [str(out / n) for n in sorted(contract["files"])]
    r = subprocess.run([sys.executable, "-I", "-S", "-c", SERVER, sysconfig.get_paths()["purelib"],
                        str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt"), *files],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    served = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert served["loaded"] == []  # nothing of distkd or TorchRec was imported
    embedded = json.loads(served["contracts"])[str(out / "student.ts")]
    assert embedded == {k: v for k, v in contract.items() if k != "files"}

    want, labels = _model_logits(models["student"], small_logs)
    one = _first_row_logits(models["student"], small_logs)
    for name in ("student.ts", "student.pt2"):
        assert torch.equal(served["logits"][str(out / name)], want), name
        assert torch.equal(served["logits"][str(out / name) + "@1"], one), name
    for name in ("student-int8.ts", "student-int8.pt2"):
        got = served["logits"][str(out / name)]
        assert (got - want).abs().max() <= INT8_LOGIT_TOL, name
        for j in range(want.shape[1]):
            assert abs(_auc(got, labels, j) - _auc(want, labels, j)) <= INT8_AUC_TOL, (name, j)


@pytest.mark.integration
def test_onnx(models, small_logs, tmp_path, capsys):
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401, E401
    except ImportError:
        rc = cli_main(["export", str(models["student"]), "--out", str(tmp_path), "--format", "onnx"])
        assert rc == 2 and "needs the onnx and onnxscript packages" in capsys.readouterr().err
        pytest.skip("onnx, onnxscript and onnxruntime are not installed (optional; not in requirements.txt)")
    from distkd.serve.export import load

    for quant in ([], ["--quantize", "int8"]):
        assert cli_main(["export", str(models["student"]), "--out", str(tmp_path), "--format", "onnx", *quant]) == 0
    keys = [f.name for f in load_schema(small_logs).sparse]
    want, _ = _model_logits(models["student"], small_logs)
    served = load("onnx", tmp_path / "student.onnx")
    got = torch.cat([served(*rows_to_inputs(raw, keys)) for raw, _ in _test_rows(small_logs)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    served = load("onnx", tmp_path / "student-int8.onnx")
    got = torch.cat([served(*rows_to_inputs(raw, keys)) for raw, _ in _test_rows(small_logs)])
    assert (got - want).abs().max() <= INT8_LOGIT_TOL


@pytest.mark.integration
def test_export_errors_are_one_line(models, tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such export directory" in capsys.readouterr().err
    assert cli_main(["export", str(models["student"]), "--out", str(tmp_path / "o"), "--format", "tflite"]) == 2
    assert "--format: ['tflite'] not among" in capsys.readouterr().err


@pytest.mark.unit
def test_latency_is_measured_side_by_side():
    calls: list[tuple[str, int]] = []

    def model(name):
        return lambda x: calls.append((name, x.shape[0]))

    inputs = {1: (torch.zeros(1),), 64: (torch.zeros(64),)}
    r = latency.measure({"a": model("a"), "b": model("b")}, inputs, rounds=2, calls={1: 3, 64: 2}, warmup=1)
    timed = calls[4:]  # after one untimed call per (model, batch)
    one_round = [("a", 1)] * 3 + [("a", 64)] * 2 + [("b", 1)] * 3 + [("b", 64)] * 2
    assert timed == one_round * 2  # round after round, every model and batch size in each
    for m in ("a", "b"):
        assert r["models"][m]["1"]["calls"] == 6 and r["models"][m]["64"]["calls"] == 4
        assert 0 <= r["models"][m]["1"]["p50_ms"] <= r["models"][m]["1"]["p99_ms"]
    assert r["threads"] == 1 and r["rounds"] == 2 and "torch" in r["machine"]


@pytest.mark.integration
def test_eval_report_has_serving_figures(models, small_logs, tmp_path):
    exports = {TEACHER: [str(models["teacher"])], KD: [str(models["student"])], HARD: [str(models["student"])]}
    result = evaluate_models(small_logs, exports, "test", batch_size=2000, serving_dir=tmp_path / "serving",
                             serving_calls={1: 5, 64: 3, 1024: 2})
    sv = result["serving"]
    assert list(sv["models"]) == [TEACHER, KD, f"{KD} int8"] and sv["quantized"] == f"{KD} int8"
    size = {n: m["bytes"] for n, m in sv["models"].items()}
    assert size[f"{KD} int8"] < size[KD] < size[TEACHER]
    for m in sv["models"].values():
        assert Path(m["file"]).is_file() and Path(m["file"]).stat().st_size == m["bytes"]
        assert set(m["latency"]) == {"1", "64", "1024"} and m["latency"]["1024"]["calls"] == 2 * sv["rounds"]
    q = sv["models"][f"{KD} int8"]
    for task, cost in q["auc_cost"].items():
        assert abs(cost) <= INT8_AUC_TOL and math.isclose(
            cost, result["models"][KD]["metrics"][task]["auc"]["mean"] - q["metrics"][task]["auc"], abs_tol=1e-12)
    text = write_report(result, tmp_path / "report").read_text()
    assert "## Serving: size and latency" in text and "p50 / p99 ms @1024" in text and "int8" in text
    assert "serving" in format_comparison(result)
    json.loads((tmp_path / "report" / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    # The flag and the YAML field.
    args = build_parser().parse_args(["eval", "--logs", "l", "--teacher", "t", "--kd", "k", "--hard", "h",
                                      "--out", "o", "--serving"])
    job = job_from_args(args)
    assert job.serving and command_line(job).endswith("--serving")
    assert not dataclasses.replace(job, serving=False).serving
