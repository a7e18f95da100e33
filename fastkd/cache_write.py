"""Writing a teacher cache (the format: fastkd.cache_format), on one process or several, and
resuming one: `build_cache`, which `fastkd cache-teacher` (fastkd.cache_teacher) and
`fastkd cache-import` (fastkd.cache_import) both call with the rows they compute.

Under torchrun (WORLD_SIZE > 1) each rank writes the shards j with j mod world = rank; shards are
named by their sequence range, so a rerun with another number of processes resumes the same
cache. A rerun (after Ctrl-C, kill -9 or a crash) keeps every shard already on disk that checks
out (its own digest and the plan's) and writes the others; then, after a barrier, rank 0 writes
the complete manifest.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from fastkd import distributed, fsio
from fastkd.cache_format import (
    SPLITS,
    ManifestCorrupt,
    check_out,
    check_shard,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from fastkd.data import Blocks

log = logging.getLogger("fastkd")


def build_cache(out: Path, manifest: dict, splits: dict[str, Blocks], shard_sequences: int,
                shard_rows, progress: bool, desc: str) -> dict:
    """Write (or resume) the cache `manifest` describes under `out`, on every rank: each rank
    checks or writes the shards j with j mod world = rank, then rank 0 writes the complete
    manifest. shard_rows() -> rows(split, first, blocks, offset, advance) -> Rows is called only
    when a shard is to be written (offset: the split's first sequence in the whole data;
    advance(n) moves the bar by n sequences done). Rank 0 holds out's lock throughout
    (`claim_out`)."""
    with claim_out(out, desc):
        return _build_cache(out, manifest, splits, shard_sequences, shard_rows, progress, desc)


@contextlib.contextmanager
def claim_out(out: Path, desc: str):
    """Rank 0 holds out's lock (`fsio.locked`) for the block: a second copy of the command on the
    same directory is refused, naming this one's pid; and, under it, out must be new, empty or a
    cache (`check_out`). Every rank raises rank 0's refusal."""
    with contextlib.ExitStack() as lock:
        failure = None
        if distributed.is_main():
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock.enter_context(fsio.locked(out / fsio.LOCK, f"{desc} --out {out}"))
                check_out(out)
            except (ValueError, OSError) as err:
                failure = err
        distributed.raise_main_refusal(failure)
        yield


def _build_cache(out: Path, manifest: dict, splits: dict[str, Blocks], shard_sequences: int,
                 shard_rows, progress: bool, desc: str) -> dict:
    found = check_resume(out, manifest)
    distributed.barrier()  # every rank has read the manifest on disk before rank 0 rewrites it
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # an interrupted write (the shard is redone)
            stale.unlink()
        write_manifest(out, dict(manifest))  # incomplete until every shard is checked
    distributed.barrier()
    jobs, offset = [], 0
    for split in SPLITS:
        for s0 in range(0, len(splits[split]), shard_sequences):
            jobs.append((split, s0, min(s0 + shard_sequences, len(splits[split])), offset))
        offset += len(splits[split])
    mine = jobs[distributed.rank()::distributed.world_size()]
    entries, error = [], None
    try:
        entries = _fill_shards(out, manifest, found, mine, splits, shard_rows, progress, desc)
    except ValueError as err:  # bad input on this rank: every rank raises it, below
        error = str(err)
    results = distributed.all_ranks((entries, error))
    errors = [e for _, e in results if e is not None]
    if errors:
        raise ValueError(errors[0])
    shards = sorted((e for got, _ in results for e in got),
                    key=lambda e: (SPLITS.index(e["split"]), e["first"]))
    manifest.update(shards=shards, complete=True,
                    positions=sum(e["positions"] for e in shards),
                    max_id=max((e["max_id"] for e in shards), default=-1),
                    bytes=sum(e["bytes"] for e in shards))
    if distributed.is_main():
        write_manifest(out, manifest)
    return manifest


def check_resume(out: Path, manifest: dict) -> dict:
    """The shards of a cache already in `out` made by the same plan (file -> entry), {} for a new
    one; a different cache there is refused."""
    if not (out / "manifest.json").is_file():
        return {}
    try:
        found, version = read_manifest(out)
    except ManifestCorrupt as err:  # fastkd writes it atomically: damaged since; every shard
        log.warning("%s; rechecking the shards one by one", err)  # is rechecked
        return {}
    if version < 2:
        raise ValueError(f"out: {out} holds a cache of format {found.get('format')}; choose "
                         "another directory (old caches still read, but are not extended)")
    differing = [key for key in manifest if key not in ("shards", "complete", "plan_sha256")
                 and found.get(key) != manifest[key]]
    if differing:
        raise ValueError(f"out: {out} holds a different teacher cache (it differs in "
                         f"{differing}); choose another directory")
    return {e["file"]: e for e in found.get("shards", [])}


def _fill_shards(out, manifest, found, jobs, splits, shard_rows, progress, desc) -> list:
    """This rank's shards: each one on disk checked (its digest, the plan's and, where the
    manifest lists it, its sha256) and kept, or computed and written."""
    from tqdm import tqdm

    entries, todo = [], []
    for job in jobs:
        split, s0, s1, _ = job
        path = out / shard_name(split, s0, s1)
        entry = check_shard(path, manifest["plan_sha256"]) if path.is_file() else None
        listed = found.get(path.name)
        if entry is not None and (listed is None or listed["sha256"] == entry["sha256"]):
            entries.append(entry)
        else:
            if path.is_file():
                log.warning("%s: %s does not check out (truncated or corrupted): writing it "
                            "again", desc, path)
            todo.append(job)
    if not todo:
        return entries
    rows_of = shard_rows()
    bar = tqdm(total=sum(s1 - s0 for _, s0, s1, _ in todo), unit="seq", desc=desc,
               disable=not (progress and distributed.is_main()), dynamic_ncols=True)
    for split, s0, s1, offset in todo:
        blocks = splits[split].take(torch.arange(s0, s1))
        done = bar.n
        rows = rows_of(split, s0, blocks, offset, bar.update)  # may move the bar as it goes
        entries.append(write_shard(out, manifest, split, s0, blocks, rows, manifest["vocab"]))
        bar.update(s1 - s0 - (bar.n - done))
    bar.close()
    return entries
