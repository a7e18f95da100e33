"""Reading a teacher cache (the format: fastkd.cache_format): `CacheReader` opens and checks a
complete cache (its manifest, every shard's sha256, where each shard belongs, the splits covered);
`Shard` is one shard, memory-mapped, its sequences and, for any of them, their targets as the
sparse loss takes them, its tensors checked against their own digest on the first read of its
targets (`Shard.check_payload`). Both read what they are asked for, from the map: the sequences'
fields and targets, and their byte ranges in the streams; nothing in proportion to the cache is
held in memory (a shard of a cache whose rows vary in size keeps one int a sequence: where its
rows start)."""

from __future__ import annotations

import bisect
import threading
from pathlib import Path

import torch

from fastkd import codec
from fastkd.cache_format import (
    SPLITS,
    cache_error,
    counted_positions,
    decode_block_field,
    payload_digest,
    plan_digest,
    read_manifest,
    row_layout,
    shard_meta,
)
from fastkd.data import Blocks
from fastkd.fsio import sha256_file


class Shard:
    """One shard, memory-mapped (safetensors): its sequences and, for any of them, their targets
    as the sparse loss takes them."""

    def __init__(self, path: Path, entry: dict, manifest: dict, version: int):
        from safetensors import safe_open

        self.path, self.entry, self.version = path, entry, version
        self.manifest = manifest
        try:
            self.handle = safe_open(str(path), framework="pt")
            self.meta = shard_meta(self.handle)
            names = set(self.handle.keys())
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise cache_error(f"shard {path} is unreadable ({err}); delete it and rerun the "
                              "command that wrote the cache") from err
        self.layout = "fixed" if version == 1 else manifest["layout"]
        need = {"ids", "logprobs"} if self.layout == "fixed" else {
            "fixed", "unary", "fixed_offsets", "unary_offsets"}
        need |= {"input_ids", "attention_mask"} if version == 1 else {"blocks.input_ids"}
        if not need <= names:
            raise cache_error(f"shard {path} lacks {sorted(need - names)}")
        if version >= 2:
            for key, want in (("split", entry["split"]), ("first", entry["first"]),
                              ("end", entry["first"] + entry["rows"]),
                              ("plan_sha256", manifest["plan_sha256"])):
                if self.meta.get(key) != want:
                    raise cache_error(
                        f"shard {path} does not belong where the manifest puts it (its {key} is "
                        f"{self.meta.get(key)!r}, the manifest says {want!r})")
        # format /2: the tensors against their digest on the first read of targets (`targets`)
        self._payload_checked = version < 2
        self._payload_lock = threading.Lock()
        rows = self._rows_in("blocks.input_ids" if version >= 2 else "ids")
        if rows != entry["rows"]:
            raise cache_error(f"shard {path} holds {rows} rows, the manifest says {entry['rows']}")
        self.has_sizes = "sizes" in names
        self._rows_before: torch.Tensor | None = None  # `_row_offsets`, read once when needed
        if self.layout == "compact" and (self._rows_in("fixed_offsets") != rows + 1
                                         or self._rows_in("unary_offsets") != rows + 1):
            raise cache_error(f"shard {path}: its offsets do not cover its {rows} sequences")

    def _rows_in(self, name: str) -> int:
        return self.handle.get_slice(name).get_shape()[0]

    def _take(self, name: str, local: list[int] | None) -> torch.Tensor:
        """Tensor `name`'s rows `local` (None: every row), read from the map: one slice a run of
        consecutive rows."""
        view = self.handle.get_slice(name)
        if local is None:
            return view[:]
        if not local:
            return view[0:0]
        parts, start = [], 0
        for j in range(1, len(local) + 1):
            if j == len(local) or local[j] != local[j - 1] + 1:
                parts.append(view[local[start]:local[j - 1] + 1])
                start = j
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def blocks(self, local: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The Blocks fields, (len(local), L) each (input ids and masks int64), of the shard's
        sequences `local` (None: all of them)."""
        if self.version == 1:
            return {name: self._take(name, local).long() for name in ("input_ids",
                                                                       "attention_mask")}
        encodings = self.meta["blocks"]
        return {name: decode_block_field(self._take(f"blocks.{name}", local), *encodings[name])
                for name in encodings}

    @property
    def fields(self) -> list[str]:
        """The Blocks fields its sequences carry."""
        return ["input_ids", "attention_mask"] if self.version == 1 else list(self.meta["blocks"])

    def check_payload(self) -> None:
        """The shard's tensors against the digest of them in its own metadata, once (the first
        read of its targets: in training, on the prefetch thread, so a step does not wait).
        Opening the cache checked the file's sha256 against the manifest; this catches a damaged
        shard behind a manifest rebuilt by hand, which would decode to wrong targets."""
        with self._payload_lock:
            if self._payload_checked:
                return
            tensors = {name: self.handle.get_tensor(name) for name in self.handle.keys()}
            if payload_digest(tensors) != self.meta.get("payload_sha256"):
                raise cache_error(f"shard {self.path} is corrupted: its tensors do not match the "
                                  "digest in its own metadata (payload_sha256), though its "
                                  "sha256 matches the manifest's (a manifest rebuilt by hand?); "
                                  "delete the shard and rerun the command that wrote the cache")
            self._payload_checked = True

    def targets(self, local: list[int], counted: torch.Tensor, width: int):
        """(ids int32, logprobs float32), (len(local), L-1, width), for the shard's sequences
        `local`, whose counted positions are `counted` (len(local), L-1); the shard's payload
        checked first (`check_payload`)."""
        self.check_payload()
        if self.layout == "fixed":
            return self._take("ids", local), self._take("logprobs", local)
        seq_rows = counted.sum(1)
        fixed = self._streams("fixed", local)
        unary = self._streams("unary", local)
        if not self.has_sizes:
            n = torch.full((int(seq_rows.sum()),), width, dtype=torch.long)
        else:
            row_offsets, sizes = self._row_offsets(), self.handle.get_slice("sizes")
            n = torch.cat([sizes[int(row_offsets[i]):int(row_offsets[i + 1])] for i in local]
                          ).long() if local else torch.empty(0, dtype=torch.long)
        try:
            ids_rows, lp_rows = codec.decode(
                row_layout(self.manifest), fixed[0], fixed[1], unary[0], unary[1], n, seq_rows,
                width)
        except codec.CorruptRows as err:
            raise cache_error(f"shard {self.path} is corrupted ({err}); delete it and rerun the "
                              "command that wrote the cache") from None
        ids = torch.full((*counted.shape, width), -1, dtype=torch.int32)
        lp = torch.zeros((*counted.shape, width))
        ids[counted], lp[counted] = ids_rows, lp_rows
        return ids, lp

    def _streams(self, name: str, local: list[int]):
        """The bytes of stream `name` (fixed or unary) of the sequences `local`, concatenated,
        and each one's byte count (S,); their byte ranges read from the stream's offsets."""
        view, offsets = self.handle.get_slice(name), self.handle.get_slice(f"{name}_offsets")
        parts = []
        for i in local:
            start, end = offsets[i:i + 2].tolist()
            parts.append(view[start:end])
        sizes = torch.tensor([p.numel() for p in parts], dtype=torch.long)
        return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)), sizes

    def _row_offsets(self) -> torch.Tensor:
        """(rows + 1,) int64: each sequence's first row in `sizes`, from the sequences' counted
        positions (the shard's sequences decoded once, then dropped)."""
        if self._rows_before is None:
            counted = counted_positions(Blocks(**self.blocks())).sum(1)
            rows_before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counted, 0)])
            if int(rows_before[-1]) != self._rows_in("sizes"):
                raise cache_error(f"shard {self.path}: {self._rows_in('sizes')} row sizes for "
                                  f"{int(rows_before[-1])} counted positions")
            self._rows_before = rows_before
        return self._rows_before

    def scan(self) -> tuple[int, bool]:
        """(largest id, whether every used log-probability is finite) of a fixed-layout shard:
        for format /1 caches, whose writer checked neither."""
        ids = self.handle.get_tensor("ids")
        lp = self.handle.get_tensor("logprobs")
        used = ids >= 0
        return (int(ids.max()) if ids.numel() else -1), bool(torch.isfinite(lp[used]).all())


