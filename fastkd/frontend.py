"""The front-end every fused loss shares: `fused_loss` checks a call's inputs, fixes its plan and
runs it.

In order: the student's tensors and the labels are checked here, the teacher's by its form
(`fastkd.forms.TeacherForm.check`); one host sync reads everything that needs values (the
counted tokens, the labels' range, the form's value checks); the backend is resolved, the compute
dtypes and the chunk size fixed into one `fastkd.forms.Plan`; ignored tokens are gathered out;
then the autograd Function (`fastkd.autograd`) runs the chunk loop, and the result takes the
reduction's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastkd import cpu_rows
from fastkd.autograd import FusedLossFunction, cast_or_none, default_chunk_size, forward_only
from fastkd.backends import resolve_backend
from fastkd.checks import positive_int
from fastkd.forms import Deferred, Plan, TeacherForm
from fastkd.options import DistillOptions

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


def check_int_tensor(name: str, x: object) -> torch.Tensor:
    """x as an integer tensor (any width, signed or not), else a TypeError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
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


@dataclass(frozen=True)
class Call:
    """One call of a fused loss once its inputs are checked: its plan, the tensors the chunk loop
    runs on, and what the ranks of a vocab-parallel call must agree on."""

    plan: Plan
    teacher: tuple
    h_s: torch.Tensor  # (N, D_s)
    w_s: torch.Tensor
    b_s: torch.Tensor | None
    labels: torch.Tensor | None  # (N,) int64
    n_counted: int | None  # None: not read (check_labels=False)
    label_range: tuple[int, int] | None  # (min, max) of the counted labels, read with n_counted
    vocab: int  # labels must lie in [0, vocab)
    grads: bool  # whether the student's gradients are wanted


def _check_student(h_s, w_s, b_s) -> torch.Tensor:
    h_s = check_tensor("student_hidden", h_s)
    w_s = check_tensor("student_weight", w_s, 2)
    if h_s.shape[-1] != w_s.shape[1]:
        raise ValueError(
            f"student_hidden last dim {h_s.shape[-1]} != student_weight dim 1 ({tuple(w_s.shape)})"
        )
    check_bias("student_bias", b_s, w_s)
    return h_s


def _check_labels(labels, lead: torch.Size, opts: DistillOptions) -> None:
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("labels=None needs ce_weight == 0 (cross-entropy needs labels)")
        return
    check_int_tensor("labels", labels)
    if labels.shape != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the hidden states' "
                         f"leading shape {tuple(lead)}")


def _read_values(deferred: list[Deferred], flat, n: int, opts: DistillOptions):
    """The one host sync: the count of counted tokens (the compaction of ignored tokens needs
    it), their labels' range (an out-of-range label must be an error, not an out-of-bounds read)
    and the teacher form's checks on values, read together. Returns (n_counted, label_range);
    raises the first failed check's error."""
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
    if flat is None:
        return n, None
    n_counted = values[-3]
    return n_counted, (values[-2], values[-1]) if n_counted else None


def prepare(form: TeacherForm, student: tuple, teacher: tuple, labels, opts: DistillOptions,
            backend: str, chunk_size: int | None, check_labels: bool) -> Call:
    """Every check of `fused_loss` but the label range (which a vocab-parallel call checks
    against the ranks' whole vocabulary), then the call's plan: a TypeError/ValueError naming the
    first bad argument."""
    h_s, w_s, b_s = student
    h_s = _check_student(h_s, w_s, b_s)
    deferred = form.check(teacher, h_s, w_s.shape[0], opts)
    if w_s.shape[0] == 0:
        raise ValueError("student_weight and teacher_weight need at least one vocabulary row")
    lead = h_s.shape[:-1]
    _check_labels(labels, lead, opts)
    check_devices(h_s.device, student_hidden=h_s, student_weight=w_s, student_bias=b_s,
                  labels=labels)
    backend = resolve_backend(backend, h_s.device)
    if backend == "reference" and not form.reference_backend:
        raise ValueError(f"backend='reference' forms full logits: the {form.name} loss has none")
    positive_int("chunk_size", chunk_size, optional=True)
    s_dtype = model_dtype("student", (h_s, w_s, b_s), h_s.device.type)
    dtypes = (s_dtype, form.compute_dtype(teacher, s_dtype))
    if backend == "triton" and torch.float64 in dtypes:
        raise TypeError("backend='triton' takes fp32, fp16 or bf16 inputs, got float64")

    flat = None if labels is None else labels.reshape(-1).long()  # unsigned ids do not wrap
    n = lead.numel()
    n_counted, label_range = (_read_values(deferred, flat, n, opts) if check_labels
                              else (None, None))
    rows = n if n_counted is None else n_counted  # the chunk loop's tokens
    native = backend == "torch" and form.native_rows and cpu_rows.native(dtypes)
    chunk = min(chunk_size or default_chunk_size(
        rows, w_s.shape[0], form.width(teacher, w_s.shape[0], h_s.device),
        max(d.itemsize for d in dtypes), h_s.device, native), max(rows, 1))
    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                            for x in (h_s, w_s, b_s))
    return Call(Plan(form, opts, backend, chunk, dtypes), teacher, h_s.reshape(-1, h_s.shape[-1]),
                w_s, b_s, flat, n_counted, label_range, w_s.shape[0], grads)


