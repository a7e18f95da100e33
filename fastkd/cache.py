"""The teacher cache: run the teacher once over the data, keep k (id, log-probability) pairs per
next-token position, and distil from that with no teacher in memory (`fastkd.sparse`).

    CACHE_DIR/manifest.json              what the cache is (teacher, tokenizer hash, temperature,
                                         mode, k, samples, seq_len, data files with sizes and
                                         sha256, the held-out split, dtype) and its shards (file,
                                         rows, sha256); rewritten atomically after every shard
    CACHE_DIR/train-00000.safetensors    input_ids (n, L) int32, attention_mask (n, L) int8,
    CACHE_DIR/heldout-00000.safetensors  ids (n, L-1, k) int32 (-1: unused slot), logprobs
                                         (n, L-1, k) fp16/bf16 at temperature T; for chat and
                                         prompt-completion data also counted (n, L) int8 (the
                                         targets) and, packed, position_ids (n, L) int32

The data are tokenized, packed and split exactly as `fastkd distill` does (`fastkd.data`). Modes:
"topk" keeps the k most likely ids and log softmax(t / T) there; "sample" draws `samples` ids
from softmax(t / T) (seeded per sequence: a resumed cache equals an uninterrupted one) and keeps
the distinct ones with log(count / samples), an unbiased estimate of the teacher (use the sparse
loss's tail="ignore"). Per batch the teacher's logits are formed for batch x (L-1) positions only,
never for the whole data. Shards are written to a temp file, fsynced and renamed; a run that
finds a manifest resumes at the first shard it does not list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import reference
from fastkd.data import SPLIT_SEED, UTF8_ERRORS, Blocks, check_packing, load_blocks
from fastkd.fsio import atomic_write as _atomic_write
from fastkd.fsio import sha256_file

log = logging.getLogger("fastkd")

FORMAT = "fastkd-teacher-cache/1"
MODES = ("topk", "sample")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SPLITS = ("train", "heldout")
# the manifest fields a run must agree with, besides the tokenizer and data fingerprints
PLAN_FIELDS = ("teacher", "temperature", "mode", "k", "samples", "seq_len", "eval_fraction",
               "dtype", "seed", "shard_sequences")


# ---- the targets: top-k and sampled, from one chunk of teacher logits ------------------------


def topk_targets(logits: torch.Tensor, temperature: float, k: int):
    """(ids int32, logprobs fp32), both (rows, k): the k most likely ids of softmax(logits / T)."""
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    values, ids = logprobs.topk(min(k, logits.shape[-1]), -1)
    if ids.shape[-1] < k:  # a vocabulary smaller than k: unused slots
        pad = k - ids.shape[-1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], -1)
        values = torch.cat([values, values.new_zeros(values.shape[0], pad)], -1)
    return ids.int(), values


def sample_targets(logits: torch.Tensor, temperature: float, samples: int, k: int, seed: int):
    """(ids int32, logprobs fp32), both (rows, k): `samples` draws per row from softmax(logits / T)
    with a generator seeded by `seed`; the distinct ids drawn with log(count / samples), the rest
    of the k >= samples slots unused (-1). E[count / samples] = p: the sparse loss's "ignore" tail
    then has the dense forward-KL gradient as its expectation."""
    if samples > k:
        raise ValueError(f"samples ({samples}) must be <= k ({k}): every distinct id drawn needs "
                         "a slot")
    probs = torch.softmax(logits.float() / temperature, -1)
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    draws = torch.multinomial(probs, samples, replacement=True, generator=gen)
    ones = torch.ones_like(draws, dtype=probs.dtype)
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, ones)
    top, ids = counts.topk(min(k, counts.shape[-1]), -1)
    drawn = top > 0
    if ids.shape[-1] < k:
        pad = k - ids.shape[-1]
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], -1)
        top = torch.cat([top, top.new_zeros(top.shape[0], pad)], -1)
        drawn = top > 0
    ids = torch.where(drawn, ids, -1).int()
    logprobs = torch.where(drawn, (top / samples).log(), 0.0)
    return ids, logprobs


# ---- fingerprints ----------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> dict:
    """sha256 of the vocabulary and special tokens (what makes ids mean the same), and its size."""
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return {"sha256": hashlib.sha256(payload.encode()).hexdigest(), "size": len(tokenizer)}


def data_fingerprint(paths: list[str]) -> list[dict]:
    """Size and sha256 of each data file; of a directory (a saved dataset), of its files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            listing = "".join(f"{f.relative_to(p)}\t{sha256_file(f)}\n" for f in files)
            out.append({"path": str(p), "bytes": sum(f.stat().st_size for f in files),
                        "sha256": hashlib.sha256(listing.encode()).hexdigest()})
        else:
            out.append({"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


# ---- writing -----------------------------------------------------------------------------------


def _write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write(out / "manifest.json",
                  lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def bytes_per_token(k: int, dtype: str) -> int:
    """Cache bytes per next-token position: k int32 ids + k log-probabilities (+ ~5 B of input)."""
    return k * (4 + DTYPES[dtype].itemsize) + 5


@dataclass
class CachePlan:
    """One `fastkd cache-teacher` run."""

    teacher: str
    data: list[str]
    out: str
    mode: str = "topk"
    k: int = 64
    samples: int | None = None  # sample mode: draws per position (default k)
    temperature: float = 1.0
    seq_len: int = 256
    batch_size: int = 8
    tokenizer: str | None = None  # default: the teacher's
    eval_fraction: float = 0.05
    dtype: str = "float16"
    seed: int = 0
    shard_sequences: int = 1024
    device: str | None = None
    teacher_dtype: str = "auto"
    progress: bool = True
    packing: bool = True  # as DistillConfig's (fastkd.data.load_blocks)
    utf8_errors: str = "strict"

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        self.data = [str(p) for p in self.data]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("k", "batch_size", "shard_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.mode == "sample":
            self.samples = self.k if self.samples is None else self.samples
            if isinstance(self.samples, bool) or not isinstance(self.samples, int) or \
                    not 1 <= self.samples <= self.k:
                raise ValueError(f"samples must be an int in [1, k={self.k}] (each distinct id "
                                 f"drawn needs a slot), got {self.samples!r}")
        elif self.samples is not None:
            raise ValueError("samples applies to mode='sample' only")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.utf8_errors not in UTF8_ERRORS:
            raise ValueError(f"utf8_errors must be one of {UTF8_ERRORS}, got "
                             f"{self.utf8_errors!r}")


def _targets(plan: CachePlan, logits: torch.Tensor, seed: int):
    if plan.mode == "topk":
        return topk_targets(logits, plan.temperature, plan.k)
    return sample_targets(logits, plan.temperature, plan.samples, plan.k, seed)


@torch.no_grad()
def _shard(plan: CachePlan, teacher, blocks: Blocks, first_seq: int, device) -> dict:
    """The cached tensors of some packed sequences; sequence i's samples are seeded by
    (plan.seed, first_seq + i), so any shard can be recomputed alone, identically."""
    n, seq_len = blocks.input_ids.shape
    ids = torch.empty(n, seq_len - 1, plan.k, dtype=torch.int32)
    logprobs = torch.empty(n, seq_len - 1, plan.k, dtype=DTYPES[plan.dtype])
    for b0 in range(0, n, plan.batch_size):
        b1 = min(b0 + plan.batch_size, n)
        h = teacher.hidden(**blocks.select(torch.arange(b0, b1)).model_inputs(device))[:, :-1]
        logits = torch.nn.functional.linear(h, teacher.weight, teacher.bias)  # (b, L-1, V)
        logits = reference.softcap(logits.float(), teacher.softcap)
        for i in range(b1 - b0):  # per sequence: its own sampling seed
            seed = hash_seed(plan.seed, first_seq + b0 + i)
            seq_ids, seq_lp = _targets(plan, logits[i], seed)
            ids[b0 + i] = seq_ids.cpu()
            logprobs[b0 + i] = seq_lp.to(logprobs.dtype).cpu()
        del logits
    tensors = {"input_ids": blocks.input_ids.to(torch.int32).contiguous(),
               "attention_mask": blocks.attention_mask.to(torch.int8).contiguous(),
               "ids": ids, "logprobs": logprobs}
    if blocks.counted is not None:
        tensors["counted"] = blocks.counted.to(torch.int8).contiguous()
    if blocks.position_ids is not None:
        tensors["position_ids"] = blocks.position_ids.to(torch.int32).contiguous()
    return tensors


def hash_seed(seed: int, sequence: int) -> int:
    """A 63-bit seed per (run seed, sequence index)."""
    digest = hashlib.sha256(f"fastkd-cache:{seed}:{sequence}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _plan_manifest(plan: CachePlan, tokenizer, train: Blocks, heldout: Blocks) -> dict:
    return {
        "format": FORMAT, "teacher": plan.teacher, "tokenizer": tokenizer_fingerprint(tokenizer),
        "temperature": plan.temperature, "mode": plan.mode, "k": plan.k, "samples": plan.samples,
        "seq_len": plan.seq_len, "eval_fraction": plan.eval_fraction, "dtype": plan.dtype,
        "seed": plan.seed, "shard_sequences": plan.shard_sequences, "packing": plan.packing,
        "utf8_errors": plan.utf8_errors, "data": data_fingerprint(plan.data),
        "split": {"seed": SPLIT_SEED, "train": len(train), "heldout": len(heldout)},
        "shards": [], "complete": False,
    }


def cache_teacher(plan: CachePlan) -> dict:
    """Write (or resume) the teacher cache of `plan` under plan.out; returns the manifest."""
    from tqdm import tqdm

    from fastkd.models import check_vocab, load_lm, load_tokenizer

    out = Path(plan.out)
    tokenizer = load_tokenizer(plan.tokenizer or plan.teacher)
    train, heldout = load_blocks(plan.data, tokenizer, plan.seq_len, plan.eval_fraction,
                                 packing=plan.packing, utf8_errors=plan.utf8_errors)
    manifest = _plan_manifest(plan, tokenizer, train, heldout)
    path = out / "manifest.json"
    if path.is_file():  # resume: the same plan, and the shards it lists
        found = json.loads(path.read_text())
        differing = [key for key in manifest if key not in ("shards", "complete")
                     and found.get(key) != manifest[key]]
        if differing:
            raise ValueError(f"out: {out} holds a different teacher cache (it differs in "
                             f"{differing}); choose another directory")
        manifest["shards"] = [s for s in found["shards"] if (out / s["file"]).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()
    done = {s["file"] for s in manifest["shards"]}
    todo = []
    offset = 0
    for split_name, blocks in (("train", train), ("heldout", heldout)):
        for i, s0 in enumerate(range(0, len(blocks), plan.shard_sequences)):
            s1 = min(s0 + plan.shard_sequences, len(blocks))
            name = f"{split_name}-{i:05d}.safetensors"
            if name not in done:
                todo.append((split_name, name, blocks.select(torch.arange(s0, s1)), offset + s0))
        offset += len(blocks)
    total = len(train) + len(heldout)
    if todo:
        device = torch.device(plan.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(
            plan.teacher_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        teacher = load_lm(plan.teacher, "teacher", dtype, device)
        teacher.model.eval().requires_grad_(False)
        check_vocab(tokenizer, teacher, "teacher")
        if train.position_ids is not None:  # packed examples
            check_packing(teacher.model, "teacher")
        _write_manifest(out, manifest)
        from safetensors.torch import save_file

        bar = tqdm(total=total, initial=total - sum(len(t[2]) for t in todo), unit="seq",
                   desc="cache-teacher", disable=not plan.progress, dynamic_ncols=True)
        for split_name, name, blocks, first in todo:
            tensors = _shard(plan, teacher, blocks, first, device)
            _atomic_write(out / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
            manifest["shards"].append({"file": name, "split": split_name, "rows": len(blocks),
                                       "first": first, "sha256": sha256_file(out / name)})
            manifest["shards"].sort(key=lambda s: (SPLITS.index(s["split"]), s["first"]))
            _write_manifest(out, manifest)
            bar.update(len(blocks))
        bar.close()
    manifest["complete"] = True
    manifest["bytes"] = sum((out / s["file"]).stat().st_size for s in manifest["shards"])
    _write_manifest(out, manifest)
    return manifest


# ---- reading -----------------------------------------------------------------------------------


class TeacherCache:
    """A complete cache, its shards checked (sha256) and memory-mapped (safetensors)."""

    def __init__(self, directory: str | Path, verify: bool = True):
        from safetensors import safe_open

        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"teacher_cache: no manifest.json in {self.dir}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"teacher_cache: {path} is not a {FORMAT} manifest")
        if not self.manifest.get("complete"):
            raise ValueError(f"teacher_cache: {self.dir} is incomplete (an interrupted "
                             "cache-teacher run): run the same command again to finish it")
        self.splits: dict[str, list] = {name: [] for name in SPLITS}
        for shard in self.manifest["shards"]:
            file = self.dir / shard["file"]
            if not file.is_file():
                raise ValueError(f"teacher_cache: shard {file} is missing")
            if verify and sha256_file(file) != shard["sha256"]:
                raise ValueError(f"teacher_cache: shard {file} is corrupted (its sha256 differs "
                                 "from the manifest's); rerun cache-teacher after deleting it")
            try:
                handle = safe_open(str(file), framework="pt")
                rows = handle.get_slice("ids").get_shape()[0]
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise ValueError(f"teacher_cache: shard {file} is unreadable ({err})") from err
            if rows != shard["rows"]:
                raise ValueError(f"teacher_cache: shard {file} holds {rows} rows, the manifest "
                                 f"says {shard['rows']}")
            self.splits[shard["split"]].append(handle)
        split = self.manifest["split"]
        for name in SPLITS:
            rows = sum(h.get_slice("ids").get_shape()[0] for h in self.splits[name])
            if rows != split[name]:
                raise ValueError(f"teacher_cache: the {name} shards hold {rows} sequences, the "
                                 f"manifest's split says {split[name]}")

    @property
    def k(self) -> int:
        return self.manifest["k"]

    def _rows(self, split: str, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of tensor `name` over the split's shards (read from the memory map)."""
        out = []
        starts, start = [], 0
        for handle in self.splits[split]:
            starts.append(start)
            start += handle.get_slice(name).get_shape()[0]
        for i in index.tolist():
            shard = max(j for j, s in enumerate(starts) if s <= i)
            local = i - starts[shard]
            out.append(self.splits[split][shard].get_slice(name)[local:local + 1])
        return torch.cat(out)

    def blocks(self, split: str) -> CachedBlocks:
        """The split's packed sequences, carrying the rows' cached targets."""
        n = self.manifest["split"][split]
        index = torch.arange(n)
        input_ids = self._rows(split, "input_ids", index).long() if n else torch.empty(0, 0)
        mask = self._rows(split, "attention_mask", index).long() if n else torch.empty(0, 0)
        stored = set(self.splits[split][0].keys()) if n else set()
        counted = self._rows(split, "counted", index).bool() if "counted" in stored else None
        positions = (self._rows(split, "position_ids", index).long()
                     if "position_ids" in stored else None)
        return CachedBlocks(input_ids, mask, CacheRows(self, split, index), counted=counted,
                            position_ids=positions)

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
                             f"{m['tokenizer']['sha256'][:12]})")
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
                                 f"cache's {[d['path'] for d in m['data']]} (sizes or sha256)")


@dataclass
class CacheRows:
    """Rows of one split of a cache, read lazily: `load()` gives (ids, logprobs) for them."""

    cache: TeacherCache
    split: str
    index: torch.Tensor

    def select(self, index: torch.Tensor) -> CacheRows:
        return CacheRows(self.cache, self.split, self.index[index])

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cache._rows(self.split, "ids", self.index),
                self.cache._rows(self.split, "logprobs", self.index))


@dataclass
class CachedBlocks(Blocks):
    """Packed sequences with their cached teacher targets (what `Batches` hands out)."""

    targets: CacheRows | None = None

    def select(self, index: torch.Tensor) -> CachedBlocks:
        return dataclasses.replace(super().select(index), targets=self.targets.select(index))


# ---- training from a cache (the trainer's hooks) -----------------------------------------------


def open_for_run(config, tokenizer) -> tuple[CachedBlocks, CachedBlocks, TeacherCache]:
    """(train, held-out, cache) of a `DistillConfig` with teacher_cache: checked against the
    run's tokenizer, seq_len, temperature, held-out fraction and data; the tail chosen
    (config.cache_tail, else "ignore" for sampled caches, "bucket" for top-k ones)."""
    cache = TeacherCache(config.teacher_cache)
    cache.check_run(tokenizer, config.seq_len, config.temperature, config.eval_fraction,
                    config.data)
    cache.tail = config.cache_tail or ("ignore" if cache.manifest["mode"] == "sample"
                                       else "bucket")
    if cache.tail not in reference.SPARSE_TAILS:
        raise ValueError(f"cache_tail must be one of {reference.SPARSE_TAILS}, got "
                         f"{cache.tail!r}")
    if cache.tail == "ignore" and config.divergence != "forward_kl":
        raise ValueError(f"the cache's tail 'ignore' (sampled targets) supports "
                         f"divergence='forward_kl' only, got {config.divergence!r}; choose "
                         "cache_tail='bucket' or 'renormalize'")
    return cache.blocks("train"), cache.blocks("heldout"), cache

