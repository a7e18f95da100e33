"""The fused losses' public API: each loss as a function of keyword options, the same with the
options as one `DistillOptions` (the trainers' and integrations' entry), and a module.

    dense teacher (hidden states and LM head):  fused_distill_loss, dense_loss, FusedDistillLoss
    sparse teacher (k ids, log-probabilities):  fused_sparse_distill_loss, sparse_loss,
                                                FusedSparseDistillLoss
    several teachers (routed or mixed):         fused_multi_teacher_loss,
                                                `fastkd.multi_teacher.multi_teacher_loss`,
                                                FusedMultiTeacherLoss

Each picks its teacher form (`fastkd.dense`, `fastkd.sparse`, `fastkd.vocab_parallel`,
`fastkd.routed`, `fastkd.mixture`) and runs the shared front-end, `fastkd.frontend.fused_loss`.
The option lists in the docstrings are written from DistillOptions' fields
(`fastkd.options.option_signature`).
"""

from __future__ import annotations

import torch

from fastkd import options
from fastkd.checks import choice
from fastkd.dense import DenseTeacher
from fastkd.frontend import fused_loss
from fastkd.multi_teacher import MIXTURES, TEACHER_OPTIONS, multi_teacher_loss
from fastkd.options import BACKENDS, DistillOptions
from fastkd.sparse import SparseTeacher, check_tail
from fastkd.vocab_parallel import VocabParallelTeacher, agree


@options.option_signature()
def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    return_components: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_labels: bool = True,
    process_group=None,
    vocab_start: int = 0,
    **options_,
):
    """Distillation loss through both LM heads, without materialising the N x V logits.

    Per token, with s and t each model's logits (h W^T + b, times its logit scale, then the
    optional softcap), K = min(V, V_t), p = softmax(t[:K] / T) and q = softmax(s[:K] / T):
    loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D(p, q). The divergences, the
    edge cases and vocab-parallel heads: docs/loss.md. Plain-torch equivalent (the spec):
    `fastkd.reference.distill_loss`.

    Args:
        student_hidden: (..., D_s), fp32, fp16 or bf16 (fp64 on the torch and reference
            backends); N tokens once flattened.
        student_weight: (V, D_s), the student's LM head.
        teacher_hidden: (..., D_t), the same leading shape.
        teacher_weight: (V_t, D_t), the teacher's LM head.
        labels: (...) integer targets, or None (then ce_weight must be 0).
        student_bias, teacher_bias: (V,) and (V_t,), or None.
        return_components: return a `fastkd.Components` (below) instead of the loss alone.
        backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton", "torch" or
            "reference" (the spec, full logits).
        chunk_size: tokens per chunk (None: from a memory budget).
        check_labels: False skips the one host sync (the label-range check and the count of
            ignored tokens, which are then computed and masked), so the loss fits in
            torch.compile(fullgraph=True); labels are then the caller's promise.
        process_group, vocab_start: vocab-parallel heads: each rank of the group passes the same
            tokens and its own rows of both heads, starting at vocab_start.
        **options: the loss's options (`fastkd.DistillOptions`), keyword-only:

    Returns:
        The loss: a scalar, or the leading shape for reduction="none". With return_components,
        a `fastkd.Components` that unpacks as (loss, ce, kd) (reduced, unweighted, detached, kd
        without T**2) and carries `.entropy`, the student's entropy at T over the shared ids.
        Gradients reach the student's tensors only.
    """
    try:
        opts = options.from_kwargs("fused_distill_loss", options_)
    except (TypeError, ValueError) as error:
        if process_group is None:
            raise
        agree(process_group, error)  # the other ranks are in their agreement: raise everywhere
    return dense_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts,
        student_bias=student_bias, teacher_bias=teacher_bias,
        return_components=return_components, backend=backend, chunk_size=chunk_size,
        check_labels=check_labels, process_group=process_group, vocab_start=vocab_start,
    )


