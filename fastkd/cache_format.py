"""The teacher cache on disk (format fastkd-teacher-cache/2), and reading it.

    CACHE_DIR/manifest.json    what the cache is: its format, the plan (teacher and its fingerprint,
                               tokenizer hash, vocabulary, temperature, mode, k, samples, seq_len,
                               data files with sizes and sha256, the held-out split, layout), and,
                               once complete, its shards (file, split, first, rows, counted
                               positions, largest id, sha256) and totals; "sha256" is the digest of
                               everything else in it (the manifest's own checksum)
    CACHE_DIR/{split}-{first:09d}-{end:09d}.safetensors
                               the packed sequences [first, end) of the split and their targets;
                               named by the range, not by who wrote them

A shard's safetensors metadata repeats its split, range and the plan's digest, and holds the
digest of its own tensors: a shard checks itself (resume) and against the manifest (when a cache
is opened). Its tensors:

    blocks.<field>             each `fastkd.data.Blocks` field: input ids in bit_width(V - 1) bits
                               an id, 0/1 fields (masks) in one bit, positions counting from 0
                               per packed example as one bit a position (where they restart),
                               others in the smallest int
    layout "compact" (default; `fastkd.codec`): rows for the counted positions only (label !=
    ignore_index after the shift), nothing for the others:
        fixed, unary           uint8 bit streams; fixed_offsets, unary_offsets (S + 1,) int64
                               the byte range of each sequence
        sizes                  (rows,) ids per row, where rows vary (sampled, imported)
    layout "fixed" (the /1 layout): ids (S, L-1, k) int32 (-1: unused slot, and every position
        that does not count), logprobs (S, L-1, k) float16/bfloat16

Format /1 caches (one fixed layout, shards train-00000.safetensors with input_ids, attention_mask,
ids, logprobs, no manifest checksum) still read. A manifest of a newer format is refused, naming
the file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fastkd import codec
from fastkd.data import Blocks
from fastkd.fsio import atomic_write, sha256_file
from fastkd.options import DistillOptions
from fastkd.plans import DTYPE_NAMES

NAME = "fastkd-teacher-cache"
VERSION = 2
FORMAT = f"{NAME}/{VERSION}"
SPLITS = ("train", "heldout")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # fastkd.plans names them
IGNORE = DistillOptions.ignore_index
# manifest fields that are not the plan (everything else a resumed run must agree with)
RESULT_FIELDS = ("format", "shards", "complete", "bytes", "positions", "max_id", "sha256",
                 "plan_sha256")


class ManifestCorrupt(ValueError):
    """A manifest.json that does not parse or fails its checksum."""


def _error(message: str) -> ValueError:
    return ValueError(f"teacher_cache: {message}")


# ---- the manifest ------------------------------------------------------------------------------


def digest(obj) -> str:
    """sha256 of a JSON value, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def plan_digest(manifest: dict) -> str:
    return digest({k: v for k, v in manifest.items() if k not in RESULT_FIELDS})


def write_manifest(out: Path, manifest: dict) -> None:
    """Write manifest.json atomically, with its own checksum."""
    manifest["sha256"] = digest({k: v for k, v in manifest.items() if k != "sha256"})
    atomic_write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest,
                                                                              indent=1)))


def format_version(value, path: Path) -> int:
    if not isinstance(value, str) or not value.startswith(f"{NAME}/"):
        raise _error(f"{path} is not a fastkd teacher-cache manifest (format {value!r})")
    try:
        version = int(value.split("/", 1)[1])
    except ValueError:
        raise _error(f"{path}: unknown format {value!r}") from None
    if version > VERSION:
        raise _error(f"{path} was written by a newer fastkd (format {value}); this version reads "
                     f"formats up to {FORMAT}: upgrade fastkd")
    return version


