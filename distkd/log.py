"""distkd's logging: one `distkd` logger tree, a level, and a rank filter.

Every module logs through `logging.getLogger(__name__)`; `setup()` gives the `distkd` tree one
stderr handler, so the messages read as the bare lines they always were (progress lines
included: rows, rows/s, ETA). The level comes from `--log-level`, else `DISTKD_LOG_LEVEL`, else
INFO; `setup` writes it back to the environment so ranks, Ray actors and subprocesses that
call `setup()` themselves log at the same level.

Rank filter: under a launcher (RANK set) only rank 0 logs below WARNING, so N ranks do not
print N copies of every progress line; warnings and errors from any rank get through,
prefixed with the rank that raised them. At DEBUG every rank logs.

The tree does not propagate to the root logger: `quiet()` holds the root (and
torchrec's, torch.distributed's) at ERROR to silence third-party noise, which must not
silence distkd's own lines.

A progress line that redraws itself (carriage return, no newline) passes `extra={"end": ""}`.

`print` is for a command's primary result on stdout only (a report table, JSON, `cache status`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

ENV = "DISTKD_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROOT = "distkd"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (pytest's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # StreamHandler.emit with the record's own line end: a progress line redraws in place
        try:
            self.stream.write(self.format(record) + getattr(record, "end", self.terminator))
            self.flush()
        except Exception:
            self.handleError(record)


class RankFilter(logging.Filter):
    """Rank 0 (or no launcher) logs everything; other ranks only WARNING and above, tagged.
    The rank is read per record: the in-process launcher sets RANK after import."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        if rank in (None, "", "0"):
            return True
        if record.levelno < logging.WARNING and logging.getLogger(ROOT).level > logging.DEBUG:
            return False
        if not getattr(record, "_distkd_ranked", False):
            record.msg = f"[rank {rank}] {record.msg}"
            record._distkd_ranked = True
        return True


def level_from(value: str | None) -> int:
    """A level name (any case) to its number; None means `DISTKD_LOG_LEVEL` or INFO."""
    name = (value or os.environ.get(ENV) or "INFO").upper()
    if name not in LEVELS:
        raise ValueError(f"log level {name!r}: expected one of {', '.join(LEVELS)} "
                         f"(from {'--log-level' if value else ENV})")
    return getattr(logging, name)


def current_level() -> str:
    """The level in force, by name: what a process started elsewhere (a Ray worker on another
    node, which does not inherit this environment) passes to its own `setup`."""
    lvl = logging.getLogger(ROOT).level
    return logging.getLevelName(lvl if lvl != logging.NOTSET else level_from(None))


@contextlib.contextmanager
def silenced(name: str, level: int = logging.WARNING):
    """Hold logger `name` (and its children) at `level` for the block: a benchmark's timed call
    without its progress lines."""
    target = logging.getLogger(name)
    before = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(before)


def setup(level: str | None = None) -> logging.Logger:
    """Configure the `distkd` logger tree (idempotent: a second call only sets the level)."""
    root = logging.getLogger(ROOT)
    lvl = level_from(level)
    root.setLevel(lvl)
    os.environ[ENV] = logging.getLevelName(lvl)
    if not any(getattr(h, "_distkd", False) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankFilter())
        handler._distkd = True
        root.addHandler(handler)
    root.propagate = False
    return root


def quiet() -> None:
    """Silence the planner's and DDP's routine warnings; errors still surface."""

    for name in ("", "torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
