"""FusedGKDTrainer (fastkd.integrations.trl) against TRL's own GKD loss; a short on-policy run."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

pytest.importorskip("trl", reason="needs TRL: pip install fastkd[trl]")
from _hf_fixtures import VOCAB, load, tiny_pair  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations.trl import FusedGKDTrainer, GKDConfig, gkd_options  # noqa: E402

BETAS = (0.0, 0.1, 0.5, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_gkd_options_equal_trl_generalized_jsd_loss(beta, temperature):
    """Same logits (student h W_s^T, teacher h_t W_t^T), float64: TRL's loss and gradient."""
    g = torch.Generator().manual_seed(0)
    b, length, v, d = 3, 7, 61, 16  # odd sizes
    h_s = torch.randn(b, length, d, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(b, length, d + 4, generator=g, dtype=torch.float64)
    w_t = torch.randn(v, d + 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :3] = labels[2, 5:] = -100
    opts = gkd_options(beta, temperature)
    for num_items in (None, torch.tensor(29.0, dtype=torch.float64)):
        expected = GKDTrainer.generalized_jsd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, beta=beta,
                                                   temperature=temperature,
                                                   num_items_in_batch=num_items)
        grads_expected = torch.autograd.grad(expected, (h_s, w_s))
        total = fastkd.distill(h_s, w_s, h_t, w_t, labels, opts)
        got = total / (num_items if num_items is not None else (labels != -100).sum())
        grads = torch.autograd.grad(got, (h_s, w_s))
        assert expected.item() > 1e-3
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
        for x, y in zip(grads, grads_expected, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("trl_models"))


ROWS = [((5, 4), 0), ((3, 6), 1), ((6, 2), 2), ((4, 5), 3)]  # (prompt, completion) lengths, seed


def gkd_rows() -> list[dict]:
    rows = []
    for (p, c), seed in ROWS:
        ids = torch.randint(1, VOCAB, (p + c,), generator=torch.Generator().manual_seed(seed))
        rows.append({"prompt": ids[:p].tolist(), "completion": ids[p:].tolist()})
    return rows


def gkd_collate(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """TRL's GKD batch: left-padded prompts for generation; prompt + completion right-padded,
    labels -100 on the prompt and the padding."""
    b = len(rows)
    p_max = max(len(r["prompt"]) for r in rows)
    width = max(len(r["prompt"]) + len(r["completion"]) for r in rows)
    out = {"prompts": torch.full((b, p_max), pad_id),
           "prompt_attention_mask": torch.zeros(b, p_max, dtype=torch.long),
           "input_ids": torch.full((b, width), pad_id),
           "attention_mask": torch.zeros(b, width, dtype=torch.long),
           "labels": torch.full((b, width), -100)}
    for i, r in enumerate(rows):
        p, seq = len(r["prompt"]), torch.tensor(r["prompt"] + r["completion"])
        out["prompts"][i, p_max - p:] = seq[:p]
        out["prompt_attention_mask"][i, p_max - p:] = 1
        out["input_ids"][i, :len(seq)] = seq
        out["attention_mask"][i, :len(seq)] = 1
        out["labels"][i, p:len(seq)] = seq[p:]
    return out


def make(cls, models, tmp_path, **config):
    from datasets import Dataset

    config = {"output_dir": str(tmp_path / cls.__name__), "per_device_train_batch_size": 4,
              "max_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True,
              "bf16": False, "max_new_tokens": 3, "disable_tqdm": True, **config}
    args = GKDConfig(**config)
    return cls(model=load(models["student"]), teacher_model=load(models["teacher"]), args=args,
               train_dataset=Dataset.from_list(gkd_rows()), data_collator=gkd_collate,
               processing_class=AutoTokenizer.from_pretrained(models["tokenizer"]))


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_compute_loss_equals_gkd_trainer(models, tmp_path, beta):
    """The trainers' own compute_loss on one batch: TRL's full logits vs the fused loss."""
    ours, theirs = (make(cls, models, tmp_path, beta=beta, temperature=0.7)
                    for cls in (FusedGKDTrainer, GKDTrainer))
    batch = gkd_collate(gkd_rows())
    for num_items in (None, torch.tensor(40)):
        got = ours.compute_loss(ours.model, batch, num_items_in_batch=num_items)
        expected = theirs.compute_loss(theirs.model, batch, num_items_in_batch=num_items)
        got.backward()
        expected.backward()
        assert expected.item() > 1e-3
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=0)
    params = dict(theirs.model.named_parameters())
    for name, p in ours.model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_on_policy_training_runs(models, tmp_path, monkeypatch):
    """lmbda=1: every step generates completions with the student (TRL's path), then the fused
    loss trains on them."""
    calls = []
    generate = FusedGKDTrainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        out = generate(model, inputs, generation_config)
        calls.append(out[0].shape[1] - inputs["prompts"].shape[1])
        return out

    monkeypatch.setattr(FusedGKDTrainer, "generate_on_policy_outputs", staticmethod(counted))
    trainer = make(FusedGKDTrainer, models, tmp_path, lmbda=1.0, beta=0.5, max_steps=2,
                   learning_rate=1e-2, logging_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(calls) == 2 and all(0 < n <= 3 for n in calls), calls  # new tokens per step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < float("inf") for x in losses), losses
    moved = [(p - before[n]).abs().max().item() for n, p in trainer.model.named_parameters()]
    assert min(moved) > 0


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)  # as if TRL were missing
    monkeypatch.delitem(sys.modules, "fastkd.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install fastkd\[trl\]"):
        importlib.import_module("fastkd.integrations.trl")
