"""`distkd sweep` for real: a 4-trial ASHA search over a distill job on a Ray cluster (a head
with two CPUs, started here on 127.0.0.1), its driver SIGKILLed once a trial has finished and
rerun: the rerun reads only distkd's own state (<out>/kd/state.json), never Tune's (a pickle
planted where `Tuner.restore` would look executes nothing), the finished trials are not rerun,
and the best trial's export loads and evaluates. Every trial reads the one cache: it is untouched, and no copy of
it (no Parquet at all) appears under the sweep's folder."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distkd.cache.lock import READERS
from distkd.evaluate import evaluate_models
from distkd.models.export import load_export
from distkd.bench.ray_local import ray_cluster, ray_env
from tests.support import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KILL_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_cluster(tmp_path_factory.mktemp("sweep-cluster"), head_cpus=2, dashboard=False) as c:
        yield c


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name not in skip}


def sweep(config: Path, address: str) -> subprocess.Popen:
    env = {**ray_env(), "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "distkd.cli", "sweep", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_trials(state: Path) -> set[str]:
    """Trials the sweep's own state (what a rerun reads) records as finished (done, or stopped by ASHA)."""
    try:
        return {t["id"] for t in json.loads(state.read_text())["trials"] if t["status"] in ("done", "stopped")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # not written yet (it is replaced atomically, never seen half-written)


class Planted:
    """Unpickled, it creates the file at `path`: what a restore of Tune's pickles would execute."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_sweep_completes_resumes_after_its_driver_is_killed_and_its_best_export_evaluates(
        cluster, small_logs, kd_cache, tmp_path):
    cache_dir, sha = kd_cache
    job, out = tmp_path / "distill.yaml", tmp_path / "sweep"
    job.write_text(yaml.safe_dump({
        "logs": str(small_logs), "out": str(tmp_path / "unused"), "role": "student", "tensorboard": False,
        "model": {"embedding_dim": 8, "dense_arch": [16], "cross_layers": 0, "deep_arch": [32, 16]},
        "optim": {"embedding_lr": 0.2, "dense_lr": 0.01},
        "train": {"batch_size": 512, "max_steps": 40, "eval_every": 10, "checkpoint_every": 10, "seed": 0,
                  "eval_batch_size": 4096},
        "objective": {"kind": "ctr_kd", "teachers": [{"cache": str(cache_dir), "sha256": sha}],
                      "losses": {"hard": 1.0, "mse": 1.0}},
    }))
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(out), "metric": "valid/click/auc", "mode": "max", "num_samples": 4, "max_concurrent": 2,
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "kd": {"base": str(job), "space": {"optim.dense_lr": {"loguniform": [0.003, 0.03]},
                                            "objective.losses.mse": {"choice": [0.5, 2.0]}}},
    }))
    before = snapshot(cache_dir, skip=(READERS,))

    t0 = time.monotonic()
    first = sweep(config, cluster)
    state = out / "kd" / "state.json"
    while not (done := finished_trials(state)):
        if first.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed:\n{first.stdout.read()[-4000:]}")
        if time.monotonic() - t0 > KILL_TIMEOUT_S:
            first.kill()
            pytest.fail(f"no trial finished within {KILL_TIMEOUT_S}s:\n{first.communicate()[0][-4000:]}")
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    kept = {t: snapshot(out / "kd" / "trials" / t) for t in done if (out / "kd" / "trials" / t).is_dir()}
    assert kept, done
    # what Tune wrote is never read back: a crafted pickle where Tuner.restore looks (<out>/tune/kd,
    # tuner.pkl) and in place of every pickle of the first run's experiment would create `sentinel`
    sentinel = tmp_path / "restored-a-pickle"
    tune_dir = out / "tune" / "kd"
    for pkl in [tune_dir / "tuner.pkl", *tune_dir.rglob("*.pkl")]:
        pkl.parent.mkdir(parents=True, exist_ok=True)
        pkl.write_bytes(pickle.dumps(Planted(sentinel)))
    tune_before = snapshot(tune_dir)

    second = sweep(config, cluster)
    try:
        log = second.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        second.kill()
        pytest.fail(f"the resumed sweep did not finish:\n{second.communicate()[0][-4000:]}")
    assert second.returncode == 0, log[-4000:]
    assert f"sweep kd: resuming {state}" in log, log[-3000:]
    assert "sweep kd: finished, 4 trials" in log, log[-3000:]
    assert not sentinel.exists(), "the rerun unpickled Tune's experiment state"
    after = snapshot(tune_dir)
    assert {p: after.get(p) for p in tune_before} == tune_before, "the rerun touched the first run's Tune files"
    final = json.loads(state.read_text())["trials"]
    assert len(final) == 4 and {t["status"] for t in final} <= {"done", "stopped"}, final
    assert all(len(t["runs"]) == 1 for t in final if t["id"] in kept), final  # kept, not run again

    for trial, files in kept.items():  # a trial finished before the kill is not run again
        assert snapshot(out / "kd" / "trials" / trial) == files, trial
    lines = (out / "kd" / "trials.md").read_text().splitlines()
    assert len(lines) == 2 + 4, lines  # header, rule, one row per trial
    rows = list(csv_rows(out / "kd" / "trials.csv"))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    scores = [float(r["valid/click/auc"]) for r in rows if r["valid/click/auc"]]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["status"] == "done" and {r["status"] for r in rows} <= {"done", "stopped"}
    assert (out / "kd" / "valid_click_auc.png").stat().st_size > 1000

    best = out / "kd" / "best" / "export"
    model, meta = load_export(best)
    assert json.loads((out / "kd" / "best" / "best.json").read_text())["trial"] == rows[0]["trial"]
    result = evaluate_models(small_logs, {"best": [str(best)]}, split="test")
    assert result["models"]["best"]["metrics"]["click"]["rows"]["mean"] == 4_000

    # the one cache, read by every trial, untouched; its readers' pin file (`cache gc`'s lock) may appear
    assert snapshot(cache_dir, skip=(READERS,)) == before
    assert not list(out.rglob("*.parquet")), "a trial copied the cache"


def csv_rows(path: Path):
    import csv

    with open(path) as fh:
        yield from csv.DictReader(fh)
