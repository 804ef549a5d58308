"""`distkd cache status`: per split (or partition), what is cached, missing or stale.

    cached   committed, and its log shard still has the fingerprint it was computed from
    missing  a shard of the logs with no logits yet (`distkd cache build` computes it)
    stale    committed, but the log shard changed (refused by every reader) or is gone
"""

from __future__ import annotations

from typing import Any

from distkd import storage
from distkd.cache import manifest as mf
from distkd.cache.age import age_on
from distkd.cache.contract import InputFingerprint, Manifest
from distkd.cache.reader import load_manifest, resolve_cache
from distkd.data.layout import PartitionRange, all_shards, is_partitioned, partition_values, split_files
from distkd.data.schema import SPLITS


def _state(manifest: Manifest, now: InputFingerprint, rel: str) -> str:
    entry = manifest.shards.get(rel)
    if entry is None:
        return "missing"
    return "stale" if entry.input.diff(now) else "cached"


def status(cache_dir: str, logs: str, teacher_sha256: str | None = None, key: str | None = None) -> dict[str, Any]:
    """{group: {cached, missing, stale, rows_cached, rows}} by split folder, or by partition
    value of `key` (default: the first key) for partitioned logs; plus committed shards whose
    log shard is gone."""
    cache_dir = resolve_cache(cache_dir, teacher_sha256)
    manifest = load_manifest(cache_dir)
    groups: dict[str, list[str]] = {}
    if is_partitioned(logs):
        for f in all_shards(logs):
            values = partition_values(storage.relative(logs, f) or "")
            k = key or next(iter(values), None)
            groups.setdefault(f"{k}={values.get(k)}", []).append(f)
    else:
        for split in SPLITS:
            try:
                groups[split] = split_files(logs, split)
            except ValueError:
                continue
    window = manifest.teacher.window
    out: dict[str, Any] = {"cache": cache_dir, "teacher": manifest.teacher.sha256, "window": window, "groups": {}}
    seen = set()
    for name, files in groups.items():
        g = {"cached": 0, "missing": 0, "stale": 0, "rows": 0, "rows_cached": 0, "first_missing": None, "age": None}
        k, _, value = name.partition("=")
        if window and k == window["key"]:  # days since the teacher's last training partition
            g["age"] = age_on(window, value, cache_dir)
        for f in files:
            rel = mf.rel_path(logs, f)
            seen.add(rel)
            now = mf.input_fingerprint(logs, f)
            state = _state(manifest, now, rel)
            g[state] += 1
            rows = now.rows
            g["rows"] += rows
            if state == "cached":
                g["rows_cached"] += rows
            elif state == "missing" and g["first_missing"] is None:
                g["first_missing"] = rel
        out["groups"][name] = g
    out["gone"] = sorted(rel for rel in manifest.shards if rel not in seen
                         and storage.size(storage.join(logs, rel)) is None)
    out["dropped"] = sorted(manifest.dropped)
    return out


def format_status(s: dict[str, Any]) -> str:
    w = max([6, *(len(k) for k in s["groups"])])
    win = s.get("window")
    trained = f", trained on {win['key']} {win['start']} .. {win['end']}" if win else ""
    lines = [f"cache {s['cache']} (teacher {s['teacher'][:12]}…{trained})",
             f"  {'split':<{w}} {'cached':>7} {'missing':>8} {'stale':>6} {'rows cached':>14}  "
             f"{'teacher age (days)  ' if win else ''}first missing"]
    for name, g in s["groups"].items():
        age = f"{'-' if g.get('age') is None else g['age']:>18}  " if win else ""
        lines.append(f"  {name:<{w}} {g['cached']:>7} {g['missing']:>8} {g['stale']:>6} "
                     f"{g['rows_cached']:>7,}/{g['rows']:<7,} {age}{g['first_missing'] or ''}")
    if s["gone"]:
        lines.append(f"  committed shards whose log shard is gone (the next build drops them): {s['gone'][:5]}")
    if s["dropped"]:
        lines.append(f"  dropped by earlier builds (log shard gone): {len(s['dropped'])}")
    return "\n".join(lines)


def run(args) -> int:
    # the command's output (stdout, for pipes), not a log line
    print(format_status(status(args.cache, args.logs, args.teacher_sha256, args.key)))
    return 0


__all__ = ["PartitionRange", "format_status", "status"]
