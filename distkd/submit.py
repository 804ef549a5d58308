"""`distkd submit STAGE --to ray|slurm|k8s`: run a stage's job file on a cluster.

* ray: submits `python -m distkd.cli <stage> --config JOB ...` through the Ray Jobs API
  (`daily` too, with its --date: the day's cache build and student then run on that cluster)
  (address from --ray-address/--address or RAY_ADDRESS, e.g. http://127.0.0.1:8265 through a
  tunnel); with --wait it streams the job's logs and exits with the job's status.
* slurm: renders cluster/slurm/train.sbatch (multi-node torchrun) and creates the folder its
  log goes to (runs/slurm/).
* k8s: renders cluster/k8s/pytorchjob.yaml (DDP stages under torchrun), with `--launcher ray`
  cluster/kuberay/rayjob-train.yaml (DDP stages as a Ray Train TorchTrainer), or
  cluster/kuberay/rayjob-cache.yaml (cache).

DDP stages sent to Ray (`--to ray`, or `--to k8s --launcher ray`) get `launch.launcher=ray`: the
entrypoint starts a TorchTrainer on the cluster, so the ranks spread over its workers.

The cluster/ files are the templates: their `{name}` fields are filled here (in YAML files the
quoted form `"{name}"` is replaced by the value as a JSON scalar, list or mapping), so the files
and what this command renders cannot drift. Nothing is executed for slurm/k8s: the rendered file
is written to runs/submit/ and the `sbatch` / `kubectl apply` command to run is printed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
from pathlib import Path
from typing import Sequence

import asyncio

from distkd.config import ConfigError, apply_overrides, load, read_yaml
from distkd import objectives
from distkd.train.job import TrainJob
from distkd.cache.build import CacheJob
from distkd.daily import DailyJob
from distkd.demo import DataJob
from distkd.evaluate import EvalJob

# Ray's job-submission client is imported only for `--to ray`: Ray's import costs seconds.

logger = logging.getLogger(__name__)

STAGES = ("data", "teacher", "student", "cache", "distill", "eval", "daily")
DDP_STAGES = ("teacher", "student", "distill")
# The templates: the copy a wheel installs inside the package (pyproject.toml maps cluster/ to
# distkd/_cluster), else the checkout's cluster/ (a source tree or an editable install).
_INSTALLED = Path(__file__).resolve().parent / "_cluster"
CLUSTER = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parent.parent / "cluster"
TEMPLATES = {
    "slurm": CLUSTER / "slurm" / "train.sbatch",
    "pytorchjob": CLUSTER / "k8s" / "pytorchjob.yaml",
    "rayjob": CLUSTER / "kuberay" / "rayjob-cache.yaml",
    "rayjob-train": CLUSTER / "kuberay" / "rayjob-train.yaml",
}
DEFAULT_IMAGE = "registry.example.com/distkd:0.1.0-{variant}"


def load_job(stage: str, config: str | Path, overrides: Sequence[str] = ()) -> object:
    """The stage's job, loaded and checked as the stage itself will (dataclass fields, types,
    the objective's teachers and losses), so that a typo fails here with exit 2, not
    on the cluster after the job waited in a queue. Paths are not checked: they are the
    cluster's."""

    overrides = list(overrides)
    if stage == "data":
        return load(DataJob, config, overrides)
    if stage == "cache":
        return load(CacheJob, config, overrides)
    if stage == "daily":
        return load(DailyJob, config, overrides)
    if stage == "eval":
        job = load(EvalJob, config, overrides)
        try:
            job.check()
        except ConfigError as e:
            raise ConfigError(f"{config}: {e}") from None
        return job

    job = load(TrainJob, config, [f"role={'teacher' if stage == 'teacher' else 'student'}", *overrides])
    if stage == "distill":
        objectives.require_distilling(job.objective, str(config))
    return job


