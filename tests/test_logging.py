"""distkd.log: the level (flag, environment, refused when bad), the rank-0 filter, and the real
CLI's `--log-level` silencing info lines while errors still show."""

from __future__ import annotations

import logging
import os

import pytest

from distkd import cli, log
from tests.support import cli as run_cli

pytestmark = pytest.mark.unit


@pytest.fixture
def tree(monkeypatch):
    """The `distkd` logger with its level and DISTKD_LOG_LEVEL restored afterwards: `setup`
    writes both, and the rest of the session must not inherit them."""
    monkeypatch.delenv(log.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    root = logging.getLogger(log.ROOT)
    before = root.level
    yield logging.getLogger("distkd.test_logging")
    root.setLevel(before)


def test_level_from_the_flag_then_the_environment(tree, monkeypatch):
    assert log.level_from(None) == logging.INFO
    monkeypatch.setenv(log.ENV, "error")
    assert log.level_from(None) == logging.ERROR
    assert log.level_from("debug") == logging.DEBUG  # the flag wins over the environment
    log.setup("warning")
    assert logging.getLogger(log.ROOT).level == logging.WARNING
    assert log.current_level() == "WARNING"
    assert os.environ[log.ENV] == "WARNING"  # for ranks and subprocesses that set up their own


def test_a_bad_level_is_refused_naming_where_it_came_from(tree, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"'LOUD'.*\(from --log-level\)"):
        log.level_from("loud")
    monkeypatch.setenv(log.ENV, "loud")
    with pytest.raises(ValueError, match=r"'LOUD'.*\(from DISTKD_LOG_LEVEL\)"):
        log.level_from(None)
    with pytest.raises(SystemExit) as e:  # the CLI: a usage error, not a traceback
        cli.main(["data", "inspect", "nowhere"])
    assert e.value.code == 2 and "DISTKD_LOG_LEVEL" in capsys.readouterr().err
    monkeypatch.delenv(log.ENV)
    with pytest.raises(SystemExit) as e:
        cli.main(["--log-level", "loud", "data", "inspect", "nowhere"])
    assert e.value.code == 2 and "--log-level" in capsys.readouterr().err


def test_only_rank_0_logs_below_warning(tree, monkeypatch, capsys):
    log.setup("info")
    tree.info("progress from rank 0")
    monkeypatch.setenv("RANK", "1")
    tree.info("progress from rank 1")
    tree.warning("a warning from rank 1")
    err = capsys.readouterr().err
    assert "progress from rank 0" in err and "progress from rank 1" not in err
    assert "[rank 1] a warning from rank 1" in err
    log.setup("debug")  # at DEBUG every rank logs, tagged
    tree.info("detail from rank 1")
    assert "[rank 1] detail from rank 1" in capsys.readouterr().err


def test_lines_are_bare_and_a_progress_line_redraws_in_place(tree, capsys):
    log.setup("info")
    tree.info("\r  10/20 rows", extra={"end": ""})
    tree.info("\r  20/20 rows")
    assert capsys.readouterr().err == "\r  10/20 rows\r  20/20 rows\n"
    with log.silenced("distkd.test_logging"):
        tree.info("not shown")
        tree.warning("shown")
    tree.info("shown again")
    assert capsys.readouterr().err == "shown\nshown again\n"


def test_cli_log_level_warning_silences_info_not_errors(tmp_path):
    out = tmp_path / "logs"
    synth = ["data", "synth", "--out", str(out), "--rows", "400", "--shards", "1", "--preset", "small",
             "--workers", "1"]
    r = run_cli(*synth, env_extra={log.ENV: "INFO"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 400 rows" in r.stderr and "oracle AUC" in r.stdout

    r = run_cli("--log-level", "warning", *synth, "--force", env_extra={log.ENV: "INFO"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 400 rows" not in r.stderr, r.stderr
    assert "oracle AUC" in r.stdout  # the command's result is not a log line

    r = run_cli("--log-level", "warning", *synth)  # the directory exists now: a usage error
    assert r.returncode == 2 and "distkd: error:" in r.stderr and str(out) in r.stderr, r.stderr