def dense_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts: DistillOptions, *,
    student_bias=None, teacher_bias=None, return_components=False, backend="auto", chunk_size=None,
    check_labels=True, process_group=None, vocab_start=0,
):
    """`fused_distill_loss` with the options as one `DistillOptions` (public as
    `fastkd.distill`)."""
    if process_group is not None:
        form = VocabParallelTeacher(process_group, vocab_start)
    elif vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start!r} needs a process_group (vocab-parallel)")
    else:
        form = DenseTeacher()
    return fused_loss(form, (student_hidden, student_weight, student_bias),
                      (teacher_hidden, teacher_weight, teacher_bias), labels, opts,
                      backend=backend, chunk_size=chunk_size, check_labels=check_labels,
                      return_components=return_components)


class FusedDistillLoss(torch.nn.Module):
    """Module form of `fused_distill_loss`: options fixed at construction (keyword-only),
    tensors at call time.

    >>> crit = FusedDistillLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    >>> loss = crit(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    """

    @options.option_signature()
    def __init__(self, *, return_components: bool = False, backend: str = "auto",
                 chunk_size: int | None = None, check_labels: bool = True, process_group=None,
                 **options_):
        """The options, fixed for every call.

        Args:
            return_components, backend, chunk_size, check_labels, process_group: as
                `fused_distill_loss`'s.
            **options: the loss's options (`fastkd.DistillOptions`):
        """
        super().__init__()
        self.options = options.from_kwargs("FusedDistillLoss", options_)
        self.backend = choice("backend", backend, BACKENDS)
        self.return_components = return_components
        self.chunk_size = chunk_size
        self.check_labels = check_labels
        self.process_group = process_group

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, vocab_start=0):
        return dense_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                          self.options, student_bias=student_bias, teacher_bias=teacher_bias,
                          return_components=self.return_components, backend=self.backend,
                          chunk_size=self.chunk_size, check_labels=self.check_labels,
                          process_group=self.process_group, vocab_start=vocab_start)

    def extra_repr(self) -> str:
        return f"{self.options}, backend={self.backend!r}"


@options.option_signature(unused=SparseTeacher.unused_options)
def fused_sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tail: str = "bucket",
    student_bias: torch.Tensor | None = None,
    return_components: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_labels: bool = True,
    **options_,
):
    """Distillation loss from a sparse teacher (k ids and log-probabilities per token, e.g. from a
    teacher cache) through the student's LM head, without materialising the N x V logits.

    Per token, with s the student's logits, q = softmax(s / T) over the full vocabulary, p_k the
    teacher's probabilities at its ids, P = sum_k p_k and Q = sum_k q_id_k:
    loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D, with D by `tail`: "bucket",
    between (p_1..p_k, 1 - P) and (q_id_1..q_id_k, 1 - Q); "renormalize", between p / P and
    q / Q over the k ids; "ignore" (forward_kl only, sampled targets: duplicate ids add up),
    sum_k p_k (log p_k - log q_id_k). docs/offline.md has the details; plain-torch equivalent:
    `fastkd.reference.sparse_distill_loss`.

    Args:
        student_hidden: (..., D), fp32, fp16 or bf16 (fp64 on the torch and reference
            backends); N tokens once flattened.
        student_weight: (V, D), the student's LM head.
        teacher_ids: (..., k) integer (signed or not), in [0, V), or -1 for an unused slot.
        teacher_logprobs: (..., k) float, log softmax(t / T) at the ids (already at T).
        labels: (...) integer targets, or None (then ce_weight must be 0).
        tail: "bucket", "renormalize" or "ignore" (above).
        student_bias: (V,) or None.
        return_components, backend, chunk_size, check_labels: as `fused_distill_loss`'s. The
            host sync also checks the ids (range, duplicates) and the log-probabilities (sign,
            and a token's mass: sum(exp(teacher_logprobs)) <= 1 up to their dtype's rounding).
        **options: the loss's options (`fastkd.DistillOptions`) but the teacher's softcap and
            logit scale (its log-probabilities include them), keyword-only:

    Returns:
        As `fused_distill_loss`; the entropy is that of q over the full vocabulary.
    """
    opts = options.from_kwargs("fused_sparse_distill_loss", options_,
                               SparseTeacher.unused_options)
    return sparse_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                       opts, tail=tail, student_bias=student_bias,
                       return_components=return_components, backend=backend,
                       chunk_size=chunk_size, check_labels=check_labels)


