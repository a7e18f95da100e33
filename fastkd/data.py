"""Training data for the trainer: local text / jsonl files, tokenized, packed, split, batched.

Every document is tokenized and followed by the tokenizer's end-of-sequence token (if it has one);
the token stream is cut into blocks of `seq_len`, the last, shorter block padded (attention mask 0,
label `ignore_index`). A fixed-seed split holds out some blocks for evaluation, so the held-out set
stays put when the training seed changes. `Batches` hands out training batches in a seeded order per
epoch and saves and restores its position, which is what makes resume exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SPLIT_SEED = 1234  # the held-out split is the same for every training seed


def read_documents(path: str | Path) -> list[str]:
    """The documents in one file: each line's "text" field of a .jsonl file, else the whole file.

    Raises FileNotFoundError for a missing file, ValueError for a file with no text or for a jsonl
    line that is not a JSON object with a string "text" field (naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f'{path}:{lineno}: expected a JSON object with a string "text" field')
            docs.append(record["text"])
    else:
        docs = [raw]
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise ValueError(f"data file is empty (no text): {path}")
    return docs


def tokenize_files(paths: list[str], tokenizer) -> torch.Tensor:
    """All documents of all files as one int64 token stream, each followed by EOS if any."""
    if not paths:
        raise ValueError("data: pass at least one text or jsonl file")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for path in paths:
        docs = read_documents(path)
        # verbose=False: documents longer than the model's context are expected, they get packed.
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


@dataclass
class Blocks:
    """Packed sequences: input_ids and attention_mask, both (n, seq_len) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.input_ids[index], self.attention_mask[index])

    def labels(self, ignore_index: int) -> torch.Tensor:
        """Labels aligned with input_ids (the loop shifts them): padding becomes ignore_index."""
        return self.input_ids.masked_fill(self.attention_mask == 0, ignore_index)


def pack(stream: torch.Tensor, seq_len: int, pad_id: int) -> Blocks:
    """Cut a token stream into (n, seq_len) blocks; the last partial block is padded and masked."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target needs 2 tokens), "
                         f"got {seq_len}")
    n = -(-stream.numel() // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    ids[: stream.numel()] = stream
    mask = torch.zeros(n * seq_len, dtype=torch.long)
    mask[: stream.numel()] = 1
    return Blocks(ids.view(n, seq_len), mask.view(n, seq_len))


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


def load_blocks(paths: list[str], tokenizer, seq_len: int,
                eval_fraction: float) -> tuple[Blocks, Blocks]:
    """Read, tokenize, pack and split the data files: (train, held-out)."""
    stream = tokenize_files(paths, tokenizer)
    if stream.numel() < 2:
        raise ValueError(f"data files {paths} hold fewer than 2 tokens")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return split(pack(stream, seq_len, pad_id), eval_fraction)


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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def eval_batches(blocks: Blocks, batch_size: int):
    """The held-out blocks in order, in batches of at most batch_size."""
    for start in range(0, len(blocks), batch_size):
        yield blocks.select(torch.arange(start, min(start + batch_size, len(blocks))))
