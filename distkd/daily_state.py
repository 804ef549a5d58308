"""A daily job's records: each day's step state, and the `current` pointer to the promoted student.

    OUT/days/D/state.json     the day's steps: started / done / failed, with what each found
    OUT/days/D/student/       the day's candidate (a training run: export/, summary.json)
    OUT/days/D/eval.json      the candidate against the promoted student (distkd.evaluate's result)
    OUT/current.json          the promoted student: {day, export, sha256, ..., history}

Every file is written whole (a temporary file beside it, fsync, rename): a killed run leaves
the previous version, never a torn one. `current.json` is written only after the export it
names was verified (its files hash to export.json's sha256), so it only ever names a complete
export; older promoted exports are removed only after it moved.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from distkd import storage
from distkd.config import ConfigError
from distkd.models.export import META_FILE, read_meta, verify_export

logger = logging.getLogger(__name__)

STEPS = ("validate", "drift", "cache", "distill", "eval", "promote")
CURRENT = "current.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path: Path, doc: dict) -> None:
    text = json.dumps(doc, indent=1, default=str) + "\n"
    storage.atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); it is written atomically, so something else wrote it") from None


class DayState:
    """OUT/days/D/state.json: per step its status (started, done, failed) and what it recorded.
    `status`: running, done, stopped (a check failed), waiting (the candidate waits for day D+1)."""

    def __init__(self, out: Path, day: str) -> None:
        self.dir = out / "days" / day
        self.path = self.dir / "state.json"
        self.doc = _read_json(self.path) or {"day": day, "status": "running", "steps": {}}

    @property
    def status(self) -> str:
        return self.doc["status"]

    def step(self, name: str) -> dict:
        return self.doc["steps"].get(name, {})

    def done(self, name: str) -> bool:
        return self.step(name).get("status") == "done"

    def restart(self) -> None:
        """A day stopped by a check starts over: its logs were fixed, so its checks run again."""
        self.doc = {"day": self.doc["day"], "status": "running", "steps": {},
                    "stopped_before": [*self.doc.get("stopped_before", []), self.doc["steps"]]}

    def save(self) -> None:
        _write_json(self.path, self.doc)

    def start(self, name: str) -> dict:
        """Mark `name` started (kept: `attempts` counts the starts); returns what it held before."""
        before = dict(self.step(name))
        self.doc["steps"][name] = {**before, "status": "started", "started_at": now(),
                                   "attempts": before.get("attempts", 0) + 1}
        self.doc["status"] = "running"
        self.save()
        return before

    def finish(self, name: str, status: str = "done", **record: Any) -> None:
        step = self.doc["steps"][name]
        step.update(record, status=status, finished_at=now())
        self.save()

    def end(self, status: str) -> None:
        self.doc["status"] = status
        self.doc["ended_at"] = now()
        self.save()


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """One `distkd daily` at a time per out directory: an flock on OUT/.lock, which the kernel
    drops when the holder dies, however it dies. ConfigError at once when it is taken."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{out}: another `distkd daily` is running on this out directory (it holds {out / '.lock'}); "
                          "wait for it to end") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def days_recorded(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "days").glob("*") if (p / "state.json").is_file())


# -- the promoted student --------------------------------------------------------------------


def read_current(out: Path) -> Optional[dict]:
    """current.json, or None before the first promotion."""
    return _read_json(out / CURRENT)


def check_export(export: Path, sha256: str) -> None:
    """The export is complete and is the one recorded: its files hash to `sha256`."""
    if not (export / META_FILE).is_file():
        raise ConfigError(f"{export}: no {META_FILE}: the export is incomplete or gone")
    got = verify_export(export, read_meta(export))
    if got != sha256:
        raise ConfigError(f"{export}: holds export {got[:12]}…, the daily state recorded {sha256[:12]}…")


def promote(out: Path, day: str, export: Path, sha256: str, keep_last: int, record: dict) -> dict:
    """Point current.json at `export` (verified first), then remove the promoted exports older
    than the last `keep_last`. Returns the new pointer."""
    check_export(export, sha256)
    before = read_current(out)
    history = [h for h in (before or {}).get("history", []) if h["day"] != day]
    history.append({"day": day, "export": str(export), "sha256": sha256, "promoted_at": now()})
    doc = {"day": day, "export": str(export), "sha256": sha256, "promoted_at": now(), **record,
           "history": history[-keep_last:]}
    _write_json(out / CURRENT, doc)
    logger.info(f"daily: promoted day {day}: {CURRENT} -> {export} (sha256 {sha256[:12]}…)")
    for old in history[:-keep_last]:
        remove_student(out, old["day"], f"promoted on {old['day']}, older than the last {keep_last}")
    return doc


def remove_student(out: Path, day: str, why: str) -> None:
    """Remove day `day`'s candidate run (never the one current.json names)."""
    cur = read_current(out)
    student = out / "days" / day / "student"
    if cur is not None and Path(cur["export"]).resolve().is_relative_to(student.resolve()):
        return
    if student.exists():
        shutil.rmtree(student)
        logger.info(f"daily: removed {student} ({why})")


def drop_checkpoints(student: Path) -> None:
    """A finished candidate keeps its export and summary; its checkpoints only served a resume."""
    ckpt = student / "checkpoints"
    if ckpt.exists():
        shutil.rmtree(ckpt)
