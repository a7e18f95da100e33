"""The sparse teacher form: the teacher as k (id, log-probability) pairs per token.

The public loss (`fastkd.loss.fused_sparse_distill_loss`) runs the shared front-end and chunk
loop with this form: per chunk of tokens the student GEMM into a reused (chunk, V) buffer, then a
row op that computes the per-token loss and writes dloss/dlogits over the buffer (the Triton
kernel of `fastkd.kernels.sparse`, or on CPU `torch_rows`: the native loop of `fastkd.cpu_rows`,
else the spec's closed form), then dH, dW,
db. FLOPs 2 N V 3 D_s; memory beyond the inputs: one chunk of logits, flat in N. The spec and the
tail modes' math: `fastkd.reference.sparse_token_losses`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fastkd import cpu_rows, reference
from fastkd.backends import RowOp
from fastkd.checks import choice
from fastkd.forms import Deferred, Plan, TeacherForm, register
from fastkd.frontend import check_devices, check_int_tensor, check_tensor
from fastkd.reference import SPARSE_TAILS


def torch_rows(s, ids, logprobs, labels, row_scale, out, opts, tail, compute_grad,
               components=True):
    """CPU row op: the native loop (`fastkd.cpu_rows.sparse_rows`), else the spec's
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


SPARSE_ROWS = RowOp(torch=torch_rows, triton="sparse.sparse_rows")


def check_tail(tail: str, divergence: str) -> None:
    """A ValueError unless `tail` is one of SPARSE_TAILS and takes `divergence`."""
    choice("tail", tail, SPARSE_TAILS)
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
    native_rows = True
    tail: str = "bucket"

    def __post_init__(self) -> None:
        choice("tail", self.tail, SPARSE_TAILS)

    def op_key(self) -> str:
        return f"{self.name}:{self.tail}"

    @classmethod
    def from_op_key(cls, key: str) -> SparseTeacher:
        return cls(tail=key.split(":")[1])

    def check(self, teacher, h_s, vocab, opts):
        """Types, shapes and devices now; the ids' range, duplicate ids (bucket, renormalize),
        the log-probabilities' sign and each row's mass (log sum_j p_j <= 0 up to rounding, and
        = 0 where the ids cover the whole vocabulary under tail="bucket") in the host sync."""
        check_tail(self.tail, opts.divergence)
        ids, logprobs = teacher
        check_int_tensor("teacher_ids", ids)
        check_tensor("teacher_logprobs", logprobs)
        lead = tuple(h_s.shape[:-1])
        if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
            raise ValueError(f"teacher_ids must have shape {lead} + (k,) with k >= 1 (the hidden "
                             f"states' leading shape), got {tuple(ids.shape)}")
        if logprobs.shape != ids.shape:
            raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} must equal "
                             f"teacher_ids shape {tuple(ids.shape)}")
        check_devices(h_s.device, student_hidden=h_s, teacher_ids=ids, teacher_logprobs=logprobs)
        return value_checks(ids.long(), logprobs, vocab, self.tail)  # unsigned ids would wrap

    def select(self, teacher, index):
        ids, logprobs = teacher
        k = ids.shape[-1]
        return ids.reshape(-1, k).index_select(0, index), logprobs.reshape(-1, k).index_select(
            0, index)

    def width(self, teacher, vocab, device):
        # the GPU holds one logit buffer; the CPU row op's temporaries take about as much again
        return 0 if device.type == "cuda" else vocab

    def reference(self, teacher, h_s, w_s, b_s, labels, plan: Plan):
        ids, logprobs = teacher
        return reference.sparse_distill_loss(h_s, w_s, ids.long(), logprobs.detach(), labels,
                                             plan.opts, self.tail, b_s)

    def rows(self, teacher, labels, row_scale, out, plan: Plan, grads, vocab):
        ids, logprobs = teacher
        k = ids.shape[-1]
        if not ids.dtype.is_signed:  # unsigned ids as int64 (the row ops compare with -1)
            ids = ids.long()
        ids = ids.reshape(-1, k).contiguous()
        logprobs = logprobs.detach().reshape(-1, k).contiguous()
        row_op = SPARSE_ROWS.on(plan.backend)
        if plan.backend == "torch" and not plan.components:  # a zero-weighted term may be skipped
            row_op = functools.partial(row_op, components=False)

        def rows(i0, i1, s):
            row_labels = None if labels is None else labels[i0:i1]
            row_op(s, ids[i0:i1], logprobs[i0:i1], row_labels, row_scale[i0:i1], out[i0:i1],
                   plan.opts, self.tail, grads)

        return rows


def value_checks(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int,
                 tail: str) -> list[Deferred]:
    """The sparse teacher's checks on values (int64 ids), read in the front-end's host sync."""
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
    if tail != "ignore":
        ordered = ids.sort(-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        deferred.append(Deferred(dup.sum(), lambda: ValueError(
            f"teacher_ids repeat an id within a token (e.g. {ordered[..., 1:][dup][0].item()})"
            f": tail={tail!r} needs distinct ids per token; duplicates are allowed with "
            "tail='ignore' (sampled targets: entries add up)")))
    if tail == "bucket":  # ids covering the vocabulary leave no rest bucket for 1 - P
        short = (used.sum(-1) >= vocab) & (log_mass < -slack)
        deferred.append(Deferred(short.sum(), lambda: ValueError(
            "teacher_ids cover the whole vocabulary in a token whose teacher_logprobs sum to "
            f"{log_mass[short].min().exp().item():.6g} < 1: tail='bucket' puts the mass "
            "outside the ids in a rest bucket, which is then empty; pass the full "
            "distribution, or use tail='renormalize'")))
    return deferred
