"""The trainer on tiny random Llama models, saved to a temp dir and loaded with from_pretrained."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _trainer_fixtures import build_tokenizer, corpus_texts, save_llama, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastkd import reference
from fastkd.data import load_blocks
from fastkd.distributed import StudentLoss, TeacherForward
from fastkd.options import DistillOptions
from fastkd.trainer import (
    DistillConfig,
    batch_loss,
    latest_checkpoint,
    lm_head,
    load_teacher,
    run_distillation,
)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tokenizer, data files, a teacher trained for a few steps on hard labels, and students."""
    root = tmp_path_factory.mktemp("trainer_assets")
    tokenizer = build_tokenizer(root / "tokenizer")
    data = write_data(root / "data")
    teacher_init = save_llama(root / "teacher_init", tokenizer, hidden=48, layers=2, seed=1)
    trained = run_distillation(DistillConfig(
        teacher=None, student=str(teacher_init), data=data, out=str(root / "teacher_run"),
        ce_weight=1.0, kd_weight=0.0, steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup=3,
        eval_every=30, save_every=30, eval_sequences=16, baseline=False, report=False,
        progress=False))
    assert trained["status"] == "completed"
    history = trained["history"]
    assert history[-1]["eval_ce"] < history[0]["eval_ce"] - 0.5  # the hard-label mode learns
    return SimpleNamespace(
        root=root, tokenizer=tokenizer, data=data, teacher=root / "teacher_run" / "student",
        student=save_llama(root / "student", tokenizer, hidden=24, seed=2),
        dropout_student=save_llama(root / "dropout_student", tokenizer, hidden=24, seed=3,
                                   attention_dropout=0.1),
        tied_student=save_llama(root / "tied_student", tokenizer, hidden=24, tie=True, seed=4),
    )


def make_config(assets, out: Path, **overrides) -> DistillConfig:
    base = {"teacher": str(assets.teacher), "student": str(assets.student), "data": assets.data,
            "out": str(out), "steps": 6, "batch_size": 4, "seq_len": 32, "lr": 1e-2,
            "warmup": 1, "eval_every": 3, "save_every": 3, "eval_sequences": 16,
            "baseline": False, "report": False, "progress": False}
    return DistillConfig(**{**base, **overrides})


def student_weights(run_dir: Path, phase: str = "student") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / phase / "model.safetensors"))


def test_short_run_lowers_heldout_kd(assets, tmp_path):
    result = run_distillation(make_config(assets, tmp_path / "run", steps=12, eval_every=6))
    evals = [r for r in result["history"] if "eval_kd" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["eval_kd"] < 0.8 * evals[0]["eval_kd"]
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]
    assert result["status"] == "completed" and result["distill"]["step"] == 12
    # The per-step log mirrors the history, and the student is a loadable HF model.
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(13))
    AutoModelForCausalLM.from_pretrained(result["distill"]["student_dir"])


@pytest.mark.parametrize("backend,divergence", [
    ("auto", "forward_kl"), ("auto", "reverse_kl"), ("auto", "jsd"),
    ("triton", "jsd"),  # the GPU kernel itself, run by Triton's interpreter (conftest)
])
def test_fused_and_reference_give_the_same_trajectory(assets, tmp_path, backend, divergence):
    """Same seeds, data and options; only the loss backend differs."""
    runs = {}
    # the interpreted kernel: fewer steps and micro-batches, same checks
    steps, accum = (2, 1) if backend == "triton" else (4, 2)
    for name in (backend, "reference"):
        runs[name] = run_distillation(make_config(
            assets, tmp_path / name, steps=steps, divergence=divergence, beta=0.3, backend=name,
            grad_accum=accum, temperature=1.5, eval_sequences=4, eval_every=steps))
    fused, ref = (run["history"] for run in runs.values())
    for key in ("loss", "ce", "kd"):
        got = [r[key] for r in fused if r["step"] > 0]
        want = [r[key] for r in ref if r["step"] > 0]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert fused[-1]["eval_kd"] == pytest.approx(ref[-1]["eval_kd"], rel=1e-4)
    a, b = student_weights(tmp_path / backend), student_weights(tmp_path / "reference")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(assets, tmp_path):
    big = run_distillation(make_config(assets, tmp_path / "big", steps=3, batch_size=4))
    accumulated = run_distillation(make_config(assets, tmp_path / "acc", steps=3, batch_size=2,
                                               grad_accum=2))
    got = [r["loss"] for r in accumulated["history"][1:]]
    assert got == pytest.approx([r["loss"] for r in big["history"][1:]], rel=1e-5)
    want, got = student_weights(tmp_path / "big"), student_weights(tmp_path / "acc")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def straight_run(assets, tmp_path_factory):
    """6 steps in one go: dropout on, gradient accumulation, more than one epoch of data."""
    out = tmp_path_factory.mktemp("straight") / "run"
    config = make_config(assets, out, student=str(assets.dropout_student), grad_accum=2,
                         save_every=2, eval_fraction=0.9)
    result = run_distillation(config)
    assert result["status"] == "completed"
    return config, result


