"""FusedKDTrainer (fastkd.integrations.transformers) on tiny local Llamas, on CPU: its loss and
gradients against full-logit references (padding-free packed batches and a LoRA head included),
gradient accumulation and 2 processes against one big batch, and a dispatch probe showing no
(N, V) logits are formed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _hf_fixtures import (
    LENGTHS,
    OPTIONS,
    VOCAB,
    collate,
    load,
    reference_loss,
    sequences,
    tiny_pair,
    torchrun_two,
)
from transformers import DataCollatorWithFlattening, TrainingArguments

import fastkd
from fastkd.integrations.transformers import FusedKDTrainer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("hf_models"))


def make_trainer(models, tmp_path, student="student", rows=None, opts=None, model=None,
                 teacher=None, trainer_kwargs=None, **args):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                    max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                    lr_scheduler_type="constant", report_to=[], save_strategy="no",
                    use_cpu=True, seed=0, disable_tqdm=True)
    defaults.update(args)
    return FusedKDTrainer(
        model=model or load(models[student]), teacher_model=teacher or load(models["teacher"]),
        args=TrainingArguments(**defaults), train_dataset=rows or sequences(LENGTHS),
        **{"data_collator": collate, **(trainer_kwargs or {})},
        distill_options=opts or OPTIONS)


@pytest.mark.parametrize("student,opts", [
    ("student", fastkd.DistillOptions(temperature=2.0, ce_weight=0.3, kd_weight=0.7)),
    ("tied", fastkd.DistillOptions(temperature=1.5, divergence="jsd", beta=0.3)),
    ("student", fastkd.DistillOptions(temperature=1.0, divergence="reverse_kl", ce_weight=0.0,
                                      kd_weight=1.0)),
])
def test_loss_and_grads_equal_full_logit_reference(models, tmp_path, student, opts):
    trainer = make_trainer(models, tmp_path, student=student, opts=opts)
    model, batch = trainer.model, collate(sequences(LENGTHS))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = reference_loss(model, trainer.teacher_model, batch, trainer.distill_options)
    expected.backward()
    assert expected.item() > 0.1
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # in training, num_items_in_batch (the step's count) replaces the batch's own count
    scaled = trainer.compute_loss(model.train(), batch, num_items_in_batch=torch.tensor(100))
    torch.testing.assert_close(scaled.double(), expected * int((batch["labels"][:, 1:] != -100)
                                                               .sum()) / 100, rtol=1e-5, atol=0)


def test_training_lowers_the_loss(models, tmp_path):
    trainer = make_trainer(models, tmp_path, max_steps=8, optim="adamw_torch", learning_rate=1e-2,
                           logging_steps=1)
    batch = collate(sequences(LENGTHS))
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model.eval(), batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model.eval(), batch).item()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 8 and after < 0.8 * before, (before, after, logged)
    assert trainer.evaluate(eval_dataset=sequences(LENGTHS))["eval_loss"] == pytest.approx(after,
                                                                                     rel=1e-5)


def one_step_params(models, tmp_path, **args) -> dict[str, torch.Tensor]:
    trainer = make_trainer(models, tmp_path, **args)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(models, tmp_path):
    start = {n: p.detach() for n, p in load(models["student"]).named_parameters()}
    big = one_step_params(models, tmp_path, per_device_train_batch_size=4)
    accumulated = one_step_params(models, tmp_path, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=2)
    for name, p in big.items():
        assert (p - start[name]).abs().max() > 1e-4, name  # the step moved every parameter
        torch.testing.assert_close(accumulated[name], p, rtol=1e-5, atol=1e-6, msg=name)
    # The test can tell: however the sampler pairs the 4 sequences, the two micro-batches count
    # different numbers of tokens (n - 3 each: shift, 2 ignored), so averaging their means (the
    # normalisation this guards against) would give another gradient.
    counted = [n - 3 for n in LENGTHS]
    for a, b in ((0, 1), (0, 2), (0, 3)):
        rest = [c for i, c in enumerate(counted) if i not in (a, b)]
        assert counted[a] + counted[b] != sum(rest)


def vocab_rows(run, excluded) -> int:
    """The most rows of any tensor with the vocabulary as last dim that an aten op took as input
    while `run()` ran (the profiler sees inside fastkd's custom op too); shapes in `excluded`
    (the transposed head weights, D x V) do not count."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        run()
    rows = [int(torch.Size(s[:-1]).numel()) for e in prof.events() for s in e.input_shapes
            if isinstance(s, list) and len(s) >= 2 and s[-1] == VOCAB and tuple(s) not in excluded]
    return max(rows, default=0)


def test_no_full_logits_in_compute_loss(models, tmp_path):
    trainer = make_trainer(models, tmp_path)
    trainer.chunk_size = 8
    model, batch = trainer.model.train(), collate(sequences(LENGTHS))
    n_tokens = batch["input_ids"].numel()
    weights_t = {(32, VOCAB), (48, VOCAB)}
    biggest = vocab_rows(lambda: trainer.compute_loss(model, batch).backward(), weights_t)
    assert biggest == 8 < n_tokens
    # the probe does see a plain forward's (B, L, V) logits
    assert vocab_rows(lambda: model(input_ids=batch["input_ids"]), weights_t) == n_tokens


def test_bad_arguments(models, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    student, teacher = load(models["student"]), load(models["teacher"])
    with pytest.raises(TypeError, match="teacher_model"):
        FusedKDTrainer(model=student, args=args)
    with pytest.raises(TypeError, match="distill_options"):
        FusedKDTrainer(model=student, teacher_model=teacher, args=args,
                            distill_options={"temperature": 2.0})
    with pytest.raises(ValueError, match="teacher_dtype"):
        FusedKDTrainer(model=student, teacher_model=teacher, args=args, teacher_dtype="fp8")
    smooth = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                               label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        FusedKDTrainer(model=student, teacher_model=teacher, args=smooth)
    scaled = load(models["teacher"])
    scaled.config.logit_scale = 2.0  # a scale Llama's forward does not apply: the probe refuses
    with pytest.raises(ValueError, match="logit scale 2"):
        FusedKDTrainer(model=student, teacher_model=scaled, args=args)
    bf16 = FusedKDTrainer(model=student, teacher_model=str(models["teacher"]), args=args,
                          teacher_dtype="bfloat16")
    assert bf16.teacher_model.dtype == torch.bfloat16 and not bf16.teacher_model.training
    assert not any(p.requires_grad for p in bf16.teacher_model.parameters())


def test_heads_that_scale_logits(models, tmp_path):
    """A Cohere student (logits times logit_scale) learning from a Granite teacher (logits divided
    by logits_scaling): the trainer's options carry both scales, and its loss and gradients
    equal the full-logit reference on the models' own logits."""
    trainer = make_trainer(models, tmp_path, model=load(models["cohere"]),
                           teacher=load(models["granite"]))
    opts = trainer.distill_options
    assert (opts.student_logit_scale, opts.teacher_logit_scale) == (0.5, 0.25)
    model, batch = trainer.model, collate(sequences(LENGTHS))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = dataclasses.replace(opts, student_logit_scale=1.0, teacher_logit_scale=1.0)
    expected = reference_loss(model, trainer.teacher_model, batch, plain)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_packed_batch(models, tmp_path):
    """DataCollatorWithFlattening packs the sequences into one row with position_ids and no
    attention mask: both models get the position_ids, so each sequence attends to itself only.
    The loss and gradients equal the full-logit reference on the same inputs, whose loss is that
    of the sequences run one by one; without the position_ids (one causal row) it differs."""
    trainer = make_trainer(models, tmp_path,
                           trainer_kwargs={"data_collator": DataCollatorWithFlattening()})
    batch = DataCollatorWithFlattening(return_tensors="pt")(sequences(LENGTHS))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    model, opts = trainer.model, trainer.distill_options
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = reference_loss(model, trainer.teacher_model, batch, opts)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        rows = [collate([row]) for row in sequences(LENGTHS)]
        counts = [int((r["labels"][:, 1:] != -100).sum()) for r in rows]
        one_by_one = sum(reference_loss(model, trainer.teacher_model, r, opts) * c
                         for r, c in zip(rows, counts, strict=True)) / sum(counts)
        unpacked = {k: v for k, v in batch.items() if k != "position_ids"}
        wrong = reference_loss(model, trainer.teacher_model, unpacked, opts)
    torch.testing.assert_close(expected.detach(), one_by_one, rtol=1e-6, atol=0)
    assert abs(wrong.item() - expected.item()) > 1e-2 * expected.item()
    trainer.train()  # the packed collator through the whole loop
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lora_head_trains_and_gradient_equals_full_logits(models, tmp_path):
    """A PEFT LoRA adapter on lm_head (and q_proj): the fused loss reads the head's effective
    weight W + s B A, so the adapters' gradients equal those of the PEFT model's full logits, and
    one step moves the head's adapter. lora_dropout on the head is refused by name."""
    from peft import LoraConfig, get_peft_model

    def peft_student(dropout=0.0):
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                            target_modules=["q_proj", "lm_head"])
        return get_peft_model(load(models["student"], dtype=torch.float64), config)

    student = peft_student()
    with torch.no_grad():  # B starts at 0 (then A gets no gradient): make both nonzero
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    trainer = make_trainer(models, tmp_path, model=student)
    trainer.teacher_model.double()
    batch = collate(sequences(LENGTHS))
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert any("lm_head.lora_B" in n for n in params)
    grads = torch.autograd.grad(trainer.compute_loss(student, batch), list(params.values()))
    expected = reference_loss(student, trainer.teacher_model, batch, trainer.distill_options)
    for name, x, y in zip(params, grads, torch.autograd.grad(expected, list(params.values())),
                          strict=True):
        assert y.abs().max() > 0, name
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-12, msg=name)
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    assert all((p - before[n]).abs().max() > 0 for n, p in params.items())
    with pytest.raises(ValueError, match="lora_dropout"):
        make_trainer(models, tmp_path, model=peft_student(dropout=0.1))


