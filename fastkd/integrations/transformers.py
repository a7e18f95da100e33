"""`FusedKDTrainer`: a `transformers.Trainer` whose loss is fastkd's fused distillation loss.

    from fastkd.integrations.transformers import FusedKDTrainer
    trainer = FusedKDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                             train_dataset=ds,
                             distill_options=fastkd.DistillOptions(temperature=2.0))
    trainer.train()

With no teacher model it trains from a teacher cache
(`fastkd cache-teacher`): `fastkd.integrations.cache.CacheDataset` and `cache_collator` give
batches that carry the cached targets, and the loss is the sparse one (`fused_sparse_lm_loss`).

How the loss gets the hidden states and the head weights without full logits, under any wrapper:
the student's own forward runs, on every model input the batch holds (position_ids of a
padding-free `DataCollatorWithFlattening` batch included), through whatever accelerate wrapped it
in (DDP, FSDP, DeepSpeed), with its output layer's `forward` swapped for one that feeds the hidden
states it receives (B, L, D) and the layer's effective weight/bias *at that moment*
(`fastkd.models.head_weight_and_bias`: a LoRA adapter on the head included) to the fused loss, and
returns an empty (B, L, 0) tensor, plus the loss (broadcast: still empty), as the logits. Inside
the wrapped forward an FSDP- or ZeRO-3-sharded head weight is gathered (the wrapper unshards a
layer for its forward), and the loss's backward reaches the weight through the same graph ordinary
logits would. The empty logits depend on the loss, so DDP with find_unused_parameters
(transformers' default) finds the head weight used when it walks the graph from the forward's
outputs, and the returned loss adds their sum (exactly 0) so its backward runs through those
outputs, where FSDP hangs its pre-backward hooks (unshard, the final reduce-scatter callback). The
teacher runs the same way under no_grad, its output layer recording (hidden, weight, bias) —
copied when the teacher is sharded, since the gathered weight is freed after its forward.

Normalisation: the per-token losses are summed (reduction="sum") and divided by the number of
counted tokens in the whole optimizer step (all gradient-accumulation micro-batches, and all
processes when `average_tokens_across_devices`), so accumulation and data parallelism give the
gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from fastkd.checks import choice
from fastkd.integrations.cache import CACHE_COLUMNS
from fastkd.integrations.multi_teacher import (
    TEACHER_ID,
    RoutedCollator,
    check_datasets,
    check_mixable,
    load_teachers,
    several_teachers,
    teachers_at,
)
from fastkd.loss import dense_loss, sparse_loss
from fastkd.models import head_weight_and_bias, lm_head, load_teacher, with_heads
from fastkd.multi_teacher import multi_teacher_loss
from fastkd.options import DistillOptions
from fastkd.plans import TEACHER_DTYPES

try:
    from accelerate.utils import extract_model_from_parallel
    from transformers import Trainer
except ImportError as err:  # transformers.Trainer needs accelerate
    raise ImportError(
        f"fastkd.integrations.transformers needs transformers' Trainer and accelerate ({err}): "
        "pip install fastkd[hf]"
    ) from err

__all__ = ["FusedKDTrainer", "fused_lm_loss", "fused_sparse_lm_loss", "model_inputs",
           "output_layer", "shifted_labels"]


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/FSDP/DeepSpeed/torch.compile wrappers and PEFT."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module that computes `model`'s logits (its LM head), under any wrapper; an FSDP1 unit
    wrapping the head is looked through, so its unshard still runs around the head's forward."""
    head = _inner_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output layer (get_output_embeddings())")
    while hasattr(head, "_fsdp_wrapped_module"):
        head = head._fsdp_wrapped_module
    return head