def stage_args(stage: str, config: str, overrides: list[str], date: str | None = None) -> list[str]:
    """The stage's command line after `python -m distkd.cli`, filled from the job file."""
    job = apply_overrides(read_yaml(config), overrides, where=config)  # the file must load
    if stage == "data":  # `distkd data` takes flags, not a job file: map the job's fields onto them
        source = job.get("source", "synth")
        if source == "movielens":
            if not job.get("path"):
                raise ConfigError(f"{config}: path: required for source: movielens")
            args = ["data", "movielens", str(job["path"])]
            names = ("out", "shards", "row_group_rows")
        elif source == "synth":
            args = ["data", "synth"]
            names = ("out", "rows", "shards", "row_group_rows", "seed", "preset", "max_cardinality",
                     "unlabeled_fraction", "workers")
        else:
            raise ConfigError(f"{config}: source: must be synth or movielens, got {source!r}")
        for name in names:
            if job.get(name) is not None:
                args += ["--" + name.replace("_", "-"), str(job[name])]
        return args
    if stage == "daily":  # one day: its date is the command's, not the job file's
        return ["daily", "--config", config, "--date", str(date)] + list(overrides)
    head = {"teacher": ["teacher", "train"], "student": ["student", "train"],
            "cache": ["cache", "build"], "distill": ["distill"], "eval": ["eval"]}[stage]
    return head + ["--config", config] + list(overrides)


def render(template: Path, values: dict) -> str:
    """Fill a cluster/ template: `"{k}"` -> JSON value (YAML), then bare `{k}` -> str(value)."""
    text = template.read_text()

    def field(m: re.Match, quoted: bool) -> str:
        key = m.group(1)
        if key not in values:
            raise ConfigError(f"{template}: unknown template field {{{key}}}")
        return json.dumps(values[key]) if quoted else str(values[key])

    text = re.sub(r'"\{(\w+)\}"', lambda m: field(m, True), text)
    return re.sub(r"(?<![$\w])\{(\w+)\}", lambda m: field(m, False), text)


def sbatch_log_folders(text: str) -> list[Path]:
    """The folders of a script's `#SBATCH --output/--error` files (relative to where sbatch runs).
    Slurm opens those files before the script starts, so a missing folder fails the job with no
    log at all: `submit` creates them. Folders named with a %-pattern are left to the user."""
    names = re.findall(r"^#SBATCH\s+--(?:output|error)[= ](\S+)", text, re.M)
    return [Path(n).parent for n in names if "%" not in str(Path(n).parent)]


def _values(args, argv: list[str]) -> dict:
    ddp = args.stage in DDP_STAGES
    # cache: N Ray workers of a RayJob on k8s; under Slurm one node's embedded Ray (N torchrun nodes
    # would start N competing builds of the same cache)
    nodes = max(1, args.nodes) if ddp or (args.stage == "cache" and args.to == "k8s") else 1
    gpus = max(0, args.gpus_per_node)
    nproc = max(1, gpus) if ddp else 1
    image = args.image or DEFAULT_IMAGE.format(variant="gpu" if gpus else "cpu")
    resources = {"limits": {"nvidia.com/gpu": gpus}} if gpus else {}
    command = ["python", "-m", "distkd.cli", *argv]
    return {
        "name": f"distkd-{args.stage}",
        "stage": args.stage,
        "image": image,
        "nodes": nodes,
        # PyTorchJob: Master + nodes-1 Workers; RayJob (cache): a CPU-only head + nodes workers
        "workers": nodes if args.stage == "cache" or ray_train(args) else nodes - 1,
        "nproc_per_node": nproc if args.to == "slurm" else str(nproc),
        "gpu_directive": f"SBATCH --gpus-per-node={gpus}" if gpus else " no GPUs requested: CPU nodes, gloo ranks",
        "resources": resources,
        "stage_args": shlex.join(argv),
        "entrypoint": shlex.join(command),
        # torchrun reads PET_NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT set by the training operator
        "command": ["torchrun", "--nproc-per-node", str(nproc), "-m", "distkd.cli", *argv],
    }


def ray_train(args) -> bool:
    """A DDP stage that runs as a Ray Train TorchTrainer on a Ray cluster."""
    return args.stage in DDP_STAGES and (args.to == "ray" or getattr(args, "launcher", "torchrun") == "ray")


def ray_overrides(args) -> list[str]:
    """What a DDP stage on Ray adds to its command line: the launcher, and on k8s the ranks
    (one Ray Train worker per GPU, or one per CPU node)."""
    if not ray_train(args):
        return []
    if args.to == "ray":  # an existing cluster: the job file's launch.workers (default nproc) says how many
        return ["launch.launcher=ray"]
    gpus = max(0, args.gpus_per_node)
    return ["launch.launcher=ray", f"launch.workers={max(1, args.nodes) * max(1, gpus)}",
            f"launch.gpus_per_worker={1 if gpus else 0}"]


