"""The README and docs/ show only what works (issue 27).

* Every command of a ```bash / ```sh / ```console block is parsed by the real parser: `distkd …`
  by `distkd.cli.build_parser` (the full argv as shown, then with `--help`), and a job file it
  names is loaded with the shown `key=value` overrides as the stage loads it; `torchrun … -m
  distkd.cli …` by torchrun's own parser, then the same; `make X` must be a Makefile target;
  `pytest PATH::TEST` must name a test that exists. A renamed flag or field fails here.
* Every ```yaml block starts with `# job: KIND[, KIND…]` and is loaded through that job's own
  config class by `distkd.config.load` (a schema block by `distkd.data.schema.load_schema`), so a
  snippet that no longer parses fails. `# job: none (why)` exempts a block that is no job.
* docs/jobs.md is what `distkd.config_reference` renders from the code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from distkd import objectives, submit
from distkd.cache.build import CacheJob
from distkd.cli import build_parser
from distkd.config import load
from distkd.config_reference import render
from distkd.daily import DailyJob
from distkd.data.drift import DriftConfig
from distkd.data.schema import load_schema
from distkd.demo import DataJob
from distkd.evaluate import EvalJob
from distkd.launch.sweep import SweepConfig
from distkd.train.job import TrainJob

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "console"}
PLACEHOLDER = "..."  # "more flags as above": dropped before parsing
# Commands shown that are not distkd's to check, and why.
NOT_CHECKED = {
    ("python", "-m", "pip"): "installs the GPU stack from PyTorch's index (docs/install.md); pip's, not distkd's",
}
# Makefile targets shown before the branch that adds them lands (tests restructure, issue 27).
PENDING_TARGETS = {"test-fast": "added with the tests' unit/integration markers"}
MARKER = re.compile(r"#\s*job:\s*([a-z]+(?:\s*,\s*[a-z]+)*)(.*)")


def blocks() -> list[tuple[str, int, str, str]]:
    """(page, first line, language, text) of every fenced block of the README and docs/."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)\s*$", lines[i])
            if m:
                j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
                out.append((str(page.relative_to(ROOT)), i + 2, m.group(1), "\n".join(lines[i + 1:j])))
                i = j
            i += 1
    return out


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command in a shell block: continuation lines joined, comments dropped."""
    out = []
    for page, first, lang, text in blocks():
        if lang not in SHELLS:
            continue
        lines = text.splitlines()
        if lang == "console":  # only the prompt lines are commands
            lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
        joined, start = "", None
        for n, line in enumerate(lines):
            start = first + n if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            argv = [a for a in shlex.split(joined + line, comments=True) if a != PLACEHOLDER]
            if argv:
                out.append((f"{page}:{start}", argv))
            joined, start = "", None
    return out


def yaml_blocks() -> list[tuple[str, str]]:
    return [(f"{page}:{first}", text) for page, first, lang, text in blocks() if lang in ("yaml", "yml")]


def _no_exit(parser, argv: list[str]) -> tuple[object, int, str]:
    """parse_args without letting argparse exit the test: (namespace or None, exit code, its output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return parser.parse_args(argv), 0, out.getvalue()
        except SystemExit as e:
            return None, int(e.code or 0), out.getvalue()


def _load_stage_job(args, where: str) -> None:
    """The job file a shown command names, with its shown overrides, loaded as the stage loads it."""
    config = getattr(args, "config", None)
    if not config or not (ROOT / config).is_file():
        return
    config, overrides = str(ROOT / config), list(getattr(args, "overrides", None) or [])
    target = args._target
    if target == "distkd.launch:run":
        job = load(TrainJob, config, [f"role={args.role}", *overrides])
        if getattr(args, "distill_required", False):
            objectives.require_distilling(job.objective, where)
    elif target == "distkd.submit:run":
        submit.load_job(args.stage, config, overrides)
    else:
        cls = {"distkd.cache.build:run": CacheJob, "distkd.evaluate:run": EvalJob,
               "distkd.launch.sweep:run": SweepConfig, "distkd.daily:run": DailyJob}[target]
        load(cls, config, overrides)


def check_distkd(argv: list[str], where: str) -> None:
    args, rc, said = _no_exit(build_parser(), argv)
    assert rc == 0 and args is not None, f"{where}: `distkd {shlex.join(argv)}` does not parse: {said}"
    _, rc, said = _no_exit(build_parser(), [*argv, "--help"])
    assert rc == 0 and "usage: distkd" in said, f"{where}: `distkd {shlex.join(argv)} --help`: {said}"
    _load_stage_job(args, where)


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in re.findall(r"^([A-Za-z0-9_.$() -]+?)\s*:(?!=)", text, re.M) for t in line.split()}


