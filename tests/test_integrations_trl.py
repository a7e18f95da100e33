"""fastkd inside TRL (fastkd.integrations.trl) against TRL 1.16's own trainers, on tiny local
Llamas on CPU: FusedDistillationTrainer vs trl.DistillationTrainer (loss, every gradient, logged
metrics), FusedServerDistillationTrainer vs ServerDistillationTrainer (a local teacher stands in
for the vLLM server), FusedGKDTrainer vs GKDTrainer; on-policy training with generation, gradient
accumulation and a LoRA head; 2 processes (DDP under accelerate, FSDP2)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="needs TRL: pip install fastkd[trl]")
from _hf_fixtures import VOCAB, load, tiny_pair, torchrun_two  # noqa: E402
from _trl_fixtures import (  # noqa: E402
    LocalTeacherClient,
    completion_batch,
    fixed_completions,
    make,
    relative_error,
)
from transformers import AutoTokenizer  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.experimental.server_distillation import (  # noqa: E402
    ServerDistillationConfig,
    ServerDistillationTrainer,
)

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.integrations.trl import (  # noqa: E402
    FusedDistillationTrainer,
    FusedGKDTrainer,
    FusedServerDistillationTrainer,
    GKDConfig,
    fused_divergence_loss,
    gkd_options,
    server_sparse_targets,
)
from fastkd.models import logit_scale  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.0, 0.1, 0.5, 1.0)
jsd_loss = GKDTrainer.generalized_jsd_loss  # TRL's plain-torch generalized JSD (full logits)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("trl_models"))


def test_repo_kernels_folder_does_not_shadow_hub_kernels():
    """From a clone's root (on sys.path), `import kernels` is Hugging Face's package, which TRL's
    import chain needs; without it, the folder still does not pose as it."""
    code = ("from trl import DistillationTrainer; import kernels, fastkd.kernels.dense; "
            "print(kernels.__file__); print(fastkd.kernels.dense.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    hub, ours = out.stdout.split()
    assert Path(hub).parent != ROOT / "kernels" and Path(ours) == ROOT / "kernels" / "dense.py"
    bare = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT,  # no site
                          capture_output=True, text=True, timeout=60)
    assert "ModuleNotFoundError: No module named 'kernels'" in bare.stderr, bare.stderr[-2000:]


# --- the objective, in float64 against TRL's plain-torch generalized JSD ---------------------


def transformed(logits, scale, cap):
    """TRL's logit post-processing: scale, then softcap (the loss divides by T after)."""
    return reference.softcap(logits * scale, cap)


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
        expected = jsd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, beta=beta, temperature=temperature,
                            num_items_in_batch=num_items)
        grads_expected = torch.autograd.grad(expected, (h_s, w_s))
        total = fastkd.distill(h_s, w_s, h_t, w_t, labels, opts)
        got = total / (num_items if num_items is not None else (labels != -100).sum())
        grads = torch.autograd.grad(got, (h_s, w_s))
        assert expected.item() > 1e-3
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
        for x, y in zip(grads, grads_expected, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_fused_divergence_loss_equals_trl_objective_fp64(beta):
    """`fused_divergence_loss` with biases, logit scales, softcaps, T = 2 and both reductions,
    float64: TRL's objective from full logits (scale, softcap, then generalized JSD at T), its
    gradients, and the summed entropy; with `options`, fastkd's own loss on the completions."""
    g = torch.Generator().manual_seed(1)
    b, k, v, d = 2, 5, 53, 12
    f64 = {"generator": g, "dtype": torch.float64}
    h_s, w_s, b_s = (torch.randn(*s, **f64).requires_grad_() for s in ((b, k, d), (v, d), (v,)))
    h_t, w_t, b_t = torch.randn(b, k, d + 3, **f64), torch.randn(v, d + 3, **f64), torch.randn(v,
                                                                                            **f64)
    mask = torch.ones(b, k, dtype=torch.long)
    mask[1, 3:] = 0
    tokens = torch.randint(0, v, (b, k), generator=g)
    heads = {"student_lm_head_bias": b_s, "teacher_lm_head_bias": b_t, "student_logit_scale": 0.7,
             "teacher_logit_scale": 1.3, "student_final_logit_softcapping": 4.0,
             "teacher_final_logit_softcapping": 3.0, "temperature": 2.0}
    t = transformed(h_t @ w_t.T + b_t, 1.3, 3.0)
    labels = tokens.masked_fill(mask == 0, -100)
    for num_items in (None, torch.tensor(11)):
        s = transformed(h_s @ w_s.T + b_s, 0.7, 4.0)
        loss, entropy, n = fused_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, num_items,
                                                 **heads)
        expected = jsd_loss(s, t, labels, beta=beta, temperature=2.0, num_items_in_batch=num_items)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
        for x, y in zip(torch.autograd.grad(loss, (h_s, w_s, b_s)),
                        torch.autograd.grad(expected, (h_s, w_s, b_s)), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)
    s = s.detach()
    log_q = torch.log_softmax(s / 2.0, -1)
    assert n.item() == 8 and not entropy.requires_grad
    torch.testing.assert_close(entropy, -(log_q.exp() * log_q).sum(-1)[mask == 1].sum(),
                               rtol=1e-10, atol=0)
    # options: fastkd's own objective (here tvd + CE on the completion tokens)
    opts = fastkd.DistillOptions(temperature=1.5, ce_weight=0.3, kd_weight=0.7, divergence="tvd")
    got, _, _ = fused_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, None, labels=tokens,
                                      options=opts, **heads)
    spec = reference.token_losses(s.reshape(-1, v), t.reshape(-1, v), labels.reshape(-1), opts)[0]
    torch.testing.assert_close(got, spec.sum() / 8, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="labels"):
        fused_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, options=opts)


