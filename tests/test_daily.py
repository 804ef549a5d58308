"""`distkd daily`: the day as one command, through the real CLI in subprocesses.

Five synthetic days (4,000 rows each, the truth drifting 0.05 rad/day) and a tiny teacher
trained once on days 1-2. Then, in order (each test continues from the one before; the full
ten-day figures are `make bench-daily`'s):

- day 3: validated, drift-checked, its window (days 2-3) cached, a student from scratch,
  judged on day 4, promoted (the first candidate): current.json names its verified export;
- day 4: SIGKILLed inside the distill step (the trainer's step 25, its step-20 checkpoint
  committed), rerun: the finished steps are skipped, the cache is not rebuilt, distill resumes
  from step 20 and runs to the same last step as a run never killed; warm-started from day 3's
  student, judged against it on day 5; the pointer moves to day 4;
- day 4 again: nothing to do, no file under the out or cache directories touched;
- day 5 rewritten with a dense feature x10: exit 3 naming I3 psi, recorded in the day's state,
  the cache manifest and current.json byte for byte as they were;
- day 5 restored: its checks run again, it trains, and with no day 6 it waits; day 6 lands and
  a rerun of day 5 only judges and promotes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distkd.cache import read_manifest
from distkd.cli import main
from tests.support import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAYS = [f"2026-11-0{d}" for d in range(1, 6)]
ROWS_PER_DAY = 4000
STEPS = 2 * (2 * ROWS_PER_DAY // 256 + 1)  # two epochs of the two-day window, batch 256 (the last one short)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("daily")
    logs = root / "logs"
    r = cli("data", "synth", "--out", str(logs), "--preset", "small", "--rows", str(len(DAYS) * ROWS_PER_DAY),
            "--shards", "1", "--days", str(len(DAYS)), "--start", DAYS[0], "--drift", "0.05", "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("teacher", "train", "--config", "jobs/daily/teacher.yaml", f"logs={logs}", f"out={root / 'teacher'}",
            "train.batch_size=512")
    assert r.returncode == 0, r.stderr[-3000:]
    overrides = [f"logs={logs}", f"teacher={root / 'teacher' / 'export'}", f"cache={root / 'cache'}",
                 f"out={root / 'out'}", "cache_workers=1", "distill.train.batch_size=256", "distill.train.epochs=2",
                 "distill.train.checkpoint_every=10", "eval.min_gain=-0.01"]
    return {"root": root, "logs": logs, "out": root / "out", "overrides": overrides}


def daily(world, day: str, *extra: str, module: str = "distkd.cli", before: tuple[str, ...] = ()):
    return cli(*before, "daily", "--config", "jobs/daily/daily.yaml", "--date", day, *world["overrides"], *extra,
               module=module)


def state(world, day: str) -> dict:
    return json.loads((world["out"] / "days" / day / "state.json").read_text())


def current(world) -> dict:
    return json.loads((world["out"] / "current.json").read_text())


def cache_dir(world) -> Path:
    return next(p for p in (world["root"] / "cache").iterdir() if p.is_dir())


def test_the_first_day_is_cached_distilled_from_scratch_judged_on_the_next_and_promoted(world):
    r = daily(world, DAYS[2])
    assert r.returncode == 0, r.stderr[-3000:]
    s = state(world, DAYS[2])
    assert s["status"] == "done" and all(step["status"] == "done" for step in s["steps"].values())
    assert s["steps"]["drift"]["window"] == DAYS[:2] and s["steps"]["validate"]["rows"] == ROWS_PER_DAY
    assert s["steps"]["cache"]["computed"] == 2  # the window, days 2-3
    assert sorted(read_manifest(cache_dir(world)).shards) == [f"dt={d}/part-00000.parquet" for d in DAYS[1:3]]
    assert s["steps"]["distill"]["init"] is None and s["steps"]["eval"]["on"] == DAYS[3]
    cur = current(world)
    assert cur["day"] == DAYS[2] and cur["sha256"] == s["steps"]["distill"]["sha256"]
    assert Path(cur["export"], "export.json").is_file() and not Path(cur["export"]).parent.joinpath("checkpoints").exists()
    assert f"daily {DAYS[2]}: promoted (click auc on {DAYS[3]}" in r.stdout


def test_a_day_killed_in_distill_resumes_there_and_the_pointer_moves(world):
    r = daily(world, DAYS[3], module="tests.faults.train", before=("--kill", "0:25", "--"))
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL: the whole `distkd daily` process (one local rank)
    assert f"init: weights from {world['out'] / 'days' / DAYS[2] / 'student' / 'export'}" in r.stderr  # warm
    s = state(world, DAYS[3])
    assert s["steps"]["distill"]["status"] == "started" and s["steps"]["cache"]["status"] == "done"
    student = world["out"] / "days" / DAYS[3] / "student"
    assert (student / "checkpoints" / "step-00000020" / "COMMITTED").is_file() and not (student / "export").exists()
    assert current(world)["day"] == DAYS[2]  # nothing promoted by a half-run day

    r = daily(world, DAYS[3])
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("validate", "drift", "cache"):
        assert f"daily {DAYS[3]}: {step}: done at" in r.stderr, step
    assert "shards planned" not in r.stderr  # no cache build ran
    assert f"daily {DAYS[3]}: distill resumes in {student}" in r.stderr
    assert "at epoch 0, step 20" in r.stderr, r.stderr[-3000:]
    s = state(world, DAYS[3])
    assert s["status"] == "done" and s["steps"]["distill"]["attempts"] == 2 and s["steps"]["distill"]["resumed"]
    assert s["steps"]["distill"]["init"] == str(world["out"] / "days" / DAYS[2] / "student" / "export")
    assert json.loads((student / "summary.json").read_text())["steps"] == STEPS  # as far as a run never killed
    ev = s["steps"]["eval"]
    assert ev["on"] == DAYS[4] and ev["current_day"] == DAYS[2] and ev["promote"] is (ev["gain"] >= -0.01)
    cur = current(world)
    assert ev["promote"], f"day 4's candidate lost to day 3's on day 5: {ev}"
    assert cur["day"] == DAYS[3] and [h["day"] for h in cur["history"]] == DAYS[2:4]
    assert f"current: day {DAYS[3]}" in r.stdout


def _files(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*") if p.is_file()}


def test_rerunning_a_finished_day_does_nothing(world):
    before = _files(world["out"], world["root"] / "cache")
    r = daily(world, DAYS[3])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"daily {DAYS[3]}: finished at" in r.stderr and "nothing to do" in r.stderr
    assert _files(world["out"], world["root"] / "cache") == before


def test_a_broken_day_stops_at_drift_leaving_the_cache_and_the_pointer(world):
    path = world["logs"] / f"dt={DAYS[4]}" / "part-00000.parquet"
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index("I3"), "I3",
                                pc.multiply(t.column("I3"), pa.scalar(10.0, pa.float32()))), path, row_group_size=1000)
    manifest, pointer = (cache_dir(world) / "manifest.json").read_bytes(), (world["out"] / "current.json").read_bytes()
    world["day5"] = t
    r = daily(world, DAYS[4])
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"daily {DAYS[4]}: drift fails 1 check(s): I3 psi" in r.stderr
    assert "stopped by the drift check" in r.stdout
    s = state(world, DAYS[4])
    assert s["status"] == "stopped" and s["steps"]["drift"]["status"] == "failed"
    assert [(f["feature"], f["figure"]) for f in s["steps"]["drift"]["failures"]] == [("I3", "psi")]
    assert set(s["steps"]) == {"validate", "drift"}
    assert (cache_dir(world) / "manifest.json").read_bytes() == manifest
    assert (world["out"] / "current.json").read_bytes() == pointer



def test_a_fixed_day_is_checked_again_then_waits_for_the_next_day_and_finishes_when_it_lands(world):
    """Day 5 restored: the stopped day runs its checks again, trains, and (no day 6 yet) waits
    with exit 0, the pointer still on day 4; day 6 lands and a rerun of day 5 only judges and
    promotes."""
    path = world["logs"] / f"dt={DAYS[4]}" / "part-00000.parquet"
    pq.write_table(world["day5"], path, row_group_size=1000)
    r = daily(world, DAYS[4])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"daily {DAYS[4]}: stopped at" in r.stderr and "running its checks again" in r.stderr
    assert "2026-11-06 is not in" in r.stderr and "waiting for day 2026-11-06" in r.stdout
    s = state(world, DAYS[4])
    assert s["status"] == "waiting" and s["steps"]["drift"]["status"] == "done" and s["stopped_before"]
    assert f"dt={DAYS[4]}/part-00000.parquet" in read_manifest(cache_dir(world)).shards
    assert current(world)["day"] == DAYS[3]

    day6 = world["logs"] / "dt=2026-11-06"
    day6.mkdir()
    t = world["day5"]
    pq.write_table(t.set_column(0, "example_id", pc.add(t.column("example_id"), 10 * ROWS_PER_DAY)),
                   day6 / "part-00000.parquet", row_group_size=1000)
    r = daily(world, DAYS[4])
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("validate", "drift", "cache", "distill"):
        assert f"daily {DAYS[4]}: {step}: done at" in r.stderr, step
    ev = state(world, DAYS[4])["steps"]["eval"]
    assert ev["on"] == "2026-11-06" and ev["current_day"] == DAYS[3]
    assert state(world, DAYS[4])["status"] == "done" and (current(world)["day"] == DAYS[4]) is ev["promote"]


def test_submit_daily_sends_the_day_to_ray_and_refuses_slurm(capsys):
    argv = ["submit", "daily", "--config", "jobs/daily/daily.yaml", "--date", "2026-11-05", "--dry-run"]
    assert main([*argv, "--to", "ray", "--ray-address", "http://127.0.0.1:8265"]) == 0
    assert ("entrypoint: python -m distkd.cli daily --config jobs/daily/daily.yaml --date 2026-11-05"
            in capsys.readouterr().out)
    assert main([*argv, "--to", "slurm"]) == 2
    assert main([*argv, "--to", "ray", "--ray-address", "http://x:8265", "window_days=0"]) == 2  # the job is checked
