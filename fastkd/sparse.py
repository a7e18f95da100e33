"""The sparse distillation loss: the teacher as k (id, log-probability) pairs per token.

`fused_sparse_distill_loss` and the `FusedSparseDistillLoss` module, their autograd Function and
chunk loop. The loss is the dense one's student side alone: per chunk of tokens the student GEMM
into a reused (chunk, V) buffer (`fastkd.autograd.student_chunks`), then a row op that computes
the per-token loss and writes dloss/dlogits over the buffer (the Triton kernel of
`fastkd.kernels.sparse`, or on CPU the spec's closed form), then dH, dW, db. FLOPs 2 N V 3 D_s;
memory beyond the inputs: one chunk of logits, flat in N. The spec and the tail modes' math:
`fastkd.reference.sparse_token_losses`.
"""

from __future__ import annotations

import torch

from fastkd import reference
from fastkd.autograd import (
    accumulator_dtype,
    cast_or_none,
    counted_scale,
    default_chunk_size,
    first_order_only,
    input_grads,
    reduced_outputs,
    student_chunks,
)
from fastkd.loss import BACKENDS, _check_inputs, _check_tensor, _compute_dtypes, _resolve_backend
from fastkd.options import DistillOptions
from fastkd.reference import SPARSE_TAILS


def _torch_rows(s, ids, logprobs, labels, row_scale, loss_out, ce_out, kd_out, opts, tail,
                compute_grad):
    """CPU row op: the spec's `sparse_token_losses` (and its closed-form logit gradient) on one
    chunk, in fp32 (fp64 for fp64 logits)."""
    acc_dtype = loss_out.dtype
    s_acc, lp_acc = s.to(acc_dtype), logprobs.to(acc_dtype)
    if compute_grad:
        loss, ce, kd, grad = reference.sparse_token_losses_and_grad(s_acc, ids, lp_acc, labels,
                                                                    opts, tail)
        s.copy_(grad.mul_(row_scale.to(acc_dtype).unsqueeze(-1)))
    else:
        loss, ce, kd = reference.sparse_token_losses(s_acc, ids, lp_acc, labels, opts, tail)
    loss_out.copy_(loss)
    ce_out.copy_(ce)
    kd_out.copy_(kd)


def _triton_rows(*args):
    from fastkd.kernels.sparse import sparse_rows

    sparse_rows(*args)


ROW_OPS = {"torch": _torch_rows, "triton": _triton_rows}


def _chunked(h_s, w_s, b_s, ids, logprobs, labels, row_scale, opts, tail, backend, chunk, dtype,
             grads):
    """Per-token (loss, ce, kd) and, if grads, (dH, dW, db); per-token values, dW and db in fp32
    (fp64 for fp64 inputs)."""
    acc = accumulator_dtype((dtype, dtype))
    n = h_s.shape[0]
    loss, ce, kd = (torch.empty(n, device=h_s.device, dtype=acc) for _ in range(3))
    row_op = ROW_OPS[backend]

    def rows(i0, i1, s):
        row_labels = None if labels is None else labels[i0:i1]
        row_op(s, ids[i0:i1], logprobs[i0:i1], row_labels, row_scale[i0:i1], loss[i0:i1],
               ce[i0:i1], kd[i0:i1], opts, tail, grads)

    return loss, ce, kd, student_chunks(h_s, w_s, b_s, chunk, dtype, acc, grads, rows)


