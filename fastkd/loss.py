"""Public API: `fused_distill_loss` and the `FusedDistillLoss` module."""

from __future__ import annotations

import os

import torch

from fastkd import reference
from fastkd.autograd import FusedDistillFunction, cast_or_none, default_chunk_size
from fastkd.options import BACKENDS, DistillOptions

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16, fp64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if ndim is None and x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim (..., D), got a scalar")
    return x


def _check_inputs(h_s, w_s, h_t, w_t, labels, b_s, b_t, opts: DistillOptions,
                  check_labels: bool = True, vocab: int | None = None) -> int | None:
    """Raise a ValueError/TypeError naming the first bad argument. Returns the number of counted
    tokens (labels != ignore_index), read in the same host sync as the label-range check, or None
    (no labels, or check_labels=False: then nothing syncs). vocab: the student's full vocabulary
    when the heads are vocab-parallel shards (a teacher shard may then be empty)."""
    h_s = _check_tensor("student_hidden", h_s)
    h_t = _check_tensor("teacher_hidden", h_t)
    w_s = _check_tensor("student_weight", w_s, 2)
    w_t = _check_tensor("teacher_weight", w_t, 2)
    if h_s.shape[-1] != w_s.shape[1]:
        raise ValueError(
            f"student_hidden last dim {h_s.shape[-1]} != student_weight dim 1 ({tuple(w_s.shape)})"
        )
    if h_t.shape[-1] != w_t.shape[1]:
        raise ValueError(
            f"teacher_hidden last dim {h_t.shape[-1]} != teacher_weight dim 1 ({tuple(w_t.shape)})"
        )
    if h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must have the same leading shape (tokens), got "
            f"{tuple(h_s.shape[:-1])} and {tuple(h_t.shape[:-1])}"
        )
    if w_s.shape[0] == 0 or (w_t.shape[0] == 0 and vocab is None):
        raise ValueError("student_weight and teacher_weight need at least one vocabulary row")
    for name, b, w in (("student_bias", b_s, w_s), ("teacher_bias", b_t, w_t)):
        if b is not None:
            _check_tensor(name, b, 1)
            if b.shape[0] != w.shape[0]:
                raise ValueError(
                    f"{name} has {b.shape[0]} entries, its weight has {w.shape[0]} rows"
                )
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("labels=None needs ce_weight == 0 (cross-entropy needs labels)")
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != h_s.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape "
                f"{tuple(h_s.shape[:-1])}"
            )
    tensors = {"student_hidden": h_s, "student_weight": w_s, "teacher_hidden": h_t,
               "teacher_weight": w_t, "labels": labels, "student_bias": b_s, "teacher_bias": b_t}
    devices = {name: x.device for name, x in tensors.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if labels is None or not check_labels:
        return None
    # The one host sync: an out-of-range label must be an error, not an out-of-bounds read; the
    # count of counted tokens comes with it (the compaction of ignored tokens needs it).
    vocab = vocab or w_s.shape[0]
    counted = labels != opts.ignore_index
    bad = counted & ((labels < 0) | (labels >= vocab))
    n_bad, n_counted = torch.stack([bad.sum(), counted.sum()]).tolist()
    if n_bad:
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={opts.ignore_index}; "
            f"found {first}"
        )
    return n_counted


def _compute_dtypes(h_s, w_s, b_s, h_t, w_t, b_t) -> tuple[torch.dtype, torch.dtype]:
    """(student, teacher) compute dtypes: the autocast dtype for both under autocast, else each
    model's own (its hidden, weight and bias must then agree)."""
    device_type = h_s.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype, dtype
    out = []
    for model, tensors in (("student", (h_s, w_s, b_s)), ("teacher", (h_t, w_t, b_t))):
        dtypes = {x.dtype for x in tensors if x is not None}
        if len(dtypes) > 1:
            raise TypeError(
                f"{model} hidden/weight/bias dtypes differ ({sorted(map(str, dtypes))}) outside "
                "torch.autocast; cast them or run under autocast"
            )
        out.append(dtypes.pop())
    return out[0], out[1]


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs the kernels in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing fastkd, or use backend='auto'"
        )
    return backend


