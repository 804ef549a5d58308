"""One build per cache directory: an flock on `CACHE_DIR/.lock`, held by the driver.

The kernel drops the lock when the holder dies, however it dies, so a killed build never
blocks the next one. flock is reliable on local filesystems and most NFSv4 setups; on a
cluster run the driver (the only process that takes the lock) against a filesystem where
it is.

Object storage (s3://… caches) has no lock: flock needs a file system, and an object store
offers no primitive here that a killed holder would release. There `BuildLock` does
nothing and the build says so in its log: run one build per cache location at a time.
(Two builds would not corrupt committed files, each is written whole, but they would redo
each other's work and the last manifest written wins.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from distkd import storage
from distkd.cache.contract import LOCK, CacheError
from distkd.cache.manifest import remove_temp_files

logger = logging.getLogger(__name__)


class BuildLock:
    """Exclusive (a build) or shared (a verify) lock; CacheError at once if it is taken."""

    def __init__(self, cache_dir: str | Path, shared: bool = False):
        # None on object storage: no lock there (see above)
        self.path = None if storage.is_remote(cache_dir) else Path(storage.local_path(cache_dir)) / LOCK
        self.shared = shared
        self.fd: int | None = None

    def __enter__(self) -> "BuildLock":
        if self.path is None:
            return self
        if self.shared and not self.path.exists():
            return self  # nothing ever built here; a read-only directory needs no lock file
        flags = os.O_RDONLY if self.shared else os.O_RDWR | os.O_CREAT
        fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheError(
                f"{self.path.parent}: a cache build is running in this directory (lock {self.path} held by "
                f"{holder}); wait for it to finish, or stop it and rerun"
            ) from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


READERS = ".readers"


class ReaderLock:
    """A shared flock on `CACHE_DIR/.readers`, held by every process reading the cache (the
    loaders of a distillation) for as long as it reads; `distkd cache gc` removes a cache only
    when it can take this lock (and the build lock) exclusively. Builds do not take it: a
    cache can grow while it is read. A directory readers cannot write (another team's
    cache) is read without a pin. Nothing on object storage."""

    def __init__(self, cache_dir: str | Path, exclusive: bool = False):
        self.path = None if storage.is_remote(cache_dir) else Path(storage.local_path(cache_dir)) / READERS
        self.exclusive = exclusive
        self.fd: int | None = None

    def acquire(self) -> "ReaderLock":
        if self.path is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        except PermissionError:
            return self
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(f"{self.path.parent}: " + ("in use by a reader" if self.exclusive else
                             "being removed by `distkd cache gc`")) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()


@contextmanager
def writing(out: str, who: str, run: str) -> Iterator[None]:
    """The cache at `out` opened for writing by one `who` (a build, an import): the folder writable,
    the build lock held (object storage has none: said once), and the temporary files an
    interrupted `run` left removed."""
    storage.ensure_writable_dir(out, "cache directory")
    if storage.is_remote(out):
        logger.info(f"{who}: {out}: object storage has no build lock; run one {run} of this cache at a time")
    with BuildLock(out):
        for p in remove_temp_files(out):
            logger.info(f"{who}: removed {p} (left by an interrupted {run})")
        yield
