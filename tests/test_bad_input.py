"""Bad input, one case each, through the command line's own entry (`distkd.cli.main`, in this
process to keep the suite small; the cache it damages was built by the real CLI in its own
process, tests/conftest.py `kd_world`): exit 2, one line naming the file, field or shard, and
nothing half-written. Cases already covered elsewhere are not repeated here (README,
Reliability): bad logs (test_validate, test_types), a checkpoint of another run
(test_checkpoint), an unknown train key or a mistyped override (test_trainer, test_cluster).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from distkd.bench.faults import CASES, readme_table
from distkd.cli import main as cli_main
from tests.support import ROOT


def run(capsys, *args: str) -> tuple[int, str]:
    rc = cli_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (hidden lock files aside) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in (".lock", ".readers")}


@pytest.fixture
def cache_copy(kd_world, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(kd_world["cache"], out, ignore=shutil.ignore_patterns(".lock", ".readers"))
    return out


def edit_manifest(cache: Path, fn) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    fn(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def rename_shard(m: dict, old: str, new: str) -> None:
    m["shards"][new] = m["shards"].pop(old)
    m["splits"]["train"] = [new if r == old else r for r in m["splits"]["train"]]


def distill_args(logs, cache, out) -> list[str]:
    return ["distill", "--nproc", "1", f"logs={logs}", f"out={out}", "tensorboard=false",
            f"objective={{kind: ctr_kd, teachers: [{{cache: {cache}}}]}}"]


# -- caches -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_building_into_a_cache_of_another_teacher_is_refused(kd_world, cache_copy, tmp_path, capsys):
    before = tree(cache_copy)
    rc, err = run(capsys, "cache", "build", "--teacher", kd_world["teachers"][1][0], "--logs", kd_world["logs"],
                  "--out", cache_copy, "--splits", "train")
    assert rc == 2 and f"{cache_copy}: existing cache holds logits of teacher {kd_world['teachers'][0][1][:12]}" in err
    assert "build into a new cache directory" in err, err
    assert tree(cache_copy) == before  # not a byte changed, the manifest included


@pytest.mark.integration
def test_a_cache_of_other_logs_is_refused(kd_world, tmp_path, capsys):
    """Other logs with the same schema (another seed): each shard is named as not the one cached."""
    from distkd.data.synth import generate

    other = tmp_path / "other-logs"
    generate(other, rows=4_000, shards=4, seed=7, row_group_rows=512, preset="small")
    rc, err = run(capsys, *distill_args(other, kd_world["cache"], tmp_path / "kd"))
    assert rc == 2, err
    assert f"log shard {other / 'train' / 'part-00000.parquet'} changed since its logits were cached" in err, err
    assert not (tmp_path / "kd").exists()
    rc, err = run(capsys, "cache", "verify", "--cache", kd_world["cache"], "--logs", other)
    assert rc == 2, err
    for i in range(4):  # every shard named, not only the first
        assert f"log shard {other / 'train' / f'part-0000{i}.parquet'} changed since its logits were cached" in err, err


def _truncate(cache: Path) -> str:
    f = cache / "train" / "part-00001.parquet"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-300])
    return f"{f}: {size - 300} bytes, manifest.json committed {size}"


def _swap(cache: Path) -> str:
    a, b = cache / "train" / "part-00000.parquet", cache / "train" / "part-00001.parquet"
    sa, sb = a.stat().st_size, b.stat().st_size
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    assert sa != sb  # else the footer checksum check below names it (test_cache covers misalignment)
    return f"{a}: {sb} bytes, manifest.json committed {sa}"


def _tamper_sha(cache: Path) -> str:
    edit_manifest(cache, lambda m: m["shards"]["train/part-00002.parquet"]["output"].update(sha256="0" * 64))
    return f"{cache / 'train' / 'part-00002.parquet'}: sha256 "


@pytest.mark.integration
@pytest.mark.parametrize("damage", [_truncate, _swap, _tamper_sha], ids=["truncated", "swapped", "sha256"])
def test_a_damaged_cache_is_refused_naming_the_file(kd_world, cache_copy, tmp_path, capsys, damage):
    expect = damage(cache_copy)
    rc, err = run(capsys, "cache", "verify", "--cache", cache_copy, "--logs", kd_world["logs"])
    assert rc == 2 and expect in err, err
    if damage is _tamper_sha:  # a distillation checks sizes and footers; the sha256 is verify's
        assert "is not the committed 000000000000" in err, err
        return
    rc, err = run(capsys, *distill_args(kd_world["logs"], cache_copy, tmp_path / "kd"))
    assert rc == 2 and expect in err, err
    assert not (tmp_path / "kd").exists()


@pytest.mark.integration
@pytest.mark.parametrize("path", ["../outside.parquet", "train/../../outside.parquet", "/tmp/outside.parquet",
                                  "train//part.parquet"])
def test_manifest_paths_outside_the_cache_are_refused(kd_world, cache_copy, tmp_path, capsys, path):
    """A manifest naming a shard outside its directory is refused whole; before the check, a build
    over it deleted that outside file as the logits of a log shard that is gone."""
    victim = tmp_path / "outside.parquet" if not path.startswith("/") else Path(path)
    victim.write_bytes(b"someone else's file")
    try:
        edit_manifest(cache_copy, lambda m: rename_shard(m, "train/part-00003.parquet", path))
        for args in (["cache", "verify", "--cache", cache_copy, "--logs", kd_world["logs"]],
                     ["cache", "build", "--teacher", kd_world["teachers"][0][0], "--logs", kd_world["logs"],
                      "--out", cache_copy, "--splits", "train"],
                     distill_args(kd_world["logs"], cache_copy, tmp_path / "kd")):
            rc, err = run(capsys, *args)
            assert rc == 2, err
            assert f"{cache_copy / 'manifest.json'}: shard path {path!r} is not a relative path inside the cache" in err
            assert victim.read_bytes() == b"someone else's file"
        assert not (tmp_path / "kd").exists()
    finally:
        if path.startswith("/"):
            victim.unlink()


@pytest.mark.integration
def test_a_cache_file_symlinked_out_of_the_cache_is_refused(kd_world, cache_copy, tmp_path, capsys):
    """The same bytes, but through a symlink out of the cache directory: refused, never read."""
    f = cache_copy / "train" / "part-00001.parquet"
    outside = tmp_path / "elsewhere.parquet"
    shutil.move(f, outside)
    f.symlink_to(outside)
    expect = f"{f}: resolves to {outside}, outside the cache directory {cache_copy}"
    rc, err = run(capsys, "cache", "verify", "--cache", cache_copy, "--logs", kd_world["logs"])
    assert rc == 2 and expect in err, err
    rc, err = run(capsys, *distill_args(kd_world["logs"], cache_copy, tmp_path / "kd"))
    assert rc == 2 and expect in err, err
    assert not (tmp_path / "kd").exists()


# -- job files and sizes ----------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("stage", [["cache", "build"], ["teacher", "train"], ["distill"]], ids=lambda s: s[0])
@pytest.mark.parametrize("text,expect", [
    ("logs: [unclosed\nout: x\n", "not valid YAML: while parsing a flow sequence"),
    ("logs: a\n\tout: b\n", "found character '\\t' that cannot start any token"),
    ("- logs\n- out\n", "top level must be a mapping"),
], ids=["unclosed", "tab", "list"])
def test_a_malformed_job_file_is_refused(tmp_path, capsys, stage, text, expect):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    rc, err = run(capsys, *stage, "--config", job)
    assert rc == 2 and f"{job}: " in err and expect in err, err


@pytest.mark.integration
@pytest.mark.parametrize("text,expect", [
    ("workrs: 2\n", "unknown field(s) ['workrs']; known: ['batch_size'"),
    ("workers: two\n", "workers: expected an integer, got 'two'"),
    ("splits: train\n", "splits: expected a list"),
], ids=["unknown-key", "wrong-type-int", "wrong-type-list"])
def test_a_cache_job_with_a_bad_field_is_refused(kd_world, tmp_path, capsys, text, expect):
    job = tmp_path / "cache.yaml"
    job.write_text(f"teacher: {kd_world['teachers'][0][0]}\nlogs: {kd_world['logs']}\nout: {tmp_path / 'c'}\n{text}")
    rc, err = run(capsys, "cache", "build", "--config", job)
    assert rc == 2 and str(job) in err and expect in err, err
    assert not (tmp_path / "c").exists()


@pytest.mark.integration
@pytest.mark.parametrize("args,expect", [
    (["data", "synth", "--rows", "0", "--shards", "2"], "--rows 0 is too few for 2 shards"),
    (["data", "synth", "--rows", "1000", "--shards", "0"], "--shards: must be >= 1, got 0"),
    (["data", "synth", "--rows", "1000", "--shards", "-2"], "--shards: must be >= 1, got -2"),
    (["data", "synth", "--rows", "1000", "--row-group-rows", "0"], "--row-group-rows: must be >= 1, got 0"),
    (["data", "synth", "--rows", "1000", "--max-cardinality", "0"], "--max-cardinality: must be >= 2, got 0"),
    (["cache", "build", "--batch-size", "0"], "batch_size: must be >= 1, got 0"),
    (["cache", "build", "--workers", "-1"], "workers: must be >= 1"),
    (["cache", "build", "max_attempts=0"], "max_attempts: must be >= 1, got 0"),
    (["teacher", "train", "train.batch_size=0"], "train: batch_size: must be >= 1, got 0"),
    (["teacher", "train", "train.epochs=-1"], "train: epochs: must be >= 1, got -1"),
    (["teacher", "train", "model.embedding_dim=0"], "model: layer sizes must be positive"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_zero_or_negative_sizes_are_refused(kd_world, tmp_path, capsys, args, expect):
    out = tmp_path / "out"
    where = {"data": ["--out", out, "--preset", "small", "--workers", "1"],
             "cache": ["--teacher", kd_world["teachers"][0][0], "--logs", kd_world["logs"], "--out", out],
             "teacher": [f"logs={kd_world['logs']}", f"out={out}", "--nproc", "1"]}[args[0]]
    rc, err = run(capsys, *args, *where)
    assert rc == 2 and expect in err, err
    assert not out.exists()


# -- exports ----------------------------------------------------------------------------------

def _other_weights(export: Path, other: Path) -> str:
    shutil.copy(other / "model.pt", export / "model.pt")
    return f"{export}: model.pt has sha256 "


def _escaping_name(export: Path, other: Path) -> str:
    meta = json.loads((export / "export.json").read_text())
    meta["file"] = f"../{other.name}/model.pt"
    (export / "export.json").write_text(json.dumps(meta))
    return f"{export / 'export.json'}: file: '../{other.name}/model.pt' must be the name of a file in {export}"


@pytest.mark.integration
@pytest.mark.parametrize("damage", [_other_weights, _escaping_name], ids=["other-weights", "path-out-of-export"])
def test_an_export_whose_file_is_not_the_one_its_metadata_names(kd_world, tmp_path, capsys, damage):
    (t0, _), (t1, _) = kd_world["teachers"]
    export = tmp_path / "export"
    shutil.copytree(t0, export)
    shutil.copytree(t1, tmp_path / t1.name)
    expect = damage(export, tmp_path / t1.name)
    rc, err = run(capsys, "cache", "build", "--teacher", export, "--logs", kd_world["logs"], "--out", tmp_path / "c")
    assert rc == 2 and expect in err, err
    assert not (tmp_path / "c").exists()
    rc, err = run(capsys, "export", export, "--out", tmp_path / "serve", "--format", "torchscript")
    assert rc == 2 and expect.split(": ", 1)[0] in err, err
    assert not (tmp_path / "serve").exists()


# -- output locations -------------------------------------------------------------------------

@pytest.fixture(params=["under-a-file", "read-only-mount"])
def unwritable(request, tmp_path):
    """A folder that cannot be created or written: under a regular file (tests run as root, so
    permissions would not stop a write), or on a read-only tmpfs (skipped where mount is refused)."""
    if request.param == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        yield tmp_path / "a-file" / "out", "Not a directory (a parent of it is a file)"
        return
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt / "out", "Read-only file system"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["synth", "cache", "train"])
def test_an_output_location_that_cannot_be_written(kd_world, capsys, unwritable, stage):
    out, why = unwritable
    args = {"synth": ["data", "synth", "--out", out, "--rows", "1000", "--preset", "small", "--workers", "1"],
            "cache": ["cache", "build", "--teacher", kd_world["teachers"][0][0], "--logs", kd_world["logs"],
                      "--out", out],
            "train": ["teacher", "train", "--nproc", "1", f"logs={kd_world['logs']}", f"out={out}"]}[stage]
    rc, err = run(capsys, *args)
    assert rc == 2 and f"{out}: cannot write the " in err and why in err, err


@pytest.mark.unit
def test_the_readme_reliability_table_is_bench_faults_table():
    """The Reliability table, wherever the docs hold it (README.md, or a page under docs/), is
    the one `make bench-faults` prints, and every row's test exists."""
    table = readme_table()
    header = table.splitlines()[0]
    pages = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
             if p.is_file() and header in p.read_text()]
    assert pages, f"no page holds the Reliability table ({header})"
    for page in pages:  # every copy current, none stale
        assert table in page.read_text(), page
    for *_, node in CASES:
        path, name = node.split("::")
        defined = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in defined, node
