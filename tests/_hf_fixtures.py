"""Helpers for the Hugging Face integration tests: a tiny student/teacher Llama pair (saved and
loaded back through from_pretrained), token batches of uneven lengths, their collators, and a
2-process torchrun launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from _trainer_fixtures import build_tokenizer, save_llama

VOCAB = 320
LENGTHS = (12, 7, 15, 9)  # uneven: per-micro-batch means differ from the global mean
# A wide initializer makes the random models' distributions far from uniform, so the divergences
# (and any error in them) are not vanishingly small.
INIT = {"initializer_range": 0.3}


def tiny_pair(out_dir: Path) -> dict[str, Path]:
    """Tokenizer, an untied and a tied student (D=32, 1 layer) and a teacher (D=48, 2 layers);
    and a pair whose heads scale their logits: a Cohere student (times logit_scale = 0.5) and a
    Granite teacher (divided by logits_scaling = 4)."""
    tokenizer = build_tokenizer(out_dir / "tokenizer", vocab_size=VOCAB)
    return {
        "tokenizer": out_dir / "tokenizer",
        "student": save_llama(out_dir / "student", tokenizer, hidden=32, layers=1, seed=0, **INIT),
        "tied": save_llama(out_dir / "tied", tokenizer, hidden=32, layers=1, seed=2, tie=True,
                           **INIT),
        "teacher": save_llama(out_dir / "teacher", tokenizer, hidden=48, layers=2, seed=1, **INIT),
        "cohere": save_llama(out_dir / "cohere", tokenizer, hidden=32, seed=3, arch="cohere",
                             logit_scale=0.5, **INIT),
        "granite": save_llama(out_dir / "granite", tokenizer, hidden=48, seed=4, arch="granite",
                              logits_scaling=4.0, **INIT),
    }


def load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def sequences(lengths, seed: int = 0) -> list[dict]:
    """Token sequences (ids in [1, VOCAB)) of the given lengths, the last 2 of each ignored as
    labels: uneven counted tokens per sequence, so per-batch means differ from the global mean."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[-2:] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def collate(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id), attention_mask (0) and labels (-100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(student, teacher, batch, opts, num_items=None) -> torch.Tensor:
    """The loss from both models' full logits, `fastkd.reference.token_losses` in float64 on the
    shifted labels, summed and divided by num_items (default: the batch's counted tokens)."""
    from fastkd import reference

    # every model input of the batch, as in training (no KV cache: with one, transformers does
    # not read packed sequences from position_ids)
    kwargs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
    s = student(**kwargs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**kwargs).logits[:, :-1]
    labels = batch["labels"][:, 1:].reshape(-1)
    loss = reference.token_losses(s.reshape(-1, s.shape[-1]).double(),
                                  t.reshape(-1, t.shape[-1]).double(), labels, opts)[0]
    count = (labels != opts.ignore_index).sum() if num_items is None else num_items
    return loss.sum() / count


def _options():
    import fastkd

    return fastkd.DistillOptions(temperature=2.0, ce_weight=0.3, kd_weight=0.7)


OPTIONS = _options()  # the trainers' default loss in these tests


def torchrun_two(worker: Path, args: list[str], timeout: float) -> None:
    """`worker args...` under torchrun, 2 CPU processes (gloo). The run has its own process group,
    so a hang kills torchrun and both workers and fails the test; so do a non-zero exit and an
    abort (SIGABRT, "terminate called")."""
    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(worker), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the 2-process run hung (killed after {timeout:g} s)")
    assert proc.returncode == 0, stderr[-4000:]
    assert "terminate called" not in stderr and "SIGABRT" not in stderr, stderr[-4000:]
