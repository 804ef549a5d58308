"""`distkd demo` names each suite from its data job (issue 27): the MovieLens release its
data.yaml converts, not the shipped release's name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from distkd import demo


def _jobs(root, release):
    """A jobs folder like jobs/: a synthetic suite and MovieLens suites converting `release`."""
    for name, source in (("demo", "synth"), ("next-item", "synth_next_item"),
                         ("movielens", "movielens"), ("movielens-next", "movielens_next")):
        (root / name).mkdir(parents=True)
        (root / name / "data.yaml").write_text(f"out: runs/x\nsource: {source}\npath: {release}\n")
    return root


def _names(monkeypatch, jobs, next_item):
    """The suites `distkd demo` runs, by name; the stages themselves are other tests' business."""
    seen = []
    monkeypatch.setattr(demo, "run_suite", lambda s: seen.append(s.name) or {"suite": s.name, "table": "",
                                                                           "report": ""})
    demo.run(SimpleNamespace(seeds=1, jobs=str(jobs), next_item=next_item, skip_movielens=False))
    return seen


@pytest.mark.unit
@pytest.mark.parametrize("next_item, want", [(False, ["synthetic", "ml-100k"]),
                                             (True, ["next-item (synthetic)", "next-movie (ml-100k)"])])
def test_demo_names_the_movielens_suite_after_the_release_it_converts(tmp_path, monkeypatch, next_item, want):
    release = tmp_path / "data" / "ml-100k"
    release.mkdir(parents=True)
    jobs = _jobs(tmp_path / "jobs", f"{release}/")
    assert _names(monkeypatch, jobs, next_item) == want


@pytest.mark.unit
def test_a_release_that_is_not_there_is_skipped(tmp_path, monkeypatch):
    jobs = _jobs(tmp_path / "jobs", tmp_path / "ml-25m")
    assert _names(monkeypatch, jobs, False) == ["synthetic"]
    assert demo.suite_name(demo.DataJob(source="movielens", path=str(tmp_path / "ml-25m"))) == "ml-25m"