def read_manifest(directory: Path) -> tuple[dict, int]:
    """(manifest, format version) of a cache directory; errors name the file."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"teacher_cache: no manifest.json in {directory}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestCorrupt(f"teacher_cache: {path} is not valid JSON (truncated or "
                              f"corrupted: {err}); rerun the command that wrote the cache"
                              ) from None
    if not isinstance(manifest, dict):
        raise _error(f"{path} is not a fastkd teacher-cache manifest")
    version = format_version(manifest.get("format"), path)
    if version >= 2:
        want = digest({k: v for k, v in manifest.items() if k != "sha256"})
        if manifest.get("sha256") != want:
            raise ManifestCorrupt(f"teacher_cache: {path} is corrupted or was edited: its "
                                  "checksum does not match its content (sha256)")
    return manifest, version


# ---- the sequences (Blocks) --------------------------------------------------------------------


def encode_blocks(blocks: Blocks, vocab: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Every Blocks field, compactly: (tensors "blocks.<field>", {field: encoding})."""
    tensors, encodings = {}, {}
    for f in fields(blocks):
        value = getattr(blocks, f.name)
        if not isinstance(value, torch.Tensor):
            continue
        value = value.long()
        n, length = value.shape
        if f.name == "input_ids":
            width = codec.bit_width(max(vocab - 1, int(value.max()) if value.numel() else 0))
            bits = ((value.unsqueeze(-1) >> torch.arange(width)) & 1).reshape(n, -1)
            pad = (-bits.shape[1]) % 8
            bits = torch.nn.functional.pad(bits, (0, pad)).to(torch.uint8)
            stored, encoding = codec.pack_bits(bits).reshape(n, -1), f"bits{width}"
        elif value.numel() == 0 or bool(((value == 0) | (value == 1)).all()):
            bits = torch.nn.functional.pad(value, (0, (-length) % 8)).to(torch.uint8)
            stored, encoding = codec.pack_bits(bits).reshape(n, -1), "bits1"
        elif bool((value[:, 0] == 0).all()) and bool(
                ((value[:, 1:] == value[:, :-1] + 1) | (value[:, 1:] == 0)).all()):
            # positions counting from 0 in each packed example: one bit a position, its resets
            bits = torch.nn.functional.pad((value == 0).long(), (0, (-length) % 8))
            stored, encoding = codec.pack_bits(bits.to(torch.uint8)).reshape(n, -1), "resets"
        else:
            dtype = next(d for d in (torch.int8, torch.int16, torch.int32, torch.int64)
                         if torch.iinfo(d).min <= int(value.min())
                         and int(value.max()) <= torch.iinfo(d).max)
            stored, encoding = value.to(dtype), "int"
        tensors[f"blocks.{f.name}"] = stored.contiguous()
        encodings[f.name] = [encoding, length, str(getattr(blocks, f.name).dtype).removeprefix(
            "torch.")]
    return tensors, encodings


def decode_block_field(stored: torch.Tensor, encoding: str, length: int,
                       dtype: str = "int64") -> torch.Tensor:
    """One field of encode_blocks back to (n, length), in its dtype."""
    return _decode_field(stored, encoding, length).to(getattr(torch, dtype))


def _decode_field(stored: torch.Tensor, encoding: str, length: int) -> torch.Tensor:
    if encoding == "int":
        return stored.long()
    if encoding == "resets":  # each position minus the last reset at or before it
        resets = _decode_field(stored, "bits1", length).bool()
        at = torch.arange(length).expand(resets.shape[0], length)
        return at - torch.cummax(torch.where(resets, at, 0), dim=1).values
    width = int(encoding.removeprefix("bits"))
    n = stored.shape[0]
    bits = codec.unpack_bits(stored.reshape(-1)).reshape(n, -1)[:, :length * width]
    bits = bits.reshape(n, length, width).long()
    return (bits << torch.arange(width)).sum(-1)


def counted_positions(blocks: Blocks) -> torch.Tensor:
    """(n, L-1) bool: the next-token positions that count (label != ignore_index)."""
    return blocks.labels(IGNORE)[:, 1:] != IGNORE


# ---- rows and shards ---------------------------------------------------------------------------