def test_resume_is_exact(straight_run, tmp_path):
    config, straight = straight_run
    out = tmp_path / "run"
    first = run_distillation(dataclasses.replace(config, out=str(out), stop_after=3))
    assert first["status"] == "stopped" and first["distill"]["step"] == 3
    assert latest_checkpoint(out).name == "step-00000003"
    saved = DistillConfig.load(out)
    assert saved.stop_after is None and not saved.resume  # per call: a resume runs to the end
    torch.manual_seed(12345)  # as a new process would: resume must restore the saved RNG state
    resumed = run_distillation(dataclasses.replace(saved, resume=True))
    assert resumed["status"] == "completed"
    want, got = student_weights(config.out), student_weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    def untimed(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}
                for r in history]

    assert untimed(resumed["history"]) == untimed(straight["history"])


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one(straight_run, tmp_path,
                                                                   monkeypatch):
    from fastkd import fsio

    config, _ = straight_run
    out = tmp_path / "run"
    calls = []

    def crash_on_second_write(root):
        calls.append(root)
        if len(calls) == 2:
            raise OSError("simulated crash while writing the step-4 checkpoint")
        return fsync_tree(root)

    fsync_tree = fsio.fsync_tree
    monkeypatch.setattr(fsio, "fsync_tree", crash_on_second_write)
    with pytest.raises(OSError, match="simulated crash"):
        run_distillation(dataclasses.replace(config, out=str(out)))
    monkeypatch.setattr(fsio, "fsync_tree", fsync_tree)

    checkpoint = latest_checkpoint(out)
    assert checkpoint.name == "step-00000002"
    assert list((out / "checkpoints").glob(".tmp-step-*")), "the half-written checkpoint is left"
    AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["state"], "optimizer moments were saved"

    resumed = run_distillation(dataclasses.replace(DistillConfig.load(out), resume=True))
    assert resumed["status"] == "completed"
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
    want, got = student_weights(config.out), student_weights(out)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_resume_refuses_a_changed_config_and_new_run_refuses_a_used_dir(straight_run):
    config, _ = straight_run
    with pytest.raises(ValueError, match=r"differs .* in \['lr'\]"):
        run_distillation(dataclasses.replace(config, lr=0.5, resume=True))
    with pytest.raises(ValueError, match="already holds a run"):
        run_distillation(config)