def sparse_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                opts: DistillOptions, *, tail="bucket", student_bias=None,
                return_components=False, backend="auto", chunk_size=None, check_labels=True):
    """`fused_sparse_distill_loss` with the options as one `DistillOptions` (public as
    `fastkd.sparse_distill`); opts.teacher_softcap and teacher_logit_scale are unused."""
    return fused_loss(SparseTeacher(tail), (student_hidden, student_weight, student_bias),
                      (teacher_ids, teacher_logprobs), labels, opts, backend=backend,
                      chunk_size=chunk_size, check_labels=check_labels,
                      return_components=return_components)


class FusedSparseDistillLoss(torch.nn.Module):
    """Module form of `fused_sparse_distill_loss`: options fixed at construction (keyword-only).

    >>> crit = FusedSparseDistillLoss(temperature=2.0, tail="bucket")
    >>> loss = crit(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels)
    """

    @options.option_signature(unused=SparseTeacher.unused_options)
    def __init__(self, *, tail: str = "bucket", return_components: bool = False,
                 backend: str = "auto", chunk_size: int | None = None, check_labels: bool = True,
                 **options_):
        """The options, fixed for every call.

        Args:
            tail, return_components, backend, chunk_size, check_labels: as
                `fused_sparse_distill_loss`'s.
            **options: the loss's options (`fastkd.DistillOptions`) but the teacher's:
        """
        super().__init__()
        self.options = options.from_kwargs("FusedSparseDistillLoss", options_,
                                           SparseTeacher.unused_options)
        check_tail(tail, self.options.divergence)
        self.backend = choice("backend", backend, BACKENDS)
        self.tail = tail
        self.return_components = return_components
        self.chunk_size = chunk_size
        self.check_labels = check_labels

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None,
                student_bias=None):
        return sparse_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                           self.options, tail=self.tail, student_bias=student_bias,
                           return_components=self.return_components, backend=self.backend,
                           chunk_size=self.chunk_size, check_labels=self.check_labels)

    def extra_repr(self) -> str:
        return f"{self.options}, tail={self.tail!r}, backend={self.backend!r}"


@options.option_signature(unused=TEACHER_OPTIONS)
def fused_multi_teacher_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teachers,
    labels: torch.Tensor | None = None,
    *,
    teacher_index: torch.Tensor | None = None,
    teacher_weights: torch.Tensor | None = None,
    mixture: str = "divergences",
    student_bias: torch.Tensor | None = None,
    return_components: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_labels: bool = True,
    process_group=None,
    vocab_start: int = 0,
    **options_,
):
    """Distillation from several teachers in one fused pass, without the N x V logits: each token
    routed to one teacher (teacher_index), or every token against a weighted mixture of up to 4
    dense teachers (teacher_weights).

    Per token, loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D, with D: routed,
    the single-teacher divergence to the token's teacher k (`fused_distill_loss` for a
    `fastkd.TeacherHead`, `fused_sparse_distill_loss` for a `fastkd.TeacherLogprobs`); mixed,
    sum_k w_k D(p_k || q) ("divergences", every divergence) or KL(sum_k w_k p_k || q)
    ("ensemble", forward_kl; the same gradient as "divergences" there). One chunk loop: the
    student's logits once per token, each token paying its own teachers' FLOPs only. A single
    teacher without either argument is the single-teacher loss, bit for bit. docs/loss.md
    ("Several teachers"); plain-torch equivalent: `fastkd.reference_multi`.

    Args:
        student_hidden: (..., D_s), fp32, fp16 or bf16 (fp64 on the torch and reference
            backends); N tokens once flattened.
        student_weight: (V, D_s), the student's LM head.
        teachers: a list of K `fastkd.TeacherHead` (hidden (..., D_t), weight (V_t, D_t), bias,
            its own softcap and logit_scale) and `fastkd.TeacherLogprobs` (ids, logprobs (...,
            k), its tail). Routed, a teacher's tensors cover every token (the leading shape) or
            only its own tokens in token order ((n_k, D_t), (n_k, k)).
        labels: (...) integer targets, or None (then ce_weight must be 0).
        teacher_index: integer, the leading shape (a teacher per token) or (B,) for (B, L, D_s)
            hidden states (a teacher per row); values in [0, K).
        teacher_weights: (K,) (every token alike) or the leading shape + (K,), >= 0, summing to
            1 over the teachers at every token (within K eps of their dtype, at least fp32's).
        mixture: "divergences" or "ensemble" (with teacher_weights).
        student_bias: (V,) or None.
        return_components, backend, chunk_size, check_labels: as `fused_distill_loss`'s. The
            host sync also checks teacher_index's range, compact teachers' row counts and the
            weights; check_labels=False makes them the caller's promise too.
        process_group, vocab_start: vocab-parallel heads (routing, TeacherHeads only): each rank
            passes the same tokens and its rows of every head, from vocab_start.
        **options: the loss's options (`fastkd.DistillOptions`) but the teacher's softcap and
            logit scale (per teacher, on its TeacherHead), keyword-only:

    Returns:
        The loss: a scalar, or the leading shape for reduction="none". With return_components,
        a `fastkd.TeacherComponents`: the `fastkd.Components` of `fused_distill_loss` (kd the
        routed or mixed D) plus .teacher_kd, each teacher's D(p_k || q) (without T**2) over the
        counted tokens routed to it (routing) or every counted token (mixtures): (K,), each
        teacher's mean (or sum), or the leading shape + (K,) for "none"; and .teacher_tokens
        (K,), the counted tokens each covers.
    """
    try:
        opts = options.from_kwargs("fused_multi_teacher_loss", options_, TEACHER_OPTIONS)
    except (TypeError, ValueError) as error:
        if process_group is None:
            raise
        agree(process_group, error)  # the other ranks are in their agreement: raise everywhere
    return multi_teacher_loss(
        student_hidden, student_weight, teachers, labels, opts, teacher_index=teacher_index,
        teacher_weights=teacher_weights, mixture=mixture, student_bias=student_bias,
        return_components=return_components, backend=backend, chunk_size=chunk_size,
        check_labels=check_labels, process_group=process_group, vocab_start=vocab_start)


