"""Golden losses, as torchtune's recipe tests keep them: short fixed-seed runs whose per-step
losses must match stored values, so a change to the model, the loader's order, the loss or
the optimizer shows up as a number, not as a feeling.

Tolerance: relative 1e-4 per step. The runs are deterministic on one kind of CPU (two gloo
ranks, one thread each: the same bits on every rerun), but not across kinds: torch and fbgemm
pick their kernels by the CPU's vector ISA (and MKL by vendor), and the last bits of the first
update grow over the steps (measured between an AVX512 Intel Xeon and an AVX2 AMD EPYC:
2e-6 relative at step 2, 3e-2 by step 10). So the stored losses are per CPU kind,
`golden/<name>.<vendor>-<ISA>.json`; on a kind with no file, the first two steps (where the kinds
agree within 1e-5) are checked against every stored kind, and the resumed run against an
uninterrupted one run here. After a change meant to move the losses, or to record this CPU
kind, run `DISTKD_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distkd.cache.build import CacheJob, build
from distkd.data.schema import load_schema
from distkd.models.export import write_export
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.train.metrics_logger import read_losses
from tests.support import SMALL_MODEL, cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOLDEN = Path(__file__).parent / "golden"
RTOL = 1e-4
STEPS = 12
SHARED_STEPS = 2  # steps every CPU kind reproduces within RTOL


def cpu_kind() -> str:
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def common(logs, out) -> list[str]:
    return ["--nproc", "2", f"logs={logs}", f"out={out}", "tensorboard=false", "train.batch_size=512",
            "train.checkpoint_every=5", f"train.max_steps={STEPS}", "optim.dense_lr=0.01", "optim.embedding_lr=0.2",
            *SMALL_MODEL]


def losses_of(out: Path) -> list[dict]:
    losses = [{k: round(v, 7) if k != "step" else v for k, v in row.items()} for row in read_losses(out)]
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1)), losses
    return losses


def same(name: str, losses: list[dict], golden: list[dict], source: str) -> None:
    assert len(losses) == len(golden), (name, source)
    for got, want in zip(losses, golden):
        assert got.keys() == want.keys(), (got, want)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=RTOL), \
                f"{name} step {want['step']} {k}: {got[k]} != {want[k]} ({source})"


def check(name: str, out: Path) -> bool:
    """Compare with this CPU kind's stored run; False when only the shared first steps could be."""
    losses = losses_of(out)
    path = GOLDEN / f"{name}.{cpu_kind()}.json"
    if os.environ.get("DISTKD_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(losses, indent=1) + "\n")
    if path.is_file():
        same(name, losses, json.loads(path.read_text()), path.name)
        return True
    stored = sorted(GOLDEN.glob(f"{name}.*.json"))
    assert stored, f"no golden run of {name} in {GOLDEN}"
    for other in stored:
        same(name, losses[:SHARED_STEPS], json.loads(other.read_text())[:SHARED_STEPS], other.name)
    return False


@pytest.fixture(scope="module")
def cache(small_logs, tmp_path_factory):
    """An untrained teacher (seed 0) and its fp16 logit cache of the train split."""
    root = tmp_path_factory.mktemp("golden")
    torch.manual_seed(0)
    schema = load_schema(small_logs)
    cfg = ModelConfig(embedding_dim=16, dense_arch=[16], cross_layers=1, cross_rank=8, deep_arch=[32, 16])
    model = RankingModel(schema, cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    write_export(root / "teacher", "teacher", schema, cfg, model.state_dict())
    build(CacheJob(teacher=str(root / "teacher"), logs=str(small_logs), out=str(root / "cache"), splits=["train"],
                   workers=1))
    return root / "cache"


def distill_args(cache) -> list[str]:
    return ["role=student", f"objective={{kind: ctr_kd, teachers: [{{cache: {cache}}}], temperature: 2.0, "
            "losses: {hard: 1.0, soft: 1.0, mse: 0.5}}"]


def test_teacher_losses_match_the_golden_run(small_logs, tmp_path):
    r = cli("teacher", "train", *common(small_logs, tmp_path / "t"))
    assert r.returncode == 0, r.stderr[-3000:]
    check("teacher", tmp_path / "t")


def test_distill_losses_match_the_golden_run(small_logs, cache, tmp_path):
    r = cli("distill", *common(small_logs, tmp_path / "kd"), *distill_args(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    check("distill", tmp_path / "kd")


def test_a_resumed_distillation_matches_the_golden_tail(small_logs, cache, tmp_path):
    """Rank 1 killed after step 7, restarted by the local launcher from the step-5 checkpoint:
    steps 6-12 are recomputed and match the golden run's."""
    out = tmp_path / "kd"
    r = cli("--kill", "1:7", "--", "distill", "--max-restarts", "1", *common(small_logs, out), *distill_args(cache),
            module="tests.faults.train")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000005 at epoch 0, step 5" in r.stderr, r.stderr[-2000:]
    if not check("distill", out):  # no stored run for this CPU kind: against an uninterrupted one here
        r = cli("distill", *common(small_logs, tmp_path / "whole"), *distill_args(cache))
        assert r.returncode == 0, r.stderr[-3000:]
        same("distill", losses_of(out), losses_of(tmp_path / "whole"), "uninterrupted run on this CPU")