def test_compute_metrics_warns(models, tmp_path):
    with pytest.warns(UserWarning, match="never calls compute_metrics"):
        make_trainer(models, tmp_path, trainer_kwargs={"compute_metrics": lambda p: {}})


def test_two_processes_match_one(models, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 sequences each: after one SGD step the student equals
    the 1-process 4-sequence step; the fused loss under FSDP2 (fully_shard) matches; and an FSDP2
    head read outside its forward gets the ranks' mean gradient."""
    one = one_step_params(models, tmp_path / "one", per_device_train_batch_size=4)
    out = tmp_path / "two"
    torchrun_two(Path(__file__).with_name("_hf_dist_worker.py"),
                 [str(models["student"]), str(models["teacher"]), str(out)], timeout=180)
    two = torch.load(out / "params.pt")
    for name, p in one.items():
        torch.testing.assert_close(two[name], p, rtol=1e-5, atol=1e-6, msg=name)
    fsdp = json.loads((out / "fsdp.json").read_text())
    assert fsdp["loss_rel_err"] < 1e-5 and fsdp["grad_max_err"] < 1e-5, fsdp
    assert fsdp["sharded_head"], fsdp
    head = json.loads((out / "head.json").read_text())  # the ranks' mean, not each rank's own
    assert head["dtensor"] and head["grad_max_err"] < 1e-6, head
