"""Several teachers in FusedKDTrainer and FusedDistillationTrainer (fastkd.integrations), on tiny
local Llamas of different widths on CPU: each row routed to its teacher (a `teacher_id` column)
or every token mixed, against the same objective in plain torch from full logits (the row's
teacher's); one teacher unused = that teacher alone; a list of one = today's trainer, bit for
bit; the collators keep each row's teacher; bad teacher ids refused by name; 2 processes (DDP,
FSDP2) = 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="needs TRL: pip install fastkd[trl]")
from _hf_fixtures import (  # noqa: E402
    INIT,
    LENGTHS,
    OPTIONS,
    VOCAB,
    collate,
    load,
    sequences,
    torchrun_two,
)
from _multi_teacher_fixtures import (  # noqa: E402
    ROUTE,
    TEACHERS,
    kd_trainer,
    routed_prompts,
    routed_rows,
    trained,
    trl_trainer,
)
from _trainer_fixtures import build_tokenizer, save_llama  # noqa: E402
from _trl_fixtures import completion_batch, fixed_completions  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithFlattening,
)
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.integrations.multi_teacher import TEACHER_ID  # noqa: E402
from fastkd.integrations.trl import (  # noqa: E402
    FusedDistillationTrainer,
    FusedGKDTrainer,
    FusedServerDistillationTrainer,
)

jsd_loss = GKDTrainer.generalized_jsd_loss  # TRL's plain-torch generalized JSD (full logits)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A student (D=32) and teachers of other widths sharing its tokenizer: a Llama (D=48, 2
    layers), a Llama (D=40) and a Granite (D=40) whose head divides its logits by 4."""
    out = tmp_path_factory.mktemp("multi_models")
    tokenizer = build_tokenizer(out / "tokenizer", vocab_size=VOCAB)
    return {
        "tokenizer": out / "tokenizer",
        "student": save_llama(out / "student", tokenizer, hidden=32, seed=0, **INIT),
        "teacher": save_llama(out / "teacher", tokenizer, hidden=48, layers=2, seed=1, **INIT),
        "teacher_b": save_llama(out / "teacher_b", tokenizer, hidden=40, seed=5, **INIT),
        "granite": save_llama(out / "granite", tokenizer, hidden=40, seed=4, arch="granite",
                              logits_scaling=4.0, **INIT),
    }


def full_logits(model, batch, grad=True):
    kwargs = {k: v for k, v in batch.items() if k not in ("labels", TEACHER_ID)}
    with torch.set_grad_enabled(grad):
        return model(**kwargs, use_cache=False).logits[:, :-1]


def routed_reference(student, teachers, batch, route, opts) -> torch.Tensor:
    """The objective in plain torch from full logits: each row against its own teacher's logits,
    `fastkd.reference.token_losses` (float64), summed over the counted tokens, over their count."""
    s = full_logits(student, batch)
    every = [full_logits(t, batch, grad=False) for t in teachers]
    t = torch.stack([every[k][r] for r, k in enumerate(route)])
    labels = batch["labels"][:, 1:].reshape(-1)
    loss = reference.token_losses(s.flatten(0, 1).double(), t.flatten(0, 1).double(), labels,
                                  opts)[0]
    return loss.sum() / (labels != opts.ignore_index).sum()


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict, expected: dict, rtol: float, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=name)


# --- FusedKDTrainer --------------------------------------------------------------------------