@contextmanager
def _head_replaced(model: torch.nn.Module, fn: Callable) -> Iterator[torch.nn.Module]:
    """Within the block, `model`'s output layer runs `fn(layer, hidden)` instead of its forward.

    The instance attribute shadows the class's `forward`; `nn.Module.__call__` still runs the
    layer's hooks (FSDP2 / ZeRO-3 unshard) around it. A `forward` already set on the instance
    (accelerate's device hooks) is put back afterwards."""
    head = output_layer(model)
    saved = head.__dict__.get("forward")
    head.forward = types.MethodType(fn, head)
    try:
        yield head
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def shifted_labels(inputs: dict, ignore_index: int) -> torch.Tensor:
    """(B, L-1) next-token targets: `labels[:, 1:]`, or, without labels, `input_ids[:, 1:]` with
    padding (attention_mask == 0) set to ignore_index."""
    labels = inputs.get("labels")
    if labels is None:
        labels = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, ignore_index)
    return labels[:, 1:]


def model_inputs(inputs: dict) -> dict:
    """What a batch gives the models' forward: every entry but the labels, a cache's targets
    (the loss is fastkd's) and the rows' teachers (`teacher_id`), as `transformers.Trainer`
    passes them (input_ids, attention_mask, position_ids, ...)."""
    return {k: v for k, v in inputs.items()
            if k not in ("labels", TEACHER_ID) and k not in CACHE_COLUMNS}


def fused_lm_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    opts: DistillOptions,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    copy_teacher_head: bool = False,
):
    """`fastkd.distill` of `student` against `teacher` on the next-token predictions of one batch,
    with no (N, V) logits formed outside the fused loss's chunks: returns (loss, student outputs).

    inputs: the keyword arguments of both models' forward (`model_inputs(batch)`): input_ids (B, L)
    and whatever else the batch holds (attention_mask, position_ids, ...), passed as they are (no
    attention mask is made up: a padding-free batch relies on its position_ids). labels (B, L-1),
    already shifted (`shifted_labels`). The loss is reduced as `opts.reduction` says (the trainers
    pass "sum" and divide by the counted tokens themselves). The outputs' `logits` are empty,
    (B, L, 0). Both models may be wrapped (DDP, FSDP, DeepSpeed): each runs its own forward (see
    the module docstring). copy_teacher_head=True copies the teacher's head weight out of its
    forward (needed when the teacher is sharded).
    Plain-torch equivalent (full logits): `fastkd.reference.token_losses(student(**inputs).logits[:,
    :-1], teacher(**inputs).logits[:, :-1], labels, opts)` reduced over tokens whose label is
    counted.
    """
    input_ids = inputs["input_ids"]
    expected = (input_ids.shape[0], input_ids.shape[1] - 1)
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels must be shifted, shape {expected} for input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    inputs = {**inputs, "use_cache": False}
    seen = []

    def teacher_head(head, hidden):
        weight, bias = head_weight_and_bias(head)
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        if copy_teacher_head:  # sharded: the gathered weight is freed after the forward
            weight, bias = weight.clone(), None if bias is None else bias.clone()
        seen.append((hidden, weight, bias))
        return hidden[..., :0]

    with torch.no_grad(), _head_replaced(teacher, teacher_head):
        teacher(**inputs)
    _check_calls("teacher", seen, input_ids)
    h_t, w_t, b_t = seen.pop()
    h_t = h_t[:, :-1]

    return _student_loss(student, inputs, lambda hidden, weight, bias: dense_loss(
        hidden, weight, h_t, w_t, labels, opts, student_bias=bias, teacher_bias=b_t,
        backend=backend, chunk_size=chunk_size))