def test_logit_scale_reads_the_configs_as_trl():
    from types import SimpleNamespace as C

    assert logit_scale(C()) == 1.0
    assert logit_scale(C(logit_scale=0.25, logits_scaling=8.0)) == 0.25
    assert logit_scale(C(logit_scale=None, output_multiplier=3.0)) == 3.0
    assert logit_scale(C(lm_head_multiplier=2.0)) == 2.0
    assert logit_scale(C(logits_scaling=8.0, model_type="granite")) == 0.125
    assert logit_scale(C(logits_scaling=8.0, model_type="hyperclovax")) == 8.0


# --- FusedDistillationTrainer against trl.DistillationTrainer --------------------------------

HEADS = {  # config attributes TRL's loss reads: softcaps, logit scales (Llama's forward ignores
    # them; both trainers' losses apply them)
    "plain": ({}, {}),
    "softcap": ({"final_logit_softcapping": 3.0}, {"final_logit_softcapping": 2.5}),
    "scaled": ({"final_logit_softcapping": 3.0, "logit_scale": 0.7},
               {"final_logit_softcapping": 2.5, "logits_scaling": 1.6}),
}
HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@pytest.fixture(scope="module")
def pair(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    return tuple(make(cls, DistillationConfig, models, out / cls.__name__)
                 for cls in (FusedDistillationTrainer, DistillationTrainer))


def set_heads(trainer, heads: str) -> None:
    for model, attrs in zip((trainer.model, trainer.teacher_model), HEADS[heads], strict=True):
        for name in HEAD_ATTRS:
            setattr(model.config, name, attrs.get(name))


def step(trainer, batch, beta, temperature, heads):
    """compute_loss in training (num_items_in_batch) with its gradients, then in evaluation (the
    local mean); and the logged metrics."""
    trainer.beta, trainer.temperature = beta, temperature
    set_heads(trainer, heads)
    trainer._metrics = {"train": {"entropy": []}, "eval": {"entropy": []}}
    model = trainer.model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(model.eval(), batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), eval_loss, grads, trainer._metrics


def parity_errors(pair, beta, temperature, heads) -> dict[str, float]:
    """Relative differences between ours and TRL's: loss (training and evaluation), the worst
    parameter gradient (norm-wise), the logged entropy."""
    batch = completion_batch()
    (loss, eval_loss, grads, metrics), (loss_t, eval_t, grads_t, metrics_t) = (
        step(t, batch, beta, temperature, heads) for t in pair)
    assert loss_t.item() > 1e-2 and metrics_t["train"]["entropy"][0] > 1
    assert set(grads) == set(grads_t) and metrics.keys() == metrics_t.keys()
    return {
        "loss": abs(loss.item() / loss_t.item() - 1),
        "eval_loss": abs(eval_loss.item() / eval_t.item() - 1),
        "grad": max(relative_error(grads[n], grads_t[n]) for n in grads_t),
        "entropy": max(abs(a / b - 1) for mode in ("train", "eval")
                       for a, b in zip(metrics[mode]["entropy"], metrics_t[mode]["entropy"],
                                       strict=True)),
    }


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_compute_loss_equals_trl_distillation_trainer(pair, beta, temperature, heads):
    """The two trainers' own compute_loss on one on-policy micro-batch, fp32: the loss, every
    parameter's gradient and the logged entropy agree to 1e-5 (TRL's kernel holds tiles in fp32)."""
    errors = parity_errors(pair, beta, temperature, heads)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_compute_loss_fp64_equals_full_logit_objective(models, tmp_path, beta):
    """float64 models (TRL's own kernel would compute in fp32): the trainer's loss and gradients
    equal TRL's objective from the models' full logits (scale, softcap, generalized JSD at T=2)."""
    trainer = make(FusedDistillationTrainer, DistillationConfig, models, tmp_path,
                   dtype=torch.float64, beta=beta, temperature=2.0)
    set_heads(trainer, "scaled")
    batch = completion_batch()
    model = trainer.model.train()
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    k = batch["completion_ids"].shape[1]
    s = model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    with torch.no_grad():
        t = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    expected = jsd_loss(transformed(s, 0.7, 3.0), transformed(t, 1 / 1.6, 2.5), labels, beta=beta,
                        temperature=2.0, num_items_in_batch=batch["num_items_in_batch"])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for x, y in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-12)


