"""The front-end every fused loss shares (`fused_loss`), the dense teacher form, and the dense
loss's public API: `fused_distill_loss`, `distill` and the `FusedDistillLoss` module.

`fused_loss` checks the inputs (one host sync for everything that needs values), resolves the
backend and the compute dtypes, gathers out ignored tokens, picks the chunk size, and runs the one
autograd Function (`fastkd.autograd.FusedLossFunction`); a teacher form (`TeacherForm`) supplies
what differs: its tensors' checks, its spec, its row op. The forms: `DenseTeacher` here (the
teacher's hidden states and head), `fastkd.sparse.SparseTeacher` (k ids and log-probabilities
per token), `fastkd.vocab_parallel.VocabParallelTeacher` (the dense teacher with both heads split
by vocabulary rows over ranks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from fastkd import cpu_rows, options, reference
from fastkd.autograd import (
    FusedLossFunction,
    RowOp,
    TeacherForm,
    cast_or_none,
    default_chunk_size,
    linear_into,
    load_kernels,
    padded_rows,
    register,
)
from fastkd.options import BACKENDS, DistillOptions

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    """x as a floating tensor of `ndim` dims (at least 1 if None), else a TypeError/ValueError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16, fp64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if ndim is None and x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim (..., D), got a scalar")
    return x


def check_bias(name: str, bias, weight: torch.Tensor) -> None:
    if bias is not None:
        check_tensor(name, bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{name} has {bias.shape[0]} entries, its weight has "
                             f"{weight.shape[0]} rows")


