"""Durable file I/O: what the trainer's checkpoints and the teacher cache write, so that a crash
at any moment leaves either the old file (directory) or the new one, complete, never a mix.

A file is written beside its target under a temp name, fsynced, renamed over the target
(`os.replace` is atomic on POSIX), and the directory holding it is fsynced so that the rename
itself survives a power loss. A directory is filled under a temp name, every file in it and the
directory fsynced, then renamed into place (`publish_dir`). `sha256_file` is the checksum the
cache records for its shards. `check_writable` is what a run checks before it loads anything.
`locked` is the one inter-process lock: a command that writes a directory holds it, so a second
copy says who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk (through a fresh descriptor: the writer may have closed it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fsync_file(path)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root (root included)."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fsync_file(os.path.join(dirpath, filename))
        fsync_dir(dirpath)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write path atomically: write(tmp) fills a temp file beside it, which is fsynced and
    renamed over path; then path's directory is fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def durable_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(path), then fsync it: for a file inside a temp directory that is published whole."""
    write(path)
    fsync_file(path)


def publish_dir(tmp: Path, target: Path) -> None:
    """Make a filled temp directory the target, atomically: fsync everything in it, rename it,
    fsync the parent (target must not exist)."""
    fsync_tree(tmp)
    os.rename(tmp, target)
    fsync_dir(target.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path: str | Path, what: str) -> None:
    """Fail at once, naming path, if a directory cannot be made or written at path: the nearest
    existing ancestor must be a writable directory (probed with an unnamed temp file, so a
    read-only mount is caught even for root). Nothing is left behind."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = {errno.EROFS: "a read-only file system", errno.EACCES: "no write permission",
                  errno.EPERM: "no write permission", errno.ENOSPC: "no space left"}.get(
            err.errno, err.strerror or str(err))
        where = "" if existing == path else f" (its nearest existing folder {existing})"
        raise PermissionError(f"{what} {path}: cannot write there{where}: {reason}") from err


class Busy(RuntimeError):
    """Another process holds a lock that this one asked for without waiting."""


@contextlib.contextmanager
def locked(path: str | Path, what: str, *, wait: bool = False):
    """Hold an exclusive advisory lock (`fcntl.flock`) on the file `path` (created if missing; the
    holder's pid is written into it) for the `with` block. The kernel drops the lock when the
    holder exits, kill -9 included, so a stale lock file never blocks a later run.

    wait=False: raise `Busy` at once, naming `what`, the path and the holder's pid, if another
    process holds it. wait=True: block until it is free (one process prepares, the others wait)."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise Busy(f"{what} is in use by another process (pid {holder}), which holds the "
                       f"lock {path}; wait for it to finish, or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