def _submit_ray(args, entrypoint: str) -> int:
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--to ray: no Ray Jobs API address: pass --ray-address http://HOST:8265 or set "
                          "RAY_ADDRESS (reach a remote head through an SSH tunnel or kubectl port-forward)")
    if args.dry_run:
        print(f"address: {address}")
        print(f"entrypoint: {entrypoint}")
        return 0
    if not address.startswith(("http://", "https://", "ray://")):
        logger.warning(f"distkd: note: the Ray Jobs API usually lives at http://HOST:8265, got {address!r}")
    if not Path(args.config).resolve().is_relative_to(Path.cwd().resolve()):
        logger.warning(f"distkd: note: {args.config} is outside the working directory uploaded with the job; "
                       "the cluster must see it at that path")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": ".", "excludes": ["runs/", ".venv/", ".git/"]},
        metadata={"distkd_stage": args.stage, "distkd_config": args.config},
    )
    print(f"submitted {job_id} to {address}", flush=True)
    if not args.wait:
        logger.info(f"follow it: ray job logs --address {address} --follow {job_id}")
        return 0
    return wait(client, job_id, address)


def wait(client, job_id: str, address: str, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends. Returns 0 if it succeeded, else the entrypoint's
    exit status (2: an error the job file can fix), or 1 (stopped, or failed before it ran)."""

    from ray.job_submission import JobStatus

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        logger.warning(f"\ndistkd: stopped waiting; the job keeps running (ray job stop --address {address} {job_id})")
        return 130
    except RuntimeError as e:  # the log stream closed early (dashboard restarted): fall back to polling
        logger.warning(f"distkd: note: log stream ended early ({e}); polling the job's status")
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream ends with the job, its status may lag
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    # The message of a failed job repeats the end of its logs, already printed above: its first part only.
    why = (info.message or "").split(", last available logs")[0].splitlines()
    print(f"job {job_id}: {info.status}" + (f" ({why[0]})" if why else ""), flush=True)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return info.driver_exit_code if info.driver_exit_code and info.driver_exit_code > 0 else 1


def run(args) -> int:
    if args.stage not in STAGES:
        raise ConfigError(f"submit: stage must be one of {list(STAGES)}, got {args.stage!r}")
    if not args.config:
        raise ConfigError("submit: --config JOB.yaml is required")
    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: job file not found")
    if getattr(args, "wait", False) and args.to != "ray":
        raise ConfigError(f"submit: --wait is for --to ray; {args.to} jobs are submitted by the printed command")
    if getattr(args, "launcher", "torchrun") == "ray" and args.to == "slurm":
        raise ConfigError("submit: --launcher ray is for --to k8s (a RayJob) or --to ray; Slurm runs torchrun")
    if args.stage == "daily" and args.to != "ray":
        raise ConfigError("submit daily: --to ray only (a Ray job running `distkd daily`, its cache build and "
                          "student on the cluster); Slurm and Kubernetes have no daily template")
    overrides = list(args.overrides or []) + ray_overrides(args)
    load_job(args.stage, args.config, overrides)
    argv = stage_args(args.stage, args.config, overrides, getattr(args, "date", None))
    values = _values(args, argv)
    if args.to == "ray":
        return _submit_ray(args, values["entrypoint"])
    if args.to == "slurm":
        template, ext = TEMPLATES["slurm"], "sbatch"
    else:
        kind = "rayjob" if args.stage == "cache" else "rayjob-train" if ray_train(args) else "pytorchjob"
        template, ext = TEMPLATES[kind], "yaml"
    text = render(template, values)
    if args.dry_run:
        print(text, end="")
        return 0
    out = Path("runs") / "submit" / f"{args.stage}.{ext}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    logger.info(f"wrote {out} (from cluster/{template.relative_to(CLUSTER).as_posix()})")
    if args.to == "slurm":
        for folder in sbatch_log_folders(text):
            folder.mkdir(parents=True, exist_ok=True)
    print(f"run: {'sbatch' if args.to == 'slurm' else 'kubectl apply -f'} {out}")
    return 0
