"""cluster/ definitions and `distkd submit`: every file parses and carries its required fields,
nothing exposes the Ray dashboard beyond the cluster, and what `submit` renders matches the job.
Fast: no network, no cluster."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distkd.config import load, read_yaml
from distkd.daily import DailyJob
from tests.support import CLUSTER, ROOT, docs, submit, walk

YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
DDP_JOBS = {"teacher": "jobs/demo/teacher.yaml", "student": "jobs/demo/student.yaml",
            "distill": "jobs/demo/distill.yaml"}
IMAGE = "registry.test/distkd:ci-123"


@pytest.mark.unit
def test_expected_files_exist():
    for rel in ("ray/cluster-aws.yaml", "ray/cluster-onprem.yaml", "kuberay/raycluster.yaml",
                "kuberay/rayjob-cache.yaml", "kuberay/rayjob-train.yaml", "slurm/train.sbatch", "k8s/pytorchjob.yaml",
                "docker/Dockerfile.cpu", "docker/Dockerfile.gpu", "README.md"):
        assert (CLUSTER / rel).is_file(), rel


@pytest.mark.unit
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    assert docs(path), f"{path} is empty"


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_pytorchjob_template():
    (job,) = docs(CLUSTER / "k8s" / "pytorchjob.yaml")
    assert job["apiVersion"].startswith("kubeflow.org/") and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    for role in ("Master", "Worker"):
        (c,) = specs[role]["template"]["spec"]["containers"]
        assert c["command"] == "{command}" and c["image"] == "{image}", c  # filled by distkd submit
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/workspace/runs" in mounts and c["workingDir"] == "/workspace"


@pytest.mark.unit
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


@pytest.mark.unit
def test_sbatch_template():
    text = (CLUSTER / "slurm" / "train.sbatch").read_text()
    assert text.startswith("#!/bin/bash")
    assert re.search(r"^#SBATCH --nodes", text, re.M)
    (line,) = [ln for ln in text.replace("\\\n", " ").splitlines() if "torchrun " in ln and not ln.startswith("#")]
    assert "--rdzv-backend c10d" in line and "--nnodes \"$SLURM_NNODES\"" in line and "-m distkd.cli" in line
    # srun (Slurm 22.05) does not inherit the job's --cpus-per-task: the step asks for it again
    assert re.search(r'srun .*--cpus-per-task="\$SLURM_CPUS_PER_TASK" .*torchrun ', line), line
    # every #SBATCH directive comes before the first command (sbatch stops reading them there)
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))


DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                       "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile(text: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in joined.splitlines() if ln.strip()]


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_pins_the_stack(variant):
    text = (CLUSTER / "docker" / f"Dockerfile.{variant}").read_text()
    steps = dockerfile(text)
    assert steps and all(op in DOCKER_INSTRUCTIONS for op, _ in steps), [op for op, _ in steps]
    assert steps[0][0] == "FROM" and ("python:3.11" in steps[0][1] or "cuda" in steps[0][1]), steps[0]
    order = [op + " " + args for op, args in steps]

    def at(pattern: str) -> int:
        hits = [i for i, line in enumerate(order) if re.search(pattern, line)]
        assert hits, f"Dockerfile.{variant}: nothing matches {pattern!r}"
        return hits[0]

    # the stack is installed from requirements.txt before the package's code is copied (its own layer)
    assert at(r"^COPY .*requirements\.txt") < at(r"^RUN .*pip install .*-r \S*requirements\S*\.txt") < at(r"^COPY distkd ")
    assert at(r"^COPY distkd ") < at(r"^RUN .*pip install --no-deps -e \.")
    assert re.search(r"import torch, torchrec, fbgemm_gpu, ray, distkd", order[at(r"pip install --no-deps -e \.")])
    assert steps[-1][0] in ("CMD", "ENTRYPOINT")
    torch_at = text.index("torch==2.13.0")
    torchrec = re.search(r"pip install --no-deps torchrec==1\.8\.0", text)
    assert torchrec and torchrec.start() > torch_at
    package = re.search(r"pip install --no-deps -e \.", text)
    assert package and package.start() > torchrec.start()
    if variant == "cpu":
        assert "whl/cpu" in text and "requirements.txt" in text  # fbgemm-gpu-cpu 1.8.0 comes from it
    else:
        assert "fbgemm-gpu==1.8.0" in text and "cu128" in text and "fbgemm-gpu-cpu" in text  # the CPU pair filtered out


@pytest.mark.unit
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


@pytest.mark.unit
def test_submit_writes_file_and_prints_command(tmp_path):
    distill, cache = str(ROOT / "jobs/demo/distill.yaml"), str(ROOT / "jobs/demo/cache.yaml")
    out = submit("distill", "--to", "slurm", "--config", distill, "--gpus-per-node", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sbatch runs/submit/distill.sbatch" in out.stdout
    text = (tmp_path / "runs" / "submit" / "distill.sbatch").read_text()
    assert "#SBATCH --gpus-per-node" not in text and "NPROC_PER_NODE=1" in text
    assert (tmp_path / "runs" / "slurm").is_dir()  # the job's log folder: Slurm opens the log before the script runs
    assert f"--config {distill}" in text
    out = submit("cache", "--to", "k8s", "--config", cache, "--image", IMAGE, "--nodes", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "kubectl apply -f runs/submit/cache.yaml" in out.stdout
    (job,) = docs(tmp_path / "runs" / "submit" / "cache.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    images = {c["image"] for n in walk(job) if isinstance(n, dict) and "containers" in n for c in n["containers"]}
    assert images == {IMAGE}


@pytest.mark.unit
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


@pytest.mark.unit
def test_submit_missing_job_file_exits_2():
    out = submit("distill", "--to", "k8s", "--config", "jobs/demo/no-such-job.yaml", "--dry-run")
    assert out.returncode == 2
    assert "jobs/demo/no-such-job.yaml" in out.stderr


@pytest.mark.unit
def test_submit_ray_without_address_exits_2():
    out = submit("cache", "--to", "ray", "--config", "jobs/demo/cache.yaml")
    assert out.returncode == 2
    assert "RAY_ADDRESS" in out.stderr


@pytest.mark.unit
def test_submit_bad_override_exits_2():
    out = submit("teacher", "--to", "slurm", "--config", "jobs/demo/teacher.yaml", "--dry-run", "oops")
    assert out.returncode == 2 and "key=value" in out.stderr


@pytest.mark.unit
@pytest.mark.parametrize("stage,text,expect", [
    ("distill", "logs: l\nout: o\nrole: student\nobjective:\n  kind: ctr_kd\n  teachers: [{cache: c}]\n"
                "  losses: {hardd: 1.0}\n", "unknown field(s) ['hardd']"),
    ("distill", "logs: l\nout: o\nrole: student\n", "needs an objective that learns from a teacher"),
    ("teacher", "logs: l\nout: o\ntrain: {batch_size: many}\n", "train.batch_size: expected an integer"),
    ("cache", "teacher: t\nlogs: l\nout: o\ndtype: fp8\n", "dtype: must be one of"),
    ("eval", "logs: l\nteacher: t\nout: o\n", "missing kd, hard"),
])
def test_submit_refuses_a_bad_job_file(tmp_path, stage, text, expect):
    """A job file the stage would refuse is refused before anything is rendered or submitted."""
    job = tmp_path / f"{stage}.yaml"
    job.write_text(text)
    out = submit(stage, "--to", "slurm", "--config", str(job), cwd=tmp_path)
    assert out.returncode == 2 and expect in out.stderr and str(job) in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
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


# -- job files: every suite loads, its stages agree, and criteo-large renders -------------------

JOBS = ROOT / "jobs"
STAGE_NAMES = ("data", "teacher", "student", "cache", "distill", "eval")
# A suite holds one job file per stage; jobs/daily holds a daily run's job and the stage files it names.
SUITES = sorted(p for p in JOBS.iterdir() if p.is_dir() and not (p / "daily.yaml").exists())


def load_job(path: Path):
    from distkd.submit import load_job

    return load_job(path.stem, path)


def is_sweep(path: Path) -> bool:
    return path.stem.startswith("sweep")


@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(p for p in JOBS.rglob("*.yaml") if not is_sweep(p)),
                         ids=lambda p: str(p.relative_to(JOBS)))
def test_job_file_loads(path):
    if path.stem == "daily":
        load(DailyJob, path)
        return
    assert path.stem in STAGE_NAMES, f"{path}: not a stage's job file"
    load_job(path)
    if path.stem in ("teacher", "student", "distill"):  # the file says what the command will set
        assert read_yaml(path).get("role") == ("teacher" if path.stem == "teacher" else "student"), path


@pytest.mark.unit
@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.name)
def test_job_suite_is_consistent(suite):
    """The stages of a suite hand over through the same paths; the student and the distilled
    student differ only in the teacher; the student has at most a tenth of the teacher's parameters."""
    assert sorted(p.stem for p in suite.glob("*.yaml") if not is_sweep(p)) == sorted(STAGE_NAMES), suite
    j = {stage: load_job(suite / f"{stage}.yaml") for stage in STAGE_NAMES}
    logs, export = j["teacher"].logs, f"{j['teacher'].out}/export"
    for stage in ("student", "cache", "distill", "eval"):
        assert j[stage].logs == logs, (suite.name, stage)
    assert logs == j["data"].out, suite.name
    assert j["cache"].teacher == export and "train" in j["cache"].splits
    assert j["eval"].teacher in (export, j["teacher"].out)
    assert [t.cache for t in j["distill"].objective.teachers] == [j["cache"].out]
    assert j["eval"].kd and all(k.startswith(j["distill"].out + "/") for k in j["eval"].kd)
    assert j["eval"].hard and all(h.startswith(j["student"].out + "/") for h in j["eval"].hard)
    assert j["student"].model == j["distill"].model and j["student"].train == j["distill"].train
    if j["data"].source == "synth":  # the schema follows from the data job (MovieLens' from its files)
        from distkd.data.synth import make_schema
        from distkd.models.ranking import count_parameters

        schema = make_schema(j["data"].preset, j["data"].max_cardinality)
        teacher = count_parameters(schema, j["teacher"].model)["total"]
        student = count_parameters(schema, j["student"].model)["total"]
        assert student * 10 <= teacher, (suite.name, student, teacher)


