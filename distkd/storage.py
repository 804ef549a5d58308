"""Where bytes live: a location is a local path (or file://…), used with plain os calls, or a
URI for `pyarrow.fs.FileSystem.from_uri`: s3://bucket/logs, gs://…, hdfs://…. For S3-compatible
servers pyarrow reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the usual credentials (or use
`s3://bucket/x?endpoint_override=host:port&scheme=http`). Each process resolves locations from
its own environment (Ray workers: see distkd.cache.pool).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import posixpath
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
TEMP_MARK = ".tmp-"  # temporary names are `.<name>.tmp-<tag>`: hidden, never `*.parquet`


class StorageError(OSError):
    """A location could not be reached, or its store refused the request (one line, naming it)."""


def is_remote(loc: str | Path) -> bool:
    s = os.fspath(loc)
    return not s.startswith("file://") and _SCHEME.match(s) is not None


def local_path(loc: str | Path) -> str:
    s = os.fspath(loc)
    return urlsplit(s).path if s.startswith("file://") else s


def absolute(loc: str | Path) -> str:
    """A canonical name: local paths resolved (symlinks, `..`), URIs unchanged."""
    return loc if is_remote(loc) else str(Path(local_path(loc)).resolve())


def join(loc: str | Path, *parts: str) -> str:
    if not is_remote(loc):
        return str(Path(local_path(loc), *parts))
    u = urlsplit(loc)
    return f"{u.scheme}://{u.netloc}{posixpath.join(u.path or '/', *parts)}" + (f"?{u.query}" if u.query else "")


def basename(loc: str | Path) -> str:
    return posixpath.basename(urlsplit(loc).path.rstrip("/")) if is_remote(loc) else Path(local_path(loc)).name


def relative(root: str | Path, loc: str | Path) -> str | None:
    """`loc` relative to `root` (posix), or None when it is not under it."""
    if not is_remote(loc):
        try:
            return Path(local_path(loc)).resolve().relative_to(Path(local_path(root)).resolve()).as_posix()
        except ValueError:
            return None
    a, b = urlsplit(str(root)), urlsplit(loc)
    prefix = a.path.rstrip("/") + "/"
    return b.path[len(prefix):] if a[:2] == b[:2] and b.path.startswith(prefix) else None


@functools.lru_cache(maxsize=16)
def _from_uri(root: str, env: tuple) -> tuple[pafs.FileSystem, str]:
    try:
        return _call(root, pafs.FileSystem.from_uri, root)
    except ValueError as e:  # pyarrow knows no such file system (or the URI does not parse)
        raise StorageError(f"{root}: {e}") from None


def _fs(loc: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a URI; one filesystem per root (and AWS_* environment)."""
    u = urlsplit(loc)
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    fs, base = _from_uri(f"{u.scheme}://{u.netloc}" + (f"?{u.query}" if u.query else ""), env)
    return fs, base.rstrip("/") + u.path.rstrip("/")


def _call(loc: str, fn: Callable[..., Any], *args: Any) -> Any:
    """One store call: FileNotFoundError naming `loc`, or a one-line StorageError for the rest."""
    try:
        return fn(*args)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such object", loc) from None
    except OSError as e:  # pyarrow's I/O errors; a bad file (ArrowInvalid, a ValueError) passes as it is
        if isinstance(e, StorageError):
            raise
        hint = ""
        if loc.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default"
            hint = f" (S3 endpoint: {endpoint}; check AWS_ENDPOINT_URL and the credentials)"
        raise StorageError(f"{loc}: {' '.join(str(e).split())}{hint}") from None


def size(loc: str | Path) -> int | None:
    """Bytes of a file; None when there is no file there."""
    if not is_remote(loc):
        return os.stat(local_path(loc)).st_size if os.path.isfile(local_path(loc)) else None
    fs, path = _fs(loc)
    info = _call(loc, fs.get_file_info, path)
    return info.size if info.type == pafs.FileType.File else None


