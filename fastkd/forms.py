"""What a teacher form supplies to the shared front-end and chunk loop (`TeacherForm`), and the
plan one call runs under (`Plan`).

A teacher form is what differs between the fused losses: how the teacher comes (a dense head's
hidden states, k sparse (id, log-probability) slots, a head split over ranks), its checks, its
spec and its row op. The forms: `fastkd.dense.DenseTeacher`, `fastkd.sparse.SparseTeacher`,
`fastkd.vocab_parallel.VocabParallelTeacher`. A new form is one small class beside them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastkd.options import DistillOptions
from fastkd.reference import Components

FORMS: dict[str, type[TeacherForm]] = {}


def register(cls):
    """Class decorator: a teacher form the custom op can rebuild from its key."""
    FORMS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Deferred:
    """A check whose verdict needs the tensors' values: `count` (a 0-dim integer tensor, > 0 if
    the check fails) is read in the front-end's one host sync; `error()` builds the exception
    (it may sync again: it runs only on failure)."""

    count: torch.Tensor
    error: Callable[[], Exception]


def accumulator_dtype(dtypes: tuple[torch.dtype, torch.dtype]) -> torch.dtype:
    """fp32 for half-precision and fp32 compute, fp64 when either model computes in fp64."""
    return torch.promote_types(torch.promote_types(*dtypes), torch.float32)


@dataclass(frozen=True)
class Plan:
    """How one call of a fused loss runs, fixed by the front-end once its inputs are checked; it
    travels whole through the Function, the chunk loop and the form's row op. Only the custom op
    `fastkd::chunk_loop` takes it apart, at its boundary (`fastkd.autograd.op_args`)."""

    form: TeacherForm
    opts: DistillOptions
    backend: str  # resolved: "torch", "triton" (or "reference", which runs no chunk loop)
    chunk: int  # tokens per chunk of the loop
    dtypes: tuple[torch.dtype, torch.dtype]  # the (student, teacher) compute dtypes
    # Whether every term's per-token values are wanted (return_components); if not, the CPU's
    # native row ops skip a term whose weight is 0 (`fastkd.cpu_rows`).
    components: bool = True

    @property
    def acc(self) -> torch.dtype:
        """The per-token values' and dW's dtype (`accumulator_dtype`)."""
        return accumulator_dtype(self.dtypes)


@dataclass(frozen=True)
class TeacherForm(ABC):
    """What a teacher form supplies to the shared front-end and chunk loop. A form is a frozen
    dataclass of its non-tensor settings; the teacher's tensors travel beside it as a tuple
    (`teacher`), so the Function and the custom op see them as tensors."""

    name: ClassVar[str]
    unused_options: ClassVar[tuple[str, ...]] = ()  # DistillOptions fields this form does not take
    reference_backend: ClassVar[bool] = True  # whether backend="reference" applies
    collective: ClassVar[bool] = False  # whether the ranks of a process group run it together
    # whether its torch row op runs natively (`fastkd.cpu_rows`: no temporaries, larger chunks)
    native_rows: ClassVar[bool] = False

    def op_key(self) -> str | None:
        """The form as the custom op's `form` string (None: run the chunk loop eagerly)."""
        return self.name

    @classmethod
    def from_op_key(cls, key: str) -> TeacherForm:
        return cls()

    @abstractmethod
    def check(self, teacher: tuple, h_s: torch.Tensor, vocab: int,
              opts: DistillOptions) -> list[Deferred]:
        """Raise a TypeError/ValueError naming the first bad teacher argument (types, shapes,
        devices); return the checks that need the values (read in the one host sync)."""

    @property
    def extra_outputs(self) -> int:
        """Per-token columns the row op writes after (loss, ce, kd, entropy), each reduced like
        them (the multi-teacher forms: each teacher's kd)."""
        return 0

    def compute_dtype(self, teacher: tuple, s_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the teacher's side of the row op (the student's if it has no GEMM)."""
        return s_dtype

    @abstractmethod
    def select(self, teacher: tuple, index: torch.Tensor) -> tuple:
        """The teacher's tensors at the tokens `index` (the chunk loop's, `row_order`)."""

    def row_order(self, teacher: tuple, ignored: torch.Tensor | None,
                  n_counted: int | None) -> torch.Tensor | None:
        """The tokens the chunk loop runs, in its order, as indices into the N tokens (None: all
        of them, in order). ignored: (N,) bool, None without labels; n_counted: the tokens not
        ignored, None when the front-end did not read it (check_labels=False: ignored tokens are
        then computed and masked). Here the counted tokens, in order: ignored ones cost nothing."""
        if ignored is None or n_counted is None or n_counted == ignored.numel():
            return None
        return torch.argsort(ignored.to(torch.uint8), stable=True)[:n_counted]

    def components(self, out: list, call) -> Components:
        """What return_components returns from the reduced per-token columns `out` (OUTPUTS,
        then `extra_outputs`) of the checked call (`fastkd.frontend.Call`)."""
        return Components(*out)

    @abstractmethod
    def width(self, teacher: tuple, vocab: int, device: torch.device) -> int:
        """Elements per token the row op holds beside the student's logits (the chunk budget)."""

    @abstractmethod
    def reference(self, teacher: tuple, h_s, w_s, b_s, labels, plan: Plan):
        """backend="reference": the plain-torch spec's `reference.Components` with full
        logits."""

    @abstractmethod
    def rows(self, teacher: tuple, labels, row_scale, out, plan: Plan, grads: bool,
             vocab: int) -> Callable[[int, int, torch.Tensor], None]:
        """The row op over one chunk: rows(i0, i1, s) writes out[i0:i1] (OUTPUTS) and, if
        grads, G = row_scale dloss/ds over the student logits s (chunk, vocab) of tokens i0:i1.
        Set-up (casts, buffers) happens once per chunk loop, here."""

    def agree(self, call):
        """A collective form's agreement of its ranks on the checked call (`fastkd.frontend.Call`,
        or the exception a rank's checks raised): the call to run, or the same error on every
        rank."""
        raise TypeError(f"{type(self).__name__} is not a collective form: its ranks do not agree")

    def student_grad(self, dh: torch.Tensor) -> torch.Tensor:
        """dL/dH_s after the chunk loop (vocab-parallel: summed over the ranks)."""
        return dh
