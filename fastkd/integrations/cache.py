"""A teacher cache inside `transformers.Trainer`: a Dataset and a collator over the cache's shards,
and `CachedKDTrainer`, which distils from them with no teacher model loaded.

    from fastkd.integrations.cache import CacheDataset, CachedKDTrainer, cache_collator
    train = CacheDataset("CACHE_DIR", "train")              # checked once, when opened
    args = TrainingArguments(..., dataloader_num_workers=2)  # rows decoded in the workers
    trainer = CachedKDTrainer(model=student, args=args, train_dataset=train,
                              eval_dataset=CacheDataset("CACHE_DIR", "heldout"),
                              data_collator=cache_collator,
                              distill_options=fastkd.DistillOptions(temperature=train.temperature))
    trainer.train()

An item is one packed sequence of the cache: input_ids, attention_mask and labels (L,) (labels:
the sequence's targets, ignore_index where a position does not count), position_ids where the
cache has them, and the teacher's targets at the next-token positions, teacher_ids (L-1, slots)
int32 (-1: unused) and teacher_logprobs (L-1, slots) float32 at the cache's temperature. The
Dataset opens the cache's shards lazily in each process (memory-mapped; a DataLoader worker opens
its own), so with `dataloader_num_workers` > 0 reading and decoding the compact rows run in the
workers, overlapping the model's steps (`bench/cache_loader.py` measures the step time with and
without them). The loss is `fastkd.sparse_distill` through the student's own forward, its output
layer swapped for the sparse loss as `FusedKDTrainer` swaps it for the dense one: no (N, V)
logits, any wrapper (DDP, FSDP, DeepSpeed). The temperature must be the cache's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fastkd import reference
from fastkd.integrations import transformers as hf
from fastkd.models import lm_head
from fastkd.options import DistillOptions
from fastkd.sparse import sparse_distill

__all__ = ["CACHE_COLUMNS", "CacheDataset", "CachedKDTrainer", "cache_collator",
           "fused_sparse_lm_loss"]

CACHE_COLUMNS = ("teacher_ids", "teacher_logprobs")


class CacheDataset(torch.utils.data.Dataset):
    """The packed sequences of one split of a teacher cache, with their cached targets.

    cache: a cache directory (checked when this is made: `fastkd.cache.TeacherCache`);
    split: "train" or "heldout"."""

    def __init__(self, cache: str | Path, split: str):
        from fastkd.cache import TeacherCache

        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.dir, self.split = Path(cache), split
        opened = TeacherCache(self.dir)  # every check, once
        self.manifest = opened.manifest
        self.temperature = float(self.manifest["temperature"])
        self.tail = "ignore" if self.manifest["mode"] == "sample" else "bucket"
        self._blocks = opened.blocks(split)
        self._opened = opened

    def __len__(self) -> int:
        return len(self._blocks)

    def __getstate__(self):  # a DataLoader worker (spawned) opens the shards itself
        state = dict(self.__dict__)
        state["_opened"] = None
        state["_blocks"] = None
        return state

    def _sequences(self):
        if self._blocks is None:
            from fastkd.cache import TeacherCache

            self._opened = TeacherCache(self.dir, verify=False)  # checked by the parent
            self._blocks = self._opened.blocks(self.split)
        return self._blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        one = self._sequences().select(torch.tensor([int(i)]))
        ids, logprobs = one.targets.load()
        item = {"input_ids": one.input_ids[0],
                "attention_mask": one.attention_mask[0],
                "labels": one.labels(DistillOptions.ignore_index)[0],
                "teacher_ids": ids[0], "teacher_logprobs": logprobs[0].float()}
        position_ids = getattr(one, "position_ids", None)
        if position_ids is not None:
            item["position_ids"] = position_ids[0]
        return item


def cache_collator(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack CacheDataset items (every sequence of a cache has the cache's seq_len)."""
    if not items:
        raise ValueError("cache_collator: no items")
    keys = set(items[0])
    if not set(CACHE_COLUMNS) <= keys:
        raise ValueError(f"cache_collator: items need {CACHE_COLUMNS} (a CacheDataset's), got "
                         f"{sorted(keys)}")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def fused_sparse_lm_loss(student: torch.nn.Module, inputs: dict, labels: torch.Tensor,
                         opts: DistillOptions, tail: str, *, backend: str = "auto",
                         chunk_size: int | None = None):
    """`fastkd.sparse_distill` of `student` against the cached targets of one batch
    (inputs["teacher_ids"], inputs["teacher_logprobs"], (B, L-1, k)), through the student's own
    forward with its output layer swapped for the loss: (loss, outputs), outputs' logits empty
    (B, L, 0). labels (B, L-1), already shifted; the loss is reduced as opts.reduction says."""
    input_ids = inputs["input_ids"]
    teacher_ids, teacher_logprobs = inputs["teacher_ids"], inputs["teacher_logprobs"]
    expected = (input_ids.shape[0], input_ids.shape[1] - 1)
    if tuple(labels.shape) != expected or tuple(teacher_ids.shape[:2]) != expected:
        raise ValueError(f"labels {tuple(labels.shape)} and teacher_ids "
                         f"{tuple(teacher_ids.shape)} must cover the {expected} next-token "
                         f"positions of input_ids {tuple(input_ids.shape)}")
    seen = []

    def student_head(head, hidden):
        loss = sparse_distill(hidden[:, :-1], head.weight, teacher_ids, teacher_logprobs, labels,
                              opts, tail=tail, student_bias=getattr(head, "bias", None),
                              backend=backend, chunk_size=chunk_size)
        seen.append((hidden, loss))
        return hidden[..., :0] + loss.to(hidden.dtype)  # as fused_lm_loss: the head stays found

    # as fastkd.data.Blocks.model_inputs: packed examples get position_ids and no 2-D mask
    # (with one, transformers would let them attend to each other)
    packed = inputs.get("position_ids") is not None
    forward = {key: inputs[key] for key in ("input_ids", "position_ids" if packed else
                                            "attention_mask") if inputs.get(key) is not None}
    with hf._head_replaced(student, student_head):
        outputs = student(**forward, use_cache=False)
    hf._check_calls("student", seen, input_ids)
    loss = seen.pop()[1]
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return loss + logits.sum(), outputs


