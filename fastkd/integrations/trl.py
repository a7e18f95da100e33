"""fastkd's fused loss inside TRL's distillation trainers (tested with TRL 1.16; `pip install
fastkd[trl]`). Each is a subclass with the same arguments and config as TRL's; only the loss
changes, to fastkd's fused one with TRL's objective exactly, but for one deliberate difference: a
teacher with a LoRA adapter on its output layer is distilled from through its effective head (its
own logits), where TRL 1.16 reads the base `lm_head.weight` and ignores the adapter.

    from fastkd.integrations.trl import FusedDistillationTrainer   # = trl.DistillationTrainer
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher,
                                       args=DistillationConfig(beta=1.0, ...),
                                       train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

- `FusedDistillationTrainer(trl.DistillationTrainer)`: fully on-policy distillation (the student
  generates every completion, HF generate or vLLM). TRL's loss is its own Triton kernel
  (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`); ours is `fastkd.distill` on the
  same hidden states and heads (`fused_divergence_loss`, a drop-in for TRL's
  `_chunked_divergence_loss`). Everything else is TRL's: generation, buffering over gradient
  accumulation, `num_items_in_batch`, the DDP/FSDP forward redirection, metrics.
- `FusedServerDistillationTrainer(trl.experimental.server_distillation.ServerDistillationTrainer)`:
  the teacher's top-k log-probabilities come from a vLLM server; the loss is
  `fastkd.sparse_distill` on them (`server_sparse_targets`).
- `FusedGKDTrainer(trl.experimental.gkd.GKDTrainer)`: GKD (on-policy with probability lmbda) with
  its full-logit generalized JSD replaced by the fused loss.

TRL's objective, read from TRL 1.16's source (`trl/trainer/distillation_trainer.py`,
`trl/kernels/chunked_divergence.py`, GKD's `generalized_jsd_loss`); `gkd_options` maps it:

- beta = 0: forward KL(teacher || student), fastkd's "forward_kl"; beta = 1: reverse
  KL(student || teacher), "reverse_kl"; 0 < beta < 1: beta KL(p || m) + (1 - beta) KL(q || m),
  m = beta p + (1 - beta) q (p teacher, q student), fastkd's "jsd" with the same beta. (beta = 0
  and 1 are special cases, not the limits of the mixture, which go to 0.)
- temperature T divides both models' logits, and the divergence is not multiplied by T**2: fastkd's
  kd_weight is 1 / T**2 (fastkd scales the KD term by T**2). DistillationTrainer's loss runs at
  `args.temperature` (also the sampling temperature); GKD's at T = 1 (its `temperature` is the
  sampling one only).
- logits: scale * (h W^T + b), then softcap c tanh(x / c), then / T; scale and c from each model's
  text config (`fastkd.models.logit_scale`: logit_scale, output_multiplier, lm_head_multiplier,
  1 / logits_scaling; `final_logit_softcapping`), fastkd's own DistillOptions fields
  (student/teacher_logit_scale, student/teacher_softcap), in the same order.
- no cross-entropy term (ce_weight = 0); the completion mask (times the tool mask) selects tokens.
- reduction: per-token divergences summed over the selected tokens, divided by
  `num_items_in_batch` when given, else by the local count.
- logged metrics: TRL's, the student's mean entropy at T ("entropy") included: the fused loss's
  own (`return_components=True`'s `.entropy`, from the row statistics it keeps; no extra pass).

A `distill_options` (a `fastkd.DistillOptions`) replaces that objective with fastkd's own (other
divergences, CE mixing on the completion tokens): off by default.

FusedGKDTrainer's one deliberate difference: with several processes and
`average_tokens_across_devices` the loss is multiplied by the number of processes, as
`transformers.Trainer` and TRL's `SFTTrainer` do (TRL 1.16's GKD loss omits it, so its DDP gradient
is the big batch's divided by the world size). DistillationTrainer does it right already (it
divides `num_items_in_batch` by the number of processes) and ours inherits it.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch

from fastkd.checks import choice, positive_int
from fastkd.loss import dense_loss, sparse_loss
from fastkd.models import head_weight_and_bias, lm_head, logit_scale, with_heads
from fastkd.options import BACKENDS, DistillOptions

try:
    import trl.trainer.distillation_trainer as _trl_distillation
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.server_distillation import (
        ServerDistillationConfig,
        ServerDistillationTrainer,
    )

    from fastkd.integrations.multi_teacher import several_teachers
    from fastkd.integrations.transformers import _inner_model, fused_lm_loss
    from fastkd.integrations.trl_teachers import SeveralTeachers, refuse_several
except ImportError as err:
    raise ImportError(
        f"fastkd.integrations.trl needs TRL 1.16 (trl.DistillationTrainer, "
        f"trl.experimental.gkd.GKDTrainer) and accelerate ({err}): pip install fastkd[trl]"
    ) from err

__all__ = [
    "DistillationConfig",
    "FusedDistillationTrainer",
    "FusedGKDTrainer",
    "FusedServerDistillationTrainer",
    "GKDConfig",
    "ServerDistillationConfig",
    "fused_divergence_loss",
    "gkd_options",
    "server_sparse_targets",
]

IGNORE_INDEX = -100  # TRL's label mask
# The multimodal fields TRL's DistillationTrainer forwards to both backbones (TRL 1.16)
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def gkd_options(beta: float, temperature: float = 1.0) -> DistillOptions:
    """fastkd options whose summed loss equals the sum of TRL's per-token generalized JSD (beta,
    temperature; see the module docstring) over the unmasked tokens."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (TRL's convention), got {beta}")
    divergence = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    return DistillOptions(
        temperature=temperature, ce_weight=0.0, kd_weight=1.0 / temperature**2,
        divergence=divergence, beta=beta if divergence == "jsd" else 0.5,
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def _same_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Outside autocast, the head in the hidden states' dtype, as TRL's kernel computes (an FSDP2
    mixed-precision teacher gathers its fp32 master weight)."""
    if torch.is_autocast_enabled(hidden.device.type) or weight.dtype == hidden.dtype:
        return weight, bias
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def fused_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    options: DistillOptions | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's `_chunked_divergence_loss` (same arguments, same returns) on fastkd's fused loss.

    student_hidden_states (B, K, D_s), teacher_hidden_states (B, K, D_t): the backbones' outputs
    aligned to the completion tokens; heads (V, D_s) / (V, D_t) with optional (V,) biases;
    completion_mask (B, K), nonzero where a token counts. Returns (loss, sum of the student's
    per-token entropy at T, number of counted tokens), the loss the summed divergence divided by
    num_items_in_batch, else by the count (clamped to 1). Gradients reach the student's hidden
    states, weight and bias.

    The logit scales and softcaps are the loss's own options (`DistillOptions`'
    student/teacher_logit_scale and _softcap: scale, then softcap, then T, as TRL), and the
    entropy is the loss's `return_components` entropy (summed over the counted tokens).

    options: a `fastkd.DistillOptions` replacing TRL's objective (its reduction, ignore_index,
    logit scales and softcaps are set here); labels (B, K), the completion token ids, are then
    needed for a CE term. backend, chunk_size: as in `fastkd.fused_distill_loss`.
    """
    valid = completion_mask != 0
    opts = dataclasses.replace(
        gkd_options(beta, temperature) if options is None else options,
        ignore_index=IGNORE_INDEX, reduction="sum",
        student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("options with ce_weight > 0 need labels (the completion token ids)")
        labels = torch.zeros_like(completion_mask, dtype=torch.long)
    labels = labels.long().masked_fill(~valid, IGNORE_INDEX)
    w_s, b_s = _same_dtype(student_hidden_states, student_lm_head_weight, student_lm_head_bias)
    w_t, b_t = _same_dtype(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias)
    out = dense_loss(student_hidden_states, w_s, teacher_hidden_states.detach(), w_t.detach(),
                     labels, opts, student_bias=b_s,
                     teacher_bias=None if b_t is None else b_t.detach(), return_components=True,
                     backend=backend, chunk_size=chunk_size)
    loss, entropy_sum = out.loss, out.entropy
    n_valid = valid.sum()
    if num_items_in_batch is None:
        return loss / n_valid.clamp(min=1), entropy_sum, n_valid
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, entropy_sum, n_valid


@contextmanager
def _lora_head_allowed():
    """TRL refuses a PEFT adapter on lm_head, since its loss reads `lm_head.weight` and the adapter
    would never train; fastkd's reads the effective weight (`head_weight_and_bias`), so that one
    check is lifted while TRL's __init__ runs (its prompt-learning check stays)."""
    saved = getattr(_trl_distillation, "BaseTunerLayer", None)
    if saved is None:  # no PEFT installed: nothing to lift
        yield
        return
    _trl_distillation.BaseTunerLayer = type("_NoTunerLayer", (), {})
    try:
        yield
    finally:
        _trl_distillation.BaseTunerLayer = saved


def _check_distill_options(distill_options) -> None:
    if distill_options is not None and not isinstance(distill_options, DistillOptions):
        raise TypeError(f"distill_options must be a fastkd.DistillOptions or None, got "
                        f"{type(distill_options).__name__}")


def _check_loss_arguments(backend, chunk_size, args) -> None:
    """What the fused loss is given, checked when the trainer is built (not at the first loss,
    after a generation): backend, chunk_size, and the temperature that divides both models'
    logits (TRL's loss too: 0 is a bare ZeroDivisionError there)."""
    choice("backend", backend, BACKENDS)
    positive_int("chunk_size", chunk_size, optional=True)
    temperature = getattr(args, "temperature", 1.0)
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float))
                                             and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"args.temperature must be a finite number > 0 (the loss divides both "
                         f"models' logits by it), got {temperature!r}")


