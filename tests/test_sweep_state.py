"""The sweep's own state (distkd.launch.sweep_state), without Ray: the trial list drawn up front
and seeded, kept across reopenings, refused when the study changed, and plain JSON."""

from __future__ import annotations

import json
import math

import pytest

from distkd.config import ConfigError
from distkd.launch.sweep import Study
from distkd.launch.sweep_state import STATE, StudyState, draw, fingerprint

pytestmark = pytest.mark.unit

SPACE = {"optim.dense_lr": {"loguniform": [0.003, 0.03]}, "objective.losses.mse": {"choice": [0.5, 2.0]},
         "train.seed": {"grid": [0, 1, 2]}, "model.embedding_dim": {"randint": [4, 8]},
         "objective.temperature": {"uniform": [1.0, 3.0]}}


def test_draw_crosses_the_grid_samples_the_rest_in_range_and_is_seeded():
    points = draw(SPACE, 4, seed=0, name="kd")
    assert len(points) == 3 * 4
    assert [p["train.seed"] for p in points] == [0] * 4 + [1] * 4 + [2] * 4
    for p in points:
        assert 0.003 <= p["optim.dense_lr"] <= 0.03 and p["objective.losses.mse"] in (0.5, 2.0)
        assert 4 <= p["model.embedding_dim"] <= 8 and isinstance(p["model.embedding_dim"], int)
        assert 1.0 <= p["objective.temperature"] <= 3.0
    assert draw(SPACE, 4, seed=0, name="kd") == points
    assert draw(SPACE, 4, seed=1, name="kd") != points and draw(SPACE, 4, seed=0, name="hard") != points
    lrs = [math.log10(p["lr"]) for p in draw({"lr": {"loguniform": [1e-4, 1e-1]}}, 400, 0, "kd")]
    assert sum(lr < -2.5 for lr in lrs) > 150  # log-uniform: half below the geometric middle


def test_state_is_json_reopened_as_written_and_refused_when_the_study_changed(tmp_path):
    study = Study(base=str(tmp_path / "job.yaml"), space=SPACE)
    fp = fingerprint(study, "random", 0, 2)
    state, resumed = StudyState.open(tmp_path / "kd", "kd", fp, draw(SPACE, 2, 0, "kd"))
    assert not resumed and [t["status"] for t in state.trials] == ["pending"] * 6
    state.update("t001", {}, "run-a", status="running", result={"valid/mean/auc": 0.7, "config": {"x": 1}})
    state.update("t001", {}, "run-a", status="running", result={"valid/mean/auc": 0.72, "time_total_s": 4.0})
    state.update("t001", {}, "run-b", status="done", result={"valid/mean/auc": 0.75, "finished": 1, "time_total_s": 2.5})
    state.update("t004", {}, "run-a", status="stopped", result={"valid/mean/auc": 0.6})
    state.update("optuna_1", {"a": 1}, "run-a", status="running")  # a searcher's proposal is added

    data = json.loads((tmp_path / "kd" / STATE).read_text())
    t001 = data["trials"][1]
    assert t001["result"] == {"valid/mean/auc": 0.75, "finished": 1, "time_total_s": 2.5}  # scalars only, no config
    assert t001["runs"] == ["run-a", "run-b"] and t001["seconds"] == {"run-a": 4.0, "run-b": 2.5}
    assert not [p for p in (tmp_path / "kd").iterdir() if p.name != STATE], "a temp file was left"

    again, resumed = StudyState.open(tmp_path / "kd", "kd", fp, draw(SPACE, 2, 0, "kd"))
    assert resumed and again.trials == state.trials
    assert {t["id"] for t in again.finished()} == {"t001", "t004"}
    assert len(again.unfinished()) == 5 and again.best("valid/mean/auc", "max")["id"] == "t001"
    assert again.best("valid/mean/auc", "min")["id"] == "t004"

    with pytest.raises(ConfigError, match="the study changed"):
        StudyState.open(tmp_path / "kd", "kd", fingerprint(study, "random", 0, 3), None)
    (tmp_path / "kd" / STATE).write_bytes(b"\x80\x04pickled")
    with pytest.raises(ConfigError, match="not a distkd sweep state"):
        StudyState.open(tmp_path / "kd", "kd", fp, None)
