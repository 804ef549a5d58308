"""cluster/ definitions and `distkd submit`: every file parses and carries its required fields,
nothing exposes the Ray dashboard beyond the cluster, and what `submit` renders matches the job.
Fast: no network, no cluster."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
DDP_JOBS = {"teacher": "jobs/demo/teacher.yaml", "student": "jobs/demo/student.yaml",
            "distill": "jobs/demo/distill.yaml"}
IMAGE = "registry.test/distkd:ci-123"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def submit(*argv: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m distkd.cli submit ARGV` in this process (cli.main), as a CompletedProcess."""
    from distkd import cli

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.update(env or {})
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(["submit", *argv])
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["distkd", "submit", *argv], rc, out.getvalue(), err.getvalue())


def walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_expected_files_exist():
    for rel in ("ray/cluster-aws.yaml", "ray/cluster-onprem.yaml", "kuberay/raycluster.yaml",
                "kuberay/rayjob-cache.yaml", "slurm/train.sbatch", "k8s/pytorchjob.yaml",
                "docker/Dockerfile.cpu", "docker/Dockerfile.gpu", "README.md"):
        assert (CLUSTER / rel).is_file(), rel


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    assert docs(path), f"{path} is empty"


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-onprem.yaml"])
def test_ray_launcher(name):
    (cfg,) = docs(CLUSTER / "ray" / name)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == ("aws" if "aws" in name else "local")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    if cfg["provider"]["type"] == "local":
        assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head


def test_kuberay_manifests():
    (rc,) = docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert rc["apiVersion"].startswith("ray.io/") and rc["kind"] == "RayCluster"
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert rc["spec"]["workerGroupSpecs"]
    (job,) = docs(CLUSTER / "kuberay" / "rayjob-cache.yaml")
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    assert "spec" in job and "rayClusterSpec" in job["spec"] and "entrypoint" in job["spec"]
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    # the template's default, as rendered from the demo job file
    out = submit("cache", "--to", "k8s", "--config", "jobs/demo/cache.yaml", "--dry-run")
    assert out.returncode == 0, out.stderr
    (job,) = yaml.safe_load_all(out.stdout)
    assert job["spec"]["entrypoint"] == "python -m distkd.cli cache build --config jobs/demo/cache.yaml"


def test_pytorchjob_template():
    (job,) = docs(CLUSTER / "k8s" / "pytorchjob.yaml")
    assert job["apiVersion"].startswith("kubeflow.org/") and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    text = (CLUSTER / "k8s" / "pytorchjob.yaml").read_text()
    assert "distkd" in text


def test_nothing_exposed_beyond_the_cluster():
    for path in YAMLS:
        for d in docs(path):
            for node in walk(d):
                if isinstance(node, dict):
                    assert node.get("serviceType") not in ("LoadBalancer", "NodePort"), path
                    if d.get("kind") == "Service":
                        assert node.get("type") not in ("LoadBalancer", "NodePort"), path
                    assert node.get("kind") != "Ingress", path
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"dashboard[-_]host[\"'=:\s]*0\.0\.0\.0", text), path
            assert not re.search(r"(?i)(type|serviceType)[\"']?\s*[:=]\s*[\"']?(LoadBalancer|NodePort)", text), path


def test_sbatch_template():
    text = (CLUSTER / "slurm" / "train.sbatch").read_text()
    assert text.startswith("#!/bin/bash")
    assert re.search(r"^#SBATCH --nodes", text, re.M)
    (line,) = [ln for ln in text.replace("\\\n", " ").splitlines() if "torchrun " in ln and not ln.startswith("#")]
    assert "--rdzv-backend c10d" in line and "--nnodes \"$SLURM_NNODES\"" in line and "-m distkd.cli" in line
    # every #SBATCH directive comes before the first command (sbatch stops reading them there)
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_pins_the_stack(variant):
    text = (CLUSTER / "docker" / f"Dockerfile.{variant}").read_text()
    assert text.lstrip("# \n").startswith("distkd") or "FROM " in text
    torch_at = text.index("torch==2.13.0")
    torchrec = re.search(r"pip install --no-deps torchrec==1\.8\.0", text)
    assert torchrec and torchrec.start() > torch_at
    package = re.search(r"pip install --no-deps -e \.", text)
    assert package and package.start() > torchrec.start()
    if variant == "cpu":
        assert "whl/cpu" in text and "requirements.txt" in text  # fbgemm-gpu-cpu 1.8.0 comes from it
    else:
        assert "fbgemm-gpu==1.8.0" in text and "cu128" in text and "fbgemm-gpu-cpu" in text  # the CPU pair filtered out