def _check_prompts(trainer) -> None:
    """TRL's on-policy trainers generate from each row's "prompt": a dataset without one is
    refused when the trainer is built, naming the columns it has (TRL's own fails at the first
    step with a bare KeyError)."""
    named = {"train_dataset": trainer.train_dataset}
    evals = trainer.eval_dataset
    named.update({f"eval_dataset[{k!r}]": v for k, v in evals.items()} if isinstance(evals, dict)
                 else {"eval_dataset": evals})
    for name, dataset in named.items():
        columns = getattr(dataset, "column_names", None)  # None: a dataset that does not say
        if columns is not None and "prompt" not in columns:
            raise ValueError(f"{name} has no \"prompt\" column (the trainer generates the "
                             f"completions from it); its columns: {list(columns)}. Rename the "
                             "one that holds the prompts: dataset.rename_column(NAME, \"prompt\")")


class _FusedHeads:
    """What both fused TRL trainers share: the construction checks and the student's completion
    hidden states with its effective head."""

    def _check_fused(self) -> None:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and getattr(plugin, "zero_stage", 0) == 3:
            raise ValueError(f"{type(self).__name__} does not support DeepSpeed ZeRO-3 (its "
                             "sharded lm_head is not gathered for fastkd's loss); use FSDP2 or "
                             "ZeRO-2")
        # An adapter on the head that one (weight, bias) cannot express is refused now, not at
        # the first step
        head_weight_and_bias(self.accelerator.unwrap_model(self.model).get_output_embeddings())

    def _completion_batch(self, inputs: dict):
        """(input_ids, attention_mask, completion ids, loss mask, multimodal fields) of one
        micro-batch of TRL's on-policy layout (left-padded prompts, right-padded completions)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        extra = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}
        return input_ids, attention_mask, inputs["completion_ids"], loss_mask, extra

    def _student_side(self, unwrapped_student, input_ids, attention_mask, completion_ids, extra):
        """Student hidden states at the completion tokens (B, K, D), its effective head (W, b)
        (a LoRA adapter's included), its text config."""
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask,
                                             completion_ids.size(1), **extra)
        weight, bias = head_weight_and_bias(unwrapped_student.get_output_embeddings())
        return hidden.to(weight.device), weight, bias, unwrapped_student.config.get_text_config()


