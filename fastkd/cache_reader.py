"""Reading a teacher cache (the format: fastkd.cache_format): `CacheReader` opens and checks a
complete cache (its manifest, every shard's sha256, where each shard belongs, the splits covered);
`Shard` is one shard, memory-mapped, its sequences and, for any of them, their targets as the
sparse loss takes them, its tensors checked against their own digest on the first read of its
targets (`Shard.check_payload`)."""

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
        rows = self._blocks_field("input_ids").shape[0] if version >= 2 else (
            self.handle.get_slice("ids").get_shape()[0])
        if rows != entry["rows"]:
            raise cache_error(f"shard {path} holds {rows} rows, the manifest says {entry['rows']}")
        if self.layout == "compact":
            self.fixed_offsets = self.handle.get_tensor("fixed_offsets")
            self.unary_offsets = self.handle.get_tensor("unary_offsets")
            self.sizes = self.handle.get_tensor("sizes").long() if "sizes" in names else None
            if len(self.fixed_offsets) != rows + 1 or len(self.unary_offsets) != rows + 1:
                raise cache_error(f"shard {path}: its offsets do not cover its {rows} sequences")

    def _blocks_field(self, name: str) -> torch.Tensor:
        return self.handle.get_slice(f"blocks.{name}")[:]

    def blocks(self) -> dict[str, torch.Tensor]:
        """The shard's Blocks fields, (rows, L) int64 each."""
        if self.version == 1:
            return {"input_ids": self.handle.get_tensor("input_ids").long(),
                    "attention_mask": self.handle.get_tensor("attention_mask").long()}
        encodings = self.meta["blocks"]
        return {name: decode_block_field(self._blocks_field(name), *encodings[name])
                for name in encodings}

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
            ids = torch.cat([self.handle.get_slice("ids")[i:i + 1] for i in local])
            lp = torch.cat([self.handle.get_slice("logprobs")[i:i + 1] for i in local])
            return ids, lp
        seq_rows = counted.sum(1)
        fixed = self._streams("fixed", self.fixed_offsets, local)
        unary = self._streams("unary", self.unary_offsets, local)
        if self.sizes is None:
            n = torch.full((int(seq_rows.sum()),), width, dtype=torch.long)
        else:
            row_offsets = self._row_offsets()
            n = torch.cat([self.sizes[row_offsets[i]:row_offsets[i + 1]] for i in local]
                          ) if local else torch.empty(0, dtype=torch.long)
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

    def _streams(self, name: str, offsets: torch.Tensor, local: list[int]):
        view = self.handle.get_slice(name)
        parts = [view[int(offsets[i]):int(offsets[i + 1])] for i in local]
        sizes = torch.tensor([p.numel() for p in parts], dtype=torch.long)
        return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)), sizes

    def _row_offsets(self) -> list[int]:
        """Each sequence's first row in `sizes` (from the sequences' counted positions)."""
        if not hasattr(self, "_rows_before"):
            counted = counted_positions(Blocks(**self.blocks()))
            self._rows_before = [0, *torch.cumsum(counted.sum(1), 0).tolist()]
            if self._rows_before[-1] != len(self.sizes):
                raise cache_error(f"shard {self.path}: {len(self.sizes)} row sizes for "
                                  f"{self._rows_before[-1]} counted positions")
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

    def split_blocks(self, split: str) -> dict[str, torch.Tensor]:
        parts = [shard.blocks() for shard in self.splits[split]]
        if not parts:
            return {}
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def targets(self, split: str, index: torch.Tensor, counted: torch.Tensor):
        """(ids, logprobs) (len(index), L-1, width) for the split's sequences `index`, whose
        counted positions are `counted`; read shard by shard, in the order asked."""
        starts = self.starts[split]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(index.tolist()):
            shard = bisect.bisect_right(starts, i) - 1
            by_shard.setdefault(shard, []).append((pos, i - starts[shard]))
        n, length = counted.shape
        ids = torch.empty(n, length, self.width, dtype=torch.int32)
        lp = None
        for shard, items in by_shard.items():
            where = torch.tensor([p for p, _ in items])
            got_ids, got_lp = self.splits[split][shard].targets(
                [j for _, j in items], counted[where], self.width)
            if lp is None:
                lp = torch.empty(n, length, self.width, dtype=got_lp.dtype)
            ids[where], lp[where] = got_ids, got_lp
        return ids, (lp if lp is not None else torch.zeros(n, length, self.width))