class CacheReader:
    """A complete cache, checked when opened: the manifest (its checksum, its format), every
    shard (present, its sha256 with verify=True, where the manifest puts it, its rows), the
    splits covered, and for format /1 caches the log-probabilities finite."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.dir = Path(directory)
        self.manifest, self.version = read_manifest(self.dir)
        m = self.manifest
        if not m.get("complete"):
            raise cache_error(f"{self.dir} is incomplete (an interrupted run): run the same "
                              "command again to finish it")
        if self.version >= 2 and m.get("plan_sha256") != plan_digest(m):
            raise cache_error(f"{self.dir / 'manifest.json'}: its plan digest does not match its "
                              "plan")
        self.splits: dict[str, list[Shard]] = {name: [] for name in SPLITS}
        for entry in m["shards"]:
            file = self.dir / entry["file"]
            if entry.get("split") not in SPLITS:
                raise cache_error(f"{self.dir / 'manifest.json'}: shard {entry.get('file')} has no "
                                  "split")
            if not file.is_file():
                raise cache_error(f"shard {file} is missing")
            if verify and sha256_file(file) != entry["sha256"]:
                raise cache_error(f"shard {file} is corrupted (its sha256 differs from the "
                                  "manifest's); rerun the command that wrote the cache to rewrite "
                                  "it")
            self.splits[entry["split"]].append(Shard(file, entry, m, self.version))
        self.max_id = m.get("max_id")
        for name in SPLITS:
            shards = sorted(self.splits[name], key=lambda s: s.entry.get("first", 0))
            self.splits[name] = shards
            rows = sum(s.entry["rows"] for s in shards)
            if rows != m["split"][name]:
                raise cache_error(f"the {name} shards hold {rows} sequences, the manifest's split "
                                  f"says {m['split'][name]}")
            if self.version >= 2:
                starts = [s.entry["first"] for s in shards]
                ends = [s.entry["first"] + s.entry["rows"] for s in shards]
                if starts and (starts[0] != 0 or starts[1:] != ends[:-1]):
                    raise cache_error(f"the {name} shards do not cover its sequences in order")
        if self.version == 1 and verify:
            self._scan_v1()
        self.starts = {name: [0, *torch.cumsum(torch.tensor(
            [s.entry["rows"] for s in self.splits[name]], dtype=torch.long), 0).tolist()]
            for name in SPLITS}

    def _scan_v1(self) -> None:
        """Format /1 writers checked nothing: every log-probability finite, and the largest id."""
        largest = -1
        for name in SPLITS:
            for shard in self.splits[name]:
                top, finite = shard.scan()
                if not finite:
                    raise cache_error(f"shard {shard.path} holds non-finite teacher "
                                      "log-probabilities (a teacher that gave NaN): rebuild the "
                                      "cache")
                largest = max(largest, top)
        self.max_id = largest

    @property
    def width(self) -> int:
        """Slots per position of the decoded targets."""
        return self.manifest.get("slots", self.manifest["k"])

    @property
    def positions(self) -> int | None:
        return self.manifest.get("positions")

    def disk_bytes(self) -> int:
        """Every file in the cache directory, the manifest included."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    @property
    def packed(self) -> bool:
        """Whether the sequences pack several examples each (and carry position_ids)."""
        return "position_ids" in self.splits["train"][0].fields

    def sequences(self, split: str) -> int:
        """The split's sequences."""
        return self.starts[split][-1]

    def _by_shard(self, split: str, index: torch.Tensor) -> dict[int, tuple[torch.Tensor, list]]:
        """The split's sequences `index` by shard: shard -> (their places in index, their
        indices in the shard)."""
        starts = self.starts[split]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(index.tolist()):
            shard = bisect.bisect_right(starts, i) - 1
            by_shard.setdefault(shard, []).append((pos, i - starts[shard]))
        return {shard: (torch.tensor([p for p, _ in items]), [j for _, j in items])
                for shard, items in by_shard.items()}

    def read_blocks(self, split: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Blocks fields, (len(index), L) each, of the split's sequences `index`; read shard
        by shard, in the order asked."""
        shards = self.splits[split]
        if not len(index):  # every split holds a sequence (fastkd.data.split): its fields' shapes
            return {name: t[:0] for name, t in shards[0].blocks([0]).items()}
        out = {}
        for shard, (where, local) in self._by_shard(split, index).items():
            for name, got in shards[shard].blocks(local).items():
                if name not in out:
                    out[name] = torch.empty((len(index), *got.shape[1:]), dtype=got.dtype)
                out[name][where] = got
        return out

    def targets(self, split: str, index: torch.Tensor, counted: torch.Tensor):
        """(ids, logprobs) (len(index), L-1, width) for the split's sequences `index`, whose
        counted positions are `counted`; read shard by shard, in the order asked."""
        n, length = counted.shape
        ids = torch.empty(n, length, self.width, dtype=torch.int32)
        lp = None
        for shard, (where, local) in self._by_shard(split, index).items():
            got_ids, got_lp = self.splits[split][shard].targets(local, counted[where],
                                                                self.width)
            if lp is None:
                lp = torch.empty(n, length, self.width, dtype=got_lp.dtype)
            ids[where], lp[where] = got_ids, got_lp
        return ids, (lp if lp is not None else torch.zeros(n, length, self.width))

