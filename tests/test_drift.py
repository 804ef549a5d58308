"""Day-over-day checks (`distkd data drift`, distkd.data.drift) and synthetic logs in daily
partitions whose truth drifts (`distkd data synth --days --drift`).

The figures' math on small arrays; then eight days of synthetic logs, the eighth checked
against the seven before it as written (passes) and rewritten broken with pyarrow: a dense
feature scaled x10, ids shifted out of their table, half the clicks, a tenth of the rows; each
fails naming the feature and the figure, through `check_day` and through the CLI (exit 3)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distkd.config import ConfigError, from_dict
from distkd.data.drift import DriftConfig, RowSet, check_day, load_config, psi, unseen_share
from distkd.data.synth import generate
from distkd.data.synth_truth import Truth
from tests.support import cli

DAYS = [f"2026-11-0{d}" for d in range(1, 9)]
DAY = DAYS[-1]
ROWS_PER_DAY = 3000


# -- the figures -------------------------------------------------------------------------------


@pytest.mark.unit
def test_psi_is_zero_for_the_same_distribution_and_the_textbook_sum_otherwise():
    ref = np.arange(1000, dtype=np.float64)  # deciles cut at 99.9, 199.8, ...: 100 values a bin
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # Every value of the day in the first bin: shares (1, 0 x 9) against (0.1 x 10), 0 read as 1e-4.
    day = np.zeros(500)
    want = (1 - 0.1) * math.log(1 / 0.1) + 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert psi(ref, day) == pytest.approx(want, rel=1e-9)
    # Half the day moved from the lower half of the bins to the upper half: shares (0.05 x 5, 0.15 x 5).
    day = np.concatenate([np.arange(0, 500, 2), np.arange(500, 1000), np.arange(500, 1000, 2)]).astype(float)
    want = 5 * (0.05 - 0.1) * math.log(0.05 / 0.1) + 5 * (0.15 - 0.1) * math.log(0.15 / 0.1)
    assert psi(ref, day) == pytest.approx(want, rel=1e-9)


@pytest.mark.unit
def test_psi_bins_merge_where_the_reference_quantiles_tie():
    """Half zeros (a count feature): the cuts at 0.1 .. 0.5 are all 0 and make one bin, so the
    same day reads no shift and the zeros moving up reads one."""
    rng = np.random.default_rng(0)
    ref = np.where(rng.random(20_000) < 0.5, 0.0, rng.integers(1, 50, 20_000)).astype(float)
    same = np.where(rng.random(20_000) < 0.5, 0.0, rng.integers(1, 50, 20_000)).astype(float)
    assert psi(ref, same) < 0.01
    assert psi(ref, same * 10) > 0.25 and psi(ref, same + 1) > 0.25


@pytest.mark.unit
def test_unseen_share_exact_and_folded():
    seen = RowSet(100)
    seen.add(np.array([1, 2, 3, 3, 50]))
    assert not seen.folded and seen.fill == pytest.approx(4 / 100)
    day = np.array([1, 1, 2, 4, 5, 50, 99, 3])  # 4, 5 and 99 unseen: 3 of 8 lookups
    assert seen.missing(day) == 3 and unseen_share(3, 8, seen) == pytest.approx(3 / 8)
    assert unseen_share(0, 0, seen) is None

    # A table of 10**7 rows folded into 2**16 slots: half the day's distinct rows seen in the
    # reference, ~27% of the slots set, so uncorrected the share reads ~0.37, corrected ~0.5.
    rng = np.random.default_rng(1)
    rows = rng.choice(10**7, 40_000, replace=False)
    folded = RowSet(10**7, cap=1 << 16)
    folded.add(rows[:20_000])
    day = rows[10_000:30_000]  # 10,000 seen, 10,000 not
    missing = folded.missing(day)
    assert folded.folded and 0.2 < folded.fill < 0.35 and missing / len(day) < 0.42
    assert unseen_share(missing, len(day), folded) == pytest.approx(0.5, abs=0.02)


@pytest.mark.unit
def test_drift_config_loads_from_a_daily_job_section_or_its_own_file(tmp_path):
    job = tmp_path / "daily.yaml"
    job.write_text("logs: runs/logs\ndrift:\n  window_days: 14\n  psi_max: 0.2\n"
                   "  label_rate_ratio: [0.8, 1.25]\n  features: {C5: {unseen_max: 0.9}}\n")
    cfg = load_config(str(job))
    assert (cfg.window_days, cfg.psi_max, tuple(cfg.label_rate_ratio)) == (14, 0.2, (0.8, 1.25))
    assert cfg.limit("C5", "unseen_max") == 0.9 and cfg.limit("C4", "unseen_max") == 0.5
    own = tmp_path / "drift.yaml"
    own.write_text("rows_ratio: [0.9, 1.1]\n")
    assert tuple(load_config(str(own)).rows_ratio) == (0.9, 1.1)
    with pytest.raises(ConfigError, match="rows_ratio"):
        from_dict(DriftConfig, {"rows_ratio": [1.2, 2.0]}, "x")
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(DriftConfig, {"psi": 0.1}, "x")


# -- synthetic days with a drifting truth ------------------------------------------------------


@pytest.mark.unit
def test_drifted_truth_keeps_day_zero_and_rotates_by_the_angle():
    truth = Truth("small", seed=4)

    def weights(t: Truth) -> np.ndarray:
        return np.concatenate(t.first + [v.ravel() for v in t.latent.values()] + [t.dense_w.ravel()])

    assert truth.drifted(0.0) is truth
    for angle in (0.3, 0.8, math.pi / 2):
        corr = np.corrcoef(weights(truth), weights(truth.drifted(angle)))[0, 1]
        assert corr == pytest.approx(math.cos(angle), abs=0.03)
    assert np.array_equal(weights(truth.drifted(0.8)), weights(Truth("small", seed=4).drifted(0.8)))  # by seed


@pytest.mark.unit
def test_synth_refuses_a_drift_without_days_and_a_bad_start(tmp_path):
    with pytest.raises(ConfigError, match="--drift"):
        generate(tmp_path / "a", 2000, shards=1, preset="small", drift=0.1)
    with pytest.raises(ConfigError, match="--start"):
        generate(tmp_path / "b", 2000, shards=1, preset="small", days=2, start="2026-13-01")


@pytest.mark.integration
def test_synth_days_drift_moves_the_written_label_model(tmp_path):
    """Same seed, drift 0 and 0.4 rad/day: the same rows every day; the same true click
    probabilities on the first day, different ones on the last; drift 0 keeps one truth."""
    runs = {}
    for drift in (0.0, 0.4):
        generate(tmp_path / str(drift), 3 * 2000, shards=1, preset="small", days=3, drift=drift)
        runs[drift] = [pq.read_table(tmp_path / str(drift) / f"dt={d}") for d in DAYS[:3]]
    features = [f"C{i}" for i in range(1, 7)] + [f"I{i}" for i in range(1, 5)]
    for still, moved in zip(runs[0.0], runs[0.4]):
        assert still.select(features).equals(moved.select(features))
    first, last = (np.array([r[i].column("p_click").to_numpy() for r in (runs[0.0], runs[0.4])]) for i in (0, 2))
    assert np.array_equal(first[0], first[1])
    logit = np.log(last / (1 - last))
    assert np.corrcoef(logit)[0, 1] < 0.9 and np.abs(logit[0] - logit[1]).mean() > 0.2
    # drift 0: the last day's probabilities are the undrifted truth's on the same draws
    rng = np.random.default_rng([0, 3 + 2, 0, 0])
    again = Truth("small", 0).sample(2000, rng, 4000).column("p_click").to_numpy()
    assert np.array_equal(again, last[0])


# -- one day against its window ----------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Eight days of the small preset through the CLI, the truth drifting slowly (0.05 rad/day)."""
    out = tmp_path_factory.mktemp("drift") / "logs"
    r = cli("data", "synth", "--out", str(out), "--preset", "small", "--rows", str(8 * ROWS_PER_DAY),
            "--shards", "1", "--days", "8", "--start", DAYS[0], "--drift", "0.05", "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [f"dt={d}" for d in DAYS] + ["schema.yaml"]
    assert f"dt={DAY}" in r.stdout
    return out


def broken(logs, tmp_path, change) -> str:
    """A copy of `logs` whose last day is rewritten by `change(table) -> table`."""
    copy = tmp_path / "logs"
    shutil.copytree(logs, copy)
    path = copy / f"dt={DAY}" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(change(table), path, row_group_size=1000)
    return str(copy)


def failed(report) -> list[tuple[str, str]]:
    return [(c.feature, c.figure) for c in report.failures]


@pytest.mark.integration
def test_a_normal_day_passes_and_its_figures_are_the_direct_ones(logs):
    report = check_day(str(logs), DAY, DriftConfig())
    assert failed(report) == [] and report.window == DAYS[:7]
    assert (report.rows, report.window_rows) == (ROWS_PER_DAY, 7 * ROWS_PER_DAY)
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert doc["ok"] and len(doc["checks"]) == 1 + 2 + 4 + 2 * 6
    # unseen: exact below 2**24 rows, so numpy's own count on the C5 column
    window = pa.concat_tables(pq.read_table(logs / f"dt={d}", columns=["C5"]) for d in DAYS[:7])
    day = pq.read_table(logs / f"dt={DAY}", columns=["C5", "I2"])
    want = np.isin(day.column("C5").to_numpy(), window.column("C5").to_numpy(), invert=True).mean()
    got = {(c.feature, c.figure): c.value for c in report.checks}
    assert got[("C5", "unseen")] == pytest.approx(want) and want > 0
    assert got[("I2", "psi")] < 0.05


@pytest.mark.integration
def test_a_dense_feature_scaled_tenfold_fails_on_its_psi(logs, tmp_path):
    bad = broken(logs, tmp_path, lambda t: t.set_column(t.schema.get_field_index("I3"), "I3",
                                                        pc.multiply(t.column("I3"), pa.scalar(10.0, pa.float32()))))
    report = check_day(bad, DAY, DriftConfig())
    assert failed(report) == [("I3", "psi")]
    assert report.failures[0].value > 0.25 and "I3 psi" in report.failures[0].describe()


@pytest.mark.integration
def test_ids_shifted_out_of_range_fail_naming_the_feature(logs, tmp_path):
    bad = broken(logs, tmp_path, lambda t: t.set_column(t.schema.get_field_index("C3"), "C3",
                                                        pc.add(t.column("C3"), 100)))  # C3 has 100 ids
    report = check_day(bad, DAY, DriftConfig())
    assert failed(report) == [("C3", "out_of_range")] and report.failures[0].value == 1.0


@pytest.mark.integration
def test_half_the_clicks_fail_on_the_click_label_rate(logs, tmp_path):
    def halve(t: pa.Table) -> pa.Table:
        y = t.column("clicked").to_numpy(zero_copy_only=False).copy()
        y[np.flatnonzero(y == 1)[::2]] = 0
        return t.set_column(t.schema.get_field_index("clicked"), "clicked",
                            pa.array(y, pa.int8(), mask=t.column("clicked").is_null().to_numpy(zero_copy_only=False)))

    report = check_day(broken(logs, tmp_path, halve), DAY, DriftConfig())
    assert failed(report) == [("click", "label_rate_ratio")]
    assert report.failures[0].value == pytest.approx(0.5, abs=0.05)


@pytest.mark.integration
def test_a_tenth_of_the_rows_fails_on_the_row_count(logs, tmp_path):
    report = check_day(broken(logs, tmp_path, lambda t: t.slice(0, ROWS_PER_DAY // 10)), DAY, DriftConfig())
    assert failed(report)[0] == ("*", "rows_ratio") and report.failures[0].value == pytest.approx(0.1)


@pytest.mark.integration
def test_the_cli_prints_the_table_exits_3_naming_the_failure_and_writes_json(logs, tmp_path):
    r = cli("data", "drift", str(logs), "--partition", f"dt={DAY}", "--json", str(tmp_path / "ok.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()  # the table only; progress and verdict go to the log
    assert "0 of 19 checks fail" in lines[0] and len(lines) == 2 + 19
    assert "every check passes" in r.stderr and "every check" not in r.stdout
    assert json.loads((tmp_path / "ok.json").read_text())["ok"] is True

    bad = broken(logs, tmp_path, lambda t: t.set_column(t.schema.get_field_index("I1"), "I1",
                                                        pc.multiply(t.column("I1"), pa.scalar(10.0, pa.float32()))))
    job = tmp_path / "daily.yaml"
    job.write_text("drift:\n  window_days: 3\n")
    r = cli("data", "drift", bad, "--partition", f"dt={DAY}", "--config", str(job), "--json", str(tmp_path / "bad.json"))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "first: I1 psi" in r.stderr and "FAIL" in r.stdout
    doc = json.loads((tmp_path / "bad.json").read_text())
    assert doc["ok"] is False and doc["window"] == DAYS[4:7] and doc["config"]["window_days"] == 3

    r = cli("data", "drift", str(logs), "--partition", f"dt={DAYS[0]}")  # no day before the first
    assert r.returncode == 2 and "nothing to compare with" in r.stderr