def lora(**overrides):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                         "target_modules": ["q_proj", "lm_head"], **overrides})


def test_lora_head_gradient_equals_full_logits(models, tmp_path):
    """A LoRA adapter on lm_head (TRL refuses it: its loss reads the frozen base weight): the
    fused loss's gradients of every adapter equal those of TRL's objective on the PEFT model's
    full logits. lora_dropout > 0 on the head is refused by name."""
    trainer = make(FusedDistillationTrainer, DistillationConfig, models, tmp_path,
                   dtype=torch.float64, beta=0.5, trainer_kwargs={"peft_config": lora()})
    model = trainer.model.train()
    with torch.no_grad():  # B starts at 0 (then A gets no gradient): make both nonzero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    batch = completion_batch()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora_B" in n for n in params)
    grads = torch.autograd.grad(trainer.compute_loss(model, batch), list(params.values()))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    k = batch["completion_ids"].shape[1]
    s = model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]  # the adapter applied
    with torch.no_grad():
        t = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    expected = jsd_loss(s, t, labels, beta=0.5, num_items_in_batch=batch["num_items_in_batch"])
    for name, x, y in zip(params, grads, torch.autograd.grad(expected, list(params.values())),
                          strict=True):
        assert y.abs().max() > 0, name
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="lora_dropout"):
        make(FusedDistillationTrainer, DistillationConfig, models, tmp_path / "drop",
             trainer_kwargs={"peft_config": lora(lora_dropout=0.1)})
    with pytest.raises(ValueError, match="lm_head"):  # TRL's own trainer refuses the head adapter
        make(DistillationTrainer, DistillationConfig, models, tmp_path / "trl",
             trainer_kwargs={"peft_config": lora()})


