"""Helpers for the several-teacher integration tests (tests/test_integrations_multi_teacher.py
and its 2-process worker): rows routed to teachers by a `teacher_id` column, the trainers built
on them, TRL's on-policy batch with its rows' teachers."""

from __future__ import annotations

from pathlib import Path

import torch
from _hf_fixtures import LENGTHS, OPTIONS, collate, load, sequences
from _trl_fixtures import PROMPTS, config
from transformers import AutoTokenizer, TrainingArguments

from fastkd.integrations.multi_teacher import TEACHER_ID

ROUTE = (1, 0, 1, 1)  # the teacher of each of the 4 rows (LENGTHS: uneven) and PROMPTS
TEACHERS = ("teacher", "teacher_b")


def routed_rows(route=ROUTE) -> list[dict]:
    return [{**row, TEACHER_ID: k} for row, k in zip(sequences(LENGTHS), route, strict=True)]


def routed_prompts(route=ROUTE, column: bool = True):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p, **({TEACHER_ID: k} if column else {})}
                              for p, k in zip(PROMPTS, route, strict=True)])


def hf_args(out: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{
        "output_dir": str(out / "out"), "per_device_train_batch_size": 4, "max_steps": 1,
        "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant", "report_to": [], "save_strategy": "no",
        "use_cpu": True, "seed": 0, "disable_tqdm": True, **overrides})


def teachers_of(models: dict, teachers, dtype=torch.float32):
    """A tuple of model names loads those models (a list); anything else is passed as given."""
    return ([load(models[t], dtype=dtype) for t in teachers] if isinstance(teachers, tuple)
            else teachers)


def kd_trainer(models: dict, out: Path, teachers=TEACHERS, rows=None, opts=OPTIONS,
               collator=collate, args=None, **kwargs):
    from fastkd.integrations.transformers import FusedKDTrainer

    return FusedKDTrainer(model=load(models["student"]),
                          teacher_model=teachers_of(models, teachers), args=args or hf_args(out),
                          train_dataset=routed_rows() if rows is None else rows,
                          data_collator=collator, distill_options=opts, **kwargs)


def trl_trainer(models: dict, out: Path, teachers=TEACHERS, dtype=torch.float32, rows=None,
                trainer_kwargs=None, **overrides):
    from trl import DistillationConfig

    from fastkd.integrations.trl import FusedDistillationTrainer

    return FusedDistillationTrainer(
        model=load(models["student"], dtype=dtype), teacher_model=teachers_of(models, teachers,
                                                                              dtype),
        args=config(DistillationConfig, out, **overrides),
        train_dataset=routed_prompts() if rows is None else rows,
        processing_class=AutoTokenizer.from_pretrained(models["tokenizer"]),
        **(trainer_kwargs or {}))


def trained(trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
