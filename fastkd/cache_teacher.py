"""`fastkd cache-teacher`: run the teacher once over the data and keep, per counted next-token
position, its top-k ids with their log-probabilities, or the ids drawn from it with their counts
(`cache_teacher`), so that training from the cache (fastkd.cache) needs no teacher in memory. On
disk: fastkd.cache_format (the compact rows: fastkd.codec); written, resumed and shared between
torchrun ranks by fastkd.cache_write.

The data are tokenized, packed and split exactly as `fastkd distill` does (fastkd.store); a
position counts when its label is not ignore_index (`Blocks.labels`): padding (and, for chat
data, prompts) store nothing. Modes: "topk" keeps the k most likely ids of log softmax(t / T)
over the tokenizer's ids (a padded head's extra rows are never cached: the dense loss compares
the shared ids only); "sample" draws `samples` ids from softmax(t / T) (seeded per sequence: a
resumed cache, or one written by more processes, equals an uninterrupted one) and keeps the
distinct ones with their counts, log(count / samples) being an unbiased estimate of the teacher
(the sparse loss's tail="ignore": `fastkd.cache.default_tail`). Per batch the teacher's logits are
formed for batch x (L-1) positions only, never for the whole data. A teacher that gives a
non-finite logit at a counted position is refused, naming the sequence.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from fastkd import distributed, reference
from fastkd.cache_format import (
    FORMAT,
    Rows,
    counted_positions,
    data_fingerprint,
    model_fingerprint,
    plan_digest,
    tokenizer_fingerprint,
)
from fastkd.cache_write import build_cache
from fastkd.data import SPLIT_SEED, Blocks, DiskRows
from fastkd.plans import CachePlan
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


def hash_seed(seed: int, sequence: int) -> int:
    """A 63-bit seed per (run seed, sequence index)."""
    digest = hashlib.sha256(f"fastkd-cache:{seed}:{sequence}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- the plan ----------------------------------------------------------------------------------


def plan_manifest(plan: CachePlan, tokenizer, train: DiskRows, heldout: DiskRows) -> dict:
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
            _check_finite(rows, plan, split, first + b0 + i, counted[b0 + i])
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


def _check_finite(rows: torch.Tensor, plan: CachePlan, split: str, sequence: int,
                  counted: torch.Tensor) -> None:
    """A ValueError naming the sequence and position where the teacher's logits are not finite."""
    finite = torch.isfinite(rows).all(-1)
    if not bool(finite.all()):
        position = int(torch.nonzero(counted)[int((~finite).nonzero()[0])])
        raise ValueError(
            f"teacher {plan.teacher} gives non-finite logits (NaN or inf) on {split} "
            f"sequence {sequence}, position {position}: refusing to cache them; "
            "check the teacher (its dtype: --teacher-dtype float32) and the data")


# ---- the command -------------------------------------------------------------------------------


def cache_teacher(plan: CachePlan) -> dict:
    """Write (or resume) the teacher cache of `plan` under plan.out.

    Under torchrun every rank calls this: it joins the process group, writes its shards, and
    leaves the group (barrier, then destroy) before returning (`distributed.session`).

    Returns:
        the cache's manifest (fastkd.cache_format).
    """
    with distributed.session(plan.device, plan.dist_timeout) as device:
        return _cache_teacher(plan, device)


def _cache_teacher(plan: CachePlan, device: torch.device) -> dict:
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
        from fastkd.models import check_packing, check_vocab, load_teacher

        teacher = load_teacher(plan.teacher, plan.teacher_dtype, device)
        check_vocab(tokenizer, teacher, "teacher")
        if train.packed:  # packed examples
            check_packing(teacher.model, "teacher")
        return lambda split, first, blocks, offset, advance: teacher_rows(
            plan, teacher, blocks, split, first, offset, manifest["vocab"], device, advance)

    return build_cache(Path(plan.out), manifest, {"train": train, "heldout": heldout},
                       plan.shard_sequences, teacher_shards, plan.progress, "cache-teacher")
