"""`make bench-faults` at scale: the cache build's process faults on many shards and rows.

    python -m distkd.bench.faults_scale [--rows 1000000] [--shards 16] [--out runs/bench-faults/scale]

From a checkout (the faults are the tests' seams, tests/faults/cache.py). One generated dataset
and one untrained teacher export; a Ray head of its own on 127.0.0.1 (tests/ray_cluster.py), so
that a SIGKILLed driver takes no Ray process with it. Each build runs `distkd cache build` in a
process of its own:

  clean     no fault: the reference
  workers   one worker, SIGKILLed on the first attempt of every shard (a death per shard)
  driver    the driver SIGKILLed once a third of the shards are committed, then the same build rerun

A faulted cache counts a row as kept when its shard's logits file has the clean build's sha256
and ids checksum; rows lost = the clean build's rows less the kept ones. `distkd cache verify`
runs on each. The table (stdout) is what this run saw.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(teacher: Path, logs: Path, out: Path, address: str, faults: list[str], workers: int | None = None,
          timeout: float = 3600) -> tuple[int, float, str]:
    """`python -m tests.faults.cache FAULTS -- cache build ...`: (exit code, seconds, stderr)."""
    cmd = [sys.executable, "-m", "tests.faults.cache", *faults, "--", "cache", "build", "--teacher", str(teacher),
           "--logs", str(logs), "--out", str(out), "--splits", "train", "--ray-address", address,
           *(["--workers", str(workers)] if workers else [])]
    # as tests/ray_cluster.py's own processes: the checkout on the path, 127.0.0.1 taken as given
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTKD_NO_PROGRESS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{out}: the build did not finish within {timeout:.0f} s")
    return p.returncode, time.perf_counter() - t0, p.stderr


def compare(out: Path, clean: dict, logs: Path) -> dict:
    """Rows kept (shard bytes and ids as the clean build's), shards retried, and verify's verdict."""
    from distkd.cache.manifest import read_manifest
    from distkd.cache.verify import verify_cache

    m = read_manifest(out)
    kept = sum(e["output"]["rows"] for rel, e in m["shards"].items()
               if e["output"]["sha256"] == clean[rel]["output"]["sha256"] and e["input"]["ids"] == clean[rel]["input"]["ids"])
    try:
        verify_cache(out, logs, log=lambda msg: None)
        verified = "passes"
    except Exception as e:  # the verdict is the figure: record it, keep the table going
        verified = f"FAILS: {str(e).splitlines()[0][:120]}"
    return {"kept": kept, "retried": sum(e["timings"]["attempt"] > 1 for e in m["shards"].values()),
            "complete": bool(m["complete"]), "verify": verified}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--out", default="runs/bench-faults/scale")
    a = p.parse_args(argv)
    from distkd.bench.cache import ensure_teacher
    from distkd.bench.suite import TEACHER
    from distkd.cache.manifest import read_manifest
    from distkd.data.synth import generate
    from distkd.models.ranking import ModelConfig
    from tests.ray_cluster import ray_cluster

    work = Path(a.out)
    logs, teacher = work / "logs", work / "teacher"
    stamp = logs / "rows.txt"
    if not (stamp.is_file() and stamp.read_text() == f"{a.rows} {a.shards}"):
        say(f"generating {a.rows:,} rows in {a.shards} shards …")
        generate(logs, a.rows, shards=a.shards, seed=0, preset="criteo", max_cardinality=100_000,
                 workers=min(2, os.cpu_count() or 1), force=True)
        stamp.write_text(f"{a.rows} {a.shards}")
    ensure_teacher(teacher, logs, ModelConfig(**TEACHER))
    for d in ("clean", "workers", "driver", "markers"):
        shutil.rmtree(work / d, ignore_errors=True)
    (work / "markers").mkdir()
    rows_out: list[tuple[str, str, str, str]] = []
    t_all = time.perf_counter()
    (work / "ray").mkdir(parents=True, exist_ok=True)
    with ray_cluster(work / "ray", head_cpus=2, dashboard=False) as address:
        say("clean build …")
        rc, secs, err = build(teacher, logs, work / "clean", address, [])
        if rc:
            raise SystemExit(f"the clean build exited {rc}:\n{err[-3000:]}")
        clean = read_manifest(work / "clean")["shards"]
        total = sum(e["output"]["rows"] for e in clean.values())
        rows_out.append(("clean build (reference)", f"{len(clean)} shards, {total:,} rows", "0", f"{secs:.0f}"))

        say("one worker killed on every shard …")
        rc, secs, err = build(teacher, logs, work / "workers", address, ["--kill-each-shard", str(work / "markers")],
                              workers=1)
        deaths = len(list((work / "markers").glob("killed-*")))
        if rc:
            rows_out.append((f"one worker SIGKILLed on every shard ({deaths} deaths)", f"FAILED (exit {rc}): "
                             f"{err.strip().splitlines()[-1][:160]}", "–", f"{secs:.0f}"))
        else:
            c = compare(work / "workers", clean, logs)
            rows_out.append((f"one worker SIGKILLed on every shard ({deaths} deaths)",
                             f"complete {c['complete']}, {c['retried']} shards retried once, verify {c['verify']}",
                             f"{total - c['kept']:,}", f"{secs:.0f}"))

        n = max(1, len(clean) // 3)
        say(f"driver killed after {n} commits, then rerun …")
        rc1, s1, err1 = build(teacher, logs, work / "driver", address, ["--kill-driver-after", str(n)])
        before = len(read_manifest(work / "driver")["shards"])
        rc2, s2, err2 = build(teacher, logs, work / "driver", address, [])
        if rc1 != -signal.SIGKILL or rc2:
            rows_out.append((f"cache driver SIGKILLed after {n} commits, rerun", f"FAILED: first exit {rc1} "
                             f"(expected -9), rerun exit {rc2}: {err2.strip().splitlines()[-1][:160]}", "–",
                             f"{s1 + s2:.0f}"))
        else:
            c = compare(work / "driver", clean, logs)
            recomputed = read_manifest(work / "driver")["builds"][-1]["computed"]
            rows_out.append((f"cache driver SIGKILLed after {n} commits, rerun",
                             f"{before} shards committed before the kill; the rerun computed {len(recomputed)}; "
                             f"complete {c['complete']}, verify {c['verify']}", f"{total - c['kept']:,}",
                             f"{s1 + s2:.0f}"))
    print(f"\n## Cache faults at scale: {total:,} rows, {len(clean)} shards, {time.perf_counter() - t_all:.0f} s\n")
    print("| fault | what distkd did | rows lost | seconds |")
    print("|---|---|---|---|")
    for r in rows_out:
        print("| " + " | ".join(r) + " |")
    print(f"\nReproduce: python -m distkd.bench.faults_scale --rows {a.rows} --shards {a.shards}")
    return 0 if all(r[2] == "0" for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