@pytest.mark.parametrize(("teachers", "opts"), [
    (("teacher", "teacher_b"), OPTIONS),
    (("teacher_b", "granite"), fastkd.DistillOptions(temperature=1.5, divergence="jsd", beta=0.3)),
])
def test_kd_routed_loss_and_grads_equal_plain_torch(models, tmp_path, teachers, opts):
    """Rows routed to 2 teachers of different widths (one a Granite, whose head scales its
    logits): the trainer's loss and every parameter's gradient equal the objective on full
    logits with each row's teacher; the collated batch keeps each row's teacher."""
    trainer = kd_trainer(models, tmp_path, teachers, opts=opts)
    batch = trainer.data_collator(routed_rows())
    assert batch[TEACHER_ID].tolist() == list(ROUTE)
    model = trainer.model
    loss = trainer.compute_loss(model, batch)
    grads = grads_of(model, loss)
    expected = routed_reference(model, trainer.teacher_model, batch, ROUTE,
                                trainer.distill_options)
    expected_grads = grads_of(model, expected)
    assert expected.item() > 0.1
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
    # the teachers really differ: all rows on teacher 0 is another loss
    other = routed_reference(model, trainer.teacher_model, batch, (0,) * 4, trainer.distill_options)
    assert abs(other.item() / expected.item() - 1) > 1e-2