@pytest.mark.unit
def test_criteo_large_is_full_size():
    j = {stage: load_job(JOBS / "criteo-large" / f"{stage}.yaml") for stage in STAGE_NAMES}
    assert j["data"].preset == "criteo" and j["data"].max_cardinality is None and j["data"].rows >= 10**9
    assert j["teacher"].model.embedding_dim >= 128
    # the bulk (logs, cache) in object storage; exports and checkpoints on shared storage
    assert j["cache"].logs.startswith("s3://") and j["cache"].out.startswith("s3://")
    assert j["data"].out == j["cache"].logs


@pytest.mark.unit
@pytest.mark.parametrize("stage", STAGE_NAMES)
@pytest.mark.parametrize("to", ["slurm", "k8s"])
def test_submit_renders_criteo_large(stage, to):
    config = f"jobs/criteo-large/{stage}.yaml"
    out = submit(stage, "--to", to, "--config", config, "--dry-run", "--nodes", "4", "--gpus-per-node", "8")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert not re.search(r"(?<![$\w])\{\w+\}", text), text  # every template field filled
    ddp = stage in ("teacher", "student", "distill")
    if to == "k8s":
        (job,) = yaml.safe_load_all(text)
        if stage == "cache":
            assert job["kind"] == "RayJob"
            assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4
            argv = shlex.split(job["spec"]["entrypoint"])[3:]  # after python -m distkd.cli
        else:
            assert job["kind"] == "PyTorchJob"
            specs = job["spec"]["pytorchReplicaSpecs"]
            assert specs["Worker"]["replicas"] == (3 if ddp else 0)
            assert job["spec"]["nprocPerNode"] == ("8" if ddp else "1")
            command = specs["Master"]["template"]["spec"]["containers"][0]["command"]
            argv = command[command.index("distkd.cli") + 1:]
    else:
        # DDP stages on 4 nodes; the others on one (cache: that node's embedded Ray takes its GPUs)
        assert re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1) == ("4" if ddp else "1")
        assert "#SBATCH --gpus-per-node=8" in text
        (arr,) = re.findall(r"^STAGE_ARGS=\((.*)\)$", text, re.M)
        argv = shlex.split(arr)
        check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    if stage == "data":
        assert argv[:4] == ["data", "synth", "--out", "s3://YOUR-BUCKET/distkd/criteo-large/logs"], argv
        flags = dict(zip(argv[2::2], argv[3::2]))
        assert flags["--rows"] == "1000000000" and flags["--workers"] == "32" and flags["--preset"] == "criteo"
        assert "--max-cardinality" not in flags  # the synth default: no cap
    else:
        assert argv[-2:] == ["--config", config], argv


