"""`make bench-faults` at scale: the cache build's faults on many shards and rows, then the
distillation's rank faults on the cache it built (distkd.bench.faults_scale_train).

    python -m distkd.bench.faults_scale [--rows 1000000] [--shards 16] [--train-batch 1024]
                                        [--out runs/bench-faults/scale]

From a checkout (the faults are the tests' seams, tests/faults/). One generated dataset and one
untrained teacher export; a Ray head of its own on 127.0.0.1 (distkd.bench.ray_local), so that a
SIGKILLed driver takes no Ray process with it. Each build runs `distkd cache build` in a process
of its own:

  clean     no fault: the reference
  workers   one worker, SIGKILLed on the first attempt of every shard (a death per shard)
  driver    the driver SIGKILLed once a third of the shards are committed, then the same build rerun
  race      a second build of the same directory started once the first holds its lock, while a
            reader polls the manifest as the cache grows
  nan       the teacher returns NaN at one row of the last shard
  head      a build against a Ray head of its own, every process of that head SIGKILLed once the
            first shard commits; then the same build on a new head

A faulted cache counts a row as kept when its shard's logits file has the clean build's sha256
and ids checksum; rows lost = the clean build's rows less the kept ones (for the NaN build: the
committed rows that are not the clean build's). `distkd cache verify` runs on each complete
cache. The table (stdout) is what this run saw.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from distkd import log
from distkd.bench.faults import kept_rows
from distkd.bench.ray_local import kill_head_once_committed, ray_cluster
from distkd.cache.contract import read_manifest
from distkd.cache.verify import verify_cache
from distkd.cache.build import MANIFEST_EVERY_S, CacheJob
from distkd.cache.manifest import temp_files
from distkd.bench.cache import ensure_teacher
from distkd.bench.faults_scale_train import train_faults
from distkd.bench.suite import TEACHER
from distkd.data.synth import generate
from distkd.models.ranking import ModelConfig

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
EXIT_BOUND_S = 30  # from the head's death to the driver's exit (Ray itself would give up only after 60 s)
Row = tuple[str, str, str, str]  # fault, what distkd did, rows lost, seconds


def _cmd(teacher: Path, logs: Path, out: Path, address: str, faults: list[str], workers: int | None) -> list[str]:
    """`python -m tests.faults.cache FAULTS -- cache build ...`"""
    return [sys.executable, "-m", "tests.faults.cache", *faults, "--", "cache", "build", "--teacher", str(teacher),
            "--logs", str(logs), "--out", str(out), "--splits", "train", "--ray-address", address,
            *(["--workers", str(workers)] if workers else [])]


def child_env() -> dict[str, str]:
    # as distkd.bench.ray_local's own processes: the checkout on the path, 127.0.0.1 taken as given
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTKD_NO_PROGRESS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def build(teacher: Path, logs: Path, out: Path, address: str, faults: list[str], workers: int | None = None,
          timeout: float = 3600) -> tuple[int, float, str]:
    """One build in a process of its own: (exit code, seconds, stderr)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(_cmd(teacher, logs, out, address, faults, workers), cwd=ROOT, env=child_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{out}: the build did not finish within {timeout:.0f} s")
    return p.returncode, time.perf_counter() - t0, p.stderr


def _last(err: str) -> str:
    return err.strip().splitlines()[-1][:200] if err.strip() else ""


def compare(out: Path, clean: dict, logs: Path) -> dict:
    """Rows kept (shard bytes and ids as the clean build's), shards retried, and verify's verdict."""

    m = read_manifest(out)
    kept = kept_rows(m.shards, clean)
    try:
        with log.silenced("distkd.cache"):  # the verdict is the figure, not its per-shard lines
            verify_cache(out, logs)
        verified = "passes"
    except Exception as e:  # the verdict is the figure: record it, keep the table going
        verified = f"FAILS: {str(e).splitlines()[0][:120]}"
    return {"kept": kept, "retried": sum(e.timings.attempt > 1 for e in m.shards.values()),
            "complete": bool(m.complete), "verify": verified}


def workers_killed(teacher: Path, logs: Path, work: Path, address: str, clean: dict, total: int) -> Row:
    markers = work / "markers"
    markers.mkdir()
    rc, secs, err = build(teacher, logs, work / "workers", address, ["--kill-each-shard", str(markers)], workers=1)
    fault = f"one worker SIGKILLed on every shard ({len(list(markers.glob('killed-*')))} deaths)"
    if rc:
        return fault, f"FAILED (exit {rc}): {_last(err)}", "–", f"{secs:.0f}"
    c = compare(work / "workers", clean, logs)
    return (fault, f"complete {c['complete']}, {c['retried']} shards retried once, verify {c['verify']}",
            f"{total - c['kept']:,}", f"{secs:.0f}")


def driver_killed(teacher: Path, logs: Path, work: Path, address: str, clean: dict, total: int) -> Row:

    n = max(1, len(clean) // 3)
    fault = f"cache driver SIGKILLed after {n} shard(s) finished, rerun"
    rc1, s1, _ = build(teacher, logs, work / "driver", address, ["--kill-driver-after", str(n)])
    before = len(read_manifest(work / "driver").shards)
    rc2, s2, err2 = build(teacher, logs, work / "driver", address, [])
    if rc1 != -signal.SIGKILL or rc2:
        return fault, f"FAILED: first exit {rc1} (expected -9), rerun exit {rc2}: {_last(err2)}", "–", f"{s1 + s2:.0f}"
    c = compare(work / "driver", clean, logs)
    recomputed = read_manifest(work / "driver").builds[-1].computed
    return (fault, f"{before} shard(s) in the manifest at the kill (rewritten at most every {MANIFEST_EVERY_S:g} s; "
            f"finished shards it does not name are recomputed); the rerun computed {len(recomputed)}; "
            f"complete {c['complete']}, verify {c['verify']}", f"{total - c['kept']:,}", f"{s1 + s2:.0f}")


def head_killed(teacher: Path, logs: Path, work: Path, clean: dict, total: int) -> Row:
    """A build against a Ray head of its own (slowed by a second a row group), every process of that
    head SIGKILLed once the first shard commits: the driver must exit 2 naming the lost cluster
    within EXIT_BOUND_S, the manifest name only whole shards, and a rerun on a new head compute
    the rest."""

    out, err_path = work / "head", work / "head.err"
    fault = "the Ray head (a separate cluster) SIGKILLed mid-build, rerun on a new head"
    for d in ("ray-head", "ray-head2"):
        (work / d).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ray_cluster(work / "ray-head", head_cpus=2, dashboard=False) as head:
        with open(err_path, "w") as err:
            # a second after each row group: the kill lands with shards still to commit at any scale
            driver = subprocess.Popen(_cmd(teacher, logs, out, head, ["--slow-row-groups", "1"], None), cwd=ROOT,
                                      env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            rc, took = kill_head_once_committed(driver, err_path, head, EXIT_BOUND_S)
        except RuntimeError as e:
            first, last = str(e).splitlines()[0], _last(str(e))
            return fault, f"FAILED: {first} {last}", "–", f"{time.perf_counter() - t0:.0f}"
    stderr = err_path.read_text()
    m = read_manifest(out)
    whole = all(e.output.sha256 == clean[rel].output.sha256 for rel, e in m.shards.items())
    if rc != 2 or f"lost the Ray cluster at {head}" not in stderr or m.complete or not whole:
        return fault, f"FAILED: exit {rc} {took:.0f} s after the kill: {_last(stderr)}", "–", \
            f"{time.perf_counter() - t0:.0f}"
    before = len(m.shards)
    with ray_cluster(work / "ray-head2", head_cpus=2, dashboard=False) as head2:
        rc2, _, err2 = build(teacher, logs, out, head2, [])
    if rc2:
        return fault, f"FAILED: the rerun exited {rc2}: {_last(err2)}", "–", f"{time.perf_counter() - t0:.0f}"
    c = compare(out, clean, logs)
    recomputed = read_manifest(out).builds[-1].computed
    return (fault, f"exit 2 {took:.1f} s after the kill, naming the lost cluster; {before} shard(s) in the manifest, "
            f"each the clean build's; on a new head the rerun computed {len(recomputed)}; complete {c['complete']}, "
            f"verify {c['verify']}", f"{total - c['kept']:,}", f"{time.perf_counter() - t0:.0f}")


def race(teacher: Path, logs: Path, work: Path, address: str, clean: dict, total: int) -> list[Row]:
    """Build A runs; B, on the same directory once A holds the lock, must be refused; a reader
    polls the manifest every 0.5 s meanwhile: each manifest whole, each file it names whole and
    the clean build's, the shard count never falling."""

    out, a_err, gate = work / "race", work / "race-a.err", work / "race-b-done"
    seen: list[int] = []
    torn: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                m = read_manifest(out)
                for rel, e in m.shards.items():  # the bytes on disk, hashed: what a reader would load
                    data = (out / rel).read_bytes()
                    digest = hashlib.sha256(data).hexdigest()
                    if len(data) != e.output.bytes or digest != clean[rel].output.sha256:
                        torn.append(rel)
                seen.append(len(m.shards))
            except Exception as e:  # the finding: recorded, the race goes on
                torn.append(f"{type(e).__name__}: {str(e)[:120]}")
            stop.wait(0.5)

    gate.unlink(missing_ok=True)  # a gate left by an earlier run would let A finish unheld
    t0 = time.perf_counter()
    with open(a_err, "w") as fh:
        # A's workers wait after each row group until B is done: B meets A's lock however slowly
        # it starts (a loaded machine, a torch that imports slowly), never A's finished cache
        a = subprocess.Popen(_cmd(teacher, logs, out, address, ["--hold-until", str(gate)], None), cwd=ROOT,
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=fh)
    thread = threading.Thread(target=reader, daemon=True)
    try:
        deadline = time.monotonic() + 3600
        while "shards planned" not in a_err.read_text():  # A holds the lock and has written its plan
            if a.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"build A exited {a.poll()} before planning:\n{a_err.read_text()[-3000:]}")
            time.sleep(0.2)
        thread.start()
        rc_b, secs_b, err_b = build(teacher, logs, out, address, [])
        b_during_a = a.poll() is None
        gate.touch()
        rc_a = a.wait(timeout=3600)
    finally:
        gate.touch()
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
        if a.poll() is None:
            a.kill()
            a.wait()
    secs = time.perf_counter() - t0
    refused = rc_b == 2 and b_during_a and f"held by pid {a.pid}" in err_b
    fault = "two cache builds racing for one directory (the second started once the first holds the lock)"
    if rc_a or not refused:
        rows = [(fault, f"FAILED: first exit {rc_a}: {_last(a_err.read_text())}; second exit {rc_b} "
                 f"({'during' if b_during_a else 'after'} the first): {_last(err_b)}", "–", f"{secs:.0f}")]
    else:
        c = compare(out, clean, logs)
        rows = [(fault, f"the second exited 2 after {secs_b:.1f} s naming the lock's holder (pid {a.pid}); the first "
                 f"complete {c['complete']}, verify {c['verify']}", f"{total - c['kept']:,}", f"{secs:.0f}")]
    rising = seen == sorted(seen)
    did = (f"{len(seen)} manifests read, {seen[0] if seen else 0} → {seen[-1] if seen else 0} shards; "
           + ("each whole, every file named whole and the clean build's" if not torn and rising and seen else
              f"FAILED: torn {torn[:3]}, shard counts {'rising' if rising else 'falling'}"))
    rows.append(("a reader polling the manifest every 0.5 s while the cache grows", did,
                 "0" if not torn and rising and seen else "–", f"{secs:.0f}"))
    return rows


def nan_in_last_shard(teacher: Path, logs: Path, work: Path, address: str, clean: dict) -> Row:
    """The build must stop naming shard, row group and row, publish nothing of that shard, and
    leave a valid manifest whose committed shards are the clean build's."""

    last = sorted(clean)[-1]
    out = work / "nan"
    call = clean[last].output.rows // CacheJob.batch_size // 2  # a batch halfway through the shard
    rc, secs, err = build(teacher, logs, out, address, ["--nan-at", f"{last}:{call}:5"])
    m = read_manifest(out)
    wrong = sum(e.output.rows for rel, e in m.shards.items()
                if e.output.sha256 != clean[rel].output.sha256)
    line = next((x for x in err.splitlines() if "returned nan in logits" in x), "")
    shard = os.path.abspath(logs / last)  # the workers name shards by absolute location
    named = line.startswith(f"distkd: error: {shard}: row group ") and "nothing of this shard is published" in line
    fault = f"the teacher returning NaN at one row of the last shard ({last})"
    if rc != 2 or not named or last in m.shards or (out / last).exists() or m.complete:
        return fault, f"FAILED: exit {rc}, {_last(err)}", "–", f"{secs:.0f}"
    where = line.split(": teacher ")[0].removeprefix(f"distkd: error: {shard}: ")
    left = len(temp_files(out))
    return (fault, f"exit 2 naming the shard, {where}; nothing of it published, {len(m.shards)} shards "
            f"committed, each the clean build's; manifest valid, not complete"
            + (f"; {left} temporary file(s) of interrupted shards, removed by the next build" if left else ""),
            f"{wrong:,}", f"{secs:.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=1024, help="rows per rank and step of the distillations")
    p.add_argument("--out", default="runs/bench-faults/scale")
    a = p.parse_args(argv)
    log.setup()

    work = Path(a.out)
    logs, teacher = work / "logs", work / "teacher"
    stamp = logs / "rows.txt"
    if not (stamp.is_file() and stamp.read_text() == f"{a.rows} {a.shards}"):
        logger.info(f"generating {a.rows:,} rows in {a.shards} shards …")
        generate(logs, a.rows, shards=a.shards, seed=0, preset="criteo", max_cardinality=100_000,
                 workers=min(2, os.cpu_count() or 1), force=True)
        stamp.write_text(f"{a.rows} {a.shards}")
    ensure_teacher(teacher, logs, ModelConfig(**TEACHER))
    for d in ("clean", "workers", "driver", "race", "nan", "head", "ray-head", "ray-head2", "markers",
              "train-reference", "train-ranks", "train-commit"):
        shutil.rmtree(work / d, ignore_errors=True)
    rows: list[Row] = []
    t_all = time.perf_counter()
    (work / "ray").mkdir(parents=True, exist_ok=True)
    with ray_cluster(work / "ray", head_cpus=2, dashboard=False) as address:
        logger.info("clean build …")
        rc, secs, err = build(teacher, logs, work / "clean", address, [])
        if rc:
            raise SystemExit(f"the clean build exited {rc}:\n{err[-3000:]}")
        clean = read_manifest(work / "clean").shards
        total = sum(e.output.rows for e in clean.values())
        rows.append(("clean build (reference)", f"{len(clean)} shards, {total:,} rows", "0", f"{secs:.0f}"))
        logger.info("one worker killed on every shard …")
        rows.append(workers_killed(teacher, logs, work, address, clean, total))
        logger.info("driver killed, then rerun …")
        rows.append(driver_killed(teacher, logs, work, address, clean, total))
        logger.info("two builds racing, a reader polling …")
        rows += race(teacher, logs, work, address, clean, total)
        logger.info("a teacher returning NaN …")
        rows.append(nan_in_last_shard(teacher, logs, work, address, clean))
    logger.info("the Ray head killed mid-build, then rerun on a new head …")
    rows.append(head_killed(teacher, logs, work, clean, total))
    rows += train_faults(work, logs, work / "clean", teacher, a.train_batch)
    print(f"\n## Faults at scale: {total:,} train rows, {len(clean)} shards, {time.perf_counter() - t_all:.0f} s\n")
    print("| fault | what distkd did | rows lost | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nReproduce: python -m distkd.bench.faults_scale --rows {a.rows} --shards {a.shards} "
          f"--train-batch {a.train_batch}")
    return 0 if all(r[2] == "0" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