class FusedDistillationTrainer(_FusedHeads, SeveralTeachers, DistillationTrainer):
    """`trl.DistillationTrainer` (TRL 1.16) whose loss is fastkd's fused loss, with TRL's objective
    (module docstring): same arguments, `trl.DistillationConfig`, logged metrics (the student's
    entropy included), generation (HF generate or vLLM), gradient accumulation, PEFT, DDP/FSDP2.

    Beyond TRL: a LoRA adapter on `lm_head` trains (TRL refuses it: its loss would ignore it);
    `distill_options` (a `fastkd.DistillOptions`, default None = TRL's objective) selects fastkd's
    other divergences or mixes in CE on the completion tokens (reduction, ignore_index and softcaps
    are then set by the trainer); backend and chunk_size as in `fastkd.fused_distill_loss`.
    DeepSpeed ZeRO-3 is refused. Several teachers (TRL PR #7215's shape): teacher_model (or
    teacher_models) a list or a dict {name: model or path} and a `teacher_id` column, or
    teacher_weights mixing them (`fastkd.integrations.trl_teachers`).
    """

    def __init__(self, model, teacher_model=None, args=None, *rest,
                 distill_options: DistillOptions | None = None, backend: str = "auto",
                 chunk_size: int | None = None, teacher_models=None, teacher_weights=None,
                 **kwargs):
        _check_distill_options(distill_options)
        _check_loss_arguments(backend, chunk_size, args)
        teachers = several_teachers(teacher_model, teacher_models, teacher_weights)
        if teachers is not None:  # one teacher in a list is that teacher; several: set below
            teacher_model = teachers[0][0] if len(teachers[0]) == 1 else None
        with _lora_head_allowed():
            super().__init__(model, teacher_model, args, *rest, **kwargs)
        self.distill_options, self.backend, self.chunk_size = distill_options, backend, chunk_size
        self._check_fused()
        _check_prompts(self)
        if teachers is not None:
            self._set_teachers(*teachers)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's `_compute_loss` (run inside the student wrapper's forward by `compute_loss`) with
        `fused_divergence_loss` for TRL's kernel: (loss, entropy sum, counted tokens)."""
        if self.teacher_routing is not None:
            objective = self.distill_options or gkd_options(self.beta, self.temperature)
            return self._several_teachers_loss(unwrapped_student, inputs, num_items_in_batch, (
                dataclasses.replace(objective, ignore_index=IGNORE_INDEX, reduction="sum")),
                _same_dtype)
        input_ids, attention_mask, completion_ids, loss_mask, extra = self._completion_batch(inputs)
        h_s, w_s, b_s, s_config = self._student_side(unwrapped_student, input_ids,
                                                     attention_mask, completion_ids, extra)
        # the teacher through its own wrapper too (FSDP/DeepSpeed gather its shards)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            h_t = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                unwrapped_teacher, input_ids, attention_mask, completion_ids.size(1), **extra)
            w_t, b_t = head_weight_and_bias(unwrapped_teacher.get_output_embeddings())
        if w_s.device != w_t.device:
            raise ValueError(f"the student's lm_head is on {w_s.device} but the teacher's on "
                             f"{w_t.device}: place both on one device in their device_map")
        t_config = unwrapped_teacher.config.get_text_config()
        return fused_divergence_loss(
            h_s, h_t.to(w_t.device), w_s, w_t, loss_mask.to(w_s.device), self.beta,
            num_items_in_batch, b_s, b_t, logit_scale(s_config), logit_scale(t_config),
            getattr(s_config, "final_logit_softcapping", None),
            getattr(t_config, "final_logit_softcapping", None), self.temperature,
            labels=completion_ids.to(w_s.device), options=self.distill_options,
            backend=self.backend, chunk_size=self.chunk_size)


