"""Security: what a job names is never executed, the shipped cluster definitions expose no Ray
endpoint, and credentials never reach a file. (Checkpoints refusing a pickled `.metadata` are
tests/test_checkpoint.py's; manifest paths out of the cache are tests/test_bad_input.py's.)"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from distkd.cli import main as cli_main
from distkd.config import ConfigError
from distkd.models.export import load_export, sha256_file
from distkd.models.program import ProgramError, check_program
from distkd.models.teacher import load_teacher
from distkd.models.teacher_spec import TeacherError, TeacherSpec
from distkd.data.schema import load_schema
from tests.support import BUCKET, CLUSTER, ROOT, SMALL_MODEL, cli, docs, submit, walk


class _Payload:
    """Unpickling this runs `touch TARGET`: a sentinel file appears if pickled code ever runs."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.integration
def test_exports_and_teacher_weights_never_run_pickled_code(kd_world, tmp_path, capsys):
    (t0, _), _ = kd_world["teachers"]
    pwned = tmp_path / "pwned"
    export = tmp_path / "export"
    shutil.copytree(t0, export)
    torch.save({"format": 1, "state_dict": {"w": _Payload(pwned)}}, export / "model.pt")
    meta = json.loads((export / "export.json").read_text())
    meta["sha256"] = sha256_file(export / "model.pt")  # its metadata agrees: only the loader stands in the way
    (export / "export.json").write_text(json.dumps(meta))
    expect = f"{export / 'model.pt'}: refused: it holds pickled objects, not only tensors (Trying to load unsupported GLOBAL posix.system"
    with pytest.raises(ConfigError) as e:
        load_export(export)
    assert expect in str(e.value)
    # the cache build's driver refuses it before starting Ray or writing anything
    rc = cli_main(["cache", "build", "--teacher", str(export), "--logs", str(kd_world["logs"]),
                   "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()
    # a factory teacher's weights file
    weights = tmp_path / "weights.pt"
    torch.save({"emb": _Payload(pwned)}, weights)
    spec = TeacherSpec(factory="tests.user_teacher:build", weights=str(weights), input="dict")
    with pytest.raises(TeacherError, match=r"do not load with torch.load\(weights_only=True\): .*GLOBAL posix.system"):
        load_teacher(spec, load_schema(kd_world["logs"]))
    assert not pwned.exists()



def _crafted_program(path: Path, pwned: Path, member: str, config_flag: str | None = None) -> None:
    """A real .pt2 with `member` replaced by a pickle that runs `touch PWNED`; `config_flag`
    (a weights config member) is rewritten to declare every weight pickled, which is what
    makes torch.export.load unpickle it."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x)

    good = path.with_name("good.pt2")
    torch.export.save(torch.export.export(Tiny(), (torch.randn(4, 3),)), good)
    payload = io.BytesIO()
    torch.save({"x": _Payload(pwned)}, payload)
    evil = payload.getvalue()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            rel = info.filename.split("/", 1)[1]
            data = src.read(info)
            if rel == member:
                data = evil
            elif rel == config_flag:
                cfg = json.loads(data)
                for meta in cfg["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(cfg).encode()
            dst.writestr(info, data)


@pytest.mark.integration
@pytest.mark.parametrize("member, flag", [("data/sample_inputs/model.pt", None),
                                          ("data/weights/weight_0", "data/weights/model_weights_config.json")])
def test_a_teacher_program_with_a_crafted_pickle_is_refused_before_torch_loads_it(kd_world, tmp_path, capsys, member,
                                                                                 flag):
    pwned, program = tmp_path / "pwned", tmp_path / "teacher.pt2"
    _crafted_program(program, pwned, member, flag)
    # the hole is real: torch.export.load itself runs the pickle (in a child, to keep this process clean)
    code = f"import torch; torch.export.load({str(program)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert pwned.exists(), "torch.export.load no longer unpickles this member: the check may be obsolete"
    pwned.unlink()
    with pytest.raises(TeacherError, match=rf"teacher {re.escape(str(program))}: {re.escape(member)}: a pickle that "
                                           r"does not load with torch.load\(weights_only=True\).*posix.system"):
        load_teacher(TeacherSpec(program=str(program), input="dict"), load_schema(kd_world["logs"]))
    rc = cli_main(["cache", "build", "--teacher-program", str(program), "--teacher-input", "dict",
                   "--logs", str(kd_world["logs"]), "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{member}: a pickle" in err and "Traceback" not in err, err
    assert not pwned.exists() and not (tmp_path / "cache").exists()
    with pytest.raises(ProgramError, match="not a torch.export .pt2 archive"):  # the pre-2.8 layout
        check_program(_zip({"old/version": b"8.0.0", "old/serialized_state_dict.pt": b"x"}))
    with pytest.raises(ProgramError, match="compiled code"):
        check_program(_zip({"p/.data/version": b"3", "p/archive_format": b"pt2",
                            "p/data/aotinductor/model/model.so": b"\x7fELF"}))
    with pytest.raises(ProgramError, match="not a torch zip archive"):
        check_program(b"not a zip")


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()

# Calls that deserialize arbitrary objects, and where (file: reason) they are known and allowed.
ALLOWED = {
    ("distkd/dcp_reader.py", "pickle.Unpickler"): "DCP's .metadata (checkpoints, sharded exports), through an unpickler whose "
                                                        "find_class admits only DCP's metadata classes",
    ("distkd/serve/export.py", "torch.jit.load"): "loads back the files it has just written, to check them",
    ("distkd/serve/export.py", "torch.export.load"): "the same",
    ("distkd/models/program.py", "torch.export.load"): "a program teacher, after check_program has refused "
                                                       "every member torch would unpickle beyond tensors",
}
UNSAFE = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads", "dill.load",
          "dill.loads", "joblib.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "marshal.loads",
          "torch.jit.load", "torch.export.load", "shelve.open"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


@pytest.mark.unit
def test_nothing_in_the_package_unpickles_what_a_job_names():
    """Every deserializing call in distkd/ is safe by construction or listed above with why:
    torch.load always with weights_only=True, np.load never with allow_pickle=True, no pickle,
    yaml.load, marshal or joblib outside the list."""
    found, bad = set(), []
    for path in sorted((ROOT / "distkd").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(_name(b) == "pickle.Unpickler" for b in node.bases):
                found.add((rel, "pickle.Unpickler"))
                if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    bad.append(f"{rel}:{node.lineno}: Unpickler subclass {node.name} without find_class")
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
                    bad.append(f"{rel}:{node.lineno}: np.load(allow_pickle=True)")
            elif name in UNSAFE or name.endswith("Tuner.restore"):
                found.add((rel, name))
                if (rel, name) not in ALLOWED:
                    bad.append(f"{rel}:{node.lineno}: {name}")
    assert not bad, bad
    assert ("distkd/dcp_reader.py", "pickle.Unpickler") in found  # the scan sees what it must


# -- cluster definitions ----------------------------------------------------------------------

RAY_PORTS = {6379, 8265, 10001}
PUBLIC = {"LoadBalancer", "NodePort"}


def rendered_manifests(tmp_path) -> dict[str, list[dict]]:
    """Every Kubernetes manifest as shipped and as `distkd submit --to k8s` renders it."""
    out = {str(p.relative_to(ROOT)): docs(p) for p in sorted(CLUSTER.rglob("*.yaml"))}
    for stage, extra in [("cache", []), ("teacher", []), ("distill", []), ("distill", ["--launcher", "ray"]),
                         ("eval", [])]:
        r = submit(stage, "--to", "k8s", "--config", f"jobs/demo/{stage}.yaml", "--dry-run", *extra)
        assert r.returncode == 0, r.stderr
        out[f"submit {stage} {' '.join(extra)}"] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


@pytest.mark.unit
def test_no_ray_endpoint_on_a_public_service_or_all_interfaces(tmp_path):
    problems = []
    manifests = rendered_manifests(tmp_path)
    assert len(manifests) >= 11, list(manifests)
    for name, documents in manifests.items():
        for d in documents:
            for node in walk(d):
                if not isinstance(node, dict):
                    continue
                if node.get("serviceType") in PUBLIC or (d.get("kind") == "Service" and node.get("type") in PUBLIC):
                    problems.append(f"{name}: a public Service ({node})")
                if node.get("hostNetwork") is True:
                    problems.append(f"{name}: hostNetwork binds the pod's ports on the node's interfaces")
                if "hostPort" in node:
                    problems.append(f"{name}: hostPort {node['hostPort']}")
                if d.get("kind") in ("Ingress", "Route", "Gateway"):
                    problems.append(f"{name}: {d['kind']}")
                for key, value in node.items():  # rayStartParams and container args
                    if "host" in str(key).lower() and str(value) == "0.0.0.0":
                        problems.append(f"{name}: {key}: 0.0.0.0")
    # The Ray cluster launcher configs: the head's dashboard (and Jobs API) on loopback, no host
    # flag on all interfaces, no security group opening a Ray port to the world.
    for path in sorted((CLUSTER / "ray").glob("*.yaml")):
        (cfg,) = docs(path)
        heads = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
        assert heads, path
        for command in heads + cfg.get("worker_start_ray_commands", []):
            if re.search(r"--[\w-]*host[= ]0\.0\.0\.0", command):
                problems.append(f"{path.name}: {command}")
        for command in heads:
            if "--dashboard-host=127.0.0.1" not in command:
                problems.append(f"{path.name}: the head's dashboard is not bound to 127.0.0.1: {command}")
        for node in walk(cfg.get("provider", {})):
            if isinstance(node, dict) and "FromPort" in node:
                world = any(r.get("CidrIp") == "0.0.0.0/0" for r in node.get("IpRanges", []))
                if world and any(node["FromPort"] <= p <= node.get("ToPort", node["FromPort"]) for p in RAY_PORTS):
                    problems.append(f"{path.name}: a Ray port open to 0.0.0.0/0: {node}")
    assert not problems, problems


# -- credentials ------------------------------------------------------------------------------

SENTINEL = "sEcReT-do-not-leak-8c1f6b2e"


def files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                continue
    return hits


@pytest.mark.slow
@pytest.mark.cluster
def test_the_secret_key_never_reaches_a_file(s3, kd_world, tmp_path, monkeypatch):
    """A sentinel AWS_SECRET_ACCESS_KEY (moto takes any) through logs, a cache and a distillation
    on S3, the rendered job specs and every command's output: no file written, no object in the
    bucket, no Ray session log holds it."""
    import boto3

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    ray_tmp = Path(tempfile.mkdtemp(prefix="dks-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {"RAY_TMPDIR": str(ray_tmp)}
    logs, cache = f"s3://{BUCKET}/secret/logs", f"s3://{BUCKET}/secret/cache"
    outputs = tmp_path / "outputs"
    job = tmp_path / "distill.yaml"
    job.write_text(json.dumps({"logs": logs, "out": str(outputs / "kd"), "objective": {
        "kind": "ctr_kd", "teachers": [{"cache": cache}], "losses": {"hard": 1.0, "mse": 1.0}}}))
    steps = [
        ["data", "synth", "--out", logs, "--rows", "6000", "--shards", "2", "--preset", "small", "--workers", "1",
         "--row-group-rows", "1024"],
        ["cache", "build", "--teacher", str(kd_world["teachers"][0][0]), "--logs", logs, "--out", cache,
         "--splits", "train", "--workers", "1"],
        ["distill", "--config", str(job), "--nproc", "1", "train.max_steps=4", "train.checkpoint_every=2",
         "train.batch_size=512", "tensorboard=true", *SMALL_MODEL],
    ]
    try:
        for i, args in enumerate(steps):
            r = cli(*args, env_extra=env, timeout=400)
            (tmp_path / f"step-{i}.log").write_text(r.stdout + r.stderr)
            assert r.returncode == 0, r.stderr[-3000:]
        for to in ("k8s", "slurm"):
            r = submit("distill", "--to", to, "--config", str(job), cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            (tmp_path / f"submit-{to}.log").write_text(r.stdout + r.stderr)
        assert sorted(p.name for p in (tmp_path / "runs" / "submit").iterdir()) == ["distill.sbatch", "distill.yaml"]
        assert (outputs / "kd" / "summary.json").is_file() and list((outputs / "kd" / "tensorboard").rglob("*"))
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="secret/")["Contents"]]
        assert "secret/cache/manifest.json" in keys and len(keys) >= 8, keys
        needle = SENTINEL.encode()
        (tmp_path / "control").write_bytes(b"x" + needle)  # the search finds what is there
        assert files_with(tmp_path, needle) == [str(tmp_path / "control")]
        (tmp_path / "control").unlink()
        searched = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file()]
        assert len(searched) > 30, searched  # outputs, logs, rendered specs, Ray's session logs
        assert any("session_" in str(p) and p.suffix in (".out", ".err", ".log") for p in searched)
        leaks = files_with(tmp_path, needle) + files_with(ray_tmp, needle)
        leaks += [k for k in keys if needle in boto3.client("s3").get_object(Bucket=BUCKET, Key=k)["Body"].read()]
        assert not leaks, leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
