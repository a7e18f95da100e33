"""A teacher cache inside `transformers.Trainer`: a Dataset and a collator over the cache's shards,
for `FusedKDTrainer` with no teacher model loaded.

    from fastkd.integrations.cache import CacheDataset, cache_collator
    from fastkd.integrations.transformers import FusedKDTrainer
    train = CacheDataset("CACHE_DIR", "train")              # checked once, when opened
    args = TrainingArguments(..., dataloader_num_workers=2)  # rows decoded in the workers
    trainer = FusedKDTrainer(model=student, teacher_model=None, args=args, train_dataset=train,
                             eval_dataset=CacheDataset("CACHE_DIR", "heldout"),
                             data_collator=cache_collator,
                             distill_options=fastkd.DistillOptions(temperature=train.temperature))
    trainer.train()

An item is one packed sequence of the cache, as `fastkd.data.Blocks.model_inputs` gives it to a
model (input_ids with attention_mask, or, for packed examples, with position_ids and no 2-D mask),
its labels (L,) (ignore_index where a position does not count), and the teacher's targets at its
next-token positions, teacher_ids (L-1, slots) int32 (-1: unused) and teacher_logprobs
(L-1, slots) float32 at the cache's temperature. The Dataset opens the cache's shards lazily in
each process (memory-mapped; a DataLoader worker opens its own) and reads an item's sequence and
targets when the item is asked for, so with `dataloader_num_workers` > 0 reading and decoding the
compact rows run in the workers, overlapping the steps (`bench/cache_loader.py` measures the step
time with and without them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastkd.cache_format import SPLITS
from fastkd.checks import choice
from fastkd.options import DistillOptions

__all__ = ["CACHE_COLUMNS", "CacheDataset", "cache_collator"]
# A teacher cache's targets in a batch: the loss's, not the models' (the trainer keeps them apart).
CACHE_COLUMNS = ("teacher_ids", "teacher_logprobs")


class CacheDataset(torch.utils.data.Dataset):
    """The packed sequences of one split of a teacher cache, with their cached targets.

    cache: a cache directory (checked when this is made: `fastkd.cache.TeacherCache`);
    split: "train" or "heldout"."""

    def __init__(self, cache: str | Path, split: str):
        from fastkd.cache import TeacherCache, default_tail

        choice("split", split, SPLITS)
        self.dir, self.split = Path(cache), split
        opened = TeacherCache(self.dir)  # every check, once
        self.manifest = opened.manifest
        self.temperature = float(self.manifest["temperature"])
        self.tail = default_tail(opened.mode)  # what it trains with unless told another
        self._rows = opened.rows(split)

    def __len__(self) -> int:
        return len(self._sequences())

    def __getstate__(self):  # a DataLoader worker (spawned) opens the shards itself
        return {**self.__dict__, "_rows": None}

    def _sequences(self):
        if self._rows is None:
            from fastkd.cache import TeacherCache

            # checked by the process that made this Dataset
            self._rows = TeacherCache(self.dir, verify=False).rows(self.split)
        return self._rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        one = self._sequences().take(torch.tensor([int(i)]))
        ids, logprobs = one.targets.load()
        return {**{k: v[0] for k, v in one.model_inputs().items()},
                "labels": one.labels(DistillOptions.ignore_index)[0],
                "teacher_ids": ids[0], "teacher_logprobs": logprobs[0].float()}


def cache_collator(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack CacheDataset items (every sequence of a cache has the cache's seq_len)."""
    if not items:
        raise ValueError("cache_collator: no items")
    keys = set(items[0])
    if not set(CACHE_COLUMNS) <= keys:
        raise ValueError(f"cache_collator: items need {CACHE_COLUMNS} (a CacheDataset's), got "
                         f"{sorted(keys)}")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
