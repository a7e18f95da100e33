"""Several teachers in `fastkd.integrations.trl.FusedDistillationTrainer`: the shape of TRL PR
#7215 (multi-teacher on-policy distillation, MOPD; docs/integrations.md, "Several teachers").

    trainer = FusedDistillationTrainer(model=student, teacher_model={"code": a, "math": b},
                                       args=DistillationConfig(...), train_dataset=prompts)

Each row's `teacher_id` names its teacher (a dict's key, or a list's position); the generation
batch carries the rows' teachers as `teacher_index` (B,), which TRL's shuffling and splitting into
micro-batches keep with the rows. Per micro-batch, each teacher's backbone runs on its own rows
only (through its wrapper: TRL's forward redirection), and one routed fused loss takes them all:
the student's logits once per token, each teacher's head for its own tokens, TRL's objective (or
`distill_options`) with each teacher's logit scale and softcap from its own config. A sharded
teacher (FSDP) runs on every rank in every micro-batch, on one row of the rank's own when none
is routed to it, since its forward and its head's gather are collectives. teacher_weights mixes
the teachers on every token instead (every teacher on every row). Logged per teacher, as the PR
names them: `teacher_jsd/NAME` (its mean divergence over its own counted tokens; a mixture: over
every counted token) and, routed, `teacher_token_frac/NAME`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.distributed.tensor import DTensor
from trl.experimental.server_distillation import ServerDistillationTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path

from fastkd.integrations.multi_teacher import (
    TEACHER_ID,
    TeacherRouting,
    check_datasets,
    check_mixable,
)
from fastkd.models import head_weight_and_bias, logit_scale
from fastkd.multi_teacher import multi_teacher_loss
from fastkd.options import DistillOptions
from fastkd.teachers import TeacherHead

__all__ = ["ROUTE", "SeveralTeachers", "refuse_several"]

ROUTE = "teacher_index"  # a generation batch's (B,) teacher positions (TRL PR #7215's name)


class SeveralTeachers:
    """The several-teacher half of `FusedDistillationTrainer` (a mixin before TRL's
    DistillationTrainer; with one teacher every method passes through)."""

    teacher_routing: TeacherRouting | None = None
    _teacher_stats = None  # the last loss's (teacher_kd (K,), teacher_tokens (K,))
    _generation_batches = 0

    def _set_teachers(self, sources: list, routing: TeacherRouting) -> None:
        """After TRL's __init__: each row's teacher_id checked in the datasets it can read now;
        with several teachers, each loaded and prepared as TRL prepares its one."""
        check_datasets(routing, self.train_dataset, self.eval_dataset)
        if len(sources) == 1:
            return
        if self.args.teacher_model_revision is not None:
            raise ValueError("args.teacher_model_revision is ambiguous with several teachers: "
                             "give each teacher by a path or as a loaded model")
        if self._is_vlm:
            raise ValueError("several teachers take text prompts only (a multimodal batch's "
                             "images cannot be split between the teachers' rows)")
        self.teacher_model = [self._prepared_teacher(source, routing.label(k))
                              for k, source in enumerate(sources)]
        check_mixable(routing, self.model.config.get_text_config().vocab_size,
                      [self.accelerator.unwrap_model(t).get_output_embeddings()
                       for t in self.teacher_model])
        self.teacher_routing = routing

    def _prepared_teacher(self, source, label: str):
        """One teacher as TRL 1.16's DistillationTrainer loads and prepares its one (a path with
        args.teacher_model_init_kwargs; the student's vocabulary size; accelerate's eval-mode
        preparation or DeepSpeed), each error naming the teacher."""
        args = self.args
        if isinstance(source, str):
            kwargs = dict(args.teacher_model_init_kwargs or {})
            dtype = kwargs.get("dtype")
            kwargs["dtype"] = dtype if dtype in ("auto", None) else getattr(torch, dtype)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kwargs["device_map"] = None  # as TRL: distributed training needs no device_map
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            source = create_model_from_path(source, **kwargs)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(f"{label} is already instantiated: "
                             "args.teacher_model_init_kwargs applies to teachers given by path")
        vocab = source.config.get_text_config().vocab_size
        student_vocab = self.model.config.get_text_config().vocab_size
        if vocab != student_vocab:
            raise ValueError(f"{label} has vocab_size {vocab}, the student "
                             f"{student_vocab}: distillation compares the teacher's full "
                             "next-token distribution, which needs a shared vocabulary (TRL's "
                             "rule for its one teacher)")
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(source, self.accelerator)
        return self.accelerator.prepare_model(source, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        routing = self.teacher_routing
        if routing is not None and routing.routed and TEACHER_ID not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TEACHER_ID]

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """TRL's generation batch, with each row's teacher (`ROUTE`), read before generating: a
        row whose teacher_id names no teacher is a ValueError naming the batch and the row."""
        routing = self.teacher_routing
        if routing is None or not routing.routed:
            return super()._generate_and_score_completions(inputs)
        self._generation_batches += 1
        mode = "training" if self.model.training else "evaluation"
        where = f"generation batch {self._generation_batches} ({mode})"
        route = [routing.index(row.get(TEACHER_ID), f"{where}, row {i}")
                 for i, row in enumerate(inputs)]
        output = super()._generate_and_score_completions(inputs)
        output[ROUTE] = torch.tensor(route, dtype=torch.long, device=self.accelerator.device)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's, then (several teachers) each teacher's divergence and share of the tokens
        logged, summed over processes (a collective, after the wrapped forward as TRL's own)."""
        self._teacher_stats = None
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._teacher_stats is not None:
            kd, tokens = (self.accelerator.gather(x.reshape(1, -1)).sum(0)
                          for x in self._teacher_stats)
            metrics = self._metrics["train" if self.model.training else "eval"]
            total = tokens.sum().item()
            for k, name in enumerate(self.teacher_routing.names):
                count = tokens[k].item()
                metrics[f"teacher_jsd/{name}"].append(kd[k].item() / count if count else math.nan)
                if self.teacher_routing.routed:
                    metrics[f"teacher_token_frac/{name}"].append(count / total if total
                                                                 else math.nan)
        return out

    def _teacher_at(self, k: int, route, input_ids, attention_mask, width: int, cast):
        """Teacher k at the completion tokens as the loss takes it: its hidden states on its own
        rows, (n_k, D_t) (routed), or on every row, (B, width, D_t) (mixed); its head, cast as the
        single teacher's (`cast`), and its config's logit scale and softcap."""
        teacher = self.teacher_model[k]
        unwrapped = self.accelerator.unwrap_model(teacher)
        teacher.eval()
        rows = None if route is None else route == k
        has_rows = rows is None or bool(rows.any())
        sharded = self.is_fsdp_enabled or isinstance(next(unwrapped.parameters()), DTensor)
        hidden = None
        with torch.no_grad():
            if has_rows or sharded:  # sharded: every rank runs it (one row of its own at least)
                pick = slice(None) if rows is None else rows if has_rows else slice(0, 1)
                hidden = self._forward_redirection(
                    teacher, unwrapped, self._get_last_hidden_state, unwrapped, input_ids[pick],
                    attention_mask[pick], width)
            weight, bias = head_weight_and_bias(unwrapped.get_output_embeddings())
        if hidden is None:
            hidden = weight.new_empty(0, weight.shape[1])
        elif rows is not None:  # compact; a stand-in row's output is dropped
            hidden = hidden.flatten(0, 1) if has_rows else hidden.flatten(0, 1)[:0]
        weight, bias = cast(hidden, weight, bias)
        config = unwrapped.config.get_text_config()
        return TeacherHead(hidden.to(weight.device), weight.detach(),
                           None if bias is None else bias.detach(),
                           softcap=getattr(config, "final_logit_softcapping", None),
                           logit_scale=logit_scale(config))

    def _several_teachers_loss(self, unwrapped_student, inputs: dict, num_items_in_batch,
                               objective: DistillOptions, cast):
        """`_compute_loss` with several teachers: (loss, the student's entropy sum, counted
        tokens), as `fused_divergence_loss` returns them for one. objective: TRL's (or
        distill_options), its ignore_index TRL's label mask and its reduction "sum"; cast: the
        heads' dtype rule (`fastkd.integrations.trl._same_dtype`)."""
        input_ids, attention_mask, completion_ids, loss_mask, extra = (
            self._completion_batch(inputs))
        routing = self.teacher_routing
        route = inputs.get(ROUTE) if routing.routed else None
        if routing.routed and route is None:
            raise ValueError(f"several teachers are routed by the batch's {ROUTE!r} (from each "
                             f"row's {TEACHER_ID}), which this batch lacks")
        h_s, w_s, b_s, s_config = self._student_side(unwrapped_student, input_ids,
                                                     attention_mask, completion_ids, extra)
        w_s, b_s = cast(h_s, w_s, b_s)
        heads = [self._teacher_at(k, route, input_ids, attention_mask, completion_ids.size(1),
                                  cast) for k in range(len(self.teacher_model))]
        for k, head in enumerate(heads):
            if head.weight.device != w_s.device:
                raise ValueError(f"the student's lm_head is on {w_s.device} but "
                                 f"{routing.label(k)}'s on {head.weight.device}: place both on "
                                 "one device in their device_map")
        opts = dataclasses.replace(
            objective, student_softcap=getattr(s_config, "final_logit_softcapping", None),
            student_logit_scale=logit_scale(s_config), teacher_softcap=None,
            teacher_logit_scale=1.0)
        valid = loss_mask.to(w_s.device) != 0
        labels = completion_ids.to(w_s.device).long().masked_fill(~valid, opts.ignore_index)
        weights = None if routing.routed else torch.tensor(routing.weights, dtype=torch.float32,
                                                           device=w_s.device)
        out = multi_teacher_loss(h_s, w_s, heads, labels, opts,
                                 teacher_index=None if route is None else route.to(w_s.device),
                                 teacher_weights=weights, student_bias=b_s,
                                 return_components=True, backend=self.backend,
                                 chunk_size=self.chunk_size)
        self._teacher_stats = (out.teacher_kd.detach(), out.teacher_tokens)
        n_valid = valid.sum()
        if num_items_in_batch is None:
            return out.loss / n_valid.clamp(min=1), out.entropy, n_valid
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(out.loss.device)
        return out.loss / num_items_in_batch, out.entropy, n_valid


def refuse_several(trainer, teacher_model, teacher_models) -> None:
    """A ValueError for a trainer that takes one teacher (GKD) or none (a served teacher) when it
    is given a list (or a dict) of teachers, pointing to the trainers that take several."""
    if teacher_models is None and not isinstance(teacher_model, (list, tuple, dict)):
        return
    takes = ("its teacher from a server (teacher_model_server_url), not local teachers"
             if isinstance(trainer, ServerDistillationTrainer) else "one teacher")
    raise ValueError(f"{type(trainer).__name__} takes {takes}: FusedDistillationTrainer and "
                     "FusedKDTrainer take several (a list or a dict of teachers, and a "
                     "teacher_id column)")