class FusedSparseDistillFunction(torch.autograd.Function):
    """Inputs flattened to (N, D) and (N, k); returns (loss, ce, kd) reduced by opts.reduction.

    As the dense loss: for "mean"/"sum" the gradients are computed in the forward pass with the
    reduction's scale folded in (backward multiplies by the upstream scalar); for "none" backward
    recomputes the chunks with the upstream gradient as the row scale."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, ids, logprobs, labels, opts: DistillOptions, tail, backend,
                chunk, dtype, grad_enabled):
        need = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        grads_now = any(need) and opts.reduction != "none"
        valid, scale = counted_scale(labels, h_s.shape[0], opts,
                                     accumulator_dtype((dtype, dtype)), h_s.device)
        loss_i, ce_i, kd_i, (dh, dw, db) = _chunked(
            h_s, w_s, b_s, ids, logprobs, labels, scale, opts, tail, backend, chunk, dtype,
            grads_now)
        ctx.opts, ctx.tail, ctx.backend, ctx.chunk, ctx.dtype = opts, tail, backend, chunk, dtype
        ctx.in_dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        if grads_now:
            ctx.save_for_backward(dh, dw, db)
        elif any(need):  # reduction "none"
            ctx.save_for_backward(h_s, w_s, b_s, ids, logprobs, labels, valid)
        ctx.grads_now = grads_now
        return reduced_outputs(ctx, (loss_i, ce_i, kd_i), valid, opts)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        first_order_only()
        need = ctx.needs_input_grad[:3]
        if ctx.grads_now:
            dh, dw, db = ctx.saved_tensors
            g = grad_loss.to(dw.dtype)
        else:
            h_s, w_s, b_s, ids, logprobs, labels, valid = ctx.saved_tensors
            scale = grad_loss.to(accumulator_dtype((ctx.dtype, ctx.dtype))) * valid
            _, _, _, (dh, dw, db) = _chunked(
                h_s, w_s, b_s, ids, logprobs, labels, scale, ctx.opts, ctx.tail, ctx.backend,
                ctx.chunk, ctx.dtype, True)
            g = None
        out = input_grads((dh, dw, db), need, ctx.in_dtypes, g)
        return (*out, None, None, None, None, None, None, None, None, None)


def _check_sparse(h_s, w_s, ids, logprobs, labels, b_s, opts: DistillOptions, tail: str) -> int:
    """Raise a ValueError/TypeError naming the first bad argument; returns the number of counted
    tokens. One host sync covers the label range, the id range, duplicate ids and the
    log-probabilities' sign."""
    _check_inputs(h_s, w_s, h_s, w_s, labels, b_s, b_s, opts, check_labels=False)
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")
    if tail == "ignore" and opts.divergence != "forward_kl":
        raise ValueError(f'tail="ignore" supports divergence="forward_kl" only, got '
                         f"{opts.divergence!r} (use tail='bucket' or 'renormalize')")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    _check_tensor("teacher_logprobs", logprobs)
    lead = tuple(h_s.shape[:-1])
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids must have shape {lead} + (k,) with k >= 1 (the hidden "
                         f"states' leading shape), got {tuple(ids.shape)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} must equal teacher_ids "
                         f"shape {tuple(ids.shape)}")
    if ids.device != h_s.device or logprobs.device != h_s.device:
        raise ValueError(f"all tensors must be on one device, got student_hidden on {h_s.device}, "
                         f"teacher_ids on {ids.device}, teacher_logprobs on {logprobs.device}")
    vocab = w_s.shape[0]
    checks = []
    if labels is not None:
        counted = labels != opts.ignore_index
        bad_label = counted & ((labels < 0) | (labels >= vocab))
        checks += [bad_label.sum(), counted.sum()]
    bad_id = (ids < -1) | (ids >= vocab)
    used = ids >= 0
    bad_lp = used & ~(logprobs <= 0)  # NaN or > 0
    checks += [bad_id.sum(), bad_lp.sum()]
    if tail != "ignore":
        ordered = ids.sort(-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        checks.append(dup.sum())
    values = torch.stack(checks).tolist()  # the one host sync
    n_counted = ids[..., 0].numel()
    if labels is not None:
        n_bad, n_counted = values[:2]
        values = values[2:]
        if n_bad:
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                             f"{opts.ignore_index}; found {labels[bad_label][0].item()}")
    if values[0]:
        raise ValueError(f"teacher_ids must lie in [0, {vocab}) or be -1 (an unused slot); found "
                         f"{ids[bad_id][0].item()}")
    if values[1]:
        raise ValueError("teacher_logprobs must be log-probabilities (<= 0, not NaN) at the used "
                         f"slots; found {logprobs[used & ~(logprobs <= 0)][0].item()}")
    if tail != "ignore" and values[2]:
        dup_id = ordered[..., 1:][dup][0].item()
        raise ValueError(f"teacher_ids repeat an id within a token (e.g. {dup_id}): tail={tail!r} "
                         "needs distinct ids per token; duplicates are allowed with tail='ignore' "
                         "(sampled targets: entries add up)")
    return n_counted


def fused_sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    return_components: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """Distillation loss from a sparse teacher (k ids and log-probabilities per token, e.g. from a
    teacher cache) through the student's LM head, without materialising the N x V logits.

    Shapes: student_hidden (..., D) (N tokens once flattened), student_weight (V, D), student_bias
    (V,); teacher_ids (..., k) integer, ids in [0, V) or -1 for an unused slot; teacher_logprobs
    (..., k) float, log softmax(t / T)[id] (already at temperature T); labels (...,) integer or
    None. fp32, fp16 or bf16 (fp64 on the torch/reference backends).

    Per token, with s = h W^T + b (optionally softcapped), q = softmax(s / T) over the full
    vocabulary, P = sum_k p_k and Q = sum_k q_id_k:

        loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D

    tail="bucket": D between (p_1..p_k, 1 - P) and (q_id_1..q_id_k, 1 - Q), 1 - Q from the
    logsumexp over the ids outside the set; tail="renormalize": D between p / P and q / Q over the
    k ids; tail="ignore" (forward_kl only): D = sum_k p_k (log p_k - log q_id_k), the teacher's
    missing mass counted as 0 (with sampled targets an unbiased estimate of the full forward-KL
    gradient; duplicate ids add up). Duplicate ids are an error for bucket and renormalize.
    divergence: as `fused_distill_loss` (forward_kl, reverse_kl, jsd with beta, skew_forward_kl,
    skew_reverse_kl with skew, tvd). Plain-torch equivalent: `fastkd.reference.sparse_distill_loss`.

    Returns the loss (a scalar, or the leading shape for reduction="none"); with
    return_components=True, (loss, ce, kd): reduced, unweighted, detached, kd without T**2.
    Gradients reach student_hidden, student_weight and student_bias only. Bad input raises a
    ValueError/TypeError naming the argument (one host sync checks labels, ids and
    log-probabilities). Ignored tokens cost nothing (gathered out before the chunk loop).
    """
    opts = DistillOptions(
        temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, divergence=divergence,
        beta=beta, skew=skew, ignore_index=ignore_index, reduction=reduction,
        student_softcap=student_softcap,
    )
    return sparse_distill(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                          opts, tail=tail, student_bias=student_bias,
                          return_components=return_components, backend=backend,
                          chunk_size=chunk_size)


