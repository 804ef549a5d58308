"""`make bench-faults`: every fault injected and every bad input tried, run now, as a table.

    python -m distkd.bench.faults [--out runs/bench-faults] [-k PATTERN]

Runs the pytest node ids of `CASES` (from a checkout: the tests are not in the wheel) with a
JUnit report, then prints the Reliability table of docs/reliability.md with this run's result and
seconds per row. That table is `readme_table()` (tests/test_bad_input.py checks they agree), so the
table says what the tests assert, and this command shows they still do.

Its "rows lost" column is this run's: each fault test that can lose rows records the rows a clean
run ends with and those its faulted run ended with (the `rows_lost` fixture, tests/conftest.py),
one JSON line per run into the folder named by $DISTKD_FAULT_RESULTS; the table prints expected
less kept, summed over a test's parameters. A row whose test records nothing (a refused input:
nothing is written to lose; a security check) prints "–"; the claim README makes is the
"claimed" column, and a run whose rows lost differ from the claim exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "DISTKD_FAULT_RESULTS"

# (fault or bad input, what distkd did, rows lost, the pytest node id that reproduces it)
CASES: list[tuple[str, str, str, str]] = [
    ("cache worker SIGKILLed mid-shard", "the shard is retried on the restarted worker; same bytes as a clean "
     "build", "0", "tests/test_cache.py::test_worker_killed_mid_shard_costs_one_retry"),
    ("one cache worker SIGKILLed on every shard of a build (4 deaths, max_attempts 2)", "each shard retried "
     "once on the restarted worker; the build completes, same bytes as a clean build", "0",
     "tests/test_cache.py::test_one_worker_killed_on_every_shard_still_builds_every_row_once"),
    ("cache driver SIGKILLed after its first commit (separate Ray head)", "the rerun computes only the 3 "
     "uncommitted shards", "0", "tests/test_cache.py::test_ray_address_build_resumes_after_driver_kill"),
    ("cache driver SIGKILLed, cache on S3", "the final keys hold only whole objects; the rerun resumes",
     "0", "tests/test_storage.py::test_cache_on_s3_interrupted_resumed_verified"),
    ("the Ray head (separate cluster, `--ray-address`) SIGKILLed mid-build", "exit 2 within seconds naming "
     "the lost cluster's address; committed shards whole, manifest valid; on a new head the rerun computes "
     "only the uncommitted shards, equal to a clean build", "0",
     "tests/test_faults_cluster.py::test_the_ray_head_killed_mid_build_fails_clearly_and_the_rerun_resumes"),
    ("S3 failing uploads mid-build (a 503, then 500s for every upload of one shard)", "the 503 is retried by "
     "the S3 client; the 500s stop the build, exit 2 naming the key; no half or temporary object, manifest "
     "valid; the rerun against a healthy store computes the rest and verifies", "0",
     "tests/test_faults_cluster.py::test_the_object_store_failing_an_upload_publishes_nothing_half"),
    ("teacher returns NaN in a later row group", "build stops naming shard, row group and row; nothing of that "
     "shard published, manifest valid", "0", "tests/test_teacher_contract.py::test_nan_in_a_later_row_group_stops_the_build"),
    ("two cache builds racing for one directory, a reader joining the cache as it grows",
     "the second exits 2 naming the lock's holder, writes nothing; the reader sees whole manifests and the same "
     "logits throughout", "0", "tests/test_faults.py::test_two_builds_race_while_a_reader_reads_the_growing_cache"),
    ("disk full (tmpfs) while a cache file is written", "exit 2 naming the file; nothing of that shard "
     "published, manifest valid, committed files whole", "0",
     "tests/test_faults.py::test_the_disk_filling_while_a_cache_file_is_written"),
    ("disk full (tmpfs) while a checkpoint is written", "the run stops naming the checkpoint; partial folder "
     "removed, the previous checkpoint stays the one `--resume` uses", "0",
     "tests/test_faults.py::test_the_disk_filling_while_a_checkpoint_is_written"),
    ("rank 0 SIGKILLed while committing a checkpoint", "the partial folder is never trusted; the resume "
     "starts from the previous checkpoint", "0",
     "tests/test_checkpoint.py::test_a_crash_while_committing_leaves_the_previous_checkpoint"),
    ("a rank SIGKILLed under torchrun --max-restarts", "restarted, resumed from the last checkpoint; the final "
     "model equals an uninterrupted run's", "0",
     "tests/test_restarts.py::test_torchrun_restarts_a_killed_rank_and_the_run_matches"),
    ("two ranks SIGKILLed in one run (rank 1, then rank 0 of the restarted group)", "two torchrun restarts, "
     "resumed from step 10 then 20; the final model equals an uninterrupted run's", "0",
     "tests/test_restarts.py::test_torchrun_survives_several_ranks_killed_in_one_run"),
    ("a hung rank", "the collective fails within launch.timeout_s; "
     "the launch exits 1 naming the rank", "0",
     "tests/test_restarts.py::test_a_hung_rank_fails_the_collective_within_the_timeout"),
    ("bad logs (wrong types, bad labels, duplicate ids, missing splits, …)", "`data validate` exit 2 naming the "
     "file, column and row",
     "0 (refused)", "tests/test_validate.py::test_bad_logs_are_clear_errors"),
    ("building into a cache of another teacher", "exit 2 naming both teachers; not a byte changed", "0 (refused)",
     "tests/test_bad_input.py::test_building_into_a_cache_of_another_teacher_is_refused"),
    ("a cache of other logs", "distill exits 2 naming the first shard, verify names all four", "0 (refused)",
     "tests/test_bad_input.py::test_a_cache_of_other_logs_is_refused"),
    ("a truncated, swapped or sha256-tampered cache file", "verify (and distill for the first two) exit 2 "
     "naming the file", "0 (refused)", "tests/test_bad_input.py::test_a_damaged_cache_is_refused_naming_the_file"),
    ("manifest paths with `..`, absolute, empty parts", "verify, build and distill exit 2 naming the path; the "
     "outside file is untouched", "0 (refused)",
     "tests/test_bad_input.py::test_manifest_paths_outside_the_cache_are_refused"),
    ("a cache file symlinked out of the cache", "verify and distill exit 2 naming where it resolves",
     "0 (refused)", "tests/test_bad_input.py::test_a_cache_file_symlinked_out_of_the_cache_is_refused"),
    ("a malformed job YAML (cache, teacher, distill)", "exit 2 naming the file and the YAML error",
     "0 (refused)", "tests/test_bad_input.py::test_a_malformed_job_file_is_refused"),
    ("an unknown key or a wrongly typed value in a cache job", "exit 2 naming the file and field",
     "0 (refused)", "tests/test_bad_input.py::test_a_cache_job_with_a_bad_field_is_refused"),
    ("zero or negative sizes (rows, shards, batch, workers, epochs, layers)", "exit 2 naming the flag or field; "
     "nothing created", "0 (refused)", "tests/test_bad_input.py::test_zero_or_negative_sizes_are_refused"),
    ("an export whose file is not the one export.json names", "exit 2 naming the file (sha256, or a path out "
     "of the export)", "0 (refused)", "tests/test_bad_input.py::test_an_export_whose_file_is_not_the_one_its_metadata_names"),
    ("a checkpoint of another run", "exit 2 naming the field that differs", "0 (refused)",
     "tests/test_checkpoint.py::test_a_checkpoint_of_another_run_is_refused"),
    ("an output directory that cannot be written (under a file, read-only mount)", "exit 2 naming it, before "
     "any work", "0 (refused)", "tests/test_bad_input.py::test_an_output_location_that_cannot_be_written"),
    ("pickled code in an export or teacher weights", "refused by torch.load(weights_only=True), in the driver; "
     "the sentinel file never appears", "–", "tests/test_security.py::test_exports_and_teacher_weights_never_run_pickled_code"),
    ("pickled code inside a `.pt2` teacher program (a sample input or a weight flagged pickled)",
     "refused before torch.export.load sees it (which would run it), naming the archive member; exit 2, "
     "nothing created; the sentinel file never appears", "–",
     "tests/test_security.py::test_a_teacher_program_with_a_crafted_pickle_is_refused_before_torch_loads_it"),
    ("pickled code in a checkpoint's DCP metadata", "refused naming the global; nothing runs", "–",
     "tests/test_checkpoint.py::test_loading_never_runs_pickled_code"),
    ("unsafe deserialization anywhere in distkd/", "none: torch.load only with weights_only=True, DCP metadata "
     "through an allow-list unpickler", "–", "tests/test_security.py::test_nothing_in_the_package_unpickles_what_a_job_names"),
    ("pickled code where Ray Tune's experiment state lies, on `distkd sweep` resume (driver SIGKILLed)",
     "never read: resume reads distkd's own state.json; finished trials kept, the rest rerun; the sentinel "
     "file never appears", "0", "tests/test_sweep.py::test_sweep_completes_resumes_after_its_driver_is_killed_and_its_best_export_evaluates"),
    ("a Ray endpoint on a public Service, a host port or 0.0.0.0 in the cluster manifests", "none, as shipped "
     "and as rendered by `distkd submit`", "–",
     "tests/test_security.py::test_no_ray_endpoint_on_a_public_service_or_all_interfaces"),
    ("a sentinel AWS_SECRET_ACCESS_KEY through an S3 run", "in no file, S3 object, Ray log or rendered job "
     "spec", "–", "tests/test_security.py::test_the_secret_key_never_reaches_a_file"),
]


def readme_table() -> str:
    """The Reliability table of docs/reliability.md, from `CASES`."""
    lines = ["| fault or bad input | what distkd did | rows lost | reproduce |", "|---|---|---|---|"]
    lines += [f"| {case} | {did} | {lost} | `pytest {node}` |" for case, did, lost, node in CASES]
    return "\n".join(lines)


def results_file(folder: str | Path, nodeid: str) -> Path:
    """Where a fault test's rows go: one file per node id, its parameters together."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("[")[0]) + ".jsonl")


