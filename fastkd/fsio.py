"""Durable file I/O: what the trainer's checkpoints and the teacher cache write, so that a crash
at any moment leaves either the old file (directory) or the new one, complete, never a mix.

A file is written beside its target under a temp name, fsynced, renamed over the target
(`os.replace` is atomic on POSIX), and the directory holding it is fsynced so that the rename
itself survives a power loss. A directory is filled under a temp name, every file in it and the
directory fsynced, then renamed into place (`publish_dir`). Both leave the modes the umask gives
(0644 files, 0755 directories under umask 022), not the 0600 / 0700 that safetensors' writer and
`tempfile.mkdtemp` create, so a team's shared cache or run is readable by the team. A write that
fails (a full disk, a read-only mount) removes its temp file and raises `WriteFailed`: one line
naming the path, the reason and the free space (`write_failed`).

`sha256_file` is the checksum the cache records for its shards; `remembered_sha256` the same,
computed once per version of a file and kept under `user_cache_dir()`. `check_writable` is what a
run checks before it loads anything. `locked` is the one inter-process lock: a command that writes
a directory holds it (`LOCK`, inside the directory), so a second copy says who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
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


LOCK = ".fastkd.lock"  # the lock file `locked` holds in a directory a command writes


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, and set it back at once
    os.umask(mask)
    return mask


def honour_umask(root: str | Path) -> None:
    """Give root (a file, or a directory and everything under it) the modes a plain open() or
    mkdir() would have given: 0666 / 0777 less the umask."""
    mask = umask()
    root = Path(root)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for filename in filenames:
            os.chmod(os.path.join(dirpath, filename), 0o666 & ~mask)


class WriteFailed(OSError):
    """A write that failed on the file system (full, read-only, no permission): its message is
    one line naming the path, the reason and the free space."""


# "os error 28" (safetensors, Rust), "[Errno 28]" (Python): the errno inside another error's text
_ERRNO_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def write_failed(path: str | Path, err: BaseException) -> WriteFailed | None:
    """The one-line error for a failed write of path, or None when err is not a file-system
    error (a bug stays a traceback). A file-system error: an OSError, an error whose text holds
    an errno (safetensors' SafetensorError), or torch.save's stream writer failing
    ("inline_container.cc": it names no errno, so a full disk is told by the free space)."""
    text = str(err)
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (match := _ERRNO_TEXT.search(text)):
        code = int(match.group(1) or match.group(2))
    if not isinstance(err, OSError) and code is None and "inline_container.cc" not in text:
        return None
    free = free_bytes(path)
    if code is not None:
        reason = os.strerror(code).lower()
    elif free is not None and free < 1 << 20:
        reason = "no space left on device"
    else:
        reason = text.splitlines()[0] if text else type(err).__name__
    room = "" if free is None else f"; {free / 2**20:,.1f} MiB free there"
    hint = " (free some space, then run the same command again)" if (
        code == errno.ENOSPC or (code is None and free is not None and free < 1 << 20)) else ""
    failed = WriteFailed(f"cannot write {path}: {reason}{room}{hint}")
    failed.errno = code
    return failed


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system that holds path (or its nearest existing
    ancestor), None if that cannot be read."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def failed_writes_named(path: str | Path):
    """Inside the block, a file-system error while writing becomes `write_failed(path, ...)`."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as err:
        named = write_failed(path, err)
        if named is None:
            raise
        raise named from err


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write path atomically: write(tmp) fills a temp file beside it, which gets the umask's
    mode, is fsynced and renamed over path; then path's directory is fsynced. A failed write
    removes the temp file and raises `WriteFailed` (path named) for a file-system error."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with failed_writes_named(path):
            write(tmp)
            honour_umask(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def durable_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(path), then fsync it: for a file inside a temp directory that is published whole."""
    write(path)
    fsync_file(path)


def publish_dir(tmp: Path, target: Path) -> None:
    """Make a filled temp directory the target, atomically: give everything in it the umask's
    modes, fsync it all, rename it, fsync the parent (target must not exist)."""
    honour_umask(tmp)
    fsync_tree(tmp)
    os.rename(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def temp_dir_beside(target: Path):
    """A temp directory beside target to fill and `publish_dir` as target: temp directories that
    interrupted writes of target left are removed first, this one is removed if the block fails,
    and a file-system error in it is named after target (`write_failed`)."""
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        with failed_writes_named(target):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_sha256(value) -> str:
    """sha256 of a JSON value, keys sorted: the checksum a JSON file records of its own content."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def user_cache_dir() -> Path:
    """fastkd's own cache: $FASTKD_CACHE, else $XDG_CACHE_HOME/fastkd or ~/.cache/fastkd."""
    if os.environ.get("FASTKD_CACHE"):
        return Path(os.environ["FASTKD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastkd"


def remembered_sha256(path: str | Path) -> str:
    """sha256 of a file's whole content, computed once per version of the file and remembered
    under user_cache_dir()/sha256, keyed by its device, inode, size, mtime and ctime: a file
    rewritten or edited in place (which moves its ctime, whatever its mtime is set back to) is
    hashed again. The record is best effort: an unwritable cache only costs the hash each time."""
    path = Path(path).resolve()
    st = path.stat()
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    record = user_cache_dir() / "sha256" / (
        hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(record.read_text())
        if saved.get("path") == str(path) and saved.get("key") == key:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record, lambda tmp: tmp.write_text(json.dumps(
            {"path": str(path), "key": key, "sha256": digest})))
    except OSError:
        pass
    return digest


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


class Busy(OSError):
    """Another process holds a lock that this one asked for without waiting (an OSError: the
    commands report it in one line, as any other file-system refusal)."""


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
