"""The token store: the data read, tokenized and packed once (fastkd.prepare), then memory-mapped by
every run, resume, torchrun rank and `fastkd cache-teacher` on the same data.

Where it lives: DATA_CACHE/NAME, where DATA_CACHE is `--data-cache DIR` (a directory a team can
share), else $FASTKD_CACHE/data, else ~/.cache/fastkd/data ($XDG_CACHE_HOME/fastkd/data), under
the one cache root (`fsio.user_cache_dir`). NAME is the first data path's name, seq_len and the
digest of the recipe: the data paths (absolute, as given), the tokenizer's fingerprint
(fastkd.tokens), seq_len, packing, utf8_errors and the store's format.

When it is prepared: when there is no store for the recipe yet, or when the data files (every
file the paths expand to) no longer have the sizes and mtimes it recorded (stale: prepared again,
a message naming the change). A changed tokenizer or option makes another recipe, so another
store.

Safety: a process holds the store's lock (fastkd.fsio.locked on DATA_CACHE/.NAME.lock, which the
kernel releases on kill -9) while it checks, prepares or opens the store, so a second process
wanting the same store waits, then maps it. Preparation writes DATA_CACHE/.tmp-NAME-PID and
renames it into place once its manifest is written: a kill -9 at any moment leaves nothing a
later run trusts (it removes the leftovers). Opening checks the manifest's checksum, each file's
size and its Arrow stream's structure; each chunk's sha256 is checked when a row of it is first
read. A damaged store is refused, naming the file. A store in a directory this user cannot write
is mapped without the lock (a team's store, prepared by its owner).

Under torchrun one rank prepares (`StoreOptions.prepare`: the others wait for it) and every rank
maps the same files: the page cache holds one copy. A process holds the rows' index, never the
rows: `StoredRows.take` reads the rows a batch needs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastkd import fsio
from fastkd.checks import check_num_proc
from fastkd.data import Blocks, DiskRows, cat, split
from fastkd.prepare import FORMAT, Preparation, to_arrow
from fastkd.readers import DataSpec, expand_data
from fastkd.tokens import fingerprint

POLL_S = 0.5  # how often a process that waits for another one's preparation looks again

log = logging.getLogger("fastkd")


@dataclass(frozen=True)
class StoreOptions:
    """How this process gets its token store (not what the store holds): data_cache (None: the
    default, `store_root`), num_proc (fastkd.prepare), a progress bar, and prepare=False to wait
    for another process (torchrun's rank 0) to prepare it."""

    data_cache: str | None = None
    num_proc: int | None = None
    progress: bool = False
    prepare: bool = True

    def __post_init__(self) -> None:
        check_num_proc(self.num_proc)


def store_root(data_cache: str | None) -> Path:
    """Where token stores live: data_cache, else fsio.user_cache_dir()/data."""
    return Path(data_cache).expanduser() if data_cache else fsio.user_cache_dir() / "data"


def recipe(spec: DataSpec, tokenizer) -> dict:
    """What a store is made from, and how (its name's digest)."""
    made_of = {"format": FORMAT, "data": list(spec.paths), "tokenizer": fingerprint(tokenizer),
               "seq_len": spec.seq_len, "packing": spec.packing, "utf8_errors": spec.utf8_errors}
    # routed: the same rows, each token's teacher besides (a store without routes keeps its name)
    return made_of if spec.routes is None else {**made_of, "routes": list(spec.routes)}


def store_name(spec: DataSpec, made_of: dict) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.paths[0]).stem)[:40] or "data"
    digest = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()
    return f"{stem}-L{spec.seq_len}-{digest[:16]}"


def stamps(sources: list[Path]) -> list[dict]:
    """Size and mtime of every data file (a saved dataset: of each file in it)."""
    files = [f for s in sources for f in ([s] if s.is_file() else sorted(
        p for p in s.rglob("*") if p.is_file()))]
    return [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in files]


# ----------------------------------------------------------------------------------------------
# Getting a store: find it, or prepare it, under its lock.


def open_store(spec: DataSpec, tokenizer, options: StoreOptions | None = None) -> TokenStore:
    """The token store of spec and tokenizer, mapped: found fresh, else prepared here (or, with
    options.prepare=False, by another process this one waits for)."""
    options = options or StoreOptions()
    started = time.perf_counter()
    sources = expand_data(list(spec.paths))
    made_of = recipe(spec, tokenizer)
    root = store_root(options.data_cache)
    name = store_name(spec, made_of)
    directory = root / name
    waited = False
    while True:
        with _locked(root, name) as writable:
            files = stamps(sources)
            why = _why_prepare(directory, made_of, files)
            if why is None:
                store, action = TokenStore(directory), "mapped"
                break
            if not writable:
                raise PermissionError(f"data_cache {root}: the token store {name} must be "
                                      f"prepared ({why}), but this user cannot write there; "
                                      "use another --data-cache")
            if options.prepare:
                log.info("data: %s: preparing the token store %s", why, directory)
                _prepare(spec, sources, tokenizer, directory, {"recipe": made_of,
                                                               "files": files}, options)
                store, action = TokenStore(directory), "prepared"
                break
        if not waited:
            log.info("data: waiting for another process to prepare the token store %s",
                     directory)
            waited = True
        time.sleep(POLL_S)
    log.info("data: token store %s %s in %.2f s: %s", directory, action,
             time.perf_counter() - started, store.summary())
    return store