@dataclass
class Rows:
    """The targets of the counted positions of some sequences, in order: ids (R, K) int64 (-1:
    unused slot), values (R, K) log-probabilities (float) or counts (int), n (R,) ids per row."""

    ids: torch.Tensor
    values: torch.Tensor
    n: torch.Tensor


def shard_name(split: str, first: int, end: int) -> str:
    return f"{split}-{first:09d}-{end:09d}.safetensors"


def payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_shard(out: Path, plan: dict, split: str, first: int, blocks: Blocks, rows: Rows,
                vocab: int) -> dict:
    """Encode and write one shard atomically; returns its manifest entry.

    plan: the manifest's plan fields (layout, mode, k, logprob_step, samples, dtype), with
    "plan_sha256"."""
    counted = counted_positions(blocks)
    seq_rows = counted.sum(1)
    tensors, encodings = encode_blocks(blocks, vocab)
    width = plan["slots"]
    if plan["layout"] == "compact":
        layout = row_layout(plan)
        tensors.update(codec.encode(layout, rows.ids, rows.values, rows.n, seq_rows))
        if plan["mode"] != "topk" or not bool((rows.n == width).all()):
            dtype = torch.uint8 if width < 256 else torch.int16
            tensors["sizes"] = rows.n.to(dtype)
    else:
        ids = torch.full((*counted.shape, width), -1, dtype=torch.int32)
        lp = torch.zeros((*counted.shape, width), dtype=DTYPES[plan["dtype"]])
        values = rows.values.double()
        if plan["mode"] == "sample":
            values = torch.log(values / plan["samples"])
        used = torch.arange(rows.ids.shape[1]) < rows.n.unsqueeze(-1)
        pad = (0, width - rows.ids.shape[1])
        ids[counted] = torch.nn.functional.pad(torch.where(used, rows.ids, -1), pad,
                                               value=-1).int()
        lp[counted] = torch.nn.functional.pad(torch.where(used, values, 0.0), pad).to(lp.dtype)
        tensors.update(ids=ids, logprobs=lp)
    max_id = int(rows.ids.max()) if rows.ids.numel() else -1
    end = first + len(blocks)
    meta = {"format": FORMAT, "plan_sha256": plan["plan_sha256"], "split": split,
            "first": first, "end": end, "positions": int(seq_rows.sum()), "max_id": max_id,
            "blocks": encodings, "payload_sha256": payload_digest(tensors)}
    from safetensors.torch import save_file

    name = shard_name(split, first, end)
    # one metadata key: safetensors writes several in a random order (the file would differ)
    atomic_write(out / name, lambda tmp: save_file(
        tensors, str(tmp), metadata={"fastkd": json.dumps(meta, sort_keys=True)}))
    return shard_entry(out / name, meta)


def shard_meta(handle) -> dict:
    """A shard's own description (its safetensors metadata), {} if it has none."""
    try:
        return json.loads((handle.metadata() or {}).get("fastkd", "{}"))
    except json.JSONDecodeError:
        return {}


def shard_entry(path: Path, meta: dict) -> dict:
    return {"file": path.name, "split": meta["split"], "first": meta["first"],
            "rows": meta["end"] - meta["first"], "positions": meta["positions"],
            "max_id": meta["max_id"], "sha256": sha256_file(path), "bytes": path.stat().st_size}


