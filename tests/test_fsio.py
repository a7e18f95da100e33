"""fastkd.fsio: modes that follow the umask, failed writes named in one line (and cleaned up), the
remembered whole-file sha256, and the inter-process lock."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastkd import fsio


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_writes_and_published_dirs_take_the_umask(tmp_path, umask_027):
    """safetensors writes 0600 and tempfile.mkdtemp makes 0700: a shared cache or run would be
    unreadable to the team. What fsio writes gets 0666 / 0777 less the umask (here 027)."""
    assert fsio.umask() == 0o027
    shard = tmp_path / "shard.safetensors"
    fsio.atomic_write(shard, lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    assert mode(shard) == 0o640
    target = tmp_path / "student"
    with fsio.temp_dir_beside(target) as tmp:
        assert mode(tmp) == 0o700  # mkdtemp's
        (tmp / "sub").mkdir()
        save_file({"x": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))
        fsio.publish_dir(tmp, target)
    assert mode(target) == mode(target / "sub") == 0o750
    assert mode(target / "sub" / "model.safetensors") == 0o640


def test_a_failed_write_is_one_line_with_the_path_and_the_free_space(tmp_path, monkeypatch):
    """A full disk as each writer reports it: an OSError (ENOSPC), safetensors' error (errno in
    its text), torch.save's stream writer (no errno: told by the free space). The temp file is
    removed; an error that is not the file system's stays as it is."""
    from safetensors import SafetensorError

    target = tmp_path / "out.bin"
    for err in (OSError(errno.ENOSPC, "No space left on device"),
                SafetensorError("Error while serializing: I/O error: No space left on device "
                                "(os error 28)"),
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "
                             "vs 534")):
        def failing(tmp, err=err):
            tmp.write_bytes(b"partial")
            raise err

        monkeypatch.setattr(fsio, "free_bytes", lambda path: 12345)  # a full disk
        with pytest.raises(fsio.WriteFailed) as failed:
            fsio.atomic_write(target, failing)
        message = str(failed.value)
        assert message == (f"cannot write {target}: no space left on device; 0.0 MiB free "
                           "there (free some space, then run the same command again)"), message
        assert not list(tmp_path.iterdir())  # the partial temp file is gone
    monkeypatch.setattr(fsio, "free_bytes", lambda path: 10 * 2**30)
    with pytest.raises(fsio.WriteFailed, match=r"read-only file system; 10,240.0 MiB free"):
        fsio.atomic_write(target, lambda tmp: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")))

    def bug(tmp):
        raise RuntimeError("a bug, not the disk")

    with pytest.raises(RuntimeError, match="^a bug, not the disk$"):
        fsio.atomic_write(target, bug)
    assert not list(tmp_path.iterdir())


def test_remembered_sha256_is_computed_once_per_version_of_a_file(tmp_path, monkeypatch):
    """The whole file's sha256, remembered (keyed by inode, size, mtime and ctime): a second call
    reads nothing; a byte changed in the middle, even with its mtime set back, is hashed again."""
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(3 << 20))
    weights.write_bytes(bytes(data))
    hashed = []
    real = fsio.sha256_file
    monkeypatch.setattr(fsio, "sha256_file", lambda path: hashed.append(path) or real(path))
    first = fsio.remembered_sha256(weights)
    assert first == real(weights) and len(hashed) == 1
    assert fsio.remembered_sha256(weights) == first and len(hashed) == 1
    stat = weights.stat()
    time.sleep(0.01)
    data[len(data) // 2] ^= 0x01  # the middle: neither the first nor the last MiB
    with open(weights, "r+b") as f:
        f.write(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its mtime as it was
    assert weights.stat().st_size == stat.st_size
    assert fsio.remembered_sha256(weights) != first and len(hashed) == 2


def test_a_second_holder_of_the_lock_names_the_first(tmp_path):
    """Two copies of one command on one directory: the second is refused at once, naming the
    first one's pid; the lock goes with its holder, kill -9 included."""
    lock = tmp_path / fsio.LOCK
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fastkd import fsio\n"
         f"with fsio.locked({str(lock)!r}, 'x'):\n    print('held', flush=True)\n"
         "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fsio.Busy, match=rf"run directory /r is in use by another process "
                                            rf"\(pid {holder.pid}\)"):
            with fsio.locked(lock, "run directory /r"):
                pass
        assert isinstance(fsio.Busy("x"), OSError)  # the commands report it in one line
    finally:
        holder.kill()
        holder.wait()
    with fsio.locked(lock, "run directory /r"):  # released with its killed holder
        pass