class FusedMultiTeacherLoss(torch.nn.Module):
    """Module form of `fused_multi_teacher_loss`: options fixed at construction (keyword-only),
    tensors, teachers and their routing or weights at call time.

    >>> crit = FusedMultiTeacherLoss(temperature=2.0, divergence="reverse_kl")
    >>> loss = crit(student_hidden, student_weight, [TeacherHead(h_a, w_a),
    ...             TeacherLogprobs(ids_b, logprobs_b)], labels, teacher_index=index)
    """

    @options.option_signature(unused=TEACHER_OPTIONS)
    def __init__(self, *, mixture: str = "divergences", return_components: bool = False,
                 backend: str = "auto", chunk_size: int | None = None, check_labels: bool = True,
                 process_group=None, **options_):
        """The options, fixed for every call.

        Args:
            mixture, return_components, backend, chunk_size, check_labels, process_group: as
                `fused_multi_teacher_loss`'s.
            **options: the loss's options (`fastkd.DistillOptions`) but the teacher's (per
                teacher, on its TeacherHead):
        """
        super().__init__()
        self.options = options.from_kwargs("FusedMultiTeacherLoss", options_, TEACHER_OPTIONS)
        self.mixture = choice("mixture", mixture, MIXTURES)
        self.backend = choice("backend", backend, BACKENDS)
        self.return_components = return_components
        self.chunk_size = chunk_size
        self.check_labels = check_labels
        self.process_group = process_group

    def forward(self, student_hidden, student_weight, teachers, labels=None, teacher_index=None,
                teacher_weights=None, student_bias=None, vocab_start=0):
        return multi_teacher_loss(
            student_hidden, student_weight, teachers, labels, self.options,
            teacher_index=teacher_index, teacher_weights=teacher_weights, mixture=self.mixture,
            student_bias=student_bias, return_components=self.return_components,
            backend=self.backend, chunk_size=self.chunk_size, check_labels=self.check_labels,
            process_group=self.process_group, vocab_start=vocab_start)

    def extra_repr(self) -> str:
        return f"{self.options}, mixture={self.mixture!r}, backend={self.backend!r}"
