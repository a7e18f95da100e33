"""The teachers of a multi-teacher loss (`fastkd.fused_multi_teacher_loss`), each described by a
small frozen object that holds its tensors and the settings that belong to that teacher alone:

    TeacherHead(hidden, weight, bias=None, *, softcap=None, logit_scale=1.0)
        a resident dense model: its hidden states (..., D_t) and LM head (V_t, D_t) (under a
        process group, this rank's rows of it: vocab-parallel); its logits over the K = min(V,
        V_t) ids it shares with the student are formed per chunk, never whole
    TeacherLogprobs(ids, logprobs, *, tail="bucket")
        a cache's or a server's k (id, log-probability) slots per token, the sparse teacher

Under routing a teacher's tensors cover either every token (the student's leading shape) or only
the tokens routed to it, compact, in token order ((n_k, D_t) or (n_k, k)). The tensors are checked
by the loss, which names the teacher (`teachers[1]: ...`); the settings here, at construction.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

import torch

from fastkd.checks import choice, positive
from fastkd.reference import SPARSE_TAILS


def _shape(x) -> str:
    return tuple(x.shape).__repr__() if isinstance(x, torch.Tensor) else type(x).__name__


@dataclass(frozen=True, eq=False)
class TeacherHead:
    """A dense teacher: hidden states (..., D_t) and LM head weight (V_t, D_t), bias (V_t,) or
    None. Its logits as the loss sees them are softcap(logit_scale (h W^T + b)) (the teacher's
    own head settings: `fastkd.DistillOptions`' teacher_softcap and teacher_logit_scale, per
    teacher). The logit scale also gives a teacher a temperature of its own: p = softmax(
    logit_scale t / T) is softmax(t / T_k) at logit_scale = T / T_k."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    _: KW_ONLY
    softcap: float | None = None
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "softcap", positive("softcap", self.softcap, optional=True))
        object.__setattr__(self, "logit_scale", positive("logit_scale", self.logit_scale))

    def tensors(self) -> tuple:
        return self.hidden, self.weight, self.bias

    def __repr__(self) -> str:
        bias = "" if self.bias is None else f", bias {_shape(self.bias)}"
        return (f"TeacherHead(hidden {_shape(self.hidden)}, weight {_shape(self.weight)}{bias}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale})")


@dataclass(frozen=True, eq=False)
class TeacherLogprobs:
    """A sparse teacher: ids (..., k) integer (-1 an unused slot) and logprobs (..., k), log
    softmax(t / T) at the ids, already at the loss's temperature (the teacher's head settings
    are in them); `tail` says what the loss does with the mass outside the ids ("bucket",
    "renormalize" or "ignore": `fastkd.fused_sparse_distill_loss`)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    _: KW_ONLY
    tail: str = "bucket"

    def __post_init__(self) -> None:
        choice("tail", self.tail, SPARSE_TAILS)

    def tensors(self) -> tuple:
        return self.ids, self.logprobs

    def __repr__(self) -> str:
        return (f"TeacherLogprobs(ids {_shape(self.ids)}, logprobs {_shape(self.logprobs)}, "
                f"tail={self.tail!r})")


TEACHERS = (TeacherHead, TeacherLogprobs)


def check_teachers(teachers) -> tuple:
    """teachers as a tuple of at least one TeacherHead or TeacherLogprobs, else a TypeError or
    ValueError naming the bad entry."""
    if isinstance(teachers, (TeacherHead, TeacherLogprobs)) or not isinstance(
            teachers, (list, tuple)):
        raise TypeError("teachers must be a list or tuple of fastkd.TeacherHead and "
                        f"fastkd.TeacherLogprobs, got {type(teachers).__name__}")
    if not teachers:
        raise ValueError("teachers is empty: pass at least one teacher")
    for k, teacher in enumerate(teachers):
        if not isinstance(teacher, TEACHERS):
            raise TypeError(f"teachers[{k}] must be a fastkd.TeacherHead or "
                            f"fastkd.TeacherLogprobs, got {type(teacher).__name__}")
    return tuple(teachers)