def sparse_distill(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                   opts: DistillOptions, *, tail="bucket", student_bias=None,
                   return_components=False, backend="auto", chunk_size=None):
    """`fused_sparse_distill_loss` with the options as one `DistillOptions` (the module's and the
    trainer's entry point); opts.teacher_softcap is unused (the teacher comes as log-probs)."""
    n_counted = _check_sparse(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                              labels, student_bias, opts, tail)
    backend = _resolve_backend(backend, student_hidden.device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    dtype = _compute_dtypes(student_hidden, student_weight, student_bias,
                            student_hidden, student_weight, student_bias)[0]
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("backend='triton' takes fp32, fp16 or bf16 inputs, got float64")
    logprobs = teacher_logprobs.detach()
    if backend == "reference":
        with torch.autocast(student_hidden.device.type, enabled=False):
            loss, ce, kd = reference.sparse_distill_loss(
                student_hidden.to(dtype), student_weight.to(dtype), teacher_ids, logprobs, labels,
                opts, tail, cast_or_none(student_bias, dtype))
        return (loss, ce, kd) if return_components else loss

    lead = student_hidden.shape[:-1]
    k = teacher_ids.shape[-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    ids = teacher_ids.reshape(-1, k).contiguous()
    logprobs = logprobs.reshape(-1, k).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).long().contiguous()
    n = h_s.shape[0]
    counted = None
    if flat_labels is not None and n_counted < n:  # ignored tokens cost no compute
        counted = torch.argsort((flat_labels == opts.ignore_index).to(torch.uint8),
                                stable=True)[:n_counted]
        h_s, ids, logprobs, flat_labels = (x.index_select(0, counted)
                                           for x in (h_s, ids, logprobs, flat_labels))
    vocab = student_weight.shape[0]
    # the GPU holds one logit buffer; the CPU row op's temporaries take about as much again
    shared = 0 if h_s.device.type == "cuda" else vocab
    chunk = chunk_size or default_chunk_size(h_s.shape[0], vocab, shared,
                                             max(dtype.itemsize, 4), h_s.device)
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss, ce, kd = FusedSparseDistillFunction.apply(
            h_s, student_weight, student_bias, ids, logprobs, flat_labels, opts, tail, backend,
            chunk, dtype, torch.is_grad_enabled())
    if dtype == torch.float16 and not bool(torch.isfinite(loss).all()):
        raise ValueError(
            "the loss is not finite in fp16: logits beyond +-65504 overflow fp16 (or the hidden "
            "states/weights hold inf or NaN); compute in bf16 or fp32")
    if opts.reduction == "none":
        if counted is not None:
            loss, ce, kd = (x.new_zeros(n).index_copy(0, counted, x) for x in (loss, ce, kd))
        loss, ce, kd = loss.reshape(lead), ce.reshape(lead), kd.reshape(lead)
    return (loss, ce, kd) if return_components else loss


class FusedSparseDistillLoss(torch.nn.Module):
    """Module form of `fused_sparse_distill_loss`: options fixed at construction.

    >>> crit = FusedSparseDistillLoss(temperature=2.0, tail="bucket")
    >>> loss = crit(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels)
    """

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.5, kd_weight: float = 0.5,
                 divergence: str = "forward_kl", tail: str = "bucket", beta: float = 0.5,
                 skew: float = 0.1, ignore_index: int = -100, reduction: str = "mean",
                 student_softcap: float | None = None, return_components: bool = False,
                 backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.options = DistillOptions(
            temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
            divergence=divergence, beta=beta, skew=skew, ignore_index=ignore_index,
            reduction=reduction, student_softcap=student_softcap,
        )
        if tail not in SPARSE_TAILS:
            raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")
        if tail == "ignore" and divergence != "forward_kl":
            raise ValueError(f'tail="ignore" supports divergence="forward_kl" only, got '
                             f"{divergence!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.tail = tail
        self.return_components = return_components
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None,
                student_bias=None):
        return sparse_distill(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                              labels, self.options, tail=self.tail, student_bias=student_bias,
                              return_components=self.return_components, backend=self.backend,
                              chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"{self.options}, tail={self.tail!r}, backend={self.backend!r}"