def server_sparse_targets(teacher: dict[str, torch.Tensor], completion_tokens: torch.Tensor,
                          required: torch.Tensor, beta: float, add_tail: bool):
    """The sparse teacher of TRL 1.16's ServerDistillationTrainer loss, for `fastkd.sparse_distill`:
    (ids (B, K, k), log-probabilities (B, K, k), tail); the divergence is `gkd_options(beta)`'s.

    teacher: the server's tensors at the completion tokens, "topk_token_ids" / "topk_logprobs"
    (B, K, k) sorted, -inf where absent, and "actual_logprobs" (B, K), the sampled token's;
    completion_tokens (B, K); required (B, K) bool, the tokens that count. Supports as TRL's:

    - beta = 0: the teacher's top-k (forward KL);
    - beta = 1: the sampled token alone (reverse KL);
    - 0 < beta < 1: the teacher's top-1 and the sampled token, once if they agree (JSD, beta);

    with a tail bucket for the rest of both distributions when add_tail (`tail="bucket"`), else
    both renormalized over the support (`tail="renormalize"`). Slots with no teacher value, and
    every slot of a token that does not count, get id -1 (unused). A counted token whose sampled
    (beta > 0) or top-1 (0 < beta < 1) log-probability the server did not return raises, as TRL.
    """
    top_ids, top_lps = teacher["topk_token_ids"], teacher["topk_logprobs"]
    actual = teacher["actual_logprobs"]
    for name, lps, needed in (("actual-token", actual, beta > 0),
                              ("top-1", top_lps[..., 0], 0 < beta < 1)):
        missing = required & ~torch.isfinite(lps)
        if needed and bool(missing.any()):
            raise ValueError(f"the teacher server is missing {name} log-probabilities for "
                             f"{int(missing.sum())}/{int(required.sum())} counted positions")
    if beta == 0:
        ids, lps = top_ids, top_lps
    elif beta == 1:
        ids, lps = completion_tokens.unsqueeze(-1), actual.unsqueeze(-1)
    else:
        sampled = torch.where(completion_tokens == top_ids[..., 0], -1, completion_tokens)
        ids = torch.stack([top_ids[..., 0], sampled], -1)
        lps = torch.stack([top_lps[..., 0], actual], -1)
    used = required.unsqueeze(-1) & (ids >= 0) & (lps > float("-inf"))
    ids = torch.where(used, ids, -1)
    lps = torch.where(used, lps, 0.0)
    return ids, lps, "bucket" if add_tail else "renormalize"