def load_blocks(paths: list[str], tokenizer, seq_len: int, eval_fraction: float, *,
                packing: bool = True, utf8_errors: str = "strict",
                options: StoreOptions | None = None,
                routes: list[str | None] | None = None) -> tuple[StoredRows, StoredRows]:
    """(train, held-out) rows of the data files, from their token store (`open_store`): the
    fixed-seed split of fastkd.data.split, on disk. routes: `DataSpec.routes`."""
    spec = DataSpec(tuple(paths), seq_len, packing, utf8_errors,
                    None if routes is None else tuple(routes))
    return split(open_store(spec, tokenizer, options).rows(), eval_fraction)


@contextlib.contextmanager
def _locked(root: Path, name: str):
    """Hold the store's lock (saying whom this process waits for, if it must); yields whether
    this user can write the root (if not: no lock, the store read as it is). Leftovers of
    interrupted preparations are removed first."""
    stack, writable = contextlib.ExitStack(), True
    what, path = f"the token store {root / name}", root / f".{name}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        try:
            stack.enter_context(fsio.locked(path, what))
        except fsio.Busy as busy:
            log.info("data: waiting: %s", busy)
            stack.enter_context(fsio.locked(path, what, wait=True))
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        writable = False
    with stack:
        if writable:
            for leftover in [*root.glob(f".tmp-{name}-*"), *root.glob(f".old-{name}-*")]:
                shutil.rmtree(leftover, ignore_errors=True)
        yield writable


def _why_prepare(directory: Path, made_of: dict, files: list[dict]) -> str | None:
    """None if the store in directory is there and fresh; else why it must be prepared. A
    damaged manifest raises (`read_manifest`)."""
    if not directory.exists():
        return "no token store for this data, tokenizer and options yet"
    manifest = read_manifest(directory)
    if manifest.get("recipe") != made_of:
        raise _damaged(directory / "manifest.json", directory, "its recipe is not the one its "
                       "name stands for")
    old = {f["path"]: f for f in manifest["files"]}
    now = {f["path"]: f for f in files}
    for path in [*old, *(p for p in now if p not in old)]:
        if path not in now:
            return f"the data file {path} is gone since the token store was prepared (stale)"
        if path not in old:
            return f"the data file {path} is new since the token store was prepared (stale)"
        if old[path] != now[path]:
            return (f"the data file {path} changed since the token store was prepared (size "
                    f"{old[path]['bytes']} -> {now[path]['bytes']} bytes, mtime "
                    f"{_when(old[path])} -> {_when(now[path])}; stale)")
    if list(old) != list(now):
        return "the data files are in another order than when the token store was prepared"
    return None


def _when(stamp: dict) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp["mtime_ns"] / 1e9))


def _prepare(spec: DataSpec, sources: list[Path], tokenizer, directory: Path, head: dict,
             options: StoreOptions) -> None:
    """Prepare the store in a temp directory beside it, then rename it into place (an old,
    stale one moved aside first and removed after)."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    tmp.mkdir()
    try:
        data = Preparation(spec, sources, tokenizer, tmp, options.num_proc,
                           options.progress).run()
        manifest = {"format": FORMAT, **head, **data}
        manifest["sha256"] = _digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        if directory.exists():
            os.rename(directory, old)
        fsio.publish_dir(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _damaged(path: Path, directory: Path, what: str) -> ValueError:
    return ValueError(f"token store {path} is damaged ({what}); delete {directory} and run again "
                      "to prepare it anew")


def read_manifest(directory: Path) -> dict:
    """A store's manifest, checked (JSON, checksum, format); errors name the file."""
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(path, directory, "missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, directory, f"not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("sha256") != _digest(manifest):
        raise _damaged(path, directory, "its checksum does not match its content")
    if manifest.get("format") != FORMAT:
        raise _damaged(path, directory, f"format {manifest.get('format')!r}, not {FORMAT}")
    return manifest


# ----------------------------------------------------------------------------------------------
# A store, mapped.


class TokenStore:
    """A prepared store, opened: its manifest and its parts' Arrow streams, memory-mapped and
    checked (size, schema, chunks); `rows()` are its rows."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        m = self.manifest
        self.parts = {name: _Part(self.dir, entry, m["seq_len"])
                      for name, entry in m["parts"].items()}
        self.text_rows = m["text_rows"]

    def __len__(self) -> int:
        return self.manifest["rows"]

    def rows(self) -> StoredRows:
        return StoredRows(self)

    def verify(self) -> None:
        """Check every chunk's sha256 now (they are otherwise checked when first read)."""
        for part in self.parts.values():
            for chunk in range(len(part.batches)):
                part.check(chunk)

    def summary(self) -> str:
        m = self.manifest
        text = f"{m['text_rows']:,} text rows" if m["text_rows"] else "no text"
        examples = (f"{m['examples']:,} examples in {m['example_rows']:,} rows"
                    f"{' (packed)' if m['packed'] else ''}" if m["example_rows"] else "no examples")
        return (f"{m['tokens']:,} tokens in {m['rows']:,} rows of {m['seq_len']} ({text}; "
                f"{examples}; {100 * m['padding']:.0f}% padding), {m['targets']:,} targets")

    def take(self, rows: np.ndarray) -> Blocks:
        """The rows (global indices) in memory, in order, as fastkd.data.cat joins text rows and
        example rows (when the store has examples, every row carries counted, and position_ids
        when packed)."""
        m = self.manifest
        is_text = rows < self.text_rows
        parts, order = [], []
        for name, chosen, offset in (("text", is_text, 0),
                                     ("examples", ~is_text, self.text_rows)):
            if chosen.any():
                got = self.parts[name].take(rows[chosen] - offset)
                parts.append(Blocks.from_rows(got["input_ids"], got["length"],
                                              got.get("counted"), got.get("position_ids"),
                                              teacher=got.get("teacher")))
                order.append(np.nonzero(chosen)[0])
        if not parts:
            empty = np.zeros((0, m["seq_len"]), dtype=np.int64)
            return Blocks.from_rows(empty, np.zeros(0), empty.astype(bool) if m["counted"]
                                    else None, empty if m["packed"] else None)
        blocks = cat(parts, counted=m["counted"], packed=m["packed"])
        if len(parts) == 2:  # back in the order asked
            blocks = blocks.select(torch.from_numpy(np.argsort(np.concatenate(order))))
        return blocks


class _Part:
    """One part's Arrow stream, memory-mapped (its record batches are views of the map)."""

    def __init__(self, directory: Path, entry: dict, seq_len: int):
        import pyarrow as pa

        self.path, self.entry, self.seq_len = directory / entry["file"], entry, seq_len
        self.directory = directory
        if not self.path.is_file():
            raise self._damaged("missing")
        size = self.path.stat().st_size
        if size != entry["bytes"]:
            raise self._damaged(f"{size} bytes, the manifest says {entry['bytes']}: truncated?")
        try:
            self.map = pa.memory_map(str(self.path))
            self.batches = list(pa.ipc.open_stream(self.map))
        except (pa.ArrowException, OSError) as err:
            raise self._damaged(f"not a readable Arrow stream: {err}") from None
        # The chunks are checked through a descriptor of the same file (opened with the map,
        # under the store's lock): reading pages through the map would add them to this
        # process's resident memory, the whole store once every chunk is checked.
        self.fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        schema = self.batches[0].schema if self.batches else None
        want = [(name, dtype) for name, dtype in entry["columns"].items()]
        got = [] if schema is None else [
            (f.name, (f.type.value_type if pa.types.is_fixed_size_list(f.type) else f.type)
             .to_pandas_dtype().__name__) for f in schema]
        if got != want or len(self.batches) != len(entry["chunks"]) or any(
                b.num_rows != c[0] for b, c in zip(self.batches, entry["chunks"], strict=True)):
            raise self._damaged("its columns or chunks are not those of the manifest")
        self.starts = np.cumsum([0] + [c[0] for c in entry["chunks"]])
        self.checked: set[int] = set()

    def _damaged(self, what: str) -> ValueError:
        return _damaged(self.path, self.directory, what)

    def check(self, chunk: int) -> None:
        """The chunk's bytes against its sha256."""
        rows, offset, nbytes, sha256 = self.entry["chunks"][chunk]
        if hashlib.sha256(os.pread(self.fd, nbytes, offset)).hexdigest() != sha256:
            first = int(self.starts[chunk])
            raise self._damaged(f"chunk {chunk}, rows {first}-{first + rows - 1}, does not match "
                                "its sha256")
        self.checked.add(chunk)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each column at the rows (this part's indices): (k, seq_len), length (k,)."""
        chunk_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = {}
        for chunk in np.unique(chunk_of):
            if chunk not in self.checked:
                self.check(int(chunk))
            where = np.nonzero(chunk_of == chunk)[0]
            got = self.batches[chunk].take(to_arrow(rows[where] - self.starts[chunk]))
            for name in self.entry["columns"]:
                column = got.column(name)
                values = column.to_numpy() if name == "length" else column.flatten().to_numpy(
                    zero_copy_only=False).reshape(len(where), self.seq_len)
                if name not in out:
                    out[name] = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
                out[name][where] = values
        return out


class StoredRows(DiskRows):
    """Rows of a token store, on disk (`fastkd.data.DiskRows`): what a process holds is the row
    index."""

    def __init__(self, store: TokenStore, index: torch.Tensor | None = None):
        super().__init__(index)
        self.store = store

    @property
    def total(self) -> int:
        return len(self.store)

    @property
    def packed(self) -> bool:
        return self.store.manifest["packed"]

    def read(self, rows: torch.Tensor) -> Blocks:
        return self.store.take(rows.numpy())