def fused_sparse_lm_loss(
    student: torch.nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    opts: DistillOptions,
    *,
    tail: str = "bucket",
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """`fastkd.sparse_distill` of `student` against a teacher's cached targets on one batch, as
    `fused_lm_loss` without the teacher's forward: (loss, student outputs). teacher_ids,
    teacher_logprobs (B, L-1, k): the teacher's (id, log-probability) pairs at each next-token
    position (-1: an unused slot), at opts.temperature. Plain-torch equivalent:
    `fastkd.reference.sparse_distill_loss` on `student(**inputs).logits[:, :-1]`."""
    input_ids = inputs["input_ids"]
    expected = (input_ids.shape[0], input_ids.shape[1] - 1)
    if tuple(labels.shape) != expected or tuple(teacher_ids.shape[:-1]) != expected:
        raise ValueError(f"labels {tuple(labels.shape)} and teacher_ids "
                         f"{tuple(teacher_ids.shape)} must cover the {expected} next-token "
                         f"positions of input_ids {tuple(input_ids.shape)}")
    return _student_loss(student, {**inputs, "use_cache": False},
                         lambda hidden, weight, bias: sparse_loss(
                             hidden, weight, teacher_ids, teacher_logprobs, labels, opts,
                             tail=tail, student_bias=bias, backend=backend,
                             chunk_size=chunk_size))


def _student_loss(student: torch.nn.Module, inputs: dict, loss_of: Callable):
    """The student's forward on `inputs` with its output layer swapped for
    loss_of(hidden (B, L-1, D), weight, bias): (loss, outputs), outputs' logits empty."""
    seen = []

    def student_head(head, hidden):
        weight, bias = head_weight_and_bias(head)  # differentiable: a LoRA head's A and B get dW
        loss = loss_of(hidden[:, :-1], weight, bias)
        seen.append((hidden, loss))
        # Empty logits (B, L, 0) that depend on the loss: a wrapper that walks the graph from
        # the forward's outputs (DDP with find_unused_parameters, FSDP's hooks) finds the head.
        return hidden[..., :0] + loss.to(hidden.dtype)

    with _head_replaced(student, student_head):
        outputs = student(**inputs)
    _check_calls("student", seen, inputs["input_ids"])
    loss = seen.pop()[1]
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    # + 0, exactly, but the backward then runs through the model's outputs, where DDP and FSDP
    # hang their hooks
    return loss + logits.sum(), outputs


def _check_calls(role: str, seen: list, input_ids: torch.Tensor) -> None:
    if len(seen) != 1:
        raise ValueError(f"the {role} model's forward called its output layer {len(seen)} times "
                         "(expected once): fastkd cannot take the hidden states from it")
    hidden = seen[0][0]
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"the {role} model's output layer got hidden states of shape "
                         f"{tuple(hidden.shape)}, expected ({tuple(input_ids.shape)}, D)")