def check(where: str, argv: list[str]) -> None:
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    head = argv[0]
    if any(tuple(argv[:len(k)]) == k for k in NOT_CHECKED):
        return
    if head == "distkd":
        check_distkd(argv[1:], where)
    elif head == "torchrun":
        args, rc, said = _no_exit(torchrun_parser(), argv[1:])
        assert rc == 0, f"{where}: torchrun does not take `{shlex.join(argv)}`: {said}"
        assert args.module and args.training_script == "distkd.cli", f"{where}: torchrun runs distkd as -m distkd.cli"
        check_distkd(list(args.training_script_args), where)
    elif head == "make":
        for target in (a for a in argv[1:] if "=" not in a and not a.startswith("-")):
            assert target in make_targets() or target in PENDING_TARGETS, f"{where}: no Makefile target {target!r}"
    elif argv[:3] == ["python", "-m", "pytest"] or head == "pytest":
        for node in (a for a in argv[1:] if a.startswith("tests/")):
            path, _, name = node.partition("::")
            assert (ROOT / path).is_file(), f"{where}: no {path}"
            assert not name or f"def {name}(" in (ROOT / path).read_text(), f"{where}: no test {node}"
    elif argv[:2] == ["python", "-m"] and argv[2].startswith("distkd."):
        assert importlib.util.find_spec(argv[2]), f"{where}: no module {argv[2]}"
    else:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is not a command this test knows how to check: "
                    "show a distkd/make/torchrun command, or add it to NOT_CHECKED with the reason")


@pytest.mark.unit
@pytest.mark.parametrize("where, argv", commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_shown_command_parses(where, argv):
    check(where, argv)


# What each `# job:` kind is loaded as: the dataclass and the overrides its stage adds.
KINDS = {"data": (DataJob, []), "teacher": (TrainJob, ["role=teacher"]), "student": (TrainJob, ["role=student"]),
         "distill": (TrainJob, ["role=student"]), "cache": (CacheJob, []), "eval": (EvalJob, []),
         "sweep": (SweepConfig, []), "drift": (DriftConfig, []), "daily": (DailyJob, [])}


def load_block(where: str, text: str, tmp: Path) -> int:
    """Load one yaml block as every kind its marker names; returns how many loads it took (0: exempt)."""
    m = MARKER.match(text.splitlines()[0] if text else "")
    assert m, f"{where}: a yaml block starts with `# job: KIND` ({', '.join([*KINDS, 'schema', 'none'])})"
    kinds = [k.strip() for k in m.group(1).split(",")]
    if kinds == ["none"]:
        assert m.group(2).strip(), f"{where}: `# job: none` needs the reason the block is not checked"
        return 0
    path = tmp / "block.yaml"
    path.write_text(text + "\n")
    for kind in kinds:
        if kind == "schema":
            load_schema(path, stats=False)
            continue
        assert kind in KINDS, f"{where}: unknown job kind {kind!r}"
        cls, overrides = KINDS[kind]
        job = load(cls, path, overrides)
        if kind == "distill":
            objectives.require_distilling(job.objective, where)
    return len(kinds)


@pytest.mark.unit
@pytest.mark.parametrize("where, text", yaml_blocks(), ids=lambda v: v if v.endswith(tuple("0123456789")) else None)
def test_every_yaml_block_loads_as_its_job(where, text, tmp_path):
    load_block(where, text, tmp_path)


@pytest.mark.unit
def test_the_docs_show_commands_and_jobs_to_check():
    """Guards the two tests above against passing over nothing (a changed fence, a moved page)."""
    shown = commands()
    assert sum(argv[0] == "distkd" for _, argv in shown) >= 40
    assert {"make"} <= {argv[0] for _, argv in shown}
    assert len(yaml_blocks()) >= 6
    readme = [argv for where, argv in shown if where.startswith("README.md")]
    assert ["make", "demo"] in readme and ["make", "test"] in readme


@pytest.mark.unit
def test_a_renamed_flag_or_field_fails(tmp_path):
    with pytest.raises(AssertionError, match="does not parse"):
        check("x", ["distkd", "cache", "build", "--ray-adress", "HOST:6379"])
    with pytest.raises(Exception, match="unknown field"):
        check("x", ["distkd", "distill", "--config", "jobs/demo/distill.yaml", "train.sead=1"])
    with pytest.raises(AssertionError, match="no Makefile target"):
        check("x", ["make", "bench-everything"])
    with pytest.raises(Exception, match="unknown field"):
        load_block("x", "# job: cache\nteacher: runs/t/export\nworkres: 2", tmp_path)


@pytest.mark.unit
def test_the_partition_block_loads_as_written_with_unquoted_dates(tmp_path):
    """YAML reads `start: 2026-11-02` as a date; the partition bounds take it as its text."""
    (where, text), = [(w, t) for w, t in yaml_blocks() if "partitions:" in t and "start: 2026-" in t]
    assert "'2026" not in text and '"2026' not in text, "the block shows the dates unquoted, as users write them"
    path = tmp_path / "teacher.yaml"
    path.write_text(text)
    for cls in (TrainJob, CacheJob, EvalJob):
        job = load(cls, path)
        assert (job.partitions["train"].start, job.partitions["train"].end) == ("2026-11-02", "2026-11-29"), where
    job = load(TrainJob, None, ["partitions.valid.start=2026-11-30", "partitions.valid.end=2026-11-30"])
    assert job.partitions["valid"].holds("2026-11-30") and not job.partitions["valid"].holds("2026-12-01")


@pytest.mark.unit
def test_jobs_md_is_what_the_code_renders():
    assert (ROOT / "docs" / "jobs.md").read_text() == render(), "docs/jobs.md is stale: run `make docs`"


@pytest.mark.unit
def test_every_relative_link_names_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: link to missing {target}"