def fused_loss(form: TeacherForm, student: tuple, teacher: tuple, labels, opts: DistillOptions, *,
               backend="auto", chunk_size=None, check_labels=True, return_components=False):
    """The front-end of every fused loss: checks, the plan, ignored-token compaction, the autograd
    Function, the reduction's shape. student = (hidden, weight, bias or None); teacher: the
    form's tensors. Returns the loss, or with return_components the form's `components`
    (a `reference.Components`: (loss, ce, kd) with .entropy)."""
    if form.collective:  # every rank reaches the agreement, even one whose checks failed
        try:
            call = prepare(form, student, teacher, labels, opts, backend, chunk_size, check_labels)
        except Exception as error:  # noqa: BLE001 -- raised again, on every rank, by agree
            call = error
        call = form.agree(call)
    else:
        call = prepare(form, student, teacher, labels, opts, backend, chunk_size, check_labels)
    if not return_components:  # a zero-weighted term's values are not wanted: it may be skipped
        call = replace(call, plan=replace(call.plan, components=False))
    if call.label_range is not None:
        lo, hi = call.label_range
        if lo < 0 or hi >= call.vocab:
            raise ValueError(f"labels must lie in [0, {call.vocab}) or equal ignore_index="
                             f"{opts.ignore_index}; found {lo if lo < 0 else hi}")
    h_s, w_s, b_s = student
    with torch.autocast(h_s.device.type, enabled=False):
        if call.plan.backend == "reference":
            s_dtype = call.plan.dtypes[0]
            out = form.reference(teacher, h_s.to(s_dtype), w_s.to(s_dtype),
                                 cast_or_none(b_s, s_dtype), call.labels, call.plan)
            return out if return_components else out.loss
        out = _run(call)
    fp16 = torch.float16 in call.plan.dtypes
    if fp16 and check_labels and not bool(torch.isfinite(out[0]).all()):
        # fp16 only (a second host sync): logits past 65504 overflow the fp16 GEMM output
        raise ValueError(
            "the loss is not finite in fp16: logits beyond +-65504 overflow fp16 (or the hidden "
            "states/weights hold inf or NaN); compute in bf16 (torch.autocast(dtype="
            "torch.bfloat16)) or fp32"
        )
    if opts.reduction == "none":
        out = [x.reshape(h_s.shape[:-1]) for x in out]
    return call.plan.form.components(out, call) if return_components else out[0]


def _run(call: Call) -> list[torch.Tensor]:
    """The checked call through the Function (or `forward_only` when nothing is differentiated),
    its tokens gathered in the form's order first (`TeacherForm.row_order`: ignored ones out):
    (loss, ce, kd, entropy) and the form's extra columns, reduced, or for reduction "none" per
    token (N,), 0 at the ignored ones."""
    plan, h_s, labels, teacher = call.plan, call.h_s, call.labels, call.teacher
    if labels is not None:
        # contiguous: the row kernels read label i at y_ptr + i (a strided or expanded view isn't)
        labels = labels.contiguous()
    n = h_s.shape[0]
    ignored = None if labels is None else labels == plan.opts.ignore_index
    order = plan.form.row_order(teacher, ignored, call.n_counted)
    if order is not None:
        # Ignored tokens cost no compute: gather the counted rows, in the form's order (routing:
        # by teacher). index_select is differentiable: its backward scatters dH back, zeros at
        # ignored rows, so no ignored row enters a GEMM.
        h_s = h_s.index_select(0, order)
        labels = None if labels is None else labels.index_select(0, order)
        teacher = plan.form.select(teacher, order)
    inputs = (h_s, call.w_s, call.b_s, *teacher)
    differentiable = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in inputs)
    run = FusedLossFunction.apply if differentiable else forward_only
    out = list(run(h_s, call.w_s, call.b_s, labels, plan, *teacher))
    if plan.opts.reduction == "none" and order is not None:  # every token, 0 at ignored ones
        out = [x.new_zeros(n).index_copy(0, order, x) for x in out]
    return out