class FusedServerDistillationTrainer(_FusedHeads, ServerDistillationTrainer):
    """`trl.experimental.server_distillation.ServerDistillationTrainer` (TRL 1.16) whose loss is
    fastkd's fused sparse loss (`fastkd.sparse_distill`) on the teacher server's top-k
    log-probabilities (`server_sparse_targets`: `loss_add_tail` -> tail="bucket", else
    "renormalize"), with TRL's server objective: the student's log-probabilities at temperature T
    (logit scale and softcap from its config), no T**2, the per-token divergences' mean over the
    micro-batch's completion tokens divided by the gradient-accumulation steps in training (TRL's
    server path does not use num_items_in_batch). Same arguments and `ServerDistillationConfig`;
    the server fetch and alignment are TRL's. A LoRA adapter on `lm_head` trains.
    backend, chunk_size: as in `fastkd.fused_sparse_distill_loss`.
    """

    def __init__(self, model, args=None, *rest, backend: str = "auto",
                 chunk_size: int | None = None, **kwargs):
        _check_loss_arguments(backend, chunk_size, args)
        refuse_several(self, kwargs.get("teacher_model"), kwargs.get("teacher_models"))
        with _lora_head_allowed():
            super().__init__(model, args, *rest, **kwargs)
        self.backend, self.chunk_size = backend, chunk_size
        self._check_fused()
        _check_prompts(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        loss = self._forward_redirection(model, unwrapped, self._server_loss, unwrapped, inputs)
        if self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    def _server_teacher(self, inputs: dict, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """The server's log-probabilities at the completion tokens (B, K[, k]): TRL's fetch and
        alignment (columns from the batch's shortest prompt on), re-sliced to the completions."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        labels = torch.cat([torch.full_like(inputs["prompt_ids"], IGNORE_INDEX),
                            completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)], 1)
        layout = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask,
                  "labels": labels, "prompt_attention_mask": inputs["prompt_mask"]}
        start = self._compute_prompt_length(layout)
        result = self._get_teacher_token_logprobs_from_server(layout, start)
        # completion token c sits at column prompt width - start + c; pad beyond the window
        offset, width = inputs["prompt_ids"].shape[1] - start, completion_ids.shape[1]
        out = {}
        for key, fill in (("topk_token_ids", 0), ("topk_logprobs", float("-inf")),
                          ("actual_logprobs", float("-inf"))):
            x = result[key]
            pad = offset + width - x.shape[1]
            if pad > 0:
                x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], 1)
            out[key] = x[:, offset:offset + width]
        return out

    def _server_loss(self, unwrapped_student, inputs):
        input_ids, attention_mask, completion_ids, _, extra = self._completion_batch(inputs)
        required = inputs["completion_mask"] != 0
        teacher = self._server_teacher(inputs, input_ids, attention_mask)
        h_s, w_s, b_s, config = self._student_side(unwrapped_student, input_ids, attention_mask,
                                                   completion_ids, extra)
        ids, lps, tail = server_sparse_targets(
            teacher, completion_ids, required, self.beta, self.loss_add_tail)
        opts = dataclasses.replace(
            gkd_options(self.beta, self.temperature),
            student_softcap=getattr(config, "final_logit_softcapping", None),
            student_logit_scale=logit_scale(config))
        w_s, b_s = _same_dtype(h_s, w_s, b_s)
        labels = completion_ids.masked_fill(~required, IGNORE_INDEX).to(w_s.device)
        loss = sparse_loss(h_s, w_s, ids.to(w_s.device), lps.to(w_s.device, h_s.dtype), labels,
                           opts, tail=tail, student_bias=b_s, backend=self.backend,
                           chunk_size=self.chunk_size)
        return loss / required.sum().clamp(min=1)


class FusedGKDTrainer(GKDTrainer):
    """`trl.experimental.gkd.GKDTrainer` whose `compute_loss` runs the fused loss on the student's
    and teacher's last hidden states (no (N, V) logits), equal to TRL's own loss (module
    docstring). Same arguments as GKDTrainer, plus backend and chunk_size (as in
    `fastkd.fused_distill_loss`). The student's outputs returned with the loss have empty logits
    (B, L, 0): metrics that need logits get none.
    """

    def __init__(self, model=None, teacher_model=None, *args, backend: str = "auto",
                 chunk_size: int | None = None, **kwargs):
        # GKD's loss runs at T = 1 (its temperature only samples): backend and chunk_size
        _check_loss_arguments(backend, chunk_size, None)
        refuse_several(self, teacher_model, kwargs.get("teacher_models"))
        # The teacher's 8-token probe runs before accelerate prepares it (after that its forward
        # may autocast, or hold shards); a teacher given by name gets the config checks only.
        teacher = (lm_head(teacher_model, "teacher")
                   if isinstance(teacher_model, torch.nn.Module) else None)
        super().__init__(model, teacher_model, *args, **kwargs)
        if teacher is None:
            teacher = lm_head(_inner_model(self.teacher_model), "teacher", probe=False)
        student = lm_head(_inner_model(self.model), "student")
        self.fused_options = with_heads(gkd_options(self.beta), student, teacher)
        self.backend, self.chunk_size = backend, chunk_size
        # a sharded teacher's gathered head weight is freed after its forward: copy it out
        self._copy_teacher_head = self.is_fsdp_enabled or self.is_deepspeed_enabled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        self.teacher_model.eval()
        loss, outputs = fused_lm_loss(
            model, self.teacher_model,
            {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
            labels, self.fused_options, backend=self.backend, chunk_size=self.chunk_size,
            copy_teacher_head=self._copy_teacher_head)
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss
