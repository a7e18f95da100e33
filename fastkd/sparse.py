"""The sparse distillation loss: the teacher as k (id, log-probability) pairs per token.

`fused_sparse_distill_loss` and the `FusedSparseDistillLoss` module run the shared front-end and
chunk loop (`fastkd.loss.fused_loss`) with the sparse teacher form: per chunk of tokens the
student GEMM into a reused (chunk, V) buffer, then a row op that computes the per-token loss and
writes dloss/dlogits over the buffer (the Triton kernel of `fastkd.kernels.sparse`, or on CPU the
spec's closed form), then dH, dW, db. FLOPs 2 N V 3 D_s; memory beyond the inputs: one chunk of
logits, flat in N. The spec and the tail modes' math: `fastkd.reference.sparse_token_losses`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fastkd import cpu_rows, options, reference
from fastkd.autograd import LEAN, Deferred, RowOp, TeacherForm, register
from fastkd.loss import BACKENDS, check_devices, check_tensor, fused_loss
from fastkd.options import DistillOptions
from fastkd.reference import SPARSE_TAILS


def _torch_rows(s, ids, logprobs, labels, row_scale, out, opts, tail, compute_grad,
                components=True):
    """CPU row op: the fused native loop (`fastkd.cpu_rows`), else the spec's
    `sparse_token_losses` (and its closed-form logit gradient) on one chunk, in fp32 (fp64 for
    fp64 logits)."""
    if cpu_rows.sparse_rows(s, ids, logprobs, labels, row_scale, out, opts, tail, compute_grad,
                            components):
        return
    acc = out.dtype
    s_acc, lp_acc = s.to(acc), logprobs.to(acc)
    if compute_grad:
        per_token, grad = reference.sparse_token_losses_and_grad(s_acc, ids, lp_acc, labels,
                                                                 opts, tail)
        s.copy_(grad.mul_(row_scale.to(acc).unsqueeze(-1)))
    else:
        per_token = reference.sparse_token_losses(s_acc, ids, lp_acc, labels, opts, tail)
    out.copy_(torch.stack(per_token.columns(), 1))


SPARSE_ROWS = RowOp(torch=_torch_rows, triton="sparse.sparse_rows")


def _check_tail(tail: str, divergence: str) -> None:
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")
    if tail == "ignore" and divergence != "forward_kl":
        raise ValueError(f'tail="ignore" supports divergence="forward_kl" only, got '
                         f"{divergence!r} (use tail='bucket' or 'renormalize')")


def mass_slack(logprobs: torch.Tensor, used: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per row, by how much log sum_j p_j may exceed 0 in log-probabilities that are a log-softmax
    rounded to their precision: eps (1 + 2 log V + sum_j p_j |log p_j|), the rounding of the
    row's logsumexp (which shifts every entry) and of each entry. eps: that of the coarsest float
    type holding the row's values exactly (bf16 or fp16 values upcast keep their rounding), at
    least fp32's (the log-softmax's own arithmetic). In float64 (rows x k: cheap)."""
    lp = torch.where(used, logprobs.double(), 0.0)
    eps = torch.full(lp.shape[:-1], max(torch.finfo(logprobs.dtype).eps,
                                        torch.finfo(torch.float32).eps), dtype=torch.float64,
                     device=lp.device)
    for coarse in (torch.float16, torch.bfloat16):  # finer, then coarser
        held = (lp.to(coarse).double() == lp).all(-1)
        eps = torch.where(held, max(torch.finfo(coarse).eps, torch.finfo(logprobs.dtype).eps),
                          eps)
    spread = (lp.exp() * lp.abs()).sum(-1)  # 0 at unused slots (lp = 0 there)
    return eps * (1 + 2 * math.log(max(vocab, 2)) + spread)


@register
@dataclass(frozen=True)
class SparseTeacher(TeacherForm):
    """The teacher as k (id, log-probability) slots per token: teacher = (ids (N, k) integer,
    -1 an unused slot; logprobs (N, k) log softmax(t / T)[id]); `tail` says what the loss does
    with the mass outside the k ids (`fastkd.reference.sparse_token_losses`)."""

    name = "sparse"
    # the teacher comes as log-probabilities (its head's scale and softcap already applied)
    unused_options = ("teacher_softcap", "teacher_logit_scale")
    tail: str = "bucket"

    def __post_init__(self) -> None:
        if self.tail not in SPARSE_TAILS:
            raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {self.tail!r}")

    def op_key(self) -> str:
        return f"{self.name}:{self.tail}" + ("" if self.components else LEAN)

    @classmethod
    def from_op_key(cls, key: str) -> SparseTeacher:
        return cls(tail=key.split(":")[1], components=not key.endswith(LEAN))

    def check(self, teacher, h_s, vocab, opts):
        """Types, shapes and devices now; the ids' range, duplicate ids (bucket, renormalize),
        the log-probabilities' sign and each row's mass (log sum_j p_j <= 0 up to rounding, and
        = 0 where the ids cover the whole vocabulary under tail="bucket") in the host sync."""
        _check_tail(self.tail, opts.divergence)
        ids, logprobs = teacher
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
        check_tensor("teacher_logprobs", logprobs)
        lead = tuple(h_s.shape[:-1])
        if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
            raise ValueError(f"teacher_ids must have shape {lead} + (k,) with k >= 1 (the hidden "
                             f"states' leading shape), got {tuple(ids.shape)}")
        if logprobs.shape != ids.shape:
            raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} must equal "
                             f"teacher_ids shape {tuple(ids.shape)}")
        check_devices(h_s.device, student_hidden=h_s, teacher_ids=ids, teacher_logprobs=logprobs)
        ids = ids.long()  # unsigned ids (uint8 ...) compared with -1 would wrap
        used = ids >= 0
        bad_id = (ids < -1) | (ids >= vocab)
        bad_lp = used & ~(logprobs <= 0)  # NaN or > 0
        log_mass = torch.logsumexp(torch.where(used, logprobs.double(), float("-inf")), -1)
        slack = mass_slack(logprobs, used, vocab)
        deferred = [
            Deferred(bad_id.sum(), lambda: ValueError(
                f"teacher_ids must lie in [0, {vocab}) or be -1 (an unused slot); found "
                f"{ids[bad_id][0].item()}")),
            Deferred(bad_lp.sum(), lambda: ValueError(
                "teacher_logprobs must be log-probabilities (<= 0, not NaN) at the used slots; "
                f"found {logprobs[bad_lp][0].item()}")),
            Deferred((log_mass > slack).sum(), lambda: ValueError(
                "teacher_logprobs must be log-probabilities of one distribution: a token's "
                "slots hold mass sum(exp(teacher_logprobs)) = "
                f"{log_mass[log_mass > slack].max().exp().item():.6g} > 1 (more than the "
                f"rounding of {logprobs.dtype} allows)")),
        ]
        if self.tail != "ignore":
            ordered = ids.sort(-1).values
            dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
            deferred.append(Deferred(dup.sum(), lambda: ValueError(
                f"teacher_ids repeat an id within a token (e.g. {ordered[..., 1:][dup][0].item()})"
                f": tail={self.tail!r} needs distinct ids per token; duplicates are allowed with "
                "tail='ignore' (sampled targets: entries add up)")))
        if self.tail == "bucket":  # ids covering the vocabulary leave no rest bucket for 1 - P
            short = (used.sum(-1) >= vocab) & (log_mass < -slack)
            deferred.append(Deferred(short.sum(), lambda: ValueError(
                "teacher_ids cover the whole vocabulary in a token whose teacher_logprobs sum to "
                f"{log_mass[short].min().exp().item():.6g} < 1: tail='bucket' puts the mass "
                "outside the ids in a rest bucket, which is then empty; pass the full "
                "distribution, or use tail='renormalize'")))
        return deferred

    def select(self, teacher, index):
        ids, logprobs = teacher
        k = ids.shape[-1]
        return ids.reshape(-1, k).index_select(0, index), logprobs.reshape(-1, k).index_select(
            0, index)

    def width(self, teacher, vocab, device):
        # the GPU holds one logit buffer; the CPU row op's temporaries take about as much again
        return 0 if device.type == "cuda" else vocab

    def reference(self, teacher, h_s, w_s, b_s, labels, opts, dtypes):
        ids, logprobs = teacher
        return reference.sparse_distill_loss(h_s, w_s, ids.long(), logprobs.detach(), labels,
                                             opts, self.tail, b_s)

    def rows(self, teacher, labels, row_scale, out, opts, backend, dtypes, grads, chunk, vocab):
        ids, logprobs = teacher
        k = ids.shape[-1]
        if not ids.dtype.is_signed:  # unsigned ids as int64 (the row ops compare with -1)
            ids = ids.long()
        ids = ids.reshape(-1, k).contiguous()
        logprobs = logprobs.detach().reshape(-1, k).contiguous()
        row_op = SPARSE_ROWS.on(backend)
        if backend == "torch" and not self.components:  # a zero-weighted term may be skipped
            row_op = functools.partial(row_op, components=False)

        def rows(i0, i1, s):
            row_labels = None if labels is None else labels[i0:i1]
            row_op(s, ids[i0:i1], logprobs[i0:i1], row_labels, row_scale[i0:i1], out[i0:i1],
                   opts, self.tail, grads)

        return rows


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

    Shapes: student_hidden (..., D) (N tokens once flattened), student_weight (V, D), student_bias
    (V,); teacher_ids (..., k) integer (signed or unsigned), ids in [0, V) or -1 for an unused
    slot; teacher_logprobs (..., k) float, log softmax(t / T)[id] (already at temperature T);
    labels (...,) integer or None. fp32, fp16 or bf16 (fp64 on the torch/reference backends).

    Options (keyword-only): those of `fused_distill_loss` but the teacher's softcap and logit
    scale, which its log-probabilities already include (temperature=1.0, ce_weight=0.5,
    kd_weight=0.5, divergence="forward_kl", beta=0.5, skew=0.1, ignore_index=-100,
    reduction="mean", student_softcap=None, student_logit_scale=1.0).

    Per token, with s = h W^T + b (times student_logit_scale, then optionally softcapped), q =
    softmax(s / T) over the full vocabulary, P = sum_k p_k and Q = sum_k q_id_k:

        loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D

    tail="bucket": D between (p_1..p_k, 1 - P) and (q_id_1..q_id_k, 1 - Q), 1 - Q from the
    logsumexp over the ids outside the set; when a token's ids cover the whole vocabulary there
    is no rest bucket (1 - Q = 0), so its log-probabilities must sum to 1 (checked);
    tail="renormalize": D between p / P and q / Q over the k ids; tail="ignore" (forward_kl only):
    D = sum_k p_k (log p_k - log q_id_k), the teacher's missing mass counted as 0 (with sampled
    targets an unbiased estimate of the full forward-KL gradient; duplicate ids add up; D may then
    be negative). Duplicate ids are an error for bucket and renormalize. divergence: as
    `fused_distill_loss` (forward_kl, reverse_kl, jsd with beta, skew_forward_kl, skew_reverse_kl
    with skew, tvd). Plain-torch equivalent: `fastkd.reference.sparse_distill_loss`.

    Returns the loss (a scalar, or the leading shape for reduction="none"); with
    return_components=True, a `fastkd.reference.Components`: (loss, ce, kd), reduced, unweighted,
    detached, kd without T**2, and `.entropy`, the student's entropy of q (the full vocabulary).
    Gradients reach student_hidden, student_weight and student_bias only. Bad input raises a
    ValueError/TypeError naming the argument: one host sync checks labels, ids (range, duplicates)
    and log-probabilities (sign, and a token's mass: sum_j exp(teacher_logprobs) > 1 by more than
    the rounding of their dtype is an error). Ignored tokens cost nothing (gathered out before
    the chunk loop). check_labels=False skips that sync (the inputs are then the caller's promise,
    ignored tokens are computed and masked), so the loss fits in a torch.compile(fullgraph=True)
    graph, as `fused_distill_loss`'s.
    """
    opts = options.from_kwargs("fused_sparse_distill_loss", options_,
                               SparseTeacher.unused_options)
    return sparse_distill(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                          opts, tail=tail, student_bias=student_bias,
                          return_components=return_components, backend=backend,
                          chunk_size=chunk_size, check_labels=check_labels)


def sparse_distill(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                   opts: DistillOptions, *, tail="bucket", student_bias=None,
                   return_components=False, backend="auto", chunk_size=None, check_labels=True):
    """`fused_sparse_distill_loss` with the options as one `DistillOptions` (the module's and the
    trainer's entry point); opts.teacher_softcap and teacher_logit_scale are unused (the teacher
    comes as log-probabilities)."""
    return fused_loss(SparseTeacher(tail), (teacher_ids, teacher_logprobs), student_hidden,
                      student_weight, student_bias, labels, opts, backend=backend,
                      chunk_size=chunk_size, check_labels=check_labels,
                      return_components=return_components)


class FusedSparseDistillLoss(torch.nn.Module):
    """Module form of `fused_sparse_distill_loss`: options fixed at construction.

    >>> crit = FusedSparseDistillLoss(temperature=2.0, tail="bucket")
    >>> loss = crit(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels)

    The first arguments may also come positionally, in their order before the options became one
    dataclass; options added since (and check_labels) are keyword-only.
    """

    @options.option_signature(unused=SparseTeacher.unused_options, positional=(
        "temperature", "ce_weight", "kd_weight", "divergence", "tail", "beta", "skew",
        "ignore_index", "reduction", "student_softcap", "return_components", "backend",
        "chunk_size"))
    def __init__(self, *, tail: str = "bucket", return_components: bool = False,
                 backend: str = "auto", chunk_size: int | None = None, check_labels: bool = True,
                 **options_):
        super().__init__()
        self.options = options.from_kwargs("FusedSparseDistillLoss", options_,
                                           SparseTeacher.unused_options)
        _check_tail(tail, self.options.divergence)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.tail = tail
        self.return_components = return_components
        self.backend = backend
        self.chunk_size = chunk_size
        self.check_labels = check_labels

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None,
                student_bias=None):
        return sparse_distill(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                              labels, self.options, tail=self.tail, student_bias=student_bias,
                              return_components=self.return_components, backend=self.backend,
                              chunk_size=self.chunk_size, check_labels=self.check_labels)

    def extra_repr(self) -> str:
        return f"{self.options}, tail={self.tail!r}, backend={self.backend!r}"