class FusedKDTrainer(Trainer):
    """`transformers.Trainer` for distillation: the student (`model`) learns from `teacher_model`
    through fastkd's fused loss, per counted token

        ce_weight * CE(student, label) + kd_weight * T**2 * D(teacher || student)

    (`distill_options`, a `fastkd.DistillOptions`; its reduction is replaced: the trainer sums and
    divides by the counted tokens of the whole optimizer step). Next-token shift: position i
    predicts label i+1; without a `labels` column, the labels are the input ids with padding
    ignored. The student's and teacher's softcaps and logit scales (Cohere, Granite, ...) come
    from their configs (`fastkd.models.lm_head`, whose probe checks them against each model's
    own forward).

    teacher_model: a causal LM (or a path / hub id) sharing the student's tokenizer; it is moved to
    the student's device, frozen and cast to teacher_dtype ("bfloat16", torch.bfloat16, ...; None
    keeps its dtype: `fastkd.models.load_teacher`). It is not wrapped by accelerate: each process
    holds the whole teacher. backend, chunk_size: as in `fastkd.fused_distill_loss`.

    teacher_model=None: from a teacher cache, no teacher loaded: train_dataset must be a
    `fastkd.integrations.cache.CacheDataset` (with `cache_collator`), whose batches carry the
    cached targets (teacher_ids, teacher_logprobs), and the loss is `fused_sparse_lm_loss` with
    cache_tail (default: the cache's own, `fastkd.cache.default_tail`);
    distill_options.temperature must be the cache's.

    Every input the collator gives (input_ids, attention_mask, position_ids, ...) goes to both
    models' forward, as `transformers.Trainer` passes them, so padding-free packing
    (`DataCollatorWithFlattening`) keeps its sequence boundaries. A LoRA adapter on the student's
    output layer trains (`fastkd.models.head_weight_and_bias`).

    Evaluation reports the loss only: no logits are ever formed, so a `compute_metrics` is never
    called (a warning says so). Label smoothing and `compute_loss_func` are refused (the loss is
    fastkd's).

    Several teachers (`fastkd.integrations.multi_teacher`): teacher_model a list of them (or a
    dict {name: model or path}; `teacher_models=`, TRL PR #7215's name, takes the same), each
    loaded, placed and checked as the one teacher is. Each row names its teacher in a
    `teacher_id` column (its position in the list, or its name): every row's tokens distil from
    that teacher alone, each teacher's model runs on its own rows only, and one routed fused loss
    takes the batch; the data collator is wrapped to keep each row's teacher (`RoutedCollator`:
    a packing collator's rows keep theirs per token). teacher_weights (K weights summing to 1,
    up to 4 teachers) mixes them on every token instead: sum_k w_k D(p_k || q). A list of one is
    the single-teacher trainer. `self.teacher_model` is then the list of teachers.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the counted tokens of the whole step
    teacher_routing = None  # several teachers: a `TeacherRouting`; one: None

    def __init__(self, model=None, teacher_model=None, args=None, *,
                 distill_options: DistillOptions | None = None,
                 teacher_dtype: torch.dtype | str | None = None, backend: str = "auto",
                 chunk_size: int | None = None, cache_tail: str | None = None,
                 teacher_models=None, teacher_weights=None, **kwargs):
        opts = DistillOptions() if distill_options is None else distill_options
        if not isinstance(opts, DistillOptions):
            raise TypeError(f"distill_options must be a fastkd.DistillOptions, got "
                            f"{type(opts).__name__}")
        if isinstance(teacher_dtype, str):
            choice("teacher_dtype", teacher_dtype, TEACHER_DTYPES)
        elif teacher_dtype is not None and not isinstance(teacher_dtype, torch.dtype):
            raise TypeError(f"teacher_dtype must be a str, torch.dtype or None, got "
                            f"{type(teacher_dtype).__name__}")
        several = several_teachers(teacher_model, teacher_models, teacher_weights)
        if several is not None:  # one teacher in a list is that teacher
            teacher_model = several[0][0] if len(several[0]) == 1 else several[0]
        super().__init__(model=model, args=args, **kwargs)
        if self.label_smoother is not None:
            raise ValueError("label_smoothing_factor is not supported: the loss is fastkd's "
                             "(set ce_weight/kd_weight in distill_options)")
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func is not supported: the loss is fastkd's")
        if self.compute_metrics is not None:
            warnings.warn("FusedKDTrainer never calls compute_metrics: the fused loss forms no "
                          "logits, so evaluation reports eval_loss only", UserWarning,
                          stacklevel=2)
        # Our loss is already normalised over the step (get_batch_samples): with this set, older
        # transformers (no loss_is_scaled_for_ga) do not divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        student = lm_head(_inner_model(self.model), "student")
        self.backend, self.chunk_size, self.cache_tail = backend, chunk_size, None
        if several is not None:
            check_datasets(several[1], self.train_dataset, self.eval_dataset)
        if teacher_model is None:  # from a teacher cache: its targets come with the batches
            self.teacher_model = None
            self.cache_tail = _cache_tail(self.train_dataset, opts, cache_tail)
            # the cached log-probabilities already hold the teacher's logit scale and softcap
            self.distill_options = with_heads(dataclasses.replace(opts, reduction="sum"),
                                              student)
            return
        if cache_tail is not None:
            raise ValueError("cache_tail applies to training from a teacher cache "
                             "(teacher_model=None)")
        if isinstance(teacher_model, list):  # several teachers, each its own head settings
            self.teacher_model = load_teachers(*several, self.args.device, teacher_dtype)
            check_mixable(several[1], student.vocab_size,
                          [t.get_output_embeddings() for t in self.teacher_model])
            self.teacher_routing = several[1]
            self.distill_options = with_heads(dataclasses.replace(
                opts, reduction="sum", teacher_softcap=None, teacher_logit_scale=1.0), student)
            if self.teacher_routing.routed:
                self.data_collator = RoutedCollator(self.data_collator, self.teacher_routing)
            return
        teacher = load_teacher(teacher_model, teacher_dtype, self.args.device)
        self.teacher_model = teacher.model
        self.distill_options = with_heads(dataclasses.replace(opts, reduction="sum"), student,
                                          teacher)

    def _set_signature_columns_if_needed(self):
        """A cache's targets and the rows' teachers are batch columns the model's forward does not
        take: keep them."""
        super()._set_signature_columns_if_needed()
        if self.teacher_model is None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns,
                                                          *CACHE_COLUMNS]))
        if self.teacher_routing is not None and self.teacher_routing.routed:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, TEACHER_ID]))

    def _tokens_across_processes(self) -> bool:
        return self.args.average_tokens_across_devices and self.args.world_size > 1

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and its number of counted (shifted, not ignored) tokens, summed
        over processes when `average_tokens_across_devices`: what compute_loss divides by."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        ignore = self.distill_options.ignore_index
        count = sum(int((shifted_labels(b, ignore) != ignore).sum()) for b in batches)
        count = torch.tensor(count, device=device)
        if self._tokens_across_processes():
            count = self.accelerator.gather(count).sum()  # a collective: every process counts
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Summed fused loss over the batch's counted tokens, divided by num_items_in_batch (the
        step's count, from get_batch_samples) in training, by the batch's own count otherwise."""
        opts = self.distill_options
        labels = shifted_labels(inputs, opts.ignore_index)
        if self.teacher_routing is not None:  # several teachers: routed or mixed
            batch = model_inputs(inputs)
            heads, index, weights = teachers_at(self.teacher_model, self.teacher_routing, batch,
                                                inputs.get(TEACHER_ID))
            loss, outputs = _student_loss(model, {**batch, "use_cache": False},
                                          lambda hidden, weight, bias: multi_teacher_loss(
                                              hidden, weight, heads, labels, opts,
                                              teacher_index=index, teacher_weights=weights,
                                              student_bias=bias, backend=self.backend,
                                              chunk_size=self.chunk_size))
        elif self.teacher_model is None:
            missing = [c for c in CACHE_COLUMNS if c not in inputs]
            if missing:
                raise ValueError(f"FusedKDTrainer without teacher_model trains from a teacher "
                                 f"cache: its batches need {missing} (fastkd.integrations.cache:"
                                 " CacheDataset with cache_collator)")
            loss, outputs = fused_sparse_lm_loss(
                model, model_inputs(inputs), labels, inputs["teacher_ids"],
                inputs["teacher_logprobs"], opts, tail=self.cache_tail, backend=self.backend,
                chunk_size=self.chunk_size)
        else:
            self.teacher_model.eval()
            loss, outputs = fused_lm_loss(model, self.teacher_model, model_inputs(inputs), labels,
                                          opts, backend=self.backend, chunk_size=self.chunk_size)
        if num_items_in_batch is None or not model.training:
            loss = loss / (labels != opts.ignore_index).sum().clamp(min=1)
        else:
            loss = loss / torch.as_tensor(num_items_in_batch).to(loss.device).clamp(min=1)
            if self._tokens_across_processes():
                # each process divided by the global count; DDP averages gradients over processes
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, None, None): the fused loss never forms the logits metrics would need."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _cache_tail(dataset, opts: DistillOptions, tail: str | None) -> str:
    """The sparse loss's tail for training from a cache, whose temperature must be the run's."""
    from fastkd.cache import sparse_tail
    from fastkd.integrations.cache import CacheDataset

    if not isinstance(dataset, CacheDataset):
        raise TypeError("FusedKDTrainer needs teacher_model (a causal LM, path or hub id), or, to "
                        "train from a teacher cache, teacher_model=None with a "
                        "fastkd.integrations.cache.CacheDataset as train_dataset, got "
                        f"{type(dataset).__name__}")
    if opts.temperature != dataset.temperature:
        raise ValueError(f"distill_options.temperature is {opts.temperature}, the cache "
                         f"{dataset.dir}'s is {dataset.temperature}: its log-probabilities are "
                         "at that temperature")
    return sparse_tail(tail, dataset.manifest["mode"], opts.divergence)