def test_tied_embeddings_get_the_head_and_embedding_gradients(assets, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(assets.tied_student, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    teacher = load_teacher(make_config(assets, tmp_path / "unused"), torch.device("cpu"))
    student = lm_head(model, "student")
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher)
    train, _ = load_blocks(assets.data, tokenizer, seq_len=32, eval_fraction=0.1)
    batch = train.select(torch.arange(3))
    opts = DistillOptions(temperature=2.0, reduction="sum")

    loss, _, _ = batch_loss(StudentLoss(student, opts, "auto"), TeacherForward(teacher), batch,
                            torch.device("cpu"))
    loss.backward()
    fused_grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()

    # The same loss through the HF forward's full logits, and the spec's per-token losses.
    labels = batch.labels(opts.ignore_index)[:, 1:].reshape(-1)
    s = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    with torch.no_grad():
        t = teacher.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_token, _, _ = reference.token_losses(s.flatten(0, 1), t[:, :-1].flatten(0, 1), labels,
                                             opts)
    per_token.sum().backward()
    torch.testing.assert_close(fused_grad, model.get_input_embeddings().weight.grad,
                               rtol=1e-4, atol=1e-5)

    result = run_distillation(make_config(assets, tmp_path / "run",
                                          student=str(assets.tied_student), steps=2))
    trained = AutoModelForCausalLM.from_pretrained(result["distill"]["student_dir"])
    assert trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
    initial = AutoModelForCausalLM.from_pretrained(assets.tied_student)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


def test_padded_vocab_and_bf16_teacher(assets, tmp_path):
    n = len(assets.tokenizer)
    teacher = save_llama(tmp_path / "teacher", assets.tokenizer, hidden=32, vocab_size=n + 40)
    student = save_llama(tmp_path / "student", assets.tokenizer, hidden=24, vocab_size=n + 8)
    result = run_distillation(make_config(
        assets, tmp_path / "run", teacher=str(teacher), student=str(student), steps=3,
        teacher_dtype="bfloat16", bf16=True))
    assert result["status"] == "completed"
    for record in result["history"][1:]:
        assert math.isfinite(record["loss"]) and record["kd"] > 0
    assert math.isfinite(result["distill"]["eval_kd"])
    assert student_weights(tmp_path / "run")["lm_head.weight"].shape[0] == n + 8


def test_teacher_is_frozen(assets, tmp_path):
    teacher = load_teacher(make_config(assets, tmp_path / "unused", teacher_dtype="bfloat16"),
                           torch.device("cpu"))
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert teacher.weight.dtype == torch.bfloat16


def test_different_tokenizers_are_refused(assets, tmp_path):
    other = build_tokenizer(tmp_path / "other_tok", vocab_size=300, texts=corpus_texts()[:2])
    student = save_llama(tmp_path / "student", other, hidden=24, vocab_size=len(assets.tokenizer))
    with pytest.raises(ValueError, match="different tokenizers") as err:
        run_distillation(make_config(assets, tmp_path / "run", student=str(student)))
    assert str(assets.teacher) in str(err.value) and str(student) in str(err.value)


def test_student_head_smaller_than_the_tokenizer_is_refused(assets, tmp_path):
    student = save_llama(tmp_path / "student", assets.tokenizer, hidden=24,
                         vocab_size=len(assets.tokenizer) - 10, with_tokenizer=False)
    with pytest.raises(ValueError, match="student's output layer has only"):
        run_distillation(make_config(assets, tmp_path / "run", student=str(student)))


def test_missing_and_empty_data_files(assets, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        run_distillation(make_config(assets, tmp_path / "a", data=[*assets.data, str(missing)]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        run_distillation(make_config(assets, tmp_path / "b", data=[str(empty)]))


def test_gemma2_softcap_becomes_the_loss_softcap(assets, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=2.0, max_position_embeddings=32)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    head = lm_head(AutoModelForCausalLM.from_pretrained(tmp_path / "gemma2"), "teacher")
    assert head.softcap == 2.0  # and the probe agreed with the model's own capped logits

    # A model whose config claims a softcap its forward does not apply fails the probe.
    llama = AutoModelForCausalLM.from_pretrained(assets.student)
    llama.config.final_logit_softcapping = 0.5
    with pytest.raises(ValueError, match="not its output layer applied"):
        lm_head(llama, "student")


def test_heads_that_scale_logits_are_refused(tmp_path):
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, logit_scale=0.25,
                          max_position_embeddings=32)
    CohereForCausalLM(config).save_pretrained(tmp_path / "cohere")
    with pytest.raises(ValueError, match="logit_scale=0.25"):
        lm_head(AutoModelForCausalLM.from_pretrained(tmp_path / "cohere"), "teacher")