def check_devices(device: torch.device, **tensors) -> None:
    devices = {name: x.device for name, x in tensors.items() if x is not None}
    if any(d != device for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")


def model_dtype(model: str, tensors, device_type: str) -> torch.dtype:
    """A model's compute dtype: the autocast dtype under autocast, else its tensors' own (its
    hidden, weight and bias must then agree)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {x.dtype for x in tensors if x is not None}
    if len(dtypes) > 1:
        raise TypeError(
            f"{model} hidden/weight/bias dtypes differ ({sorted(map(str, dtypes))}) outside "
            "torch.autocast; cast them or run under autocast"
        )
    return dtypes.pop()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        load_kernels(device)  # on CPU tensors: the kernels in Triton's interpreter
    return backend


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


@dataclass
class Call:
    """One call of a fused loss once its inputs are checked: what the chunk loop runs on, and
    what the ranks of a vocab-parallel call must agree on."""

    form: TeacherForm
    teacher: tuple
    h_s: torch.Tensor  # (N, D_s)
    w_s: torch.Tensor
    b_s: torch.Tensor | None
    labels: torch.Tensor | None  # (N,) int64
    opts: DistillOptions
    backend: str
    dtypes: tuple[torch.dtype, torch.dtype]  # (student, teacher) compute dtypes
    chunk: int
    n_counted: int | None  # None: not read (check_labels=False)
    label_range: tuple[int, int] | None  # (min, max) of the counted labels, read with n_counted
    vocab: int  # labels must lie in [0, vocab)
    grads: bool  # whether the student's gradients are wanted


def _prepare(form, teacher, h_s, w_s, b_s, labels, opts, backend, chunk_size,
             check_labels) -> Call:
    """Every check of `fused_loss` but the label range (which a vocab-parallel call checks
    against the ranks' whole vocabulary): a TypeError/ValueError naming the first bad argument.
    One host sync reads the counted tokens, the labels' range and the form's value checks."""
    h_s = check_tensor("student_hidden", h_s)
    w_s = check_tensor("student_weight", w_s, 2)
    if h_s.shape[-1] != w_s.shape[1]:
        raise ValueError(
            f"student_hidden last dim {h_s.shape[-1]} != student_weight dim 1 ({tuple(w_s.shape)})"
        )
    check_bias("student_bias", b_s, w_s)
    deferred = form.check(teacher, h_s, w_s.shape[0], opts)
    if w_s.shape[0] == 0:
        raise ValueError("student_weight and teacher_weight need at least one vocabulary row")
    lead = h_s.shape[:-1]
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("labels=None needs ce_weight == 0 (cross-entropy needs labels)")
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape "
                f"{tuple(lead)}"
            )
    check_devices(h_s.device, student_hidden=h_s, student_weight=w_s, student_bias=b_s,
                  labels=labels)
    backend = resolve_backend(backend, h_s.device)
    if backend == "reference" and not form.reference_backend:
        raise ValueError(f"backend='reference' forms full logits: the {form.name} loss has none")
    check_chunk_size(chunk_size)
    device_type = h_s.device.type
    s_dtype = model_dtype("student", (h_s, w_s, b_s), device_type)
    dtypes = (s_dtype, form.compute_dtype(teacher, s_dtype))
    if backend == "triton" and torch.float64 in dtypes:
        raise TypeError("backend='triton' takes fp32, fp16 or bf16 inputs, got float64")

    flat = None if labels is None else labels.reshape(-1).long()  # unsigned ids do not wrap
    n = lead.numel()
    n_counted = label_range = None
    if check_labels:
        # The one host sync: the count of counted tokens (the compaction of ignored tokens needs
        # it), their labels' range (an out-of-range label must be an error, not an out-of-bounds
        # read) and the teacher form's checks on values, read together.
        checks = [x.count for x in deferred]
        if flat is not None:
            counted = flat != opts.ignore_index
            big = torch.iinfo(torch.int64).max
            low = torch.where(counted, flat, big).amin() if n else flat.new_tensor(0)
            high = torch.where(counted, flat, -big).amax() if n else flat.new_tensor(0)
            checks += [counted.sum(), low, high]
        values = torch.stack(checks).tolist() if checks else []
        for check, count in zip(deferred, values, strict=False):
            if count:
                raise check.error()
        n_counted = n if flat is None else values[-3]
        if flat is not None and n_counted:
            label_range = (values[-2], values[-1])  # (min, max) over the counted labels
    rows = n if n_counted is None else n_counted
    itemsize = max(d.itemsize for d in dtypes)
    fused = backend == "torch" and not form.collective and cpu_rows.fused(dtypes)
    chunk = chunk_size or default_chunk_size(
        rows, w_s.shape[0], form.width(teacher, w_s.shape[0], h_s.device), itemsize, h_s.device,
        fused)
    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                            for x in (h_s, w_s, b_s))
    return Call(form, teacher, h_s.reshape(-1, h_s.shape[-1]), w_s, b_s, flat, opts, backend,
                dtypes, chunk, n_counted, label_range, w_s.shape[0], grads)


def fused_loss(form: TeacherForm, teacher: tuple, student_hidden, student_weight, student_bias,
               labels, opts: DistillOptions, *, backend="auto", chunk_size=None,
               check_labels=True, return_components=False):
    """The front-end of every fused loss: checks, backend, ignored-token compaction, the autograd
    Function, the reduction's shape. Returns the loss, or with return_components a
    `reference.Components`: (loss, ce, kd) with .entropy."""
    if form.collective:  # every rank reaches the agreement, even one whose checks failed
        try:
            call = _prepare(form, teacher, student_hidden, student_weight, student_bias, labels,
                            opts, backend, chunk_size, check_labels)
        except Exception as error:  # noqa: BLE001 -- raised again, on every rank, by agree
            call = error
        call = form.agree(call)
    else:
        call = _prepare(form, teacher, student_hidden, student_weight, student_bias, labels,
                        opts, backend, chunk_size, check_labels)
    if call.label_range is not None:
        lo, hi = call.label_range
        if lo < 0 or hi >= call.vocab:
            raise ValueError(f"labels must lie in [0, {call.vocab}) or equal ignore_index="
                             f"{opts.ignore_index}; found {lo if lo < 0 else hi}")
    if not return_components:  # a zero-weighted term's values are not wanted: it may be skipped
        form = replace(form, components=False)
    lead = student_hidden.shape[:-1]
    if call.backend == "reference":
        with torch.autocast(student_hidden.device.type, enabled=False):
            s_dtype = call.dtypes[0]
            out = form.reference(
                teacher, student_hidden.to(s_dtype), student_weight.to(s_dtype),
                cast_or_none(student_bias, s_dtype), call.labels, opts, call.dtypes)
        return out if return_components else out.loss

    h_s, flat_labels, teacher = call.h_s, call.labels, call.teacher
    if flat_labels is not None:
        # contiguous: the row kernels read label i at y_ptr + i (a strided or expanded view isn't)
        flat_labels = flat_labels.contiguous()
    n = h_s.shape[0]
    counted = None  # indices of the counted tokens, when some are ignored
    if call.n_counted is not None and call.n_counted < n:
        # Ignored tokens cost no compute: gather the counted rows (index_select is differentiable:
        # its backward scatters dH back, zeros at ignored rows, so no ignored row enters a GEMM).
        counted = torch.argsort((flat_labels == opts.ignore_index).to(torch.uint8),
                                stable=True)[:call.n_counted]
        h_s, flat_labels = h_s.index_select(0, counted), flat_labels.index_select(0, counted)
        teacher = form.select(teacher, counted)
    with torch.autocast(student_hidden.device.type, enabled=False):
        out = FusedLossFunction.apply(
            h_s, student_weight, student_bias, flat_labels, form, opts, call.backend, call.chunk,
            call.dtypes, torch.is_grad_enabled(), *teacher)
    if torch.float16 in call.dtypes and check_labels and not bool(torch.isfinite(out[0]).all()):
        # fp16 only (a second host sync): logits past 65504 overflow the fp16 GEMM output
        raise ValueError(
            "the loss is not finite in fp16: logits beyond +-65504 overflow fp16 (or the hidden "
            "states/weights hold inf or NaN); compute in bf16 (torch.autocast(dtype="
            "torch.bfloat16)) or fp32"
        )
    if opts.reduction == "none":
        if counted is not None:  # back to every token, 0 at the ignored ones
            out = [x.new_zeros(n).index_copy(0, counted, x) for x in out]
        out = [x.reshape(lead) for x in out]
    return reference.Components(*out) if return_components else out[0]


# ---- the dense teacher: hidden states and LM head ---------------------------------------------

def _torch_rows(s, t, labels, row_scale, out, opts, compute_grad, components=True):
    """CPU row op: the fused native loop (`fastkd.cpu_rows`), else the spec's `token_losses` (and
    its closed-form logit gradient) on one chunk in fp32 (fp64 for fp64 logits). t is None when
    the KD term is skipped (kd_weight=0, components not wanted)."""
    if cpu_rows.dense_rows(s, t, labels, row_scale, out, opts, compute_grad, components):
        return
    if t is None:  # the student stands in for the skipped teacher: its KD term, weighted 0
        t = s
    acc = out.dtype
    s_acc, t_acc = s.to(acc), t.to(acc)
    if compute_grad:
        per_token, grad = reference.token_losses_and_grad(s_acc, t_acc, labels, opts)
        s.copy_(grad.mul_(row_scale.to(acc).unsqueeze(-1)))
    else:
        per_token = reference.token_losses(s_acc, t_acc, labels, opts)
    out.copy_(torch.stack(per_token.columns(), 1))


DENSE_ROWS = RowOp(torch=_torch_rows, triton="distill.distill_rows")


@register
@dataclass(frozen=True)
class DenseTeacher(TeacherForm):
    """The teacher as its hidden states and LM head: teacher = (hidden (N, D_t), weight (V_t,
    D_t), bias (V_t,) or None); its logits over the K = min(V, V_t) shared ids are formed per
    chunk, in its own compute dtype."""

    name = "dense"

    def check(self, teacher, h_s, vocab, opts):
        h_t, w_t, b_t = teacher
        h_t = check_tensor("teacher_hidden", h_t)
        w_t = check_tensor("teacher_weight", w_t, 2)
        if h_t.shape[-1] != w_t.shape[1]:
            raise ValueError(
                f"teacher_hidden last dim {h_t.shape[-1]} != teacher_weight dim 1 "
                f"({tuple(w_t.shape)})"
            )
        if h_s.shape[:-1] != h_t.shape[:-1]:
            raise ValueError(
                f"student_hidden and teacher_hidden must have the same leading shape (tokens), "
                f"got {tuple(h_s.shape[:-1])} and {tuple(h_t.shape[:-1])}"
            )
        if w_t.shape[0] == 0 and not self.collective:
            raise ValueError("student_weight and teacher_weight need at least one vocabulary row")
        check_bias("teacher_bias", b_t, w_t)
        check_devices(h_s.device, student_hidden=h_s, teacher_hidden=h_t, teacher_weight=w_t,
                      teacher_bias=b_t)
        return []

    def compute_dtype(self, teacher, s_dtype):
        return model_dtype("teacher", teacher, teacher[0].device.type)

    def select(self, teacher, index):
        h_t, w_t, b_t = teacher
        return h_t.reshape(-1, h_t.shape[-1]).index_select(0, index), w_t, b_t

    def width(self, teacher, vocab, device):
        return min(vocab, teacher[1].shape[0])

    def reference(self, teacher, h_s, w_s, b_s, labels, opts, dtypes):
        h_t, w_t, b_t = (cast_or_none(x, dtypes[1]) for x in teacher)
        return reference.distill_loss(h_s, w_s, h_t, w_t, labels, opts, b_s, b_t)

    def row_op(self, backend):
        return DENSE_ROWS.on(backend)

    def rows(self, teacher, labels, row_scale, out, opts, backend, dtypes, grads, chunk, vocab):
        h_t, w_t, b_t = teacher
        t_dtype = dtypes[1]
        k = min(vocab, w_t.shape[0])  # the shared ids (this rank's, if sharded)
        h_t = h_t.detach().reshape(-1, h_t.shape[-1]).to(t_dtype)
        w_t = w_t.detach()[:k].to(t_dtype)
        b_t = None if b_t is None else b_t.detach()[:k].to(t_dtype)
        row_op = self.row_op(backend)
        lean = backend == "torch" and not self.components and not self.collective
        if lean:  # the CPU row op skips a zero-weighted term; kd_weight=0: no teacher GEMM either
            row_op = functools.partial(row_op, components=False)
        t_buf = None if lean and opts.kd_weight == 0 else padded_rows(chunk, k, t_dtype,
                                                                      h_t.device)

        def rows(i0, i1, s):
            t = None if t_buf is None else t_buf[: i1 - i0]
            if t is not None:
                linear_into(h_t[i0:i1], w_t, b_t, t)
            row_labels = None if labels is None else labels[i0:i1]
            row_op(s, t, row_labels, row_scale[i0:i1], out[i0:i1], opts, grads)

        return rows


# ---- the dense loss's public API ----------------------------------------------------------------

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
    """Distillation loss through both LM heads without materialising the N x V logits.

    Shapes: student_hidden (..., D_s), teacher_hidden (..., D_t) with the same leading shape (N
    tokens once flattened); student_weight (V, D_s), teacher_weight (V_t, D_t); labels (...,)
    integer or None; biases (V,) / (V_t,). fp32, fp16 or bf16 (fp64 on the torch/reference
    backends).

    Options (keyword-only, the fields of `fastkd.DistillOptions`, with their defaults):
    temperature=1.0, ce_weight=0.5, kd_weight=0.5, divergence="forward_kl", beta=0.5, skew=0.1,
    ignore_index=-100, reduction="mean", student_softcap=None, teacher_softcap=None,
    student_logit_scale=1.0, teacher_logit_scale=1.0.

    Per token, with s = h_s W_s^T + b_s and t = h_t W_t^T + b_t, each times its logit scale, then
    optionally softcapped (c tanh(x / c)), K = min(V, V_t), p = softmax(t[:K] / T),
    q = softmax(s[:K] / T):

        loss = ce_weight * cross_entropy(s, y) + kd_weight * T**2 * D(p, q)

    D is KL(p||q) ("forward_kl"), KL(q||p) ("reverse_kl"), beta KL(p||m) + (1-beta) KL(q||m) with
    m = beta p + (1-beta) q ("jsd"), KL(p || skew p + (1-skew) q) ("skew_forward_kl"),
    KL(q || (1-skew) p + skew q) ("skew_reverse_kl") or sum |p - q| / 2 ("tvd"). Tokens labelled
    ignore_index count for nothing; "mean" divides by the counted tokens. Plain-torch equivalent:
    `fastkd.reference.distill_loss`.

    Returns the loss (a scalar, or the leading shape for reduction="none"); with
    return_components=True, a `fastkd.reference.Components` that unpacks as (loss, ce, kd)
    (reduced, unweighted, detached, kd without T**2) and carries `.entropy`, the student's entropy
    H(q) = -sum q log q at T over the shared ids, reduced (and detached) the same way.
    Gradients reach student_hidden, student_weight and student_bias (each in its own dtype); the
    teacher gets none. backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton" (on CPU
    tensors: the kernels in Triton's interpreter, slow, for checking), "torch", "reference".
    chunk_size: tokens per step (default from a memory budget).

    Ignored tokens cost nothing: the counted ones are gathered before the chunk loop (their count
    comes with the label-range check, the one host sync). check_labels=False skips that sync, so
    the loss can sit inside a `torch.compile(fullgraph=True)` graph: labels are then the caller's
    promise (in [0, V) or ignore_index; an id out of range reads out of bounds in the kernel), and
    ignored tokens are computed and masked instead of skipped.

    Vocab-parallel heads (tensor parallelism): with process_group, every rank of the group passes
    the same hidden states and global labels and its own rows of both heads, student rows
    [vocab_start, vocab_start + V_r) and teacher rows [vocab_start, vocab_start + V_t,r) (biases
    likewise); in rank order the shards tile each vocabulary. Every call checks, in one
    all-gather, that the shards tile, and that the ranks agree on the tokens, the counted tokens
    and every option; a bad input on any rank raises the same error on every rank. Every rank gets
    the single-process loss; gradients reach its own weight/bias rows, and student_hidden gets
    dL/dh_s summed over the ranks (the same on every rank). Ranks exchange a few floats per token,
    never logits (`fastkd.vocab_parallel`).
    """
    try:
        opts = options.from_kwargs("fused_distill_loss", options_)
    except (TypeError, ValueError) as error:
        if process_group is None:
            raise
        from fastkd.vocab_parallel import agree

        agree(process_group, error)  # the other ranks are in their agreement: raise everywhere
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
    if process_group is not None:
        from fastkd.vocab_parallel import VocabParallelTeacher

        form = VocabParallelTeacher(process_group, vocab_start)
    elif vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start!r} needs a process_group (vocab-parallel)")
    else:
        form = DenseTeacher()
    return fused_loss(form, (teacher_hidden, teacher_weight, teacher_bias), student_hidden,
                      student_weight, student_bias, labels, opts, backend=backend,
                      chunk_size=chunk_size, check_labels=check_labels,
                      return_components=return_components)


class FusedDistillLoss(torch.nn.Module):
    """Module form of `fused_distill_loss`: options fixed at construction, tensors at call time.

    >>> crit = FusedDistillLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    >>> loss = crit(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)

    The first arguments may also come positionally, in their order before the options became one
    dataclass (`FusedDistillLoss(2.0, 0.5, 0.5)`); options added since are keyword-only.
    """

    @options.option_signature(positional=(
        "temperature", "ce_weight", "kd_weight", "divergence", "beta", "skew", "ignore_index",
        "reduction", "student_softcap", "teacher_softcap", "return_components", "backend",
        "chunk_size", "check_labels", "process_group"))
    def __init__(self, *, return_components: bool = False, backend: str = "auto",
                 chunk_size: int | None = None, check_labels: bool = True, process_group=None,
                 **options_):
        super().__init__()
        self.options = options.from_kwargs("FusedDistillLoss", options_)
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