def rows_lost(folder: Path, node: str) -> int | None:
    """Expected less kept rows over every run of `node` recorded in `folder`; None if none was."""
    path = results_file(folder, node)
    if not path.is_file():
        return None
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["expected"] - r["kept"] for r in runs)


def kept_rows(shards: dict, clean: dict) -> int:
    """Rows of a faulted cache's `shards` (a manifest's) kept: those of each shard whose logits file
    and ids are the clean build's, byte for byte. Rows lost = the clean build's rows less these."""
    return sum(e.output.rows for rel, e in shards.items()
               if rel in clean and e.output.sha256 == clean[rel].output.sha256 and e.input.ids == clean[rel].input.ids)


def clean_rows(clean: dict, split: str = "") -> int:
    """Rows of the clean build's shards (of `split` only, when named)."""
    return sum(e.output.rows for rel, e in clean.items() if rel.startswith(split))


def claimed(lost: str) -> int | None:
    """The number a claim such as "0" or "0 (refused)" states; None for "–"."""
    m = re.match(r"\d+", lost)
    return int(m.group()) if m else None


def results(junit: Path) -> dict[str, tuple[str, float]]:
    """Per node id of `CASES`: (passed | failed | skipped | not run, seconds), its parameters together."""
    out: dict[str, list] = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        module, name = tc.get("classname", ""), tc.get("name", "")
        node = f"{module.replace('.', '/')}.py::{name.split('[')[0]}"
        state = ("failed" if tc.find("failure") is not None or tc.find("error") is not None
                 else "skipped" if tc.find("skipped") is not None else "passed")
        prev = out.setdefault(node, ["passed", 0.0, 0])
        order = ["passed", "skipped", "failed"]
        prev[0] = max(prev[0], state, key=order.index)
        prev[1] += float(tc.get("time", 0))
        prev[2] += 1
    return {n: (f"{s} ({k})" if k > 1 else s, t) for n, (s, t, k) in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-faults")
    p.add_argument("-k", default=None, help="only the rows whose node id contains this")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.k is None or args.k in c[3]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    junit, rows = out / "junit.xml", out / "rows"
    for old in rows.glob("*.jsonl") if rows.is_dir() else ():
        old.unlink()  # this run's counts only
    rows.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    nodes = list(dict.fromkeys(c[3] for c in cases))
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                          *nodes], cwd=ROOT, env={**os.environ, RESULTS_ENV: str(rows.resolve())})
    got = results(junit) if junit.is_file() else {}
    print(f"\n## Reliability: {len(cases)} faults and bad inputs, {time.perf_counter() - t0:.0f}s\n")
    print("| fault or bad input | what distkd did | rows lost | claimed | this run | seconds | reproduce |")
    print("|---|---|---|---|---|---|---|")
    for case, did, lost, node in cases:
        state, secs = got.get(node, ("not run", 0.0))
        measured = rows_lost(rows, node)
        if measured is not None and measured != claimed(lost):
            rc = rc or 1  # the table would say something the run did not see
        print(f"| {case} | {did} | {'–' if measured is None else f'{measured:,}'} | {lost} | {state} | {secs:.1f} "
              f"| `pytest {node}` |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
