"""Helpers for the TRL integration tests (tests/test_integrations_trl.py and its 2-process worker):
TRL DistillationTrainer-style trainers on the tiny Llama pair of _hf_fixtures, a fixed on-policy
micro-batch, deterministic "generation", and a stand-in for the teacher's vLLM server."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from _hf_fixtures import VOCAB, load
from trl.generation.vllm_client import VLLMClient

PROMPTS = ("def f(x):", "import os", "return a + b", "class A(object):")


def prompt_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p} for p in PROMPTS])


def config(cls, out: Path, **overrides):
    """A DistillationConfig (or `cls`, a subclass) for CPU tests: fp32, no checkpointing, SGD."""
    fields = {"output_dir": str(out), "use_cpu": True, "bf16": False, "report_to": [],
              "per_device_train_batch_size": 4, "max_completion_length": 3,
              "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True,
              "logging_steps": 1, "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0,
              "lr_scheduler_type": "constant", "seed": 0, **overrides}
    return cls(**fields)


def make(trainer_cls, config_cls, models: dict, out: Path, dtype=torch.float32, teacher=True,
         trainer_kwargs=None, **overrides):
    from transformers import AutoTokenizer

    kwargs = {"model": load(models["student"], dtype=dtype), "args": config(config_cls, out,
                                                                             **overrides),
              "train_dataset": prompt_dataset(),
              "processing_class": AutoTokenizer.from_pretrained(models["tokenizer"]),
              **(trainer_kwargs or {})}
    if teacher:
        kwargs["teacher_model"] = load(models["teacher"], dtype=dtype)
    return trainer_cls(**kwargs)


def completion_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """One on-policy micro-batch as TRL's `_prepare_inputs` gives it: left-padded prompts,
    right-padded completions (uneven lengths), num_items_in_batch = the counted tokens."""
    g = torch.Generator().manual_seed(seed)
    b, p, c = 3, 5, 6
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = prompt_mask[2, :1] = 0
    completion_mask = torch.ones(b, c, dtype=torch.long)
    completion_mask[1, 4:] = completion_mask[2, 2:] = 0
    prompt_ids = torch.randint(1, VOCAB, (b, p), generator=g).masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(1, VOCAB, (b, c), generator=g).masked_fill(
        completion_mask == 0, 0)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "num_items_in_batch": completion_mask.sum()}


def fixed_completions(self, prompt_ids, images, multimodal_fields):
    """Stands in for `_generate_single_turn`: completions that depend on the prompt only (2-4
    tokens), so runs that split the same prompts differently train on the same tokens."""
    out = []
    for ids in prompt_ids:
        seed = sum(ids)
        out.append([(seed * 7 + 13 * i) % (VOCAB - 1) + 1 for i in range(2 + seed % 3)])
    return out


class LocalTeacherClient:
    """Stands in for TRL's VLLMClient (the teacher server): `get_sequence_logprobs` scores the
    sequences with a local teacher model and formats them with VLLMClient's own formatter, from
    vLLM-style prompt logprobs (the top-k by rank, plus the sequence's own token)."""

    teacher = None  # set by the test: a causal LM

    def __init__(self, base_url=None, connection_timeout=0.0, **kwargs):
        self.base_url = base_url

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100,
                              temperature=1.0, **kwargs):
        results = []
        for seq, start in zip(sequences, prompt_lengths, strict=True):
            with torch.no_grad():
                logits = self.teacher(input_ids=torch.tensor([seq])).logits[0].double()
            lps = torch.log_softmax(logits / temperature, -1)
            prompt_logprobs = [None]
            for pos in range(1, len(seq)):
                order = lps[pos - 1].argsort(descending=True)
                ranked = {int(t): r + 1 for r, t in enumerate(order[:top_logprobs])}
                ranked.setdefault(seq[pos], int((lps[pos - 1] > lps[pos - 1, seq[pos]]).sum()) + 1)
                prompt_logprobs.append({str(t): {"logprob": float(lps[pos - 1, t]), "rank": r}
                                        for t, r in ranked.items()})
            results.append(VLLMClient._format_sequence_logprobs(
                {"prompt_logprobs": prompt_logprobs}, seq, start, top_logprobs))
        return {key: [r[key] for r in results] for key in results[0]}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| (0 for two zero tensors)."""
    num, den = (got.double() - expected.double()).norm().item(), expected.double().norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
