"""The teacher cache: run the teacher once over the data, keep per counted next-token position its
top-k ids with their log-probabilities, or the ids drawn from it with their counts, and distil
from that with no teacher in memory (`fastkd.sparse`). On disk: `fastkd.cache_format` (the
compact rows: `fastkd.codec`); written by `fastkd cache-teacher` (`cache_teacher`) or imported
from a server's log-probabilities (`fastkd.cache_import`).

The data are tokenized, packed and split exactly as `fastkd distill` does (`fastkd.store`); a
position counts when its label is not ignore_index (`Blocks.labels`): padding (and, for chat
data, prompts) store nothing. Modes: "topk" keeps the k most likely ids of log softmax(t / T)
over the tokenizer's ids (a padded head's extra rows are never cached: the dense loss compares
the shared ids only); "sample" draws `samples` ids from softmax(t / T) (seeded per sequence: a
resumed cache, or one written by more processes, equals an uninterrupted one) and keeps the
distinct ones with their counts, log(count / samples) being an unbiased estimate of the teacher
(use the sparse loss's tail="ignore"). Per batch the teacher's logits are formed for batch x (L-1)
positions only, never for the whole data. A teacher that gives a non-finite logit at a counted
position is refused, naming the sequence.

Under torchrun (WORLD_SIZE > 1) every rank loads the teacher and writes the shards j with
j mod world = rank; shards are named by their sequence range, so a rerun with another number of
processes resumes the same cache. A rerun (after Ctrl-C, kill -9 or a crash) keeps every shard
already on disk that checks out (its own digest and the plan's) and writes the others; then, after
a barrier, rank 0 writes the complete manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import fsio, reference
from fastkd.cache_format import (
    FORMAT,
    SPLITS,
    ManifestCorrupt,
    Rows,
    check_out,
    check_shard,
    counted_positions,
    plan_digest,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from fastkd.cache_reader import CacheReader
from fastkd.data import SPLIT_SEED, Blocks
from fastkd.fsio import remembered_sha256, sha256_file
from fastkd.plans import CachePlan
from fastkd.readers import expand_data
from fastkd.store import StoreOptions, load_blocks

log = logging.getLogger("fastkd")


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


def sample_counts(logits: torch.Tensor, temperature: float, samples: int, seed: int):
    """(ids int64, counts int64), both (rows, samples), and n (rows,): `samples` draws per row
    from softmax(logits / T) with a generator seeded by `seed`; the distinct ids drawn (in the
    first n slots, by id) with their counts, the other slots -1 / 0."""
    probs = torch.softmax(logits.float() / temperature, -1)
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    draws = torch.multinomial(probs, samples, replacement=True, generator=gen).sort(-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = torch.cumsum(new, -1) - 1
    counts = torch.zeros_like(draws).scatter_add_(-1, group, torch.ones_like(draws))
    ids = torch.full_like(draws, -1).scatter_(-1, group, draws)
    return ids, counts, new.sum(-1)


def sample_targets(logits: torch.Tensor, temperature: float, samples: int, k: int, seed: int):
    """(ids int32, logprobs fp32), both (rows, k): `sample_counts` as the sparse loss takes them,
    log(count / samples) at the distinct ids drawn, the other slots unused (-1). E[count /
    samples] = p: the sparse loss's "ignore" tail then has the dense forward-KL gradient as its
    expectation."""
    if samples > k:
        raise ValueError(f"samples ({samples}) must be <= k ({k}): every distinct id drawn needs "
                         "a slot")
    ids, counts, _ = sample_counts(logits, temperature, samples, seed)
    logprobs = torch.where(counts > 0, (counts.float() / samples).log(), 0.0)
    pad = k - samples
    return (torch.nn.functional.pad(ids, (0, pad), value=-1).int(),
            torch.nn.functional.pad(logprobs, (0, pad)))


# ---- fingerprints ----------------------------------------------------------------------------


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


def hash_seed(seed: int, sequence: int) -> int:
    """A 63-bit seed per (run seed, sequence index)."""
    digest = hashlib.sha256(f"fastkd-cache:{seed}:{sequence}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- the plan ----------------------------------------------------------------------------------


def plan_manifest(plan: CachePlan, tokenizer, train: Blocks, heldout: Blocks) -> dict:
    """The manifest of a new cache (no shards yet): what a resumed run must agree with."""
    vocab = len(tokenizer)
    compact = plan.layout == "compact"
    manifest = {
        "format": FORMAT, "teacher": plan.teacher,
        "teacher_fingerprint": model_fingerprint(plan.teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer), "vocab": vocab,
        "temperature": plan.temperature, "mode": plan.mode, "k": plan.k, "samples": plan.samples,
        "slots": min(plan.k if plan.mode == "topk" or not compact else plan.samples, vocab),
        "layout": plan.layout,
        "logprob_step": plan.logprob_step if compact and plan.mode == "topk" else None,
        "dtype": None if compact else plan.dtype,
        "seq_len": plan.seq_len, "eval_fraction": plan.eval_fraction,
        "seed": plan.seed, "shard_sequences": plan.shard_sequences, "packing": plan.packing,
        "utf8_errors": plan.utf8_errors, "data": data_fingerprint(plan.data),
        "split": {"seed": SPLIT_SEED, "train": len(train), "heldout": len(heldout)},
        "shards": [], "complete": False,
    }
    manifest["plan_sha256"] = plan_digest(manifest)
    return manifest


# ---- computing a shard -------------------------------------------------------------------------


@torch.no_grad()
def teacher_rows(plan: CachePlan, teacher, blocks: Blocks, split: str, first: int, offset: int,
                 vocab: int, device, advance=None) -> Rows:
    """The targets of the counted positions of some packed sequences (split sequences first,
    first + 1, ...). The logits are the head's first `vocab` rows (the tokenizer's ids), with
    the head's logit scale and softcap (`reference.head_logits`: as the model's forward gives
    them, so the student's sparse loss sees the teacher it would see online). Sequence
    i's draws are seeded by (plan.seed, offset + first + i), so any shard can be recomputed alone,
    identically. advance(n), if given, is told of each batch of n sequences done (the bar)."""
    counted = counted_positions(blocks)
    weight = teacher.weight[:vocab]
    bias = None if teacher.bias is None else teacher.bias[:vocab]
    ids, values, n = [], [], []
    for b0 in range(0, len(blocks), plan.batch_size):
        b1 = min(b0 + plan.batch_size, len(blocks))
        h = teacher.hidden(**blocks.select(torch.arange(b0, b1)).model_inputs(device))[:, :-1]
        logits = reference.head_logits(torch.nn.functional.linear(h, weight, bias).float(),
                                       teacher.logit_scale, teacher.softcap)
        for i in range(b1 - b0):
            rows = logits[i][counted[b0 + i].to(device)]
            finite = torch.isfinite(rows).all(-1)
            if not bool(finite.all()):
                position = int(torch.nonzero(counted[b0 + i])[int((~finite).nonzero()[0])])
                raise ValueError(
                    f"teacher {plan.teacher} gives non-finite logits (NaN or inf) on {split} "
                    f"sequence {first + b0 + i}, position {position}: refusing to cache them; "
                    "check the teacher (its dtype: --teacher-dtype float32) and the data")
            if plan.mode == "topk":
                row_ids, row_values = topk_targets(rows, plan.temperature, plan.k)
                row_n = torch.full((len(rows),), min(plan.k, vocab))
            else:
                seed = hash_seed(plan.seed, offset + first + b0 + i)
                row_ids, row_values, row_n = sample_counts(rows, plan.temperature,
                                                           plan.samples, seed)
            ids.append(row_ids.long().cpu())
            values.append(row_values.cpu())
            n.append(row_n.cpu())
        del logits
        if advance is not None:
            advance(b1 - b0)
    width = min(plan.k if plan.mode == "topk" else plan.samples, vocab)
    if not ids:
        return Rows(torch.empty(0, width, dtype=torch.long), torch.empty(0, width),
                    torch.empty(0, dtype=torch.long))
    return Rows(torch.cat(ids)[:, :width], torch.cat(values)[:, :width], torch.cat(n))


# ---- writing (and resuming) a cache, on one or several processes -------------------------------


def _all_ranks(local):
    """Every rank's `local` (a picklable value), in rank order."""
    from fastkd import distributed

    if not distributed.is_distributed():
        return [local]
    import torch.distributed as dist

    gathered = [None] * distributed.world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def cache_teacher(plan: CachePlan) -> dict:
    """Write (or resume) the teacher cache of `plan` under plan.out; returns the manifest.

    Under torchrun every rank calls this: it joins the process group, writes its shards, and
    leaves the group (barrier, then destroy) before returning."""
    from fastkd import distributed

    device = distributed.init(plan.device, plan.dist_timeout)
    if device is None:
        device = torch.device(plan.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        manifest = _cache_teacher(plan, device)
    except BaseException:
        distributed.teardown(clean=False)
        raise
    distributed.teardown(clean=True)
    return manifest


def _cache_teacher(plan: CachePlan, device: torch.device) -> dict:
    from fastkd import distributed
    from fastkd.models import load_tokenizer

    tokenizer = load_tokenizer(plan.tokenizer or plan.teacher)
    main = distributed.is_main()  # it prepares the token store; the other ranks wait and map it
    train, heldout = load_blocks(plan.data, tokenizer, plan.seq_len, plan.eval_fraction,
                                 packing=plan.packing, utf8_errors=plan.utf8_errors,
                                 options=StoreOptions(plan.data_cache, plan.num_proc,
                                                      plan.progress and main, prepare=main))
    log.info("data: %d training and %d held-out sequences of %d tokens", len(train),
             len(heldout), plan.seq_len)
    manifest = plan_manifest(plan, tokenizer, train, heldout)

    def teacher_shards():  # only once a shard is to be written: the teacher
        from fastkd.models import check_packing, check_vocab, load_lm

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(
            plan.teacher_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        teacher = load_lm(plan.teacher, "teacher", dtype, device)
        teacher.model.eval().requires_grad_(False)
        check_vocab(tokenizer, teacher, "teacher")
        if train.packed:  # packed examples
            check_packing(teacher.model, "teacher")
        return lambda split, first, blocks, offset, advance: teacher_rows(
            plan, teacher, blocks, split, first, offset, manifest["vocab"], device, advance)

    return build_cache(Path(plan.out), manifest, {"train": train, "heldout": heldout},
                       plan.shard_sequences, teacher_shards, plan.progress, "cache-teacher")


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
    from fastkd import distributed

    with contextlib.ExitStack() as lock:
        failure = None
        if distributed.is_main():
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock.enter_context(fsio.locked(out / fsio.LOCK, f"{desc} --out {out}"))
                check_out(out)
            except (ValueError, OSError) as err:
                failure = err
        refusals = [r for r in _all_ranks(None if failure is None else str(failure)) if r]
        if failure is not None:
            raise failure
        if refusals:
            raise ValueError(refusals[0])
        yield


def _build_cache(out: Path, manifest: dict, splits: dict[str, Blocks], shard_sequences: int,
                 shard_rows, progress: bool, desc: str) -> dict:
    from fastkd import distributed

    found = check_resume(out, manifest)
    distributed.barrier()  # every rank has read the old manifest before rank 0 rewrites it
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
    results = _all_ranks((entries, error))
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

    from fastkd import distributed

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


# ---- reading -----------------------------------------------------------------------------------


class TeacherCache(CacheReader):
    """A complete cache, checked when opened (`CacheReader`), as the trainer reads it."""

    tail: str | None = None  # the sparse loss's tail a run trains with (open_for_run sets it)

    @property
    def k(self) -> int:
        return self.manifest["k"]

    def blocks(self, split: str) -> CachedBlocks:
        """The split's packed sequences, carrying the rows' cached targets."""
        stored = self.split_blocks(split)  # every split holds >= 1 sequence (fastkd.data)
        rows = CacheRows(self, split, torch.arange(self.manifest["split"][split]),
                         counted_positions(Blocks(**stored)))
        return CachedBlocks(**stored, targets=rows)

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
        # no fingerprint, or an earlier fastkd's (it hashed part of each weight file): the path
        fingerprinted = "weights" not in m.get("teacher_fingerprint", {"weights": None})
        same = (model_fingerprint(teacher) == m["teacher_fingerprint"] if fingerprinted else
                Path(teacher).expanduser().resolve() == Path(m["teacher"]).expanduser().resolve())
        if not same:
            raise ValueError(f"teacher_cache: {self.dir} was made from the teacher "
                             f"{m['teacher']}, not from --teacher {teacher} (their config or "
                             "weight files differ); drop --teacher to train from the cache, or "
                             "build a cache of that teacher")


@dataclass
class CacheRows:
    """Rows of one split of a cache, read lazily: `load()` gives (ids, logprobs) for them."""

    cache: TeacherCache
    split: str
    index: torch.Tensor
    counted: torch.Tensor  # (rows, L-1): the positions that carry targets

    def select(self, index: torch.Tensor) -> CacheRows:
        return CacheRows(self.cache, self.split, self.index[index], self.counted[index])

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.targets(self.split, self.index, self.counted)


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


@dataclass
class CachedBlocks(Blocks):
    """Packed sequences with their cached teacher targets (what `Batches` hands out)."""

    targets: CacheRows | None = None

    def select(self, index: torch.Tensor) -> CachedBlocks:
        return dataclasses.replace(super().select(index), targets=self.targets.select(index))


# ---- training from a cache (the trainer's hooks) -----------------------------------------------


def open_for_run(config, tokenizer) -> tuple[CachedBlocks, CachedBlocks, TeacherCache]:
    """(train, held-out, cache) of a `DistillConfig` with teacher_cache: checked against the
    run's tokenizer, seq_len, temperature, held-out fraction, data, packing, utf8_errors, student
    (the cache's largest
    id) and teacher (if named: the cache's own); the tail chosen (config.cache_tail, else
    "ignore" for sampled caches, "bucket" for top-k ones)."""
    cache = TeacherCache(config.teacher_cache)
    cache.check_run(tokenizer, config.seq_len, config.temperature, config.eval_fraction,
                    config.data)
    cache.check_options(packing=config.packing, utf8_errors=config.utf8_errors)
    cache.check_student(config.student)
    if config.teacher is not None:
        cache.check_teacher(config.teacher)
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