def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    return_components: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_labels: bool = True,
    process_group=None,
    vocab_start: int = 0,
):
    """Distillation loss through both LM heads without materialising the N x V logits.

    Shapes: student_hidden (..., D_s), teacher_hidden (..., D_t) with the same leading shape (N
    tokens once flattened); student_weight (V, D_s), teacher_weight (V_t, D_t); labels (...,)
    integer or None; biases (V,) / (V_t,). fp32, fp16 or bf16 (fp64 on the torch/reference
    backends).

    Per token, with s = h_s W_s^T + b_s and t = h_t W_t^T + b_t (each optionally softcapped),
    K = min(V, V_t), p = softmax(t[:K] / T), q = softmax(s[:K] / T):

        loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D(p, q)

    D is KL(p||q) ("forward_kl"), KL(q||p) ("reverse_kl"), beta KL(p||m) + (1-beta) KL(q||m) with
    m = beta p + (1-beta) q ("jsd"), KL(p || skew p + (1-skew) q) ("skew_forward_kl"),
    KL(q || (1-skew) p + skew q) ("skew_reverse_kl") or sum |p - q| / 2 ("tvd"). Tokens labelled
    ignore_index count for nothing; "mean" divides by the counted tokens. Plain-torch equivalent:
    `fastkd.reference.distill_loss`.

    Returns the loss (a scalar, or the leading shape for reduction="none"); with
    return_components=True, (loss, ce, kd): reduced, unweighted, detached, kd without T**2.
    Gradients reach student_hidden, student_weight and student_bias (each in its own dtype); the
    teacher gets none. backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton", "torch",
    "reference". chunk_size: tokens per step (default from a memory budget).

    Ignored tokens cost nothing: the counted ones are gathered before the chunk loop (their count
    comes with the label-range check, the one host sync). check_labels=False skips that sync, so
    the loss can sit inside a `torch.compile(fullgraph=True)` graph: labels are then the caller's
    promise (in [0, V) or ignore_index; an id out of range reads out of bounds in the kernel), and
    ignored tokens are computed and masked instead of skipped.

    Vocab-parallel heads (tensor parallelism): with process_group, every rank of the group passes
    the same hidden states and global labels and its own rows of both heads, student rows
    [vocab_start, vocab_start + V_r) and teacher rows [vocab_start, vocab_start + V_t,r) (biases
    likewise); in rank order the shards tile each vocabulary (checked on every call). Every rank
    gets the single-process loss; gradients reach its own weight/bias rows, and student_hidden gets
    dL/dh_s summed over the ranks (the same on every rank). Ranks exchange a few floats per token,
    never logits (`fastkd.vocab_parallel`).
    """
    opts = DistillOptions(
        temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, divergence=divergence,
        beta=beta, skew=skew, ignore_index=ignore_index, reduction=reduction,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
    )
    return distill(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts,
        student_bias=student_bias, teacher_bias=teacher_bias,
        return_components=return_components, backend=backend, chunk_size=chunk_size,
        check_labels=check_labels, process_group=process_group, vocab_start=vocab_start,
    )