class CachedKDTrainer(hf.DistillationTrainer):
    """The KD trainer of `fastkd.integrations.transformers` trained from a teacher cache: no
    teacher model; every batch carries its cached targets (`CacheDataset` + `cache_collator`),
    and the loss is the sparse one (tail: "ignore" for a sampled cache, "bucket" for top-k, unless
    given). Normalisation, gradient accumulation and several processes as the KD trainer's."""

    def __init__(self, model=None, args=None, *, distill_options: DistillOptions | None = None,
                 tail: str | None = None, backend: str = "auto", chunk_size: int | None = None,
                 **kwargs):
        opts = DistillOptions() if distill_options is None else distill_options
        if not isinstance(opts, DistillOptions):
            raise TypeError(f"distill_options must be a fastkd.DistillOptions, got "
                            f"{type(opts).__name__}")
        dataset = kwargs.get("train_dataset")
        if isinstance(dataset, CacheDataset):
            if opts.temperature != dataset.temperature:
                raise ValueError(f"distill_options.temperature is {opts.temperature}, the cache "
                                 f"{dataset.dir}'s is {dataset.temperature}: its "
                                 "log-probabilities are at that temperature")
            tail = tail or dataset.tail
        tail = tail or "bucket"
        if tail not in reference.SPARSE_TAILS:
            raise ValueError(f"tail must be one of {reference.SPARSE_TAILS}, got {tail!r}")
        # the Trainer itself: the KD trainer's own __init__ would load a teacher
        super(hf.DistillationTrainer, self).__init__(model=model, args=args, **kwargs)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError("label_smoothing_factor and compute_loss_func are not supported: "
                             "the loss is fastkd's")
        self.model_accepts_loss_kwargs = True
        student = lm_head(hf._inner_model(self.model), "student")
        self.distill_options = dataclasses.replace(opts, reduction="sum",
                                                   student_softcap=student.softcap)
        self.tail, self.backend, self.chunk_size = tail, backend, chunk_size
        self.teacher_model = None

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns,
                                                      *CACHE_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The sparse loss summed over the batch's counted tokens, divided as the KD trainer
        divides (the step's count in training, the batch's own otherwise)."""
        opts = self.distill_options
        labels = hf.shifted_labels(inputs, opts.ignore_index)
        loss, outputs = fused_sparse_lm_loss(model, inputs, labels, opts, self.tail,
                                             backend=self.backend, chunk_size=self.chunk_size)
        if num_items_in_batch is None or not model.training:
            loss = loss / (labels != opts.ignore_index).sum().clamp(min=1)
        else:
            loss = loss / torch.as_tensor(num_items_in_batch).to(loss.device).clamp(min=1)
            if self._tokens_across_processes():
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
