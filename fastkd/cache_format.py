"""The teacher cache on disk (format fastkd-teacher-cache/2): its manifest and the fingerprints it
records of the cache's inputs, its sequences and rows, writing and checking a shard, and where a
cache may be written (`check_out`: a new or empty directory, or a cache). Reading a cache:
fastkd.cache_reader; writing one: fastkd.cache_write.

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
digest of its own tensors: a shard checks itself (resume, and on the first read of its targets)
and against the manifest (when a cache is opened). Its tensors:

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

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fastkd import codec
from fastkd.data import Blocks
from fastkd.fsio import LOCK, atomic_write, remembered_sha256, sha256_file
from fastkd.fsio import json_sha256 as digest
from fastkd.options import DistillOptions
from fastkd.plans import DTYPE_NAMES
from fastkd.readers import expand_data

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


def cache_error(message: str) -> ValueError:
    return ValueError(f"teacher_cache: {message}")


def check_out(out: Path) -> None:
    """Where a cache is written: a new or empty directory (a lock file aside), or a cache (its
    manifest.json: resumed or rechecked). Anything else is refused, naming what it holds, so that
    nothing of the user's is written over or deleted."""
    if not out.is_dir() or (out / "manifest.json").is_file():
        return  # absent (or a file in the way: fsio.check_writable names it)
    held = sorted(name for name in os.listdir(out) if name != LOCK and not (
        name.startswith(".") and name.endswith(".tmp")))  # a write a kill interrupted
    if held:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise ValueError(f"out: {out} is not empty and holds no teacher cache (no "
                         f"manifest.json): it holds {shown}; a cache goes into a new or empty "
                         "directory, so that nothing in it is overwritten: choose another --out")


# ---- the manifest ------------------------------------------------------------------------------


def plan_digest(manifest: dict) -> str:
    return digest({k: v for k, v in manifest.items() if k not in RESULT_FIELDS})


def write_manifest(out: Path, manifest: dict) -> None:
    """Write manifest.json atomically, with its own checksum."""
    manifest["sha256"] = digest({k: v for k, v in manifest.items() if k != "sha256"})
    atomic_write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest,
                                                                              indent=1)))


def format_version(value, path: Path) -> int:
    if not isinstance(value, str) or not value.startswith(f"{NAME}/"):
        raise cache_error(f"{path} is not a fastkd teacher-cache manifest (format {value!r})")
    try:
        version = int(value.split("/", 1)[1])
    except ValueError:
        raise cache_error(f"{path}: unknown format {value!r}") from None
    if version > VERSION:
        raise cache_error(f"{path} was written by a newer fastkd (format {value}); this "
                          f"version reads formats up to {FORMAT}: upgrade fastkd")
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
        raise cache_error(f"{path} is not a fastkd teacher-cache manifest")
    version = format_version(manifest.get("format"), path)
    if version >= 2:
        want = digest({k: v for k, v in manifest.items() if k != "sha256"})
        if manifest.get("sha256") != want:
            raise ManifestCorrupt(f"teacher_cache: {path} is corrupted or was edited: its "
                                  "checksum does not match its content (sha256)")
    return manifest, version


# ---- fingerprints: what the manifest records of the cache's inputs -----------------------------


def tokenizer_fingerprint(tokenizer) -> dict:
    """sha256 of the vocabulary and special tokens (what makes ids mean the same), and its size."""
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return {"sha256": hashlib.sha256(payload.encode()).hexdigest(), "size": len(tokenizer)}


def data_fingerprint(paths: list[str]) -> list[dict]:
    """Size and sha256 of each data file the paths stand for (fastkd.readers.expand_data); of a
    saved dataset, of its files."""
    out = []
    for p in expand_data(paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            listing = "".join(f"{f.relative_to(p)}\t{sha256_file(f)}\n" for f in files)
            out.append({"path": str(p), "bytes": sum(f.stat().st_size for f in files),
                        "sha256": hashlib.sha256(listing.encode()).hexdigest()})
        else:
            out.append({"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def model_fingerprint(source: str) -> dict:
    """What identifies a model: for a local directory the sha256 of its config.json and, per
    weight file, its size and the sha256 of its whole content (`fsio.remembered_sha256`: read
    once per version of the file, so a rerun, or a run that names the teacher beside its cache,
    reads no weights again; a file edited in place is read again); for a hub id, the id."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"hub_id": source}
    config = path / "config.json"
    weights = [[file.name, file.stat().st_size, remembered_sha256(file)]
               for file in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])]
    return {"config_sha256": sha256_file(config) if config.is_file() else None,
            "weights_sha256": weights}


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
