"""The trainer on tiny random Llama models, saved to a temp dir and loaded with from_pretrained."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _trainer_fixtures import build_tokenizer, corpus_texts, save_llama, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastkd import reference
from fastkd.batch_loss import StudentLoss, TeacherForward, batch_loss
from fastkd.checkpoint import latest_checkpoint
from fastkd.config import DistillConfig
from fastkd.models import lm_head, load_teacher
from fastkd.options import DistillOptions
from fastkd.store import load_blocks
from fastkd.trainer import run_distillation


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
    assert not list((out / "checkpoints").glob(".tmp-step-*")), "a failed write cleans up"
    (out / "checkpoints" / ".tmp-step-00000004" / "model").mkdir(parents=True)  # as kill -9 left
    AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["state"], "optimizer moments were saved"

    resumed = run_distillation(dataclasses.replace(DistillConfig.load(out), resume=True))
    assert resumed["status"] == "completed"
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
    want, got = student_weights(config.out), student_weights(out)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_a_nan_from_the_teacher_stops_before_the_step_and_the_run_resumes_exactly(
        straight_run, tmp_path, monkeypatch, capsys):
    """A teacher that starts giving NaN (an overflow, a damaged weight): the step that sees it
    raises before the update, names the teacher's side and the checkpoint that is kept, and
    writes nothing; the CLI says so in one line (exit status 1); resumed with a sound teacher,
    the run ends exactly where the straight run does."""
    from fastkd import batch_loss as batch_loss_module
    from fastkd.cli import main

    config, _ = straight_run
    out = tmp_path / "run"
    assert run_distillation(dataclasses.replace(config, out=str(out), stop_after=3))[
        "distill"]["step"] == 3

    def files():
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.is_file() and p.name != "log.jsonl"}

    before = files()
    forward = batch_loss_module.TeacherForward.forward

    def nan_teacher(self, inputs):
        h, w, b = forward(self, inputs)
        return h.clone().index_fill_(0, torch.tensor([0]), float("nan")), w, b  # one sequence

    monkeypatch.setattr(batch_loss_module.TeacherForward, "forward", nan_teacher)
    resume = dataclasses.replace(DistillConfig.load(out), resume=True)
    with pytest.raises(FloatingPointError, match=(
            r"^distill: step 4 of 6: the KD term is not finite while the student's "
            r"cross-entropy is: the teacher's outputs hold NaN or inf .*\(step 3\) is as it "
            r"was")):
        run_distillation(resume)
    assert files() == before  # no step-4 checkpoint, no weights touched
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--resume", str(out)])
    assert exit_.value.code == 1
    assert "fastkd distill: error: distill: step 4 of 6" in capsys.readouterr().err
    assert files() == before

    monkeypatch.setattr(batch_loss_module.TeacherForward, "forward", forward)
    assert run_distillation(resume)["status"] == "completed"
    want, got = student_weights(config.out), student_weights(out)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_resume_refuses_a_changed_config_and_new_run_refuses_a_used_dir(straight_run):
    config, _ = straight_run
    with pytest.raises(ValueError, match=r"differs .* in \['lr'\]"):
        run_distillation(dataclasses.replace(config, lr=0.5, resume=True))
    with pytest.raises(ValueError, match="already holds a run"):
        run_distillation(config)


def fused_and_spec(student: StudentLoss, teacher: TeacherForward, batch, params: dict):
    """(loss, gradients of params) of the trainer's loss on a batch (batch_loss: the fused loss on
    the base's hidden states and the head's weight), and of the same loss through the HF
    forward's full logits and the spec's per-token losses (with no logit scales or softcaps: the
    models' own logits apply them)."""
    loss, _, _ = batch_loss(student, teacher, batch, torch.device("cpu"))
    loss.backward()
    fused = {name: p.grad.clone() for name, p in params.items()}
    model = student.model
    model.zero_grad()
    plain = dataclasses.replace(student.opts, student_softcap=None, teacher_softcap=None,
                                student_logit_scale=1.0, teacher_logit_scale=1.0)
    labels = batch.labels(plain.ignore_index)[:, 1:].reshape(-1)
    s = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    with torch.no_grad():
        t = teacher.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    spec = reference.token_losses(s.flatten(0, 1), t[:, :-1].flatten(0, 1), labels,
                                  plain).loss.sum()
    spec.backward()
    return (loss, fused), (spec, {name: p.grad for name, p in params.items()})


def fused_and_spec_grads(assets, model, params: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """`fused_and_spec`'s gradients on 3 sequences, the trainer's teacher."""
    teacher = load_teacher(str(assets.teacher), "auto", torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher)
    train, _ = load_blocks(assets.data, tokenizer, seq_len=32, eval_fraction=0.1)
    student = StudentLoss(lm_head(model, "student"), DistillOptions(temperature=2.0,
                                                                    reduction="sum"), "auto")
    (_, fused), (_, spec) = fused_and_spec(student, TeacherForward(teacher),
                                           train.take(torch.arange(3)), params)
    return fused, spec


def test_tied_embeddings_get_the_head_and_embedding_gradients(assets, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(assets.tied_student, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = model.get_input_embeddings().weight
    fused, spec = fused_and_spec_grads(assets, model, {"embedding": embedding})
    torch.testing.assert_close(fused["embedding"], spec["embedding"], rtol=1e-4, atol=1e-5)

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
    teacher = load_teacher(str(assets.teacher), "bfloat16", torch.device("cpu"))
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


def test_heads_that_scale_logits_train_with_their_scales(assets, tmp_path):
    """A Cohere student (logits times logit_scale) and a Granite teacher (logits divided by
    logits_scaling): the loop's setup gives the loss both heads' scales, and the trainer's loss
    on a batch (batch_loss) and its gradients equal the spec's on the models' own full logits.
    A config scale the model's forward does not apply (a Llama with logit_scale) is refused."""
    from fastkd.loop import _setup

    kw = dict(hidden=24, initializer_range=0.3, with_tokenizer=False)
    config = make_config(
        assets, tmp_path / "run",
        student=str(save_llama(tmp_path / "cohere", assets.tokenizer, arch="cohere", seed=5,
                               logit_scale=0.5, **kw)),
        teacher=str(save_llama(tmp_path / "granite", assets.tokenizer, arch="granite", seed=6,
                               logits_scaling=4.0, **kw)))
    cpu = torch.device("cpu")
    teacher = TeacherForward(load_teacher(config.teacher, config.teacher_dtype, cpu))
    train, _ = load_blocks(assets.data, assets.tokenizer, seq_len=32, eval_fraction=0.1)
    phase = _setup(config, None, teacher, assets.tokenizer, train, cpu)
    opts = phase.student.opts
    assert (opts.student_logit_scale, opts.teacher_logit_scale) == (0.5, 0.25)
    batch = train.take(torch.arange(3))
    params = dict(phase.student.model.named_parameters())
    (loss, fused), (spec, spec_grads) = fused_and_spec(phase.student, teacher, batch, params)
    assert loss.item() == pytest.approx(spec.item(), rel=1e-5)
    for name in params:
        torch.testing.assert_close(fused[name], spec_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the scales matter here: the spec on the models' logits with the scales undone differs
    labels = batch.labels(opts.ignore_index)[:, 1:].reshape(-1)
    with torch.no_grad():
        s, t = (m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
                for m in (phase.student.model, teacher.model))
    unscaled = reference.token_losses(s.flatten(0, 1) / 0.5, t.flatten(0, 1) * 4.0, labels,
                                      config.loss_options())
    assert abs(unscaled.loss.sum().item() / spec.item() - 1) > 0.05

    llama = AutoModelForCausalLM.from_pretrained(assets.student)
    llama.config.logit_scale = 0.5  # Llama's forward ignores it: the probe refuses the model
    with pytest.raises(ValueError, match="logit scale 0.5"):
        lm_head(llama, "student")


# ----------------------------------------------------------------------------------------------
# The config: defaults that follow other settings, paths stored absolute.


def test_default_warmup_follows_the_steps_and_errors_name_the_flag(assets, tmp_path):
    config = make_config(assets, tmp_path / "run", steps=6, warmup=None)
    assert config.warmup is None and config.warmup_steps == 0  # 10% of 6 steps
    assert make_config(assets, tmp_path / "run", steps=200, warmup=None).warmup_steps == 20
    with pytest.raises(ValueError, match=r"warmup \(--warmup\) must be an int in \[0, steps=6\]"):
        make_config(assets, tmp_path / "run", steps=6, warmup=20)
    assert not DistillConfig.__dataclass_fields__["baseline"].default  # opt-in (--baseline)


def test_paths_are_stored_absolute_and_a_damaged_config_is_named(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(assets.root)
    config = make_config(assets, "run", teacher="teacher_run/student", student="student",
                         data=["data/part1.txt"])
    assert config.teacher == str(assets.teacher) and config.student == str(assets.student)
    assert config.data == [str(assets.root / "data" / "part1.txt")]
    assert config.out == str(assets.root / "run")
    assert make_config(assets, "run", teacher="org/model").teacher == "org/model"  # a hub id
    (tmp_path / "config.json").write_text('{"teacher": "tea')
    with pytest.raises(ValueError, match=r"config.json is damaged \(not valid JSON"):
        DistillConfig.load(tmp_path)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: each fault is found, named, and the previous checkpoint used.


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if keep is None else keep])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01  # a weight's byte: the header still parses, the size is right
    path.write_bytes(bytes(data))


def _flip_bit_in_meta(field: str):
    """Flip the lowest bit of the first digit of a number in meta.json ("step": 6 -> 7, the data
    cursor's "offset": a byte that still parses, naming another position)."""
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        at = data.index(f'"{field}": '.encode()) + len(field) + 4
        assert chr(data[at]).isdigit()
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        json.loads(data)  # still valid JSON: only its checksum can tell
    return damage


FAULTS = {
    "flipped bit in meta.json step": ("meta.json", _flip_bit_in_meta("step")),
    "flipped bit in meta.json data cursor": ("meta.json", _flip_bit_in_meta("offset")),
    "truncated model.safetensors": ("model/model.safetensors", _truncate),
    "empty trainer_state.pt": ("trainer_state.pt", lambda p: _truncate(p, 0)),
    "truncated trainer_state.pt": ("trainer_state.pt", _truncate),
    "truncated meta.json": ("meta.json", _truncate),
    "truncated model config.json": ("model/config.json", _truncate),
    "flipped byte in model.safetensors": ("model/model.safetensors", _flip_byte),
}


def test_damaged_checkpoints_are_named_and_the_previous_one_is_used(straight_run, tmp_path,
                                                                     caplog):
    """The straight run keeps its last two checkpoints (steps 4 and 6), each with a checksum per
    file. Each fault in step 6 is named on resume, which sets step 6 aside and resumes from
    step 4; resuming past a flipped byte ends bit for bit where the undamaged run ended."""
    from fastkd.checkpoint import resume_checkpoint

    config, _ = straight_run
    found = sorted(p.name for p in (Path(config.out) / "checkpoints").iterdir())
    assert found == ["step-00000004", "step-00000006"]
    meta = json.loads((Path(config.out) / "checkpoints" / found[-1] / "meta.json").read_text())
    assert {"model/model.safetensors", "trainer_state.pt"} <= set(meta["files"])
    for fault, (name, damage) in FAULTS.items():
        run = tmp_path / fault.replace(" ", "-")
        shutil.copytree(config.out, run)
        damage(run / "checkpoints" / "step-00000006" / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastkd"):
            assert resume_checkpoint(run).name == "step-00000004", fault
        assert f"step-00000006/{name} is damaged" in caplog.text, fault
        assert "resuming from the previous checkpoint, step-00000004" in caplog.text
        assert (run / "checkpoints" / "damaged-step-00000006").is_dir()

    # The full resume past a flipped byte in the weights and a flipped bit in meta.json's data
    # cursor: steps 5 and 6 again, the same student.
    for fault in ("flipped byte in model.safetensors", "flipped bit in meta.json data cursor"):
        run = tmp_path / fault.replace(" ", "-")
        shutil.rmtree(run / "student")  # else the run is complete: a resume changes nothing
        resumed = run_distillation(dataclasses.replace(DistillConfig.load(run), out=str(run),
                                                       resume=True))
        assert resumed["status"] == "completed" and resumed["distill"]["steps_run"] == 2
        want, got = student_weights(config.out), student_weights(run)
        for name in want:
            assert torch.equal(want[name], got[name]), name

    # Every checkpoint damaged: a ValueError naming the files, nothing set aside.
    run = tmp_path / "all-damaged"
    shutil.copytree(config.out, run)
    _flip_byte(run / "checkpoints" / "step-00000006" / "model" / "model.safetensors")
    (run / "checkpoints" / "step-00000004" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"every checkpoint .* is damaged .*step-00000004/"
                                         r"trainer_state.pt is damaged"):
        resume_checkpoint(run)
    assert not list((run / "checkpoints").glob("damaged-*"))


def test_unverified_damaged_state_is_named(tmp_path):
    """A checkpoint from before checksums (nothing to verify against) still names the file."""
    from fastkd.checkpoint import _torch_load

    for content in (b"", b"PK\x03\x04 truncated"):
        path = tmp_path / "trainer_state.pt"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"trainer_state.pt is damaged"):
            _torch_load(path)


# ----------------------------------------------------------------------------------------------
# Options from other trainers: gradient checkpointing, TensorBoard, LoRA students.


def test_gradient_checkpointing_and_tensorboard(assets, tmp_path, monkeypatch):
    """Gradient checkpointing recomputes the decoder layers in backward and trains the same
    student (same losses, same weights); --report-to tensorboard logs every step record."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import modeling_utils

    plain = run_distillation(make_config(assets, tmp_path / "plain", steps=2, eval_every=2))
    calls = []
    checkpoint_fn = modeling_utils.checkpoint  # what HF's layers run under checkpointing

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint_fn(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    checkpointed = run_distillation(make_config(
        assets, tmp_path / "gc", steps=2, eval_every=2, gradient_checkpointing=True,
        report_to="tensorboard"))
    assert calls, "no layer was checkpointed"
    for key in ("loss", "ce", "kd", "grad_norm"):
        got = [r[key] for r in checkpointed["history"][1:]]
        assert got == pytest.approx([r[key] for r in plain["history"][1:]], rel=1e-6), key
    want, got = student_weights(tmp_path / "plain"), student_weights(tmp_path / "gc")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)

    events = EventAccumulator(str(tmp_path / "gc" / "tensorboard"))
    events.Reload()
    history = checkpointed["history"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in history[1:]], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/kd")] == [0, 2]
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_unavailable_options_fail_before_anything(assets, tmp_path, monkeypatch):
    """--report-to tensorboard without tensorboard, --lora-r without peft."""
    for module, option in (("tensorboard", {"report_to": "tensorboard"}),
                           ("peft", {"lora_r": 4})):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # as if not installed
            with pytest.raises(ValueError, match=rf"needs the {module} package.*fastkd\["):
                run_distillation(make_config(assets, tmp_path / "run", **option))
    assert not (tmp_path / "run").exists()


def test_lora_head_adapter_gradient_matches_full_logits(assets):
    """The fused loss through a LoRA student (adapters on every linear layer, the output layer
    included) gives its adapters the gradients of the same loss computed on the HF model's own
    full logits."""
    from fastkd import lora

    model = AutoModelForCausalLM.from_pretrained(assets.student, dtype=torch.float32)
    model = lora.add_lora(model, r=4, alpha=8.0, targets=None)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at 0 (then A gets no gradient): make both live
            param.data.normal_(0, 0.05)
    head = model.get_output_embeddings()
    assert "lora_A" in dict(head.named_modules()) or hasattr(head, "lora_A")
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm_head.lora_B") for n in adapters)
    assert all("lora_" in n for n in adapters)  # the base is frozen
    fused, spec = fused_and_spec_grads(assets, model, adapters)
    for name in adapters:
        torch.testing.assert_close(fused[name], spec[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert fused["lm_head.lora_A.default.weight"].abs().max() > 0


def test_lora_student_resumes_exactly_and_exports_merged(assets, tmp_path):
    """A LoRA run stopped and resumed equals the run in one go, bit for bit; checkpoints hold the
    adapter alone; the export is the merged model (W + alpha/r B A) plus the adapter, which PEFT
    loads."""
    from peft import PeftModel

    lora_opts = {"lora_r": 4, "lora_alpha": 8.0, "steps": 4, "eval_every": 2, "save_every": 2}
    straight = run_distillation(make_config(assets, tmp_path / "straight", **lora_opts))
    out = tmp_path / "run"
    first = run_distillation(make_config(assets, out, stop_after=2, **lora_opts))
    assert first["status"] == "stopped"
    checkpoint = latest_checkpoint(out)
    assert sorted(p.name for p in (checkpoint / "model").glob("*.safetensors")) == [
        "adapter_model.safetensors"]
    resumed = run_distillation(dataclasses.replace(DistillConfig.load(out), resume=True))
    assert resumed["status"] == "completed"
    want, got = student_weights(tmp_path / "straight"), student_weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    # The merged export: each adapted weight is W + (alpha / r) B A; the rest is the initial one.
    initial = load_file(str(assets.student / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(got) == set(initial)
    head_b = adapter["base_model.model.lm_head.lora_B.weight"]
    assert head_b.abs().max() > 0  # the output layer's adapter was trained
    merged_head = initial["lm_head.weight"] + 2.0 * head_b @ adapter[
        "base_model.model.lm_head.lora_A.weight"]
    torch.testing.assert_close(got["lm_head.weight"], merged_head, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["model.norm.weight"], initial["model.norm.weight"])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.student),
                                     str(out / "adapter"))
    ids = torch.arange(16).unsqueeze(0)
    merged = AutoModelForCausalLM.from_pretrained(straight["distill"]["student_dir"])
    torch.testing.assert_close(peft(input_ids=ids).logits, merged(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The run directory: fastkd's own (a marker), never a model's; a finished run stays as it is.


def tree(root: Path) -> dict:
    """Every file under root: its bytes and mtime."""
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_holding_a_model_or_anything_else_is_refused_and_left_as_it_was(assets, tmp_path):
    """--out = --student (a directory with a config.json): refused before anything is written,
    naming what it holds, and the model still loads; so is any other non-empty directory. An
    empty one takes the run (and its marker); a start that fails on its data takes back what
    it wrote."""
    model = tmp_path / "model"
    shutil.copytree(assets.student, model)
    before = tree(model)
    with pytest.raises(ValueError, match=rf"out: {model} is not empty and is not a fastkd run "
                                         r"directory \(no fastkd-run.json\): it holds "
                                         r"config.json, .*its config.json is a model's"):
        run_distillation(make_config(assets, model, student=str(model)))
    assert tree(model) == before
    AutoModelForCausalLM.from_pretrained(model)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"it holds todo.txt; a new run goes into a new or "
                                         r"empty directory"):
        run_distillation(make_config(assets, notes))
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]

    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "empty.txt").write_text("")
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(ValueError, match="empty.txt"):
            run_distillation(make_config(assets, out, data=[str(empty / "empty.txt")]))
        assert not out.exists() if out.name == "new" else (
            {p.name for p in out.iterdir()} <= {".fastkd.lock"})
    result = run_distillation(make_config(assets, tmp_path / "empty", steps=1, eval_every=1))
    assert result["status"] == "completed"
    assert json.loads((tmp_path / "empty" / "fastkd-run.json").read_text()) == {
        "format": "fastkd-run/1"}
    # --resume of a model directory: named, not a bare TypeError
    with pytest.raises(ValueError, match=rf"{model} is not a fastkd run directory"):
        DistillConfig.load(model)


def test_resume_of_a_finished_run_changes_nothing(straight_run, tmp_path, caplog, capsys):
    """--resume on a complete run says so, with how to train its student further, and neither
    runs, measures (the report's throughput) nor rewrites anything."""
    from fastkd.cli import main

    config, straight = straight_run
    run = tmp_path / "run"
    shutil.copytree(config.out, run)
    before = tree(run)
    with caplog.at_level(logging.INFO, logger="fastkd"):
        result = run_distillation(dataclasses.replace(DistillConfig.load(run), out=str(run),
                                                      resume=True))
    assert result["status"] == "completed" and result["complete_before"]
    assert result["history"] == straight["history"]
    assert result["distill"]["student_dir"] == str(run / "student")
    assert "the run is complete (6 steps): nothing to resume, nothing changed" in caplog.text
    assert f"fastkd distill --student {run / 'student'} --out NEW_RUN_DIR" in caplog.text
    assert main(["distill", "--resume", str(run)]) == 0
    assert "completed" in capsys.readouterr().out
    assert tree(run) == before


def test_thread_count_is_recorded_and_a_resume_runs_with_it(assets, tmp_path, monkeypatch):
    """CPU GEMMs round differently under another thread count: a run records the count it
    started with (torch's default, or --threads) and a resume uses it, whatever the default is
    then; torch gets its own count back afterwards."""
    from fastkd import loop

    seen = []
    step = loop._optimizer_step
    monkeypatch.setattr(loop, "_optimizer_step",
                        lambda *a: seen.append(torch.get_num_threads()) or step(*a))
    own = torch.get_num_threads()
    other = 2 if own == 1 else 1
    out = tmp_path / "run"
    run_distillation(make_config(assets, out, steps=2, stop_after=1))
    assert json.loads((out / "config.json").read_text())["threads"] == own and seen == [own]
    torch.set_num_threads(other)
    try:
        run_distillation(dataclasses.replace(DistillConfig.load(out), resume=True))
        assert seen == [own, own] and torch.get_num_threads() == other
    finally:
        torch.set_num_threads(own)
    run_distillation(make_config(assets, tmp_path / "one", steps=1, threads=other))
    assert seen[-1] == other and torch.get_num_threads() == own
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        make_config(assets, out, threads=0)


def test_no_progress_logs_a_line_per_evaluation_and_every_half_minute(assets, tmp_path,
                                                                      monkeypatch, caplog):
    """With no bar, a run under nohup still shows life: step, loss, tokens/s and ETA at each
    evaluation and at least every LOG_EVERY_SECONDS; a held-out set too small to measure is
    named in a warning."""
    from fastkd import loop

    with caplog.at_level(logging.INFO, logger="fastkd"):
        run_distillation(make_config(assets, tmp_path / "a", steps=4, eval_every=2,
                                     eval_sequences=2))
    lines = [r.getMessage() for r in caplog.records if ": step " in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == ["distill: step 2/4", "distill: step 4/4"]
    assert all(re.search(r"loss \d+\.\d{4}, [\d,]+ tokens/s, ETA \d+s, held-out ppl", line)
               for line in lines), lines
    assert re.search(r"the held-out set holds 62 next-token targets \(2 sequences\), fewer "
                     r"than the 1,000", caplog.text)
    caplog.clear()
    monkeypatch.setattr(loop, "LOG_EVERY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="fastkd"):
        run_distillation(make_config(assets, tmp_path / "b", steps=3, eval_every=3))
    assert [r.getMessage().split(",")[0] for r in caplog.records if ": step " in r.getMessage()
            ] == ["distill: step 1/3", "distill: step 2/3", "distill: step 3/3"]


def test_full_disk_at_a_checkpoint_and_at_the_export(straight_run, tmp_path, monkeypatch, capsys):
    """torch.save on a full disk fails with "[enforce fail at inline_container.cc] unexpected
    pos", which never says so; a copy runs out of space mid-export. Each is one line naming what
    was written and the free space, leaves no temp directory, and the run resumed with space
    freed ends bit for bit where the straight run did. Checkpoints and the export take the
    umask's modes (safetensors writes 0600)."""
    import errno

    from fastkd import checkpoint, fsio
    from fastkd.cli import main

    config, _ = straight_run
    out = tmp_path / "run"
    run_distillation(dataclasses.replace(config, out=str(out), stop_after=2))
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"the start of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(fsio, "free_bytes", lambda path: 4096)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--resume", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert (f"fastkd distill: error: cannot write {out}/checkpoints/step-00000004: no space left "
            "on device; 0.0 MiB free there (free some space") in err, err
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(torch, "save", real_save)

    def copy_fills_the_disk(src, dst, **kwargs):
        (Path(dst) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copytree", copy_fills_the_disk)
    with pytest.raises(SystemExit):
        main(["distill", "--resume", str(out)])
    assert (f"cannot write {out}/student: no space left on device; 0.0 MiB free there"
            in capsys.readouterr().err)
    assert not list(out.glob(".tmp-*")) and not (out / "student").exists()
    monkeypatch.undo()
    assert main(["distill", "--resume", str(out)]) == 0
    want, got = student_weights(config.out), student_weights(out)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    mask = fsio.umask()
    for path in [out / "student", *(out / "student").rglob("*"), *(out / "checkpoints").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path
