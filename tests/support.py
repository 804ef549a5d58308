"""Helpers shared by the tests (fixtures are tests/conftest.py's): a small model, jobs, the real
CLI in a subprocess, a teacher export, model comparison, `distkd submit` in this process, the
sockets a process group listens on. No test module imports another: what two share lives here."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import torch
import yaml

from distkd.cli import main as cli_main
from distkd.config import load
from distkd.launch import run_job
from distkd.models.export import write_export
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.train.job import TrainJob

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
BUCKET = "distkd-test"  # the `s3` fixture's
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
TEACHER_CFG = dict(embedding_dim=16, dense_arch=[16], cross_layers=1, cross_rank=8, deep_arch=[32, 16])
SMALL_MODEL = [
    "model.embedding_dim=16", "model.cross_layers=1", "model.cross_rank=8",
    "model.deep_arch=[64,32]", "model.dense_arch=[16]",
]


def job_for(logs: Path, out: Path, *overrides: str) -> TrainJob:
    return load(TrainJob, None, [f"logs={logs}", f"out={out}", "tensorboard=false", "train.batch_size=512",
                                 "optim.dense_lr=0.01", "optim.embedding_lr=0.2", *SMALL_MODEL, *overrides])


def train(job: TrainJob, nproc: int) -> dict:
    """The job on `nproc` local ranks through the same entry as the CLI; rank 0's summary."""
    job.nproc = nproc
    return run_job(job)


def cli(*args: str, env_extra: dict | None = None, module: str = "distkd.cli", cwd=None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (the real CLI, or a fault wrapper around it) from the repository root."""
    env = {**os.environ, "DISTKD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


def torchrun(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run ARGS` (torchrun) with the test environment."""
    return cli(*args, module="torch.distributed.run", cwd=cwd, timeout=timeout)


# -- teachers and models --------------------------------------------------------------------

def make_teacher(out: Path, schema, seed: int) -> str:
    """An untrained teacher export (TEACHER_CFG, seeded) at `out`; its sha256."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**TEACHER_CFG)
    model = RankingModel(schema, cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    return write_export(out, "teacher", schema, cfg, model.state_dict())["sha256"]


def export_weights(out: Path) -> dict[str, torch.Tensor]:
    """The state dict of the export a training run wrote under `out`."""
    return torch.load(out / "export" / "model.pt", weights_only=True)["state_dict"]


def assert_same_model(a: Path, b: Path) -> None:
    """The exports of runs `a` and `b` hold the same tensors, to the bit."""
    wa, wb = export_weights(a), export_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


# -- cluster definitions and `distkd submit` ------------------------------------------------

def docs(path: Path) -> list[dict]:
    """The YAML documents of `path`, empty ones left out."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(node):
    """Every node of a parsed YAML tree, depth first."""
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def submit(*argv: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m distkd.cli submit ARGV` in this process (cli.main), as a CompletedProcess;
    the environment and working directory are restored after."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.update(env or {})
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main(["submit", *argv])
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["distkd", "submit", *argv], rc, out.getvalue(), err.getvalue())


# -- S3 and sockets -------------------------------------------------------------------------

def s3_keys(prefix: str) -> list[str]:
    """Keys of the objects under BUCKET/prefix, sorted (the `s3` fixture's server)."""
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + 1:] for i in infos if i.type == pafs.FileType.File)


def listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket these processes listen on (from /proc)."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in owner:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            addr = socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, raw)
            found.append((addr, int(hexport, 16), owner[f[9]]))
    return found


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def distkd_log():
    """The lines distkd logs (INFO and up) in this process while the block runs: a handler on the
    `distkd` logger itself, so it sees them whether or not distkd.log.setup() ran here."""
    root, handler = logging.getLogger("distkd"), _Lines()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