def check_shard(path: Path, plan_sha: str) -> dict | None:
    """A shard already on disk, checked against itself (its tensors' digest) and the plan: its
    manifest entry, or None if it is not a complete shard of this plan (rewrite it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = shard_meta(handle)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if meta.get("plan_sha256") != plan_sha or meta.get("payload_sha256") != payload_digest(
            tensors):
        return None
    return shard_entry(path, meta)


def row_layout(plan: dict) -> codec.Layout:
    if plan["mode"] == "sample":
        return codec.Layout("counts", plan["vocab"], samples=plan["samples"])
    return codec.Layout("logprobs", plan["vocab"], step=plan["logprob_step"])


# ---- reading -----------------------------------------------------------------------------------


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
            raise _error(f"shard {path} is unreadable ({err}); delete it and rerun the command "
                         "that wrote the cache") from err
        self.layout = "fixed" if version == 1 else manifest["layout"]
        need = {"ids", "logprobs"} if self.layout == "fixed" else {
            "fixed", "unary", "fixed_offsets", "unary_offsets"}
        need |= {"input_ids", "attention_mask"} if version == 1 else {"blocks.input_ids"}
        if not need <= names:
            raise _error(f"shard {path} lacks {sorted(need - names)}")
        if version >= 2:
            for key, want in (("split", entry["split"]), ("first", entry["first"]),
                              ("end", entry["first"] + entry["rows"]),
                              ("plan_sha256", manifest["plan_sha256"])):
                if self.meta.get(key) != want:
                    raise _error(f"shard {path} does not belong where the manifest puts it (its "
                                 f"{key} is {self.meta.get(key)!r}, the manifest says {want!r})")
        rows = self._blocks_field("input_ids").shape[0] if version >= 2 else (
            self.handle.get_slice("ids").get_shape()[0])
        if rows != entry["rows"]:
            raise _error(f"shard {path} holds {rows} rows, the manifest says {entry['rows']}")
        if self.layout == "compact":
            self.fixed_offsets = self.handle.get_tensor("fixed_offsets")
            self.unary_offsets = self.handle.get_tensor("unary_offsets")
            self.sizes = self.handle.get_tensor("sizes").long() if "sizes" in names else None
            if len(self.fixed_offsets) != rows + 1 or len(self.unary_offsets) != rows + 1:
                raise _error(f"shard {path}: its offsets do not cover its {rows} sequences")

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

    def targets(self, local: list[int], counted: torch.Tensor, width: int):
        """(ids int32, logprobs float32), (len(local), L-1, width), for the shard's sequences
        `local`, whose counted positions are `counted` (len(local), L-1)."""
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
            raise _error(f"shard {self.path} is corrupted ({err}); delete it and rerun the "
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
                raise _error(f"shard {self.path}: {len(self.sizes)} row sizes for "
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
            raise _error(f"{self.dir} is incomplete (an interrupted run): run the same command "
                         "again to finish it")
        if self.version >= 2 and m.get("plan_sha256") != plan_digest(m):
            raise _error(f"{self.dir / 'manifest.json'}: its plan digest does not match its "
                         "plan")
        self.splits: dict[str, list[Shard]] = {name: [] for name in SPLITS}
        for entry in m["shards"]:
            file = self.dir / entry["file"]
            if entry.get("split") not in SPLITS:
                raise _error(f"{self.dir / 'manifest.json'}: shard {entry.get('file')} has no "
                             "split")
            if not file.is_file():
                raise _error(f"shard {file} is missing")
            if verify and sha256_file(file) != entry["sha256"]:
                raise _error(f"shard {file} is corrupted (its sha256 differs from the "
                             "manifest's); rerun the command that wrote the cache to rewrite it")
            self.splits[entry["split"]].append(Shard(file, entry, m, self.version))
        self.max_id = m.get("max_id")
        for name in SPLITS:
            shards = sorted(self.splits[name], key=lambda s: s.entry.get("first", 0))
            self.splits[name] = shards
            rows = sum(s.entry["rows"] for s in shards)
            if rows != m["split"][name]:
                raise _error(f"the {name} shards hold {rows} sequences, the manifest's split "
                             f"says {m['split'][name]}")
            if self.version >= 2:
                starts = [s.entry["first"] for s in shards]
                ends = [s.entry["first"] + s.entry["rows"] for s in shards]
                if starts and (starts[0] != 0 or starts[1:] != ends[:-1]):
                    raise _error(f"the {name} shards do not cover its sequences in order")
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
                    raise _error(f"shard {shard.path} holds non-finite teacher log-probabilities "
                                 "(a teacher that gave NaN): rebuild the cache")
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

