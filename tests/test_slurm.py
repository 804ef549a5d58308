"""The Slurm path for real: a one-node Slurm on this machine (scripts/slurm_local.sh: real munged,
slurmctld and slurmd), the distill stage rendered by `distkd submit distill --to slurm` and run by
the real `sbatch` (cluster/slurm/train.sbatch: srun, then torchrun with one gloo rank on the CPU
node). Skipped, with the reason, only where this machine cannot host it: not root, or Slurm not
installed and no apt-get to install it. Anywhere else a script that fails to install or start
Slurm fails the test (a broken script must not pass as a skip)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import distkd

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
# What scripts/slurm_local.sh's install step checks for before it reaches for apt-get
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "munged")
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A started one-node Slurm: the environment its commands need (SLURM_CONF). Stopped after."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs the jobs), and this is not root")
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing and shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found) and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")

    def run(action: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), action, str(state)], capture_output=True, text=True,
                              timeout=timeout)

    try:
        up = run("start", 900)  # the first start installs slurm-wlm and munge with apt-get
    except subprocess.TimeoutExpired as e:
        run("stop", 300)
        pytest.fail(f"scripts/slurm_local.sh start did not finish in {e.timeout:.0f}s")
    if up.returncode != 0:  # root, and Slurm installed or installable: the script itself failed
        run("stop", 300)
        pytest.fail(f"scripts/slurm_local.sh start exited {up.returncode}:\n{up.stdout[-1500:]}{up.stderr[-3000:]}")
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        down = run("stop", 300)
        assert down.returncode == 0, down.stderr


def job_info(job_id: str, env: dict) -> dict:
    """`scontrol show job -o ID` as a dict (JobState, ExitCode, StdOut, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def test_distill_through_sbatch(slurm, small_logs, kd_cache, tmp_path):
    cache_dir, sha = kd_cache
    out = tmp_path / "kd"
    job = tmp_path / "distill.yaml"
    job.write_text(yaml.safe_dump({
        "logs": str(small_logs), "out": str(out), "role": "student", "tensorboard": False,
        "model": {"embedding_dim": 8, "dense_arch": [16], "cross_layers": 0, "deep_arch": [32, 16]},
        "optim": {"embedding_lr": 0.2, "dense_lr": 0.01},
        "train": {"batch_size": 512, "max_steps": 12, "checkpoint_every": 5, "seed": 0},
        "objective": {"kind": "ctr_kd", "teachers": [{"cache": str(cache_dir), "sha256": sha}],
                      "losses": {"hard": 1.0, "mse": 1.0}},
    }))
    # The job sees this environment (sbatch --export=ALL): the venv's bin first, as an activated
    # venv would have it, so the template's `torchrun` is this interpreter's; and this checkout's package.
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **slurm, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(distkd.__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    assert shutil.which("torchrun", path=env["PATH"]) == str(Path(venv_bin) / "torchrun"), "no torchrun next to python"

    submit = subprocess.run([sys.executable, "-m", "distkd.cli", "submit", "distill", "--to", "slurm", "--config",
                             str(job), "--nodes", "1", "--gpus-per-node", "0"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    assert "run: sbatch runs/submit/distill.sbatch" in submit.stdout, submit.stdout
    # The template asks for 16 CPUs a node; this node has fewer, so ask for what it has on the
    # command line (which overrides #SBATCH lines), and bound the job's time on Slurm's side too.
    cpus = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%c"], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()
    sbatch = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={cpus}", f"--time={JOB_TIMEOUT_S // 60}",
                             "runs/submit/distill.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert sbatch.returncode == 0, sbatch.stderr
    job_id = sbatch.stdout.strip().split(";")[0]

    deadline = time.monotonic() + JOB_TIMEOUT_S + 30
    info = job_info(job_id, env)
    while info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env, timeout=30)
            break
        time.sleep(1)
        info = job_info(job_id, env)
    log_path = Path(info.get("StdOut", ""))
    log = log_path.read_text() if log_path.is_file() else f"(no job output at {log_path})"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"job {job_id}: {info.get('JobState')} exit {info.get('ExitCode')} reason {info.get('Reason')}\n{log[-4000:]}"

    assert log_path == tmp_path / "runs" / "slurm" / f"distkd-distill-{job_id}.out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12, log[-4000:]
    assert (out / "export" / "model.pt").is_file() and (out / "export" / "export.json").is_file()
    assert "export: " in log  # rank 0 ran under the job and wrote its log there
