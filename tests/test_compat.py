"""The supported stacks: distkd.compat's table against the pins scripts/install.sh installs,
and the installed stack being one of them."""

from __future__ import annotations

import re
import subprocess

import pytest

from distkd import compat
from tests.support import ROOT

STACKS = ROOT / "scripts" / "stacks"


def pins(name: str) -> dict[str, str]:
    lines = (STACKS / f"{name}.txt").read_text().splitlines()
    return dict(re.match(r"([\w-]+)==(\S+)$", line).groups() for line in lines if "==" in line)


def line(version: str) -> str:
    return ".".join(version.split(".")[:2])


@pytest.mark.unit
def test_table_matches_the_stack_files():
    assert sorted(p.stem for p in STACKS.glob("*.txt")) == sorted(compat.STACKS)
    for name, lines in compat.STACKS.items():
        p = pins(name)
        assert (line(p["torch"]), line(p["fbgemm-gpu-cpu"]), line(p["torchrec"])) == lines, name
        assert name == f"torch{line(p['torch'])}"
    assert compat.DEFAULT == "torch2.13"


@pytest.mark.unit
def test_installed_stack_is_supported():
    assert compat.stack() in compat.STACKS, compat.versions()


@pytest.mark.integration
def test_install_refuses_an_unknown_stack():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True,
                         timeout=60, env={"STACK": "torch0.1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "unknown STACK=torch0.1" in out.stderr and "torch2.11 torch2.13" in out.stderr