def test_kd_packed_batch_routes_each_sequence(models, tmp_path):
    """DataCollatorWithFlattening packs the 4 rows into one: each sequence's tokens keep its
    teacher (teacher_id per token), each teacher runs on its own sequences packed on their own,
    and the loss equals the padded batch's and the plain-torch objective."""
    trainer = kd_trainer(models, tmp_path, collator=DataCollatorWithFlattening())
    packed = trainer.data_collator(routed_rows())
    assert set(packed) == {"input_ids", "labels", "position_ids", TEACHER_ID}
    assert packed[TEACHER_ID].tolist() == [[k for k, n in zip(ROUTE, LENGTHS, strict=True)
                                            for _ in range(n)]]
    model = trainer.model
    loss = trainer.compute_loss(model, packed)
    grads = grads_of(model, loss)
    padded = collate(routed_rows())
    expected = routed_reference(model, trainer.teacher_model, padded, ROUTE,
                                trainer.distill_options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert_grads_close(grads, grads_of(model, expected), rtol=1e-4, atol=1e-6)


def test_kd_collators_keep_the_teacher_id(models, tmp_path):
    """The collators of the single-teacher tests and docs, wrapped by the trainer: the batch
    carries each row's teacher (its position for a dict's names too) and the models' inputs are
    the collator's own; through train(), a datasets.Dataset column survives the Trainer's
    removal of unused columns."""
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(models["tokenizer"])
    names = tuple(("code", "math")[k] for k in ROUTE)
    rows = [{"input_ids": r["input_ids"], TEACHER_ID: name}
            for r, name in zip(sequences(LENGTHS), names, strict=True)]
    labeled = [{**r, TEACHER_ID: name} for r, name in zip(sequences(LENGTHS), names, strict=True)]
    teachers = {"code": load(models["teacher"]), "math": load(models["teacher_b"])}
    for collator, given in ((DataCollatorForLanguageModeling(tokenizer, mlm=False), rows),
                            (collate, labeled)):
        trainer = kd_trainer(models, tmp_path, teachers, rows=given, collator=collator)
        batch = trainer.data_collator(given)
        plain = collator([{k: v for k, v in r.items() if k != TEACHER_ID} for r in given])
        assert batch[TEACHER_ID].tolist() == list(ROUTE)
        assert set(batch) == {*plain, TEACHER_ID}
        assert all(torch.equal(batch[k], plain[k]) for k in plain)
    trainer = kd_trainer(models, tmp_path, teachers, rows=Dataset.from_list(rows),
                         collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    seen = []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kw: (seen.append(inputs[TEACHER_ID].tolist())
                                                         or compute_loss(model, inputs, **kw))
    trainer.train()
    assert len(seen) == 1 and sorted(seen[0]) == sorted(ROUTE)


def test_kd_one_teacher_unused_equals_that_teacher_alone(models, tmp_path):
    """Two teachers, every row routed to the first: the loss and gradients are the single
    teacher's trainer's, bit for bit (the second teacher never runs)."""
    two = kd_trainer(models, tmp_path, rows=routed_rows((0, 0, 0, 0)))
    one = kd_trainer(models, tmp_path, teachers=load(models["teacher"]), rows=sequences(LENGTHS))
    calls = []
    two.teacher_model[1].register_forward_hook(lambda *a: calls.append(1))
    batch = two.data_collator(routed_rows((0, 0, 0, 0)))
    loss = two.compute_loss(two.model, batch)
    expected = one.compute_loss(one.model, collate(sequences(LENGTHS)))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)  # bit for bit, on CPU
    assert_grads_close(grads_of(two.model, loss), grads_of(one.model, expected), rtol=0, atol=0)
    assert not calls


def test_kd_list_of_one_is_the_single_teacher_trainer_bit_for_bit(models, tmp_path):
    """teacher_model=[teacher] (rows with teacher_id 0, or none) trains exactly as
    teacher_model=teacher: one SGD step, every parameter bit for bit."""
    def step(teacher_model, rows):
        trainer = kd_trainer(models, tmp_path, teachers=teacher_model, rows=rows)
        assert trainer.teacher_routing is None
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    today = step(load(models["teacher"]), sequences(LENGTHS))
    for teachers, rows in (([load(models["teacher"])], routed_rows((0,) * 4)),
                           ({"only": load(models["teacher"])}, sequences(LENGTHS))):
        listed = step(teachers, rows)
        assert all(torch.equal(listed[n], p) for n, p in today.items())


def test_kd_mixture_equals_weighted_plain_torch(models, tmp_path):
    """teacher_weights [0.7, 0.3]: every token against both teachers, the loss and gradients
    equal 0.7 x (the objective with teacher 0) + 0.3 x (with teacher 1) on full logits."""
    trainer = kd_trainer(models, tmp_path, rows=sequences(LENGTHS), teacher_weights=[0.7, 0.3])
    model, batch = trainer.model, collate(sequences(LENGTHS))
    assert TEACHER_ID not in trainer.data_collator(sequences(LENGTHS))
    loss = trainer.compute_loss(model, batch)
    grads = grads_of(model, loss)
    opts = trainer.distill_options
    expected = sum(w * routed_reference(model, trainer.teacher_model, batch, (k,) * 4, opts)
                   for k, w in enumerate((0.7, 0.3)))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert_grads_close(grads, grads_of(model, expected), rtol=1e-4, atol=1e-6)


def test_kd_bad_teachers_and_teacher_ids(models, tmp_path):
    """Refused when the trainer is built, naming the column and the row; a lazy dataset at its
    first batch, naming the batch and the row; teacher arguments and weights by name; a teacher
    whose logits the fused loss cannot reproduce, naming the teacher."""
    from datasets import Dataset

    cases = [
        (routed_rows((0, 1, 2, 0)), r"train_dataset row 2: teacher_id 2 is not one of the 2 "),
        ([{k: v for k, v in r.items() if k != TEACHER_ID} if i == 1 else r
          for i, r in enumerate(routed_rows())], r"train_dataset row 1 has no teacher_id"),
        (Dataset.from_list(sequences(LENGTHS)), r"train_dataset has no 'teacher_id' column"),
        (Dataset.from_list(routed_rows(("0", "1", "1", "0"))),  # names of a list: positions
         r"train_dataset row 0: teacher_id '0' is not one of the 2 teachers \(0, 1\)"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            kd_trainer(models, tmp_path, rows=rows)
    lazy = Dataset.from_list(routed_rows((0, 1, 5, 0))).to_iterable_dataset()
    trainer = kd_trainer(models, tmp_path, rows=lazy)
    with pytest.raises(ValueError, match=r"batch 1 .*, row 2: teacher_id 5 is not one of the 2"):
        trainer.train()
    with pytest.raises(ValueError, match="pass only one of teacher_model and teacher_models"):
        kd_trainer(models, tmp_path, teacher_models=[load(models["teacher"])])
    for weights, message in (([0.5, 0.6], "must sum to 1"), ([1.0], "1 weights for 2 teachers"),
                             ([-0.5, 1.5], r"teacher_weights\[0\] must be a finite number >= 0")):
        with pytest.raises(ValueError, match=message):
            kd_trainer(models, tmp_path, rows=sequences(LENGTHS), teacher_weights=weights)
    with pytest.raises(ValueError, match="teacher_weights mixes every teacher on every token"):
        kd_trainer(models, tmp_path, teacher_weights=[0.5, 0.5])  # rows with teacher_id
    with pytest.raises(ValueError, match="teacher_weights mixes several teachers"):
        kd_trainer(models, tmp_path, load(models["teacher"]), teacher_weights=[1.0])
    scaled = load(models["teacher_b"])
    scaled.config.logit_scale = 2.0  # a scale Llama's forward does not apply: the probe refuses
    with pytest.raises(ValueError, match=r"teachers\[1\] model .*logit scale 2"):
        kd_trainer(models, tmp_path, [load(models["teacher"]), scaled])


# --- FusedDistillationTrainer ----------------------------------------------------------------

TRL_ROUTE = (1, 0, 1)  # completion_batch's 3 rows
# Config attributes TRL's loss reads (Llama's forward ignores them; both losses here apply them):
# each teacher its own softcap or logit scale, read from its own config.
HEADS = ({"final_logit_softcapping": 3.0, "logit_scale": 0.7},
         ({"final_logit_softcapping": 2.5}, {"logits_scaling": 1.6}))
SCALES = (0.7, (1.0, 1 / 1.6))
CAPS = (3.0, (2.5, None))


def set_heads(trainer) -> None:
    for name, value in HEADS[0].items():
        setattr(trainer.model.config, name, value)
    for teacher, attrs in zip(trainer.teacher_model, HEADS[1], strict=True):
        for name, value in attrs.items():
            setattr(teacher.config, name, value)


def on_policy_logits(trainer, batch):
    """The student's and each teacher's full logits at the completion tokens (plain forwards),
    transformed as TRL's loss does (logit scale, then softcap)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    k = batch["completion_ids"].shape[1]
    s = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    with torch.no_grad():
        t = [reference.softcap(m(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1] * scale,
                               cap)
             for m, scale, cap in zip(trainer.teacher_model, SCALES[1], CAPS[1], strict=True)]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return reference.softcap(s * SCALES[0], CAPS[0]), t, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_routed_compute_loss_fp64_equals_plain_torch(models, tmp_path, beta):
    """float64: rows routed to 2 teachers of different widths, each with its own logit scale
    or softcap from its config; the trainer's loss and every gradient equal TRL's objective
    (its plain-torch generalized JSD at T=2) on full logits with each row's teacher, and the
    logged teacher_jsd/K each teacher's divergence over its own rows."""
    trainer = trl_trainer(models, tmp_path, dtype=torch.float64, beta=beta, temperature=2.0)
    set_heads(trainer)
    batch = {**completion_batch(), "teacher_index": torch.tensor(TRL_ROUTE)}
    model = trainer.model.train()
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    s, t, labels = on_policy_logits(trainer, batch)
    routed = torch.stack([t[k][r] for r, k in enumerate(TRL_ROUTE)])
    expected = jsd_loss(s, routed, labels, beta=beta, temperature=2.0,
                        num_items_in_batch=batch["num_items_in_batch"])
    assert expected.item() > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for x, y in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-12)
    metrics = trainer._metrics["train"]
    for k in (0, 1):
        rows = [r for r, j in enumerate(TRL_ROUTE) if j == k]
        own = jsd_loss(s[rows].detach(), t[k][rows], labels[rows], beta=beta, temperature=2.0)
        assert metrics[f"teacher_jsd/{k}"][0] == pytest.approx(own.item(), rel=1e-9)
        counted = int((labels[rows] != -100).sum())
        assert metrics[f"teacher_token_frac/{k}"][0] == counted / int((labels != -100).sum())


def test_trl_mixture_fp64_equals_weighted_plain_torch(models, tmp_path):
    """teacher_weights {name: w}: every token against both teachers, sum_k w_k JSD_k."""
    teachers = {"code": load(models["teacher"], dtype=torch.float64),
                "math": load(models["teacher_b"], dtype=torch.float64)}
    trainer = trl_trainer(models, tmp_path, teachers, dtype=torch.float64, beta=0.5,
                          rows=routed_prompts(column=False),
                          trainer_kwargs={"teacher_weights": {"math": 0.25, "code": 0.75}})
    set_heads(trainer)
    batch = completion_batch()
    model = trainer.model.train()
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    s, t, labels = on_policy_logits(trainer, batch)
    expected = sum(w * jsd_loss(s, t_k, labels, beta=0.5, num_items_in_batch=batch[
        "num_items_in_batch"]) for w, t_k in zip((0.75, 0.25), t, strict=True))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for x, y in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-12)


def test_trl_one_teacher_unused_equals_that_teacher_alone(models, tmp_path):
    """Two teachers, every row routed to the first: the loss and gradients of the single-teacher
    trainer bit for bit (fp32), and the second teacher never runs."""
    two = trl_trainer(models, tmp_path)
    one = trl_trainer(models, tmp_path, teachers=load(models["teacher"]),
                      rows=routed_prompts(column=False))
    calls = []
    two.teacher_model[1].register_forward_hook(lambda *a: calls.append(1))
    batch = completion_batch()
    out = []
    for trainer, given in ((two, {**batch, "teacher_index": torch.zeros(3, dtype=torch.long)}),
                           (one, batch)):
        loss = trainer.compute_loss(trainer.model.train(), given)
        out.append((loss, grads_of(trainer.model, loss)))
    (loss, grads), (expected, expected_grads) = out
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)  # bit for bit, on CPU
    assert_grads_close(grads, expected_grads, rtol=0, atol=0)
    assert not calls