def distill(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts: DistillOptions, *,
    student_bias=None, teacher_bias=None, return_components=False, backend="auto", chunk_size=None,
    check_labels=True, process_group=None, vocab_start=0,
):
    """`fused_distill_loss` with the options as one `DistillOptions` (the module's and trainer's
    entry point)."""
    shard = None
    if process_group is not None:
        from fastkd.vocab_parallel import check_tiling

        if backend == "reference":
            raise ValueError("backend='reference' forms full logits: it takes no process_group")
        h_s = _check_tensor("student_hidden", student_hidden)
        w_s = _check_tensor("student_weight", student_weight, 2)
        w_t = _check_tensor("teacher_weight", teacher_weight, 2)
        shard = check_tiling(process_group, vocab_start, h_s.shape[:-1].numel(), w_s.shape[0],
                             w_t.shape[0], h_s.device)
    elif vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start!r} needs a process_group (vocab-parallel)")
    n_counted = _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              labels, student_bias, teacher_bias, opts, check_labels,
                              None if shard is None else shard.vocab)
    backend = _resolve_backend(backend, student_hidden.device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    dtypes = _compute_dtypes(student_hidden, student_weight, student_bias,
                             teacher_hidden, teacher_weight, teacher_bias)
    if backend == "triton" and torch.float64 in dtypes:
        raise TypeError("backend='triton' takes fp32, fp16 or bf16 inputs, got float64")
    if backend == "reference":
        with torch.autocast(student_hidden.device.type, enabled=False):
            s_dtype, t_dtype = dtypes
            loss, ce, kd = reference.distill_loss(
                student_hidden.to(s_dtype), student_weight.to(s_dtype), teacher_hidden.to(t_dtype),
                teacher_weight.to(t_dtype), labels, opts, cast_or_none(student_bias, s_dtype),
                cast_or_none(teacher_bias, t_dtype),
            )
        return (loss, ce, kd) if return_components else loss

    lead = student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    # contiguous: the row kernel reads label i at y_ptr + i (a strided or expanded view isn't)
    flat_labels = None if labels is None else labels.reshape(-1).long().contiguous()
    n = h_s.shape[0]
    counted = None  # indices of the counted tokens, when some are ignored
    if n_counted is not None and n_counted < n:
        # Ignored tokens cost no compute: gather the counted rows (index_select is differentiable:
        # its backward scatters dH back, zeros at ignored rows, so no ignored row enters a GEMM).
        counted = torch.argsort((flat_labels == opts.ignore_index).to(torch.uint8),
                                stable=True)[:n_counted]
        h_s, h_t, flat_labels = (x.index_select(0, counted) for x in (h_s, h_t, flat_labels))
    vocab, shared = student_weight.shape[0], min(student_weight.shape[0], teacher_weight.shape[0])
    chunk = chunk_size or default_chunk_size(
        h_s.shape[0], vocab, shared, max(d.itemsize for d in dtypes), h_s.device
    )
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss, ce, kd = FusedDistillFunction.apply(
            h_s, student_weight, student_bias, h_t, teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            flat_labels, opts, backend, chunk, dtypes, torch.is_grad_enabled(), shard,
        )
    if torch.float16 in dtypes and check_labels and not bool(torch.isfinite(loss).all()):
        # fp16 only (a second host sync): logits past 65504 overflow the fp16 GEMM output
        raise ValueError(
            "the loss is not finite in fp16: logits beyond +-65504 overflow fp16 (or the hidden "
            "states/weights hold inf or NaN); compute in bf16 (torch.autocast(dtype="
            "torch.bfloat16)) or fp32"
        )
    if opts.reduction == "none":
        if counted is not None:  # back to every token, 0 at the ignored ones
            loss, ce, kd = (x.new_zeros(n).index_copy(0, counted, x) for x in (loss, ce, kd))
        loss, ce, kd = loss.reshape(lead), ce.reshape(lead), kd.reshape(lead)
    return (loss, ce, kd) if return_components else loss


class FusedDistillLoss(torch.nn.Module):
    """Module form of `fused_distill_loss`: options fixed at construction, tensors at call time.

    >>> crit = FusedDistillLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    >>> loss = crit(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    """

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.5, kd_weight: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                 ignore_index: int = -100,
                 reduction: str = "mean", student_softcap: float | None = None,
                 teacher_softcap: float | None = None, return_components: bool = False,
                 backend: str = "auto", chunk_size: int | None = None, check_labels: bool = True,
                 process_group=None):
        super().__init__()
        self.options = DistillOptions(
            temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
            divergence=divergence, beta=beta, skew=skew, ignore_index=ignore_index,
            reduction=reduction,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.return_components = return_components
        self.backend = backend
        self.chunk_size = chunk_size
        self.check_labels = check_labels
        self.process_group = process_group

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, vocab_start=0):
        return distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                       self.options, student_bias=student_bias, teacher_bias=teacher_bias,
                       return_components=self.return_components, backend=self.backend,
                       chunk_size=self.chunk_size, check_labels=self.check_labels,
                       process_group=self.process_group, vocab_start=vocab_start)

    def extra_repr(self) -> str:
        return f"{self.options}, backend={self.backend!r}"
