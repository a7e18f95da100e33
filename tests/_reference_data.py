"""An in-memory data path, apart from the token store: the data read, tokenized and packed in
memory (`load_blocks`), batched by `Batches` (fastkd/data.py at 0cf66b0, kept verbatim). The
reference that the token store's rows, batch order and trained weights are compared with
(tests/test_store.py). It calls fastkd.readers and fastkd.tokens, which give it the same records
and tokens for files under fastkd.readers.PIECE_BYTES."""

from __future__ import annotations

import copy
import logging

import torch

from fastkd.data import SPLIT_SEED, Blocks
from fastkd.readers import read_records
from fastkd.tokens import tokenize_examples

log = logging.getLogger("fastkd")


def tokenize_documents(docs: list[str], tokenizer) -> list[int]:
    """The documents as one token stream, each followed by EOS if the tokenizer has one."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    # verbose=False: documents longer than the model's context are expected, they get packed.
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return stream


def cat(parts: list[Blocks]) -> Blocks:
    """The rows of all parts; a part without counted / position_ids gets its rows' defaults."""
    if len(parts) == 1:
        return parts[0]
    packed = any(p.position_ids is not None for p in parts)
    seq_len = parts[0].input_ids.shape[1]

    def positions(p: Blocks) -> torch.Tensor:
        if p.position_ids is not None:
            return p.position_ids
        return torch.arange(seq_len).expand(len(p), seq_len)

    return Blocks(torch.cat([p.input_ids for p in parts]),
                  torch.cat([p.attention_mask for p in parts]),
                  counted=torch.cat([p.target_mask() for p in parts]),
                  position_ids=torch.cat([positions(p) for p in parts]) if packed else None)


def pack(stream: torch.Tensor, seq_len: int, pad_id: int) -> Blocks:
    """Cut a token stream into (n, seq_len) blocks; the last partial block is padded and masked."""
    _check_seq_len(seq_len)
    n = -(-stream.numel() // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    ids[: stream.numel()] = stream
    mask = torch.zeros(n * seq_len, dtype=torch.long)
    mask[: stream.numel()] = 1
    return Blocks(ids.view(n, seq_len), mask.view(n, seq_len))


def pack_examples(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                  packing: bool = True) -> Blocks:
    """Examples (ids, targets) into (n, seq_len) rows, in order: packing=True fills each row with
    as many whole examples as fit, with per-example position_ids; packing=False gives each its own
    row. Examples must be at most seq_len long (`fit_examples`)."""
    _check_seq_len(seq_len)
    rows: list[list[int]] = []
    used = seq_len
    for e, (ids, _) in enumerate(examples):
        if not packing or used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(ids)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    counted = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    positions = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for e in members:
            ids, targets = examples[e]
            end = at + len(ids)
            input_ids[r, at:end] = torch.tensor(ids)
            mask[r, at:end] = 1
            counted[r, at:end] = torch.tensor(targets)
            counted[r, at] = False  # nothing before it in its example predicts it
            positions[r, at:end] = torch.arange(len(ids))
            at = end
        positions[r, at:] = torch.arange(seq_len - at)  # the padding: a segment of its own
    return Blocks(input_ids, mask, counted=counted, position_ids=positions if packing else None)


def fit_examples(examples: list[tuple[list[int], list[bool]]], seq_len: int, where: str):
    """The examples cut to their first seq_len tokens, without those left with no target (a
    target after the first token); logs how many were cut and dropped."""
    fitted, cut = [], 0
    for ids, targets in examples:
        if len(ids) > seq_len:
            ids, targets, cut = ids[:seq_len], targets[:seq_len], cut + 1
        if any(targets[1:]):
            fitted.append((ids, targets))
    dropped = len(examples) - len(fitted)
    if cut or dropped:
        log.warning("data: %s: %d of %d examples are longer than seq_len=%d and were cut; %d "
                    "kept no target and were dropped", where, cut, len(examples), seq_len,
                    dropped)
    if not fitted:
        raise ValueError(f"{where}: no example has a target within its first seq_len={seq_len} "
                         "tokens; raise seq_len")
    return fitted


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target needs 2 tokens), "
                         f"got {seq_len}")


def split(blocks: Blocks, eval_fraction: float) -> tuple[Blocks, Blocks]:
    """(train, held-out): a fixed-seed random eval_fraction of the blocks (>= 1) is held out."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    n = len(blocks)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise ValueError(
            f"the data packs into only {n} sequence(s): too few to hold out {n_eval} for "
            "evaluation and train on the rest; add data or lower seq_len"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return blocks.select(order[n_eval:].sort().values), blocks.select(order[:n_eval].sort().values)


def load_blocks(paths: list[str], tokenizer, seq_len: int, eval_fraction: float, *,
                packing: bool = True, utf8_errors: str = "strict") -> tuple[Blocks, Blocks]:
    """Read, tokenize, pack and split the data files: (train, held-out).

    Text documents of all files form one stream, cut into blocks (as always); chat and
    prompt-completion examples are packed apart (`pack_examples`) and their rows follow the
    text's.
    """
    if not paths:
        raise ValueError("data: pass at least one data file (text, jsonl, parquet or a saved "
                         "dataset directory)")
    _check_seq_len(seq_len)
    stream: list[int] = []
    examples: list[tuple[list[int], list[bool]]] = []
    for path in paths:
        fmt, records = read_records(path, utf8_errors)
        if fmt == "text":
            stream.extend(tokenize_documents([r["text"] for _, r in records], tokenizer))
        else:
            examples.extend(fit_examples(tokenize_examples(path, fmt, records, tokenizer),
                                         seq_len, str(path)))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    parts = []
    if stream or not examples:
        if len(stream) < 2:
            raise ValueError(f"data files {paths} hold fewer than 2 tokens")
        parts.append(pack(torch.tensor(stream, dtype=torch.long), seq_len, pad_id))
    if examples:
        rows = pack_examples(examples, seq_len, pad_id, packing)
        log.info("data: %d examples in %d rows of %d tokens (%.0f%% padding, %d targets)",
                 len(examples), len(rows), seq_len,
                 100 * (1 - rows.attention_mask.float().mean().item()), rows.count_targets())
        parts.append(rows)
    return split(cat(parts), eval_fraction)


class Batches:
    """Endless training batches: each epoch a seeded permutation, cut into full batches.

    The position (epoch, offset) is the whole state: `state_dict` / `load_state_dict` resume it.
    """

    def __init__(self, blocks: Blocks, batch_size: int, seed: int):
        if len(blocks) < batch_size:
            raise ValueError(
                f"the training split has {len(blocks)} sequences, fewer than "
                f"batch_size={batch_size}; add data, lower seq_len or lower batch_size"
            )
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.blocks), generator=generator)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Blocks:
        if self.offset + self.batch_size > len(self.blocks):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation()
        index = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return self.blocks.select(index)

    def peek(self, n: int) -> list[Blocks]:
        """The next n batches, without moving the position."""
        ahead = copy.copy(self)  # shares the permutation tensor, which next() only replaces
        return [next(ahead) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def eval_batches(blocks: Blocks, batch_size: int):
    """The held-out blocks in order, in batches of at most batch_size."""
    for start in range(0, len(blocks), batch_size):
        yield blocks.select(torch.arange(start, min(start + batch_size, len(blocks))))
