"""Training from a teacher cache (`fastkd distill --teacher-cache`, written by `fastkd
cache-teacher`: fastkd.cache_teacher, or `fastkd cache-import`): the student learns from the
cached targets through the sparse loss, with no teacher in memory.

`TeacherCache` is a complete cache, checked when opened (fastkd.cache_reader) and against the run
that trains from it. Its sequences stay on disk (`CachedRows`, as a token store's rows do): a
process holds their index, and a batch reads its sequences when it is taken (`CachedBlocks`),
their targets when they are loaded (`CacheRows`), which `Prefetch` does a step ahead on a
background thread. The sparse loss's tail a run trains with is the cache's own
(`default_tail`) unless the run names one (`sparse_tail`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import reference
from fastkd.cache_format import (
    counted_positions,
    data_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
)
from fastkd.cache_reader import CacheReader
from fastkd.checks import choice
from fastkd.data import Blocks, DiskRows


def default_tail(mode: str) -> str:
    """The sparse loss's tail that fits a cache's targets: "ignore" for sampled ones (the counts'
    log(count / samples) estimate the teacher without bias, and the rest of the vocabulary is not
    a mass to model), "bucket" for top-k ones (the rest of the teacher's mass in one bucket)."""
    return "ignore" if mode == "sample" else "bucket"


def sparse_tail(tail: str | None, mode: str, divergence: str) -> str:
    """The tail a run trains with from a cache of `mode`: `tail` (cache_tail), else the cache's
    own (`default_tail`); one of the sparse loss's tails, and "ignore" only with forward KL."""
    tail = default_tail(mode) if tail is None else choice("cache_tail", tail,
                                                          reference.SPARSE_TAILS)
    if tail == "ignore" and divergence != "forward_kl":
        raise ValueError(f"the cache's tail 'ignore' (sampled targets) supports "
                         f"divergence='forward_kl' only, got {divergence!r}; choose "
                         "cache_tail='bucket' or 'renormalize'")
    return tail


class TeacherCache(CacheReader):
    """A complete cache, checked when opened (`CacheReader`), as the trainer reads it."""

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    def rows(self, split: str) -> CachedRows:
        """The split's packed sequences, on disk."""
        return CachedRows(self, split)

    def blocks(self, split: str) -> CachedBlocks:
        """Every sequence of the split in memory, with their targets (small caches, tests)."""
        return self.rows(split).load()

    def bytes_per_position(self) -> float | None:
        """Every byte in the cache directory over the counted positions."""
        positions = self.positions
        return self.disk_bytes() / positions if positions else None

    def check_run(self, tokenizer, seq_len: int, temperature: float, eval_fraction: float,
                  data: list[str] | None) -> None:
        """Refuse a run whose tokenizer, seq_len, temperature, held-out fraction or data differ
        from the cache's, naming both values."""
        m = self.manifest
        mine = tokenizer_fingerprint(tokenizer)
        if mine["sha256"] != m["tokenizer"]["sha256"]:
            raise ValueError(f"teacher_cache: the run's tokenizer ({mine['size']} tokens, sha256 "
                             f"{mine['sha256'][:12]}) differs from the cache's "
                             f"({m['tokenizer']['size']} tokens, sha256 "
                             f"{m['tokenizer']['sha256'][:12]}) ({self.dir})")
        for name, value in (("seq_len", seq_len), ("temperature", float(temperature)),
                            ("eval_fraction", eval_fraction)):
            if value != m[name]:
                raise ValueError(f"teacher_cache: the run's {name} is {value}, the cache's is "
                                 f"{m[name]} ({self.dir}); run with {name}={m[name]} or build "
                                 "another cache")
        if data is not None:
            cached = [(d["bytes"], d["sha256"]) for d in m["data"]]
            given = [(d["bytes"], d["sha256"]) for d in data_fingerprint(data)]
            if cached != given:
                raise ValueError(f"teacher_cache: the run's data files {data} differ from the "
                                 f"cache's {[d['path'] for d in m['data']]} (sizes or sha256; "
                                 f"{self.dir})")

    def check_options(self, **options) -> None:
        """Refuse a run whose data options (packing, utf8_errors) differ from those the cache's
        sequences were made with (where its manifest records them), naming the option, both
        values and the cache."""
        for name, value in options.items():
            if name in self.manifest and self.manifest[name] != value:
                raise ValueError(f"teacher_cache: the run's {name} is {value!r}, the cache's is "
                                 f"{self.manifest[name]!r} ({self.dir}): its sequences were made "
                                 f"with {name}={self.manifest[name]!r}; run with that, or build "
                                 "another cache")

    def check_student(self, student: str, rows: int | None = None) -> None:
        """Refuse a student whose output layer has fewer rows than the cache's largest id + 1
        (rows: the student's, else read from its config)."""
        if rows is None:
            from transformers import AutoConfig

            from fastkd.models import from_pretrained

            config = from_pretrained(AutoConfig, student, "student")
            rows = config.get_text_config().vocab_size
        if self.max_id is not None and self.max_id >= rows:
            raise ValueError(f"teacher_cache: {self.dir} holds teacher ids up to {self.max_id}, "
                             f"but the student {student} has only {rows} output rows; the cache "
                             "and the student do not share a vocabulary")

    def check_teacher(self, teacher: str) -> None:
        """A run that names a teacher besides the cache: it must be the cache's own teacher."""
        m = self.manifest
        # no fingerprint, or one of partial weight hashes ("weights"): the teacher matched by path
        fingerprinted = "weights" not in m.get("teacher_fingerprint", {"weights": None})
        same = (model_fingerprint(teacher) == m["teacher_fingerprint"] if fingerprinted else
                Path(teacher).expanduser().resolve() == Path(m["teacher"]).expanduser().resolve())
        if not same:
            raise ValueError(f"teacher_cache: {self.dir} was made from the teacher "
                             f"{m['teacher']}, not from --teacher {teacher} (their config or "
                             "weight files differ); drop --teacher to train from the cache, or "
                             "build a cache of that teacher")


class CachedRows(DiskRows):
    """The packed sequences of one split of a cache, on disk (`fastkd.data.DiskRows`): what a
    process holds is their index. `take` reads the sequences asked for from their shards into a
    `CachedBlocks`, whose targets are read when they are loaded."""

    def __init__(self, cache: TeacherCache, split: str, index: torch.Tensor | None = None):
        super().__init__(index)
        self.cache, self.split = cache, split

    @property
    def total(self) -> int:
        return self.cache.sequences(self.split)

    @property
    def packed(self) -> bool:
        return self.cache.packed

    def read(self, rows: torch.Tensor) -> CachedBlocks:
        fields = self.cache.read_blocks(self.split, rows)
        targets = CacheRows(self.cache, self.split, rows, counted_positions(Blocks(**fields)))
        return CachedBlocks(**fields, targets=targets)


@dataclass
class CacheRows:
    """The targets of some sequences of one split of a cache, read lazily: `load()` gives
    (ids, logprobs) for them."""

    cache: TeacherCache
    split: str
    index: torch.Tensor  # the sequences, in the split
    counted: torch.Tensor  # (rows, L-1): the positions that carry targets

    def select(self, index: torch.Tensor) -> CacheRows:
        return CacheRows(self.cache, self.split, self.index[index], self.counted[index])

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.targets(self.split, self.index, self.counted)


@dataclass
class CachedBlocks(Blocks):
    """Packed sequences with their cached teacher targets (what `Batches` hands out)."""

    targets: CacheRows | None = None

    def select(self, index: torch.Tensor) -> CachedBlocks:
        return dataclasses.replace(super().select(index), targets=self.targets.select(index))


class Prefetch:
    """Decodes the cached targets of the training batches on one background thread, the next
    step's while this step computes (the codec's torch ops release the GIL; `fastkd distill
    --teacher-cache`). `ahead(rows)` starts loads in order; `load(rows)` returns a started load's
    result (waiting for it), else loads now. Keyed by split and rows, so a step gets exactly what
    a direct load gives, and the Batches position (what a checkpoint saves) never moves ahead."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastkd-cache")
        self._pending: dict = {}

    @staticmethod
    def _key(rows: CacheRows) -> tuple:
        return rows.split, tuple(rows.index.tolist())

    def ahead(self, rows) -> None:
        for r in rows:
            key = self._key(r)
            if key not in self._pending:
                self._pending[key] = self._pool.submit(r.load)

    def load(self, rows: CacheRows) -> tuple[torch.Tensor, torch.Tensor]:
        future = self._pending.pop(self._key(rows), None)
        return rows.load() if future is None else future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