def trl_step(models, out: Path, teachers, rows, **overrides) -> dict[str, torch.Tensor]:
    return trained(trl_trainer(models, out, teachers, rows=rows, max_steps=1, **overrides))


@pytest.fixture(scope="module")
def big_steps(models, tmp_path_factory):
    """One SGD step on the 4 routed rows in one batch, by each trainer (TRL's with fixed
    completions, no sampling)."""
    out = tmp_path_factory.mktemp("big")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedDistillationTrainer, "_generate_single_turn", fixed_completions)
        return {"kd": trained(kd_trainer(models, out / "kd")),
                "trl": trl_step(models, out / "trl", TEACHERS, routed_prompts())}


def test_trl_list_of_one_and_accumulation(models, tmp_path, monkeypatch, big_steps):
    """Fixed completions (a function of the prompt), one SGD step: teacher_model=[teacher]
    (rows with teacher_id 0) is teacher_model=teacher bit for bit; and routed, 2 accumulated
    micro-batches of 2 rows equal one batch of 4 (each row's teacher follows it through TRL's
    shuffling and splitting)."""
    monkeypatch.setattr(FusedDistillationTrainer, "_generate_single_turn", fixed_completions)
    today = trl_step(models, tmp_path / "a", load(models["teacher"]),
                     routed_prompts(column=False))
    listed = trl_step(models, tmp_path / "b", [load(models["teacher"])], routed_prompts((0,) * 4))
    assert all(torch.equal(listed[n], p) for n, p in today.items())
    start = {n: p.detach() for n, p in load(models["student"]).named_parameters()}
    big = big_steps["trl"]
    accumulated = trl_step(models, tmp_path / "d", ("teacher", "teacher_b"), routed_prompts(),
                           per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for name, p in big.items():
        assert (p - start[name]).abs().max() > 1e-4, name
        torch.testing.assert_close(accumulated[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert any((big[n] - today[n]).abs().max() > 1e-4 for n in big)  # the routing mattered


def test_trl_training_with_generation_lora_and_teacher_metrics(models, tmp_path):
    """trainer.train() as a TRL user runs it, with names: HF generate samples the completions,
    2 accumulation micro-batches, a LoRA student (q_proj and lm_head); both adapters move and
    each teacher's divergence and token share are logged."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"],
                      init_lora_weights="gaussian")
    names = ("code", "math", "math", "code")
    trainer = trl_trainer(models, tmp_path, {"code": load(models["teacher"]),
                                             "math": load(models["teacher_b"])},
                          rows=routed_prompts(names), per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, max_steps=2,
                          trainer_kwargs={"peft_config": lora})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2, trainer.state.log_history
    for h in logs:
        assert 0 < h["loss"] < float("inf")
        assert h["teacher_jsd/code"] > 0 and h["teacher_jsd/math"] > 0
        assert h["teacher_token_frac/code"] + h["teacher_token_frac/math"] == pytest.approx(1)
    assert all((p - before[n]).abs().max() > 0 for n, p in trainer.model.named_parameters()
               if p.requires_grad)


def test_trl_bad_teachers_and_teacher_ids(models, tmp_path, monkeypatch):
    """Refused by name: a teacher_id out of range (the dataset's row), no teacher_id column, a
    lazy dataset's bad row at its first generation batch, a teacher whose vocabulary is not the
    student's (as TRL refuses its one), both teacher arguments, the teacher revision, and the
    trainers that take one teacher (GKD) or a served one."""
    for rows, message in ((routed_prompts((0, 1, 2, 0)),
                           r"train_dataset row 2: teacher_id 2 is not one of the 2 teachers"),
                          (routed_prompts(column=False),
                           r"train_dataset has no 'teacher_id' column")):
        with pytest.raises(ValueError, match=message):
            trl_trainer(models, tmp_path, rows=rows)
    monkeypatch.setattr(FusedDistillationTrainer, "_generate_single_turn", fixed_completions)
    trainer = trl_trainer(models, tmp_path, rows=routed_prompts((0, 1, 1, 9))
                          .to_iterable_dataset(), max_steps=1)
    with pytest.raises(ValueError, match=r"generation batch 1 \(training\), row 3: teacher_id 9"):
        trainer.train()
    tokenizer = AutoTokenizer.from_pretrained(models["tokenizer"])
    wide = save_llama(tmp_path / "wide", tokenizer, hidden=40, vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match=rf"teachers\[1\] has vocab_size {VOCAB + 8}"):
        trl_trainer(models, tmp_path, [load(models["teacher"]), str(wide)])
    with pytest.raises(ValueError, match="pass only one of teacher_model and teacher_models"):
        trl_trainer(models, tmp_path, trainer_kwargs={"teacher_models": [load(models["teacher"])]})
    with pytest.raises(ValueError, match="teacher_model_revision is ambiguous"):
        trl_trainer(models, tmp_path, teacher_model_revision="main")
    with pytest.raises(ValueError, match="FusedGKDTrainer takes one teacher"):
        FusedGKDTrainer(model=load(models["student"]), teacher_model=[load(models["teacher"])])
    with pytest.raises(ValueError, match="FusedServerDistillationTrainer takes its teacher from a "
                                         "server"):
        FusedServerDistillationTrainer(load(models["student"]), teacher_models=["a", "b"])


def test_two_processes_match_one(models, tmp_path, big_steps):
    """torchrun, 2 CPU processes (gloo), rows routed to 2 teachers: under DDP, 2 rows each, one
    SGD step of FusedKDTrainer and of FusedDistillationTrainer = the 1-process 4-row step; and
    FusedDistillationTrainer's loss with the student and both teachers sharded by FSDP2, each
    rank routing differently (one rank none to a teacher) = the unsharded loss and gradients."""
    out = tmp_path / "two"
    torchrun_two(Path(__file__).with_name("_multi_teacher_dist_worker.py"),
                 [*(str(models[k]) for k in ("student", "teacher", "teacher_b", "tokenizer")),
                  str(out)], timeout=300)
    for trainer in ("kd", "trl"):
        two = torch.load(out / f"{trainer}_params.pt")
        for name, p in big_steps[trainer].items():
            torch.testing.assert_close(two[name], p, rtol=1e-5, atol=1e-6, msg=f"{trainer} {name}")
    fsdp = json.loads((out / "fsdp.json").read_text())
    assert fsdp["loss_rel_err"] < 1e-5 and fsdp["grad_rel_err"] < 1e-5, fsdp
    assert fsdp["sharded"], fsdp