# -- packaging: the templates travel with the package -----------------------------------------

@pytest.mark.unit
def test_pyproject_lists_every_package():
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"distkd._cluster": "cluster"}
    want = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "distkd").rglob("__init__.py")}
    want |= {"distkd._cluster"} | {f"distkd._cluster.{d.name}" for d in CLUSTER.iterdir() if d.is_dir()}
    assert set(setup["packages"]) == want


@pytest.mark.integration
def test_wheel_carries_the_templates(tmp_path):
    """A wheel built from this tree holds cluster/ byte for byte, and `distkd submit` installed
    from it (no checkout around) renders what the checkout renders."""
    import zipfile

    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to its sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("distkd", "cluster"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", str(src), "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("distkd-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in CLUSTER.rglob("*"):
            if f.is_file():
                name = f"distkd/_cluster/{f.relative_to(CLUSTER).as_posix()}"
                assert name in names and z.read(name) == f.read_bytes(), name
        z.extractall(site)
    argv = ["submit", "distill", "--to", "slurm", "--config", str(ROOT / "jobs/demo/distill.yaml"), "--dry-run"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "import sys, distkd.cli as c; print(c.__file__, file=sys.stderr); "
                        "sys.exit(c.main(sys.argv[1:]))", *argv],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(site) in r.stderr  # the installed copy ran, not the checkout
    assert r.stdout == submit(*argv[1:]).stdout


# -- sweeps and Ray Train ------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(p for p in JOBS.rglob("*.yaml") if is_sweep(p)), ids=lambda p: str(p.relative_to(JOBS)))
def test_sweep_file_loads_and_its_studies_search_their_suite(path):
    """A sweep file loads, every study's base job loads with the space's first values, and it
    searches the job files of its own suite."""
    from distkd.config import load
    from distkd.launch.sweep import SweepConfig, check

    cfg = load(SweepConfig, path)
    check(cfg, str(path))
    assert cfg.metric.startswith("valid/")  # selection on the valid split only
    for study in cfg.studies().values():
        assert Path(study.base).parent == path.parent.relative_to(ROOT), study.base
    # the kd study searches the distillation (or, in a teacher search, the teacher) job
    assert Path(cfg.kd.base).stem in ("distill", "teacher") and (cfg.hard is None or Path(cfg.hard.base).stem == "student")


@pytest.mark.unit
def test_rayjob_train_template():
    (job,) = docs(CLUSTER / "kuberay" / "rayjob-train.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    out = submit("distill", "--to", "k8s", "--launcher", "ray", "--config", "jobs/demo/distill.yaml", "--dry-run",
                 "--nodes", "3", "--gpus-per-node", "2", "--image", IMAGE, "train.seed=7")
    assert out.returncode == 0, out.stderr
    (job,) = yaml.safe_load_all(out.stdout)
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "distkd-distill"
    assert shlex.split(job["spec"]["entrypoint"]) == [
        "python", "-m", "distkd.cli", "distill", "--config", "jobs/demo/distill.yaml", "train.seed=7",
        "launch.launcher=ray", "launch.workers=6", "launch.gpus_per_worker=1"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 3 and group["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"nvidia.com/gpu": 2}}
    out = submit("distill", "--to", "ray", "--config", "jobs/demo/distill.yaml", "--dry-run",
                 env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert "entrypoint: python -m distkd.cli distill --config jobs/demo/distill.yaml launch.launcher=ray" in out.stdout
    assert submit("distill", "--to", "slurm", "--launcher", "ray", "--config", "jobs/demo/distill.yaml",
                  "--dry-run").returncode == 2