def test_on_policy_training_with_generation_accumulation_and_lora(models, tmp_path):
    """trainer.train() as a TRL user runs it: HF generate samples the completions, 2 accumulation
    micro-batches per step, a LoRA adapter on q_proj and lm_head. Both adapters move; TRL's
    metrics are logged (completion lengths, entropy)."""
    trainer = make(FusedDistillationTrainer, DistillationConfig, models, tmp_path,
                   per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                   trainer_kwargs={"peft_config": lora(init_lora_weights="gaussian")})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2, trainer.state.log_history
    for h in logs:
        assert 0 < h["loss"] < float("inf") and 0 < h["entropy"] <= torch.log(torch.tensor(VOCAB))
        assert 1 <= h["completions/mean_length"] <= 3
    moved = {n: (p - before[n]).abs().max().item() for n, p in trainer.model.named_parameters()
             if p.requires_grad}
    assert all(m > 0 for m in moved.values()), moved
    assert any("lm_head.lora_B" in n for n in moved)


def one_step(models, out: Path, **overrides) -> dict[str, torch.Tensor]:
    trainer = make(FusedDistillationTrainer, DistillationConfig, models, out, max_steps=1,
                   **overrides)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def one_big_batch(models, tmp_path_factory):
    """One SGD step on the 4 prompts in one micro-batch (fixed completions, no sampling)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedDistillationTrainer, "_generate_single_turn", fixed_completions)
        return one_step(models, tmp_path_factory.mktemp("big"))


def test_gradient_accumulation_equals_one_big_batch(models, tmp_path, one_big_batch,
                                                    monkeypatch):
    """2 micro-batches of 2 prompts accumulated = one batch of 4 (TRL's num_items_in_batch over
    the generation batch): the parameters after one SGD step agree."""
    monkeypatch.setattr(FusedDistillationTrainer, "_generate_single_turn", fixed_completions)
    start = {n: p.detach() for n, p in load(models["student"]).named_parameters()}
    accumulated = one_step(models, tmp_path, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    for name, p in one_big_batch.items():
        assert (p - start[name]).abs().max() > 1e-4, name
        torch.testing.assert_close(accumulated[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes(models, tmp_path, one_big_batch):
    """torchrun, 2 CPU processes (gloo): DDP under accelerate, 2 prompts each, one SGD step =
    the 1-process 4-prompt step; compute_loss with both models sharded by FSDP2 (`fully_shard`,
    as accelerate's FSDP2 does) = the unsharded loss and gradients."""
    out = tmp_path / "two"
    torchrun_two(Path(__file__).with_name("_trl_dist_worker.py"),
                 [*(str(models[k]) for k in ("student", "teacher", "tokenizer")), str(out)],
                 timeout=240)
    two = torch.load(out / "params.pt")
    for name, p in one_big_batch.items():
        torch.testing.assert_close(two[name], p, rtol=1e-5, atol=1e-6, msg=name)
    fsdp = json.loads((out / "fsdp.json").read_text())
    assert fsdp["loss_rel_err"] < 1e-5 and fsdp["grad_rel_err"] < 1e-5, fsdp
    assert fsdp["sharded"] and fsdp["teacher_head_was_dtensor"], fsdp


def test_bad_arguments(models, tmp_path):
    """Refused when the trainer is built, naming the argument, not at the first loss after a
    generation: distill_options, backend, chunk_size, a temperature of 0 (TRL's own gives a bare
    ZeroDivisionError there), a dataset with no "prompt" column (TRL's: a bare KeyError)."""
    from datasets import Dataset

    with pytest.raises(TypeError, match="distill_options"):
        make(FusedDistillationTrainer, DistillationConfig, models, tmp_path,
             trainer_kwargs={"distill_options": {"divergence": "tvd"}})
    for cls, config in ((FusedDistillationTrainer, DistillationConfig),
                        (FusedServerDistillationTrainer, ServerDistillationConfig)):
        server = {} if cls is FusedDistillationTrainer else {
            "teacher": False, "teacher_model_server_url": "http://teacher:8000"}
        for kwargs, message in (({"backend": "cuda"}, r"backend must be one of \("),
                                ({"chunk_size": 0}, "chunk_size must be a positive int")):
            with pytest.raises(ValueError, match=message):
                make(cls, config, models, tmp_path, trainer_kwargs=kwargs, **server)
        with pytest.raises(ValueError, match=r"args.temperature must be a finite number > 0 .*"
                                             r"got 0.0"):
            make(cls, config, models, tmp_path, temperature=0.0, **server)
        questions = Dataset.from_list([{"question": "def f(x):", "answer": "return x"}])
        with pytest.raises(ValueError, match=r'train_dataset has no "prompt" column .*its '
                                             r"columns: \['question', 'answer'\]"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("trl.generation.vllm_client.VLLMClient", LocalTeacherClient)
                make(cls, config, models, tmp_path, trainer_kwargs={"train_dataset": questions},
                     **server)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        FusedGKDTrainer(model=load(models["student"]), chunk_size=0)  # before anything else


def test_a_lora_head_on_the_teacher_is_distilled_from_not_ignored(models, tmp_path):
    """A PEFT teacher with LoRA on lm_head: TRL 1.16's DistillationTrainer reads the base head's
    weight and ignores the adapter; fastkd's loss takes the head's effective weight, i.e. the
    teacher's real logits. The documented difference (docs/integrations.md): the two losses
    differ, fastkd's equals the objective on the teacher's own logits, TRL's the objective on
    the logits with the adapter switched off."""
    from peft import get_peft_model

    torch.manual_seed(0)
    teacher = get_peft_model(load(models["teacher"]), lora(target_modules=["lm_head"]))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    teacher.eval()
    batch = completion_batch()
    losses = {}
    for cls in (FusedDistillationTrainer, DistillationTrainer):
        trainer = make(cls, DistillationConfig, models, tmp_path / cls.__name__, teacher=False,
                       beta=0.5, trainer_kwargs={"teacher_model": teacher})
        losses[cls] = trainer.compute_loss(trainer.model.eval(), batch).item()
    student = trainer.model
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    k = batch["completion_ids"].shape[1]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
        adapted = teacher(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
        with teacher.disable_adapter():
            base = teacher(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]
    real, ignored = (jsd_loss(s, t, labels, beta=0.5).item() for t in (adapted, base))
    assert abs(real / ignored - 1) > 1e-2  # the adapter matters
    assert losses[FusedDistillationTrainer] == pytest.approx(real, rel=1e-5)
    assert losses[DistillationTrainer] == pytest.approx(ignored, rel=1e-5)


# --- FusedServerDistillationTrainer against ServerDistillationTrainer ------------------------

SERVER_CASES = [  # beta, loss_top_k, loss_add_tail, temperature (beta = 1 without the tail:
    # one token renormalized, the loss is 0 for both)
    (0.0, 1, True, 1.0), (0.0, 4, True, 2.0), (0.0, 4, False, 1.0),
    (0.5, 1, True, 2.0), (0.5, 1, False, 1.0), (1.0, 1, True, 1.0),
]


def trl_server_loss(beta, add_tail, teacher, student_log_probs, tokens, labels):
    """TRL 1.16's server loss (ServerDistillationTrainer's own methods, in the inputs' dtype)."""
    trl_self = ServerDistillationTrainer.__new__(ServerDistillationTrainer)  # the loss needs
    trl_self.beta, trl_self.loss_add_tail = beta, add_tail                   # no trainer state
    trl_self.reverse_kl_top_1_mode = "sampled"
    if beta > 0:
        return trl_self._compute_server_sparse_top_1_divergence_loss(
            teacher, student_log_probs, tokens, labels)
    return trl_self._compute_server_forward_kl_loss(teacher, student_log_probs, labels)


@pytest.mark.parametrize(("beta", "top_k", "tail", "temperature"), SERVER_CASES)
def test_server_sparse_targets_equal_trl_server_objective_fp64(beta, top_k, tail, temperature):
    """float64, the server's tensors made from random teacher logits (-inf beyond each row's
    completion, as TRL lays them out): `server_sparse_targets` + `fastkd.sparse_distill` equal
    TRL's server loss and its gradients."""
    g = torch.Generator().manual_seed(2)
    b, k, v, d = 3, 6, 47, 10
    h = torch.randn(b, k, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    t_lps = torch.log_softmax(2 * torch.randn(b, k, v, generator=g, dtype=torch.float64)
                              / temperature, -1)
    tokens = torch.randint(0, v, (b, k), generator=g)
    tokens[0, 1] = t_lps[0, 1].argmax()  # a sampled token that is the teacher's top-1
    required = torch.ones(b, k, dtype=torch.bool)
    required[1, 4:] = required[2, 2:] = False
    top = t_lps.topk(top_k, -1)
    teacher = {"topk_token_ids": top.indices.masked_fill(~required[..., None], 0),
               "topk_logprobs": top.values.masked_fill(~required[..., None], float("-inf")),
               "actual_logprobs": t_lps.gather(-1, tokens[..., None])[..., 0].masked_fill(
                   ~required, float("-inf"))}
    labels = tokens.masked_fill(~required, -100)
    expected = trl_server_loss(beta, tail, teacher, torch.log_softmax(h @ w.T / temperature, -1),
                               tokens, labels)
    ids, lps, tail_mode = server_sparse_targets(teacher, tokens, required, beta, tail)
    assert tail_mode == ("bucket" if tail else "renormalize")
    loss = fastkd.sparse_distill(h, w, ids, lps, labels, gkd_options(beta, temperature),
                                 tail=tail_mode) / required.sum()
    assert expected.item() > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for x, y in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(expected, (h, w)),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)
    if beta > 0:  # a counted token the server gave no log-probability for: TRL's error
        teacher["actual_logprobs"][0, 0] = float("-inf")
        with pytest.raises(ValueError, match="missing actual-token"):
            server_sparse_targets(teacher, tokens, required, beta, tail)


@pytest.fixture(scope="module")
def server_pair(models, tmp_path_factory):
    """Both server trainers, their teacher server a local teacher (no vLLM, no network)."""
    out = tmp_path_factory.mktemp("server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("trl.generation.vllm_client.VLLMClient", LocalTeacherClient)
        trainers = tuple(make(cls, ServerDistillationConfig, models, out / cls.__name__,
                              teacher=False, teacher_model_server_url="http://teacher:8000")
                         for cls in (FusedServerDistillationTrainer, ServerDistillationTrainer))
    teacher = load(models["teacher"]).eval()
    for trainer in trainers:
        assert isinstance(trainer.teacher_client, LocalTeacherClient)
        trainer.teacher_client.teacher = teacher
        # set by the training loop; TRL's server loss divides by it in training mode
        trainer.current_gradient_accumulation_steps = 2
    return trainers


@pytest.mark.parametrize(("beta", "top_k", "tail", "temperature"), SERVER_CASES)
def test_server_compute_loss_equals_trl_server_trainer(server_pair, beta, top_k, tail,
                                                       temperature):
    """compute_loss of both trainers on one micro-batch, fp32, the teacher's top-k
    log-probabilities from a local stand-in for the vLLM server (TRL's own formatter, TRL's own
    fetch and alignment): loss and every gradient."""
    batch = completion_batch(seed=3)
    out = []
    for trainer in server_pair:
        trainer.beta, trainer.loss_top_k, trainer.loss_add_tail = beta, top_k, tail
        trainer.temperature = temperature
        model = trainer.model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (expected, grads_t) = out
    assert expected > 1e-4
    # beta = 1 on one token + tail: a KL of ~6e-4 between two nearly equal 2-bucket
    # distributions, from terms of ~1e-2: fp32 rounding on either side is ~5e-5 of it (the
    # float64 test above holds the objective to 1e-10)
    assert abs(loss / expected - 1) < (1e-4 if beta == 1 else 1e-5), (loss, expected)
    errors = {n: relative_error(grads[n], grads_t[n]) for n in grads_t}
    assert max(errors.values()) < 1e-5, errors


# --- FusedGKDTrainer against GKDTrainer ------------------------------------------------------

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


def make_gkd(cls, models, tmp_path, dtype=torch.float32, pair=("student", "teacher"), **config):
    from datasets import Dataset

    config = {"output_dir": str(tmp_path / cls.__name__), "per_device_train_batch_size": 4,
              "max_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True,
              "bf16": False, "max_new_tokens": 3, "disable_tqdm": True, **config}
    return cls(model=load(models[pair[0]], dtype=dtype),
               teacher_model=load(models[pair[1]], dtype=dtype), args=GKDConfig(**config),
               train_dataset=Dataset.from_list(gkd_rows()), data_collator=gkd_collate,
               processing_class=AutoTokenizer.from_pretrained(models["tokenizer"]))


@pytest.mark.parametrize(("beta", "pair"), [(0.0, ("student", "teacher")),
                                            (0.5, ("cohere", "granite")),
                                            (1.0, ("student", "teacher"))])
def test_compute_loss_equals_gkd_trainer(models, tmp_path, beta, pair):
    """The trainers' own compute_loss on one batch, float64: TRL's full logits vs the fused
    loss; with heads that scale their logits (Cohere student, Granite teacher) too."""
    ours, theirs = (make_gkd(cls, models, tmp_path, torch.float64, pair, beta=beta,
                             temperature=0.7) for cls in (FusedGKDTrainer, GKDTrainer))
    batch = gkd_collate(gkd_rows())
    for num_items in (None, torch.tensor(40)):
        got = ours.compute_loss(ours.model, batch, num_items_in_batch=num_items)
        expected = theirs.compute_loss(theirs.model, batch, num_items_in_batch=num_items)
        got.backward()
        expected.backward()
        assert expected.item() > 1e-3
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    params = dict(theirs.model.named_parameters())
    for name, p in ours.model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-7, atol=1e-12, msg=name)


def test_gkd_on_policy_training_runs(models, tmp_path, monkeypatch):
    """lmbda=1: every step generates completions with the student (TRL's path), then the fused
    loss trains on them."""
    calls = []
    generate = FusedGKDTrainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        out = generate(model, inputs, generation_config)
        calls.append(out[0].shape[1] - inputs["prompts"].shape[1])
        return out

    monkeypatch.setattr(FusedGKDTrainer, "generate_on_policy_outputs", staticmethod(counted))
    trainer = make_gkd(FusedGKDTrainer, models, tmp_path, lmbda=1.0, beta=0.5, max_steps=2,
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


def test_bench_trl_peer_computes_each_case_loss():
    """`python -m bench`'s "trl" method (TRL's ChunkedDivergenceFunction) in the forward KL,
    reverse KL and JSD cases: the case's loss and gradients against the float64 spec, at an odd
    shape with a softcap, ignored tokens and a larger teacher vocabulary; skipped, with the
    reason, where it cannot compute the loss."""
    from _bench import import_bench

    methods, shapes, harness = (import_bench(m) for m in ("methods", "shapes", "harness"))
    trl_method, all_cases = methods.METHODS["trl"], shapes.cases(2.0)
    shape = shapes.Shape("odd", "odd", 37, 16, 24, 101, 103, 5.0)
    for name in ("kd", "rkl", "jsd"):
        problem = methods.Problem(all_cases[name], shape, torch.float32, torch.device("cpu"))
        assert trl_method.skip(problem) is None
        x = harness.make_inputs(problem, seed=0)
        loss = trl_method.build(problem)(x)
        grads = torch.autograd.grad(loss, (x.h_s, x.w_s))
        check = harness.compare(loss, grads, harness.fp64_reference(x, problem.opts))
        errors = [check[k] for k in ("loss_rel_diff", "dh_rel_diff", "dw_rel_diff")]
        assert check["ref_loss"] > 1e-2 and max(errors) < 1e-5, (name, check)
    for name, reason in (("distill", "divergence only"), ("sparse", "dense teacher only")):
        problem = methods.Problem(all_cases[name], shape, torch.float32, torch.device("cpu"))
        assert reason in trl_method.skip(problem)
