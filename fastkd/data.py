"""Training rows: `Blocks` (packed sequences), the packing rules, the held-out split, batches.

Where rows come from: fastkd.readers reads the data files, fastkd.tokens tokenizes them, the
packers below cut them into rows, fastkd.prepare writes the rows into a token store once and
fastkd.store maps it (`fastkd.store.load_blocks`); training reads rows from that map.

Packing:
- text: the documents of all files form one token stream, cut into rows of `seq_len`
  (`TextPacker`); the last, shorter row padded (attention mask 0, label `ignore_index`). Every
  token is a target; documents attend to the ones before them in the stream.
- examples (chat, prompt-completion and masked pre-tokenized records) are never split, never
  attending to each other. An example longer than `seq_len` is cut to its first `seq_len` tokens
  (one with no target left is dropped: `Fitter`). packing=True puts several examples in a row,
  in order, each with position_ids counting from 0 (`ExamplePacker`), and the model gets no
  attention_mask (`Blocks.model_inputs`): transformers then builds a block-diagonal causal mask
  from the position_ids resets (sdpa, eager, flex; flash-attention only for one row a batch, so
  `fastkd.models.check_packing` refuses it). packing=False gives each example its own padded row.
  Example rows follow the text rows.

A fixed-seed split holds out some rows for evaluation (`split`), so the held-out set stays put
when the training seed changes. `Batches` hands out training batches in a seeded order per epoch
and saves and restores its position, which is what makes resume exact. Both work on `Blocks` in
memory and on a store's rows alike (`fastkd.store.StoredRows`: `select` narrows the row index,
`take` reads rows into a `Blocks`).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from fastkd.checks import check_seq_len

SPLIT_SEED = 1234  # the held-out split is the same for every training seed

log = logging.getLogger("fastkd")


@dataclass
class Blocks:
    """Rows of tokens, all (n, seq_len).

    input_ids: int64 token ids (padding: the pad id).
    attention_mask: int64, 1 at tokens, 0 at padding.
    counted: bool or None, True at tokens that are targets (predicted from the position before);
        None: every non-padding token is (text). False at prompts, non-assistant turns, padding
        and each example's first token.
    position_ids: int64 or None, positions counting from 0 in each packed example (and in the
        padding after the last); None: each row is one sequence (text, or padded examples).
    teacher: int64 or None, each token's teacher as the token store codes it (0: none, c: the
        store's c-th routed name; fastkd.teacher_set); None: one teacher, or a mixture.

    The model sees `model_inputs()`; the loss sees `labels(ignore_index)`, shifted by the caller
    ([:, 1:]); `count_targets()` counts them. counted and position_ids are keyword-only, so a
    subclass can add positional fields.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    counted: torch.Tensor | None = field(default=None, kw_only=True)
    position_ids: torch.Tensor | None = field(default=None, kw_only=True)
    teacher: torch.Tensor | None = field(default=None, kw_only=True)

    @classmethod
    def from_rows(cls, ids: np.ndarray, lengths: np.ndarray, counted: np.ndarray | None = None,
                  positions: np.ndarray | None = None, *,
                  teacher: np.ndarray | None = None) -> Blocks:
        """Blocks of row arrays as the packers and the token store hold them: ids and positions
        (n, seq_len) of any int type, lengths (n,) (the tokens before a row's padding), counted
        (n, seq_len) bool."""
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        mask = (torch.arange(ids.shape[1]) < torch.from_numpy(
            np.asarray(lengths, dtype=np.int64)).unsqueeze(1)).long()
        return cls(ids, mask,
                   counted=None if counted is None else torch.from_numpy(
                       np.ascontiguousarray(counted, dtype=bool)),
                   position_ids=None if positions is None else torch.from_numpy(
                       np.ascontiguousarray(positions, dtype=np.int64)),
                   teacher=None if teacher is None else torch.from_numpy(
                       np.ascontiguousarray(teacher, dtype=np.int64)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def packed(self) -> bool:
        """Whether the rows pack several examples each (and carry position_ids)."""
        return self.position_ids is not None

    def select(self, index: torch.Tensor) -> Blocks:
        """The rows at index (every row field indexed; a subclass's other fields kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[index] for f in dataclasses.fields(Blocks)
            if getattr(self, f.name) is not None})

    def take(self, index: torch.Tensor) -> Blocks:
        """The rows at index, in memory: here `select` (a token store's rows read them)."""
        return self.select(index)

    def target_mask(self) -> torch.Tensor:
        """(n, seq_len) bool: the tokens that are targets."""
        return self.attention_mask != 0 if self.counted is None else self.counted

    def labels(self, ignore_index: int) -> torch.Tensor:
        """Labels aligned with input_ids (the loop shifts them): tokens that are not targets
        (padding, prompts, non-assistant turns) become ignore_index."""
        return self.input_ids.masked_fill(~self.target_mask(), ignore_index)

    def count_targets(self) -> int:
        """Next-token targets that count (labels after the shift); CPU tensors, no sync."""
        return int(self.target_mask()[:, 1:].sum())

    def model_inputs(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The model's keyword inputs: input_ids and attention_mask, or, for packed rows,
        input_ids and position_ids and no attention_mask (with a 2-D mask transformers would let
        the packed examples attend to each other). Call the model with use_cache=False too: with a
        KV cache (use_cache defaults to True) it ignores the position_ids resets as well."""
        inputs = {"input_ids": self.input_ids}
        if self.position_ids is None:
            inputs["attention_mask"] = self.attention_mask
        else:
            inputs["position_ids"] = self.position_ids
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


class DiskRows(abc.ABC):
    """Rows that stay on disk: what a process holds is a row index into their source (None: every
    row), never the rows. `select` narrows the index (as `Blocks.select`), `take` reads rows into
    memory (as `Blocks.take`), `load` all of them (small data, tests). A source (a token store's
    rows, a teacher cache's sequences) gives `total`, its rows, and `read(rows)`, the rows at
    those indices of it in memory."""

    def __init__(self, index: torch.Tensor | None = None):
        self.index = index

    @property
    @abc.abstractmethod
    def total(self) -> int:
        """The source's rows."""

    @abc.abstractmethod
    def read(self, rows: torch.Tensor) -> Blocks:
        """The source's rows at `rows` (int64 indices into all of them), in memory, in order."""

    def __len__(self) -> int:
        return self.total if self.index is None else len(self.index)

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long)
        return index if self.index is None else self.index[index]

    def select(self, index: torch.Tensor):
        narrowed = copy.copy(self)
        narrowed.index = self._rows(index)
        return narrowed

    def take(self, index: torch.Tensor) -> Blocks:
        return self.read(self._rows(index))

    def load(self) -> Blocks:
        return self.take(torch.arange(len(self)))


def cat(parts: list[Blocks], *, counted: bool | None = None,
        packed: bool | None = None) -> Blocks:
    """The rows of all parts. counted / packed (default: whether any part has them): every row
    gets counted / position_ids, a part without them its rows' defaults (its targets; positions
    0..seq_len-1)."""
    counted = any(p.counted is not None for p in parts) if counted is None else counted
    packed = any(p.position_ids is not None for p in parts) if packed is None else packed
    if len(parts) == 1 and counted == (parts[0].counted is not None) and packed == (
            parts[0].position_ids is not None):
        return parts[0]
    seq_len = parts[0].input_ids.shape[1]

    def positions(p: Blocks) -> torch.Tensor:
        if p.position_ids is not None:
            return p.position_ids
        return torch.arange(seq_len).expand(len(p), seq_len)

    return Blocks(torch.cat([p.input_ids for p in parts]),
                  torch.cat([p.attention_mask for p in parts]),
                  counted=torch.cat([p.target_mask() for p in parts]) if counted else None,
                  position_ids=torch.cat([positions(p) for p in parts]) if packed else None,
                  teacher=None if parts[0].teacher is None else torch.cat([p.teacher
                                                                           for p in parts]))


# ----------------------------------------------------------------------------------------------
# Packing: streams of tokens and examples into rows, as they come.


class TextPacker:
    """The text stream cut into rows of seq_len as the tokens come (`add`: the rows filled);
    `finish`: the last, shorter row, padded with pad_id."""

    def __init__(self, seq_len: int, pad_id: int):
        check_seq_len(seq_len)
        self.seq_len, self.pad_id = seq_len, pad_id
        self.rest = np.empty(0, dtype=np.int64)
        self.tokens = 0

    def add(self, ids: np.ndarray) -> np.ndarray:
        """(k, seq_len): the rows these ids complete."""
        stream = np.concatenate([self.rest, ids])
        self.tokens += len(ids)
        k = len(stream) // self.seq_len
        self.rest = stream[k * self.seq_len:].copy()
        return stream[:k * self.seq_len].reshape(k, self.seq_len)

    def finish(self) -> tuple[np.ndarray, int] | None:
        """(the last row, its tokens before the padding), or None if no token is left."""
        if not len(self.rest):
            return None
        row = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        row[:len(self.rest)] = self.rest
        return row, len(self.rest)


class ExamplePacker:
    """Examples (ids, targets) of at most seq_len tokens into rows, in order: packing=True fills
    a row with as many whole examples as fit, each with position_ids from 0 (the padding after
    them a segment of its own); packing=False gives each its own row. Each example's first token
    is never a target: nothing before it in its example predicts it.

    A row is (ids, length, counted, positions): arrays (seq_len,) int64, bool, int64, and the
    tokens before its padding. `add` returns the rows an example closes, `finish` the last."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool = True):
        check_seq_len(seq_len)
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        self.members: list[tuple[list[int], list[bool]]] = []
        self.used = 0
        self.examples = 0

    def add(self, ids: list[int], targets: list[bool]) -> list[tuple]:
        out = []
        if self.members and (not self.packing or self.used + len(ids) > self.seq_len):
            out.append(self._row())
        self.members.append((ids, targets))
        self.used += len(ids)
        self.examples += 1
        return out

    def finish(self) -> list[tuple]:
        return [self._row()] if self.members else []

    def _row(self) -> tuple:
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        counted = np.zeros(self.seq_len, dtype=bool)
        positions = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        for example, targets in self.members:
            end = at + len(example)
            ids[at:end] = example
            counted[at:end] = targets
            counted[at] = False
            positions[at:end] = np.arange(len(example))
            at = end
        positions[at:] = np.arange(self.seq_len - at)
        self.members, self.used = [], 0
        return ids, at, counted, positions


def pack(stream: torch.Tensor, seq_len: int, pad_id: int) -> Blocks:
    """A token stream in (n, seq_len) rows (`TextPacker`), in memory."""
    packer = TextPacker(seq_len, pad_id)
    rows = [packer.add(stream.numpy().astype(np.int64))]
    lengths = [np.full(len(rows[0]), seq_len)]
    last = packer.finish()
    if last is not None:
        rows.append(last[0][None])
        lengths.append(np.array([last[1]]))
    return Blocks.from_rows(np.concatenate(rows), np.concatenate(lengths))


def pack_examples(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                  packing: bool = True) -> Blocks:
    """Examples (ids, targets) in (n, seq_len) rows (`ExamplePacker`), in memory. Examples must
    be at most seq_len long (`Fitter`)."""
    packer = ExamplePacker(seq_len, pad_id, packing)
    rows = [row for ids, targets in examples for row in packer.add(ids, targets)]
    rows += packer.finish()
    if not rows:
        empty = np.zeros((0, seq_len), dtype=np.int64)
        return Blocks.from_rows(empty, np.zeros(0), empty.astype(bool), empty if packing else None)
    ids, lengths, counted, positions = (np.stack(column) for column in zip(*rows, strict=True))
    return Blocks.from_rows(ids, lengths, counted, positions if packing else None)


class Fitter:
    """Examples cut to their first seq_len tokens, without those left with no target (a target
    after the first token), counted per file: `finish` logs how many were cut and dropped, and
    refuses a file none of whose examples is left."""

    def __init__(self, seq_len: int, where: str):
        self.seq_len, self.where = seq_len, where
        self.seen = self.cut = self.kept = 0

    def fit(self, ids: list[int], targets: list[bool]) -> tuple[list[int], list[bool]] | None:
        self.seen += 1
        if len(ids) > self.seq_len:
            ids, targets = ids[:self.seq_len], targets[:self.seq_len]
            self.cut += 1
        if not any(targets[1:]):
            return None
        self.kept += 1
        return ids, targets

    def finish(self) -> None:
        dropped = self.seen - self.kept
        if self.cut or dropped:
            log.warning("data: %s: %d of %d examples are longer than seq_len=%d and were cut; %d "
                        "kept no target and were dropped", self.where, self.cut, self.seen,
                        self.seq_len, dropped)
        if not self.kept:
            raise ValueError(f"{self.where}: no example has a target within its first "
                             f"seq_len={self.seq_len} tokens; raise seq_len")


# ----------------------------------------------------------------------------------------------
# The held-out split and the batches.


def split(blocks, eval_fraction: float):
    """(train, held-out): a fixed-seed random eval_fraction of the rows (>= 1) is held out.
    blocks: a Blocks, or a token store's rows (both `select`ed: a store's stay on disk)."""
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


class Batches:
    """Endless training batches: each epoch a seeded permutation, cut into full batches, each
    read into memory (`take`) from the rows (a Blocks, or a token store's rows).

    The position (epoch, offset) is the whole state: `state_dict` / `load_state_dict` resume it.
    """

    def __init__(self, blocks, batch_size: int, seed: int):
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
        return self.blocks.take(index)

    def peek(self, n: int) -> list[Blocks]:
        """The next n batches, without moving the position."""
        ahead = copy.copy(self)  # shares the permutation tensor, which next() only replaces
        return [next(ahead) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def eval_batches(blocks, batch_size: int):
    """The held-out rows in order, in batches of at most batch_size (read into memory)."""
    for start in range(0, len(blocks), batch_size):
        yield blocks.take(torch.arange(start, min(start + batch_size, len(blocks))))
