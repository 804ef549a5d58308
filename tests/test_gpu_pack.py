"""The GPU run (docs/gpu.md) without network or GPU: scripts/gpu_split.sh cuts a file into parts
with a MANIFEST, scripts/gpu_part.sh puts them back in order, checking each part's sha256 and then
the whole file's, and refuses parts out of order or altered (a small generated file stands in for
the 465 MB fbgemm-gpu wheel); distkd.bench.gpu records both figures, here on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PART_BYTES = 300_000

pytestmark = pytest.mark.integration


def sh(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.fixture
def packed(tmp_path):
    """A 1,000,000-byte 'wheel' split into 4 parts: (the file, the parts folder, DEST)."""
    wheel = tmp_path / "fbgemm_gpu-0.0.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(os.urandom(1_000_000))
    parts = tmp_path / "parts"
    out = sh("gpu_split.sh", str(wheel), str(parts), env={"PART_BYTES": str(PART_BYTES)})
    assert out.returncode == 0, out.stderr
    return wheel, parts, tmp_path / "dest"


def manifest(parts: Path) -> list[list[str]]:
    return [line.split() for line in (parts / "MANIFEST").read_text().splitlines() if not line.startswith("#")]


def test_split_writes_parts_and_manifest(packed):
    wheel, parts, _ = packed
    rows = manifest(parts)
    assert rows[0] == ["file", wheel.name, "1000000", hashlib.sha256(wheel.read_bytes()).hexdigest()]
    assert [r[1:4] for r in rows[1:]] == [["0", "0", "300000"], ["1", "300000", "300000"],
                                          ["2", "600000", "300000"], ["3", "900000", "100000"]]
    for r in rows[1:]:
        assert hashlib.sha256((parts / r[5]).read_bytes()).hexdigest() == r[4]


def test_parts_in_order_reassemble_the_file(packed):
    wheel, parts, dest = packed
    for n in range(4):
        out = sh("gpu_part.sh", str(n), str(parts), env={"DEST": str(dest)})
        assert out.returncode == 0, out.stderr
    assert "complete" in out.stdout
    assert (dest / wheel.name).read_bytes() == wheel.read_bytes()
    assert not (dest / f"{wheel.name}.partial").exists()
    again = sh("gpu_part.sh", "3", str(parts), env={"DEST": str(dest)})
    assert again.returncode == 0 and "already complete" in again.stdout


def test_a_part_repeated_is_appended_once(packed):
    wheel, parts, dest = packed
    for n in (0, 1, 1, 2, 3):
        out = sh("gpu_part.sh", str(n), str(parts), env={"DEST": str(dest)})
        assert out.returncode == 0, out.stderr
    assert (dest / wheel.name).read_bytes() == wheel.read_bytes()


def test_a_part_out_of_order_is_refused(packed):
    _, parts, dest = packed
    out = sh("gpu_part.sh", "1", str(parts), env={"DEST": str(dest)})  # a fresh machine: no part 0
    assert out.returncode == 1 and "start again at part 0" in out.stderr
    assert sh("gpu_part.sh", "0", str(parts), env={"DEST": str(dest)}).returncode == 0
    out = sh("gpu_part.sh", "2", str(parts), env={"DEST": str(dest)})  # part 1 skipped
    assert out.returncode == 1 and "start again at part 0" in out.stderr


def test_an_altered_part_is_refused(packed):
    _, parts, dest = packed
    part = parts / manifest(parts)[2][5]
    data = bytearray(part.read_bytes())
    data[123] ^= 1
    part.write_bytes(bytes(data))
    assert sh("gpu_part.sh", "0", str(parts), env={"DEST": str(dest)}).returncode == 0
    out = sh("gpu_part.sh", "1", str(parts), env={"DEST": str(dest)})
    assert out.returncode == 1 and "sha256 differs" in out.stderr


def test_run_refuses_a_wheel_not_reassembled(packed, tmp_path):
    _, parts, dest = packed
    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / "MANIFEST").write_text((parts / "MANIFEST").read_text())
    out = sh("gpu_run.sh", str(carry), env={"DEST": str(dest), "SITE": str(tmp_path / "site")})
    assert out.returncode == 1 and "run scripts/gpu_part.sh for every part first" in out.stderr


def test_bench_records_the_step_alone_and_end_to_end(kd_world, tmp_path):
    out = tmp_path / "bench"
    r = cli("--logs", str(kd_world["logs"]), "--cache", str(kd_world["cache"]), "--out", str(out), "--batch", "256",
            "--steps", "3", "--warmup", "2", "--rounds", "2", module="distkd.bench.gpu", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "gpu_bench.json").read_text())
    assert result["device"] == "CPU" and result["backend"] == "gloo" and result["batch"] == 256
    assert result["stack"]["torchrec"] and result["stack"]["fbgemm_gpu"]
    for name in ("step_alone", "end_to_end"):
        figure = result[name]
        assert len(figure["rounds"]) == 2 and figure["steps"] == 6 and figure["rows"] == 6 * 256
        assert figure["samples_per_s"] > 0
    assert "step alone: " in r.stdout and "end to end: " in r.stdout and "samples/s on CPU" in r.stdout
