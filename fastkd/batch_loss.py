"""The loss on one batch: the student's forward and the fused loss, against the teacher's forward
or against the teacher's cached targets.

`StudentLoss` and `TeacherForward` are the modules DDP and FSDP wrap (fastkd.distributed): their
forward is where FSDP gathers the parameters, so the fused loss, which needs the LM head's whole
weight, runs inside it. The student's loss never sees full logits: the fused loss takes the base
model's last hidden states and the LM head's weight, `(B, L-1, D) x (V, D)`, and streams over the
vocabulary (fastkd.loss); from a teacher cache, the sparse loss (fastkd.loss too) on the cached
(id, log-probability) pairs.

`batch_loss` feeds one batch of packed sequences (fastkd.data.Blocks, or fastkd.cache.CachedBlocks
carrying cached targets) through them; the loop (fastkd.loop) calls it for training and evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd.cache import CachedBlocks, Prefetch
from fastkd.data import Blocks
from fastkd.loss import dense_loss, sparse_loss
from fastkd.models import LMHead, head_weight_and_bias
from fastkd.multi_teacher import multi_teacher_loss
from fastkd.options import DistillOptions
from fastkd.run_teachers import TeachersBlocks


class StudentLoss(nn.Module):
    """The student's forward and the fused loss on one batch, in one module, with the run's loss
    settings: opts, backend and, training from a teacher cache, the sparse loss's tail.

    forward(inputs, labels (B, L-1), teacher=(h_t (B, L-1, D_t), w_t (V_t, D_t), b_t | None) or
    None, cached=(ids, logprobs) from a teacher cache (the sparse loss) or None) -> summed (loss,
    ce, kd). inputs: the model's keyword inputs, `Blocks.model_inputs` (input_ids (B, L) with
    attention_mask, or with position_ids for packed examples). teacher=None (hard labels only,
    kd_weight=0): the student stands in as its own detached teacher, so the KD term, weighted 0,
    adds nothing. The head's weight is looked up inside forward: under FSDP that is the
    all-gathered full tensor (tied embeddings included), and its gradient flows back to the
    shards through FSDP's reduce-scatter.
    """

    def __init__(self, student: LMHead, opts: DistillOptions, backend: str,
                 tail: str | None = None):
        super().__init__()
        self.model = student.model
        self.opts, self.backend, self.tail = opts, backend, tail

    def forward(self, inputs, labels, teacher=None, cached=None, several=None):
        h_s = self.model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        # The effective weight: W + (alpha / r) B @ A with a LoRA adapter on the output layer.
        w_s, b_s = head_weight_and_bias(self.model.get_output_embeddings())
        if several is not None:  # several teachers: (teachers, teacher_index, teacher_weights)
            heads, index, weights = several
            return multi_teacher_loss(h_s, w_s, heads, labels, self.opts, teacher_index=index,
                                      teacher_weights=weights, student_bias=b_s,
                                      return_components=True, backend=self.backend)
        if cached is not None:  # offline: (ids, logprobs) from a teacher cache
            ids, logprobs = cached
            return sparse_loss(h_s, w_s, ids, logprobs, labels, self.opts, tail=self.tail,
                               student_bias=b_s, return_components=True, backend=self.backend)
        h_t, w_t, b_t = (h_s.detach(), w_s.detach(), b_s) if teacher is None else teacher
        return dense_loss(h_s, w_s, h_t, w_t, labels, self.opts, student_bias=b_s,
                          teacher_bias=None if b_t is None else b_t.detach(),
                          return_components=True, backend=self.backend)


class TeacherForward(nn.Module):
    """forward(inputs) -> (h_t (B, L-1, D), w_t (V, D), b_t | None); inputs as StudentLoss's.

    Under FSDP the head's weight is gathered for this forward and freed right after it (the
    teacher reshards after forward, it never runs backward): the loss gets a copy.
    """

    def __init__(self, teacher: LMHead):
        super().__init__()
        self.model = teacher.model
        self.softcap, self.logit_scale = teacher.softcap, teacher.logit_scale

    def forward(self, inputs):
        h = self.model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        head = self.model.get_output_embeddings()
        w, b = head.weight, head.bias
        if _is_fsdp(self):
            w, b = w.clone(), None if b is None else b.clone()
        return h, w, b


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def batch_loss(student: StudentLoss, teacher: TeacherForward | None, batch: Blocks,
               device: torch.device, prefetch: Prefetch | None = None):
    """Summed (loss, ce, kd) over the batch's next-token predictions, through the fused loss.

    student: a StudentLoss (its options and backend), maybe wrapped in DDP or FSDP; teacher: a
    TeacherForward, or None (hard labels only, kd_weight=0: no teacher forward runs). A
    CachedBlocks batch (a teacher cache) goes through the sparse loss on its cached targets, and
    no teacher runs either; `prefetch` (fastkd.cache.Prefetch), if given, loads those targets.
    """
    inputs = batch.model_inputs(device)
    # Next-token shift: position i predicts token i + 1; what is not a target (padding, prompts,
    # non-assistant turns) is labelled ignore_index. The trainer's loss options keep
    # DistillOptions' default ignore_index.
    labels = batch.labels(DistillOptions.ignore_index).to(device, non_blocking=True)[:, 1:]
    if isinstance(batch, CachedBlocks):  # offline: the cached teacher targets, the sparse loss
        ids, logprobs = batch.targets.load() if prefetch is None else prefetch.load(batch.targets)
        return student(inputs, labels, cached=(ids.to(device), logprobs.to(device)))
    if teacher is None:
        return student(inputs, labels)
    if isinstance(batch, TeachersBlocks):  # several teachers (fastkd.run_teachers)
        return student(inputs, labels, several=teacher.heads(batch, inputs, device))
    with torch.no_grad():
        teacher_out = teacher(inputs)
    return student(inputs, labels, teacher_out)


def count_targets(batch: Blocks) -> int:
    """Next-token targets in a batch (labels after the shift that are not ignore_index); CPU
    tensors, no sync."""
    return batch.count_targets()