@pytest.mark.parametrize("stage", sorted(DDP_JOBS))
@pytest.mark.parametrize("to", ["slurm", "k8s"])
def test_submit_renders_ddp_stages(stage, to):
    config = DDP_JOBS[stage]
    out = submit(stage, "--to", to, "--config", config, "--dry-run", "--nodes", "3", "--gpus-per-node", "4",
                 "--image", IMAGE, "train.seed=7", "train.epochs=2")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "{" + "name}" not in text and "{image}" not in text and "{command}" not in text
    head = {"teacher": ["teacher", "train"], "student": ["student", "train"], "distill": ["distill"]}[stage]
    expected = head + ["--config", config, "train.seed=7", "train.epochs=2"]
    if to == "k8s":
        (job,) = yaml.safe_load_all(text)
        assert job["kind"] == "PyTorchJob" and job["metadata"]["name"] == f"distkd-{stage}"
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
        assert job["spec"]["nprocPerNode"] == "4"
        for role in ("Master", "Worker"):
            (c,) = specs[role]["template"]["spec"]["containers"]
            assert c["image"] == IMAGE
            assert c["command"][:4] == ["torchrun", "--nproc-per-node", "4", "-m"]
            assert c["command"][4:] == ["distkd.cli", *expected]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    else:
        assert "#SBATCH --nodes=3" in text and "#SBATCH --gpus-per-node=4" in text
        assert "NPROC_PER_NODE=4" in text and "--rdzv-backend c10d" in text
        (arr,) = re.findall(r"^STAGE_ARGS=\((.*)\)$", text, re.M)
        assert shlex.split(arr) == expected
        assert f"--config {config}" in text
        # the rendered script is valid bash
        check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_submit_writes_file_and_prints_command(tmp_path):
    distill, cache = str(ROOT / "jobs/demo/distill.yaml"), str(ROOT / "jobs/demo/cache.yaml")
    out = submit("distill", "--to", "slurm", "--config", distill, "--gpus-per-node", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sbatch runs/submit/distill.sbatch" in out.stdout
    text = (tmp_path / "runs" / "submit" / "distill.sbatch").read_text()
    assert "#SBATCH --gpus-per-node" not in text and "NPROC_PER_NODE=1" in text
    assert f"--config {distill}" in text
    out = submit("cache", "--to", "k8s", "--config", cache, "--image", IMAGE, "--nodes", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "kubectl apply -f runs/submit/cache.yaml" in out.stdout
    (job,) = docs(tmp_path / "runs" / "submit" / "cache.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    images = {c["image"] for n in walk(job) if isinstance(n, dict) and "containers" in n for c in n["containers"]}
    assert images == {IMAGE}


def test_submit_ray_dry_run_prints_entrypoint():
    out = submit("cache", "--to", "ray", "--config", "jobs/demo/cache.yaml", "--dry-run", "batch_size=4096",
                 env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert out.returncode == 0, out.stderr
    assert "entrypoint: python -m distkd.cli cache build --config jobs/demo/cache.yaml batch_size=4096" in out.stdout
    assert "address: http://127.0.0.1:8265" in out.stdout
    out = submit("data", "--to", "ray", "--config", "jobs/demo/data.yaml", "--dry-run",
                 "--ray-address", "http://10.0.0.5:8265", "rows=5000")
    assert out.returncode == 0, out.stderr
    assert "address: http://10.0.0.5:8265" in out.stdout
    assert "python -m distkd.cli data synth --out runs/demo/logs --rows 5000" in out.stdout


def test_submit_missing_job_file_exits_2():
    out = submit("distill", "--to", "k8s", "--config", "jobs/demo/no-such-job.yaml", "--dry-run")
    assert out.returncode == 2
    assert "jobs/demo/no-such-job.yaml" in out.stderr


def test_submit_ray_without_address_exits_2():
    out = submit("cache", "--to", "ray", "--config", "jobs/demo/cache.yaml")
    assert out.returncode == 2
    assert "RAY_ADDRESS" in out.stderr


def test_submit_bad_override_exits_2():
    out = submit("teacher", "--to", "slurm", "--config", "jobs/demo/teacher.yaml", "--dry-run", "oops")
    assert out.returncode == 2 and "key=value" in out.stderr


def test_submit_through_python_m_distkd_cli():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "distkd.cli", "submit", "teacher", "--to", "ray", "--config",
                          "jobs/demo/teacher.yaml", "--dry-run", "--ray-address", "http://127.0.0.1:8265"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "entrypoint: python -m distkd.cli teacher train --config jobs/demo/teacher.yaml" in out.stdout
    out = subprocess.run([sys.executable, "-m", "distkd.cli", "submit", "eval", "--to", "slurm", "--config",
                          "jobs/missing/eval.yaml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "jobs/missing/eval.yaml" in out.stderr