def list_files(loc: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted locations of the files under `loc` (and below, with `recursive`) named `*suffix`."""
    if not is_remote(loc):
        d = Path(local_path(loc))
        return sorted(str(p) for p in (d.rglob if recursive else d.glob)(f"*{suffix}") if p.is_file())
    fs, path = _fs(loc)
    infos = _call(loc, fs.get_file_info, pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted(join(loc, i.path[len(path) + 1:]) for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def open_input(loc: str | Path) -> pa.NativeFile:
    """A random-access pyarrow file (seek, read, size); close it, or use `with`."""
    if not is_remote(loc):
        return pa.OSFile(local_path(loc))
    fs, path = _fs(loc)
    return _call(loc, fs.open_input_file, path)


def open_parquet(loc: str | Path, **kw: Any) -> pq.ParquetFile:
    """The ParquetFile of a location; a local path opens exactly as `pq.ParquetFile(path)`."""
    if not is_remote(loc):
        return pq.ParquetFile(local_path(loc), **kw)
    fs, path = _fs(loc)
    return _call(loc, lambda: pq.ParquetFile(path, filesystem=fs, **kw))


def sha256_file(loc: str | Path) -> str:
    """sha256 of a file (a path, or a storage URI such as s3://…)."""
    h = hashlib.sha256()
    with open_input(loc) as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(loc: str | Path) -> str:
    if not is_remote(loc):
        return Path(local_path(loc)).read_text()
    fs, path = _fs(loc)
    with _call(loc, fs.open_input_stream, path) as f:
        return _call(loc, f.read).decode()


def makedirs(loc: str | Path) -> None:
    """Create a local folder; object stores have none (writing a key creates its prefix)."""
    if not is_remote(loc):
        Path(local_path(loc)).mkdir(parents=True, exist_ok=True)


def ensure_writable_dir(loc: str | Path, what: str = "output directory") -> None:
    """Create a local output folder and prove a file can be written in it (then removed), or
    raise StorageError naming it: a parent that is a file, a read-only mount, no permission,
    a full disk. Called before anything is written, so a bad output location costs nothing."""
    if is_remote(loc):
        return
    path = Path(local_path(loc))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / temp_name("write-probe", str(os.getpid()))
        with open(probe, "wb") as fh:
            fh.write(b"x")
        probe.unlink()
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.ENOTDIR:
            why += " (a parent of it is a file)"
        raise StorageError(f"{loc}: cannot write the {what} there: {why}") from None


def delete(loc: str | Path) -> None:
    """Delete one file; nothing if there is none."""
    if not is_remote(loc):
        return Path(local_path(loc)).unlink(missing_ok=True)
    fs, path = _fs(loc)
    with contextlib.suppress(FileNotFoundError):
        _call(loc, fs.delete_file, path)


def temp_name(name: str, tag: str | None = None) -> str:
    return f".{name}{TEMP_MARK}{tag or f'{socket.gethostname()}-{os.getpid()}'}"


def is_temp(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def write_atomic(loc: str | Path, write: Callable[[Any], Any], tag: str | None = None) -> None:
    """Call write(file), then commit the bytes at `loc` whole, or leave `loc` as it was.

    Local: temporary file beside it, fsync, rename, fsync the folder. Object store: the whole
    object goes to a temporary key beside it, then `fs.move` to `loc`: S3 has no rename, the
    move is a server-side copy of that complete object (then a delete), so the final key only
    ever holds a complete object. Not `loc` directly: a stream is closed on an exception too,
    and closing completes the upload, publishing a truncated object. On failure the temporary
    key is deleted; a killed process leaves at most a temporary key (the cache build removes
    those) or an unfinished multipart upload, which no reader sees. S3 copies up to 5 GiB.
    """
    if not is_remote(loc):
        atomic_write_bytes(Path(local_path(loc)), write, tag)
        return
    fs, path = _fs(loc)
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, temp_name(name, tag))
    try:
        out = _call(loc, fs.open_output_stream, tmp)
        try:
            write(out)
        finally:
            _call(loc, out.close)  # the upload completes: a whole object, at the temporary key
        _call(loc, fs.move, tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # gone already, or the store is unreachable
            fs.delete_file(tmp)
        raise


def atomic_write_bytes(path: Path, write: Callable[[Any], Any], tag: str | None = None) -> None:
    """Call write(fileobj) on a temporary file next to `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name, tag or str(os.getpid())))
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(partial: Path, final: Path) -> None:
    """Publish the complete folder `partial` as `final` in one rename (an older `final` is
    removed first), then fsync the parent: readers see the old folder, none, or the new one."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    fsync_dir(final.parent)
