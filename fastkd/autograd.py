"""The pipeline below the front-end (`fastkd.loss.fused_loss`): one autograd Function, one custom
op, one chunk loop over the student's tokens, and the teacher forms that plug into it.

The layers, top to bottom (each name says which layer it is):
    FusedLossFunction      autograd: gradients formed in forward, scaled (or recomputed) in backward
    run_chunks             the chunk loop, through the custom op `fastkd::chunk_loop` when the
                           teacher form allows it (opaque to torch.compile), else eagerly
    chunk_loop             per chunk of tokens (rows i0:i1), with G = dloss/dS:
        S = H_s W_s^T + b_s      (chunk, V)  cuBLAS, in the compute dtype, into a reused buffer
        rows(i0, i1, S)          the teacher form's row op: per-token (loss, ce, kd, entropy),
                                 and G over S
        dH_s[i0:i1] = G W_s,  dW_s += G^T H_s,  db_s += sum_rows G    (dW_s, db_s in fp32)
    TeacherForm.rows       what differs per teacher form: the dense teacher forms its logits T =
                           H_t W_t[:K]^T + b_t per chunk (FLOPs 2 N V (3 D_s + D_t), the floor);
                           the sparse teacher brings k (id, log-probability) pairs per token;
                           the vocab-parallel teacher wraps the dense one around all-reduces
    RowOp                  the row op on each backend: plain torch (the spec's closed form) or
                           the Triton kernel (`fastkd.kernels`), the one backend dispatch

The loss is the last op of a training step, so for reduction "mean"/"sum" the gradients are
computed in the forward pass with the reduction's scale folded in, and backward only multiplies
them by the upstream scalar. For reduction "none" the upstream gradient differs per token, so
backward recomputes the chunks with it as the row scale.
"""

from __future__ import annotations

import importlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fastkd import options, reference
from fastkd.options import DistillOptions

# The per-token columns every row op writes, in this order (kernels/_common.py's LOSS ... ENTROPY)
OUTPUTS = ("loss", "ce", "kd", "entropy")

# ---- chunk sizes and buffers --------------------------------------------------------------------

GPU_CHUNK_BUDGET = 512 * 2**20  # bytes of the two logit buffers (the kernel allocates nothing)
CPU_CHUNK_BUDGET = 256 * 2**20  # bytes of the buffers and the torch row op's temporaries
# The torch row op (the spec's closed-form gradient) holds at most about this many (V + K)-wide
# rows of its accumulation dtype per token at its peak, the buffers included: 5.5 to 9 measured
# for jsd, the largest (tests/test_loss_api.py checks the peak against the budget).
CPU_ROW_OP_COPIES = 10
# The fused CPU row op (`fastkd.cpu_rows`) holds the two logit buffers alone: they get the whole
# budget, up to 512 rows, where the GEMMs run within a few % of their rate on 2048 (D_s = 256,
# D_t = 512, 2 threads: 128 rows cost them 40% more, 256 rows 15%); more rows would add memory
# and little speed. Peak beyond the inputs at N = 2048 (python -m bench --grid floor): 159 MiB
# at V = 32000 (512 rows), 383 MiB at V = 128256 (256 rows), against 176 and 424 MiB for the
# spec's row op at its budget.
CPU_FUSED_MAX_ROWS = 512


def default_chunk_size(
    n_tokens: int, vocab: int, shared: int, itemsize: int, device: torch.device,
    fused: bool = False,
) -> int:
    """Tokens per chunk so a chunk's memory fits a budget: on GPU the two logit buffers in 512
    MiB; on CPU the buffers and the row op's temporaries in 256 MiB (`fused`: the fused CPU row
    op, which has none; at most CPU_FUSED_MAX_ROWS). `shared`: the teacher side's width per token
    (the dense teacher's K logits).

    Each chunk re-reads and re-writes the fp32 dW accumulator (V x D_s), so fewer, larger chunks
    cost less traffic; 512 MiB gives 1024-token chunks at V = 128k in bf16 (unmeasured on a GPU).
    """
    if device.type == "cuda":
        rows = GPU_CHUNK_BUDGET // ((vocab + shared) * itemsize)
    else:
        copies = 1 if fused else CPU_ROW_OP_COPIES
        rows = CPU_CHUNK_BUDGET // ((vocab + shared) * max(itemsize, 4) * copies)
        if fused:
            rows = min(rows, CPU_FUSED_MAX_ROWS)
    rows = max(1, rows)
    if rows >= 128:
        rows -= rows % 128  # keep the GEMM's M dimension a multiple of the tile size
    return min(rows, max(n_tokens, 1))


ROW_ALIGN = 64  # elements: logit buffer rows start 128 bytes apart whatever V is


def padded_rows(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, width) buffer whose row stride is width rounded up to ROW_ALIGN; the view's
    entries are uninitialised, the pad columns between rows are zero.

    The row kernel masks its loads and stores by the stride, so a stride divisible by 16 keeps
    them 128-bit wide at any vocabulary size (V = 50257 would give scalar loads); the GEMMs
    write the (rows, width) view through cuBLAS's leading dimension, with no copy. The pad is
    zeroed because GEMMs may read it: CPU bf16 GEMMs (oneDNN, one thread) load whole vectors of
    each row of A past its width, and NaN garbage there times the zero padding of B gave NaN."""
    stride = -(-width // ROW_ALIGN) * ROW_ALIGN
    buf = torch.empty(rows, stride, device=device, dtype=dtype)
    buf[:, width:].zero_()
    return buf[:, :width]


def accumulator_dtype(dtypes: tuple[torch.dtype, torch.dtype]) -> torch.dtype:
    """fp32 for half-precision and fp32 compute, fp64 when either model computes in fp64."""
    return torch.promote_types(torch.promote_types(*dtypes), torch.float32)


def cast_or_none(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def linear_into(h, w, b, out) -> None:
    """out = h w^T + b (out may be a strided view: a padded buffer)."""
    if b is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(b, h, w.t(), out=out)


_FP32_ADDMM: dict[torch.device, bool] = {}


def _fp32_addmm_works(device: torch.device) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=float32, out=acc)` accumulates a half-precision
    product into fp32 in place here (cuBLAS with an fp32 C; CUDA only in recent torch). Probed
    once per device on tiny tensors; the probe's comparison is its one host sync."""
    if device not in _FP32_ADDMM:
        a = torch.randn(8, 16, device=device).bfloat16()
        b = torch.randn(16, 4, device=device).bfloat16()
        acc = torch.randn(8, 4, device=device)
        want = acc + a.float() @ b.float()
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_ADDMM[device] = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
        except (RuntimeError, TypeError):  # no kernel for it on this device, or an older torch
            _FP32_ADDMM[device] = False
    return _FP32_ADDMM[device]


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly half precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_addmm_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # fp32 C in the GEMM epilogue
    else:
        acc += torch.mm(a, b).float()  # one (V, D) half-precision temporary per chunk


# ---- backends: the row op on each, and the kernels' import ---------------------------------------

KERNEL_MODULES = ("distill", "sparse")


def _interpreted(jit_function) -> bool:
    return type(jit_function).__name__ == "InterpretedFunction"


_TOO_LATE = (
    "backend='triton' on CPU tensors runs the kernels in Triton's interpreter, which Triton "
    "fixes for the whole process when it is first imported (torch.compile and torch custom ops "
    "import it: fastkd's loss is one), and this process imported it for compiling: set "
    "TRITON_INTERPRET=1 in the environment before the process starts (TRITON_INTERPRET=1 python "
    "...) or before its first import of torch._dynamo or triton, or use backend='torch' (or "
    "'auto') on CPU tensors"
)


def load_kernels(device: torch.device) -> None:
    """Import fastkd.kernels for tensors on `device`: compiled for CUDA, in Triton's interpreter
    for CPU tensors. @triton.jit reads TRITON_INTERPRET when it decorates a function, at import:
    Triton's own language functions when triton is first imported, fastkd's kernels when
    fastkd.kernels is (and Triton reads it again at launches). So a first backend="triton" call on
    CPU tensors in a process that has not imported triton yet sets TRITON_INTERPRET=1 for the rest
    of the process and imports both (every Triton kernel of the process then runs interpreted);
    otherwise TRITON_INTERPRET=1 must be set from the start. A ValueError saying so when the
    kernels cannot run on `device`."""
    cpu = device.type != "cuda"
    name = f"fastkd.kernels.{KERNEL_MODULES[0]}"
    if name not in sys.modules:
        lazy = cpu and os.environ.get("TRITON_INTERPRET") != "1"
        if lazy and "triton" in sys.modules and not _interpreted(
                sys.modules["triton"].language.zeros):
            raise ValueError(_TOO_LATE)
        if lazy:
            os.environ["TRITON_INTERPRET"] = "1"  # for good: Triton reads it at launches too
        for module in KERNEL_MODULES:
            importlib.import_module(f"fastkd.kernels.{module}")
    interpreted = _interpreted(sys.modules[name].distill_rows_kernel)
    if cpu and not interpreted:
        raise ValueError(_TOO_LATE)
    if not cpu and interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CUDA tensors: this process loaded the kernels in Triton's "
            "interpreter for an earlier backend='triton' call on CPU tensors (Triton decides "
            "once per process); run the GPU work in a process that does not do that first"
        )


@dataclass(frozen=True)
class RowOp:
    """One row op on every backend: `torch`, a plain-torch function (the spec's closed form);
    `triton`, its launcher in fastkd.kernels as "module.function" (imported at first use, after
    the front-end's `load_kernels`), with the same arguments."""

    torch: Callable
    triton: str

    def on(self, backend: str) -> Callable:
        if backend == "torch":
            return self.torch
        module, name = self.triton.split(".")
        return getattr(importlib.import_module(f"fastkd.kernels.{module}"), name)


# ---- teacher forms -----------------------------------------------------------------------------

FORMS: dict[str, type[TeacherForm]] = {}
LEAN = ":lean"  # an op key's suffix: components=False


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


@dataclass(frozen=True)
class TeacherForm(ABC):
    """What a teacher form supplies to the shared front-end and chunk loop. A form is a frozen
    dataclass of its non-tensor settings; the teacher's tensors travel beside it as a tuple
    (`teacher`), so the Function and the custom op see them as tensors."""

    name: ClassVar[str]
    unused_options: ClassVar[tuple[str, ...]] = ()  # DistillOptions fields this form does not take
    reference_backend: ClassVar[bool] = True  # whether backend="reference" applies
    collective: ClassVar[bool] = False  # whether the ranks of a process group run it together
    # Whether every term's per-token values are wanted (return_components); if not, the CPU row
    # ops skip a term whose weight is 0.
    components: bool = field(default=True, kw_only=True)

    def op_key(self) -> str | None:
        """The form as the custom op's `form` string (None: run the chunk loop eagerly)."""
        return self.name + ("" if self.components else LEAN)

    @classmethod
    def from_op_key(cls, key: str) -> TeacherForm:
        return cls(components=not key.endswith(LEAN))

    @abstractmethod
    def check(self, teacher: tuple, h_s: torch.Tensor, vocab: int,
              opts: DistillOptions) -> list[Deferred]:
        """Raise a TypeError/ValueError naming the first bad teacher argument (types, shapes,
        devices); return the checks that need the values (read in the one host sync)."""

    def compute_dtype(self, teacher: tuple, s_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the teacher's side of the row op (the student's if it has no GEMM)."""
        return s_dtype

    @abstractmethod
    def select(self, teacher: tuple, index: torch.Tensor) -> tuple:
        """The teacher's tensors at the counted tokens only."""

    @abstractmethod
    def width(self, teacher: tuple, vocab: int, device: torch.device) -> int:
        """Elements per token the row op holds beside the student's logits (the chunk budget)."""

    @abstractmethod
    def reference(self, teacher: tuple, h_s, w_s, b_s, labels, opts: DistillOptions,
                  dtypes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """backend="reference": the plain-torch spec's `reference.Components` with full
        logits."""

    @abstractmethod
    def rows(self, teacher: tuple, labels, row_scale, out, opts: DistillOptions, backend: str,
             dtypes, grads: bool, chunk: int,
             vocab: int) -> Callable[[int, int, torch.Tensor], None]:
        """The row op over one chunk: rows(i0, i1, s) writes out[i0:i1] (OUTPUTS) and, if
        grads, G = row_scale dloss/ds over the student logits s (chunk, vocab) of tokens i0:i1.
        Set-up (casts, buffers) happens once per chunk loop, here."""

    def agree(self, call):
        """A collective form's agreement of its ranks on the checked call (`fastkd.loss.Call`, or
        the exception a rank's checks raised): the call to run, or the same error on every rank."""
        raise TypeError(f"{type(self).__name__} is not a collective form: its ranks do not agree")

    def student_grad(self, dh: torch.Tensor) -> torch.Tensor:
        """dL/dH_s after the chunk loop (vocab-parallel: summed over the ranks)."""
        return dh


# ---- the chunk loop, the custom op ------------------------------------------------------------

def chunk_loop(h_s, w_s, b_s, labels, row_scale, form: TeacherForm, teacher: tuple,
               opts: DistillOptions, backend: str, chunk: int, dtypes, grads: bool):
    """The shared student loop. Returns per-token (n, OUTPUTS) values and, if grads, (dH, dW, db)
    (else Nones); the per-token values, dW and db in fp32 (fp64 for fp64 inputs). dtypes: the
    (student, teacher) compute dtypes; each model's GEMM runs in its own."""
    dtype = dtypes[0]
    acc = accumulator_dtype(dtypes)
    n, d_s = h_s.shape
    vocab, dev = w_s.shape[0], h_s.device
    chunk = min(chunk, max(n, 1))
    out = torch.empty(n, len(OUTPUTS), device=dev, dtype=acc)
    rows = form.rows(teacher, labels, row_scale, out, opts, backend, dtypes, grads, chunk, vocab)
    h_s, w_s, b_s = h_s.to(dtype), w_s.to(dtype), cast_or_none(b_s, dtype)
    s_buf = padded_rows(chunk, vocab, dtype, dev)
    dh = torch.empty(n, d_s, device=dev, dtype=dtype) if grads else None
    dw = torch.zeros(vocab, d_s, device=dev, dtype=acc) if grads else None
    db = torch.zeros(vocab, device=dev, dtype=acc) if grads and b_s is not None else None
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        s, hs = s_buf[: i1 - i0], h_s[i0:i1]
        linear_into(hs, w_s, b_s, s)
        rows(i0, i1, s)
        if grads:  # s now holds G = dloss/dS for this chunk
            torch.mm(s, w_s, out=dh[i0:i1])
            _accumulate_mm(dw, s.t(), hs)
            if db is not None:
                db += s.sum(0, dtype=acc)
    if dh is not None:
        dh = form.student_grad(dh)
    return out, dh, dw, db


_ARGS = ("(Tensor h_s, Tensor w_s, Tensor? b_s, Tensor? labels, Tensor row_scale, str form, "
         "Tensor?[] teacher, str backend, int chunk, ScalarType s_dtype, ScalarType t_dtype, "
         "bool grads, ")


# The chunk loop as one custom op: opaque to torch.compile (its buffers, out= GEMMs and kernel
# launches stay eager), so a compiled graph holds the loss whole when check_labels=False. Its
# option arguments are DistillOptions' fields (`options.op_schema`).
@torch.library.custom_op("fastkd::chunk_loop", mutates_args=(),
                         schema=_ARGS + options.op_schema() + ") -> (Tensor, Tensor, Tensor, "
                         "Tensor)")
def _chunk_loop_op(h_s, w_s, b_s, labels, row_scale, form, teacher, backend, chunk, s_dtype,
                   t_dtype, grads, *option_values):
    """(per-token, dH, dW, db) of `chunk_loop`; absent gradients as empty tensors."""
    form = FORMS[form.split(":")[0]].from_op_key(form)
    out, *grads_out = chunk_loop(h_s, w_s, b_s, labels, row_scale, form, tuple(teacher),
                                 options.from_op_args(option_values), backend, chunk,
                                 (s_dtype, t_dtype), grads)
    return out, *(h_s.new_empty(0) if g is None else g for g in grads_out)


@_chunk_loop_op.register_fake
def _(h_s, w_s, b_s, labels, row_scale, form, teacher, backend, chunk, s_dtype, t_dtype, grads,
      *option_values):
    acc = accumulator_dtype((s_dtype, t_dtype))
    n, (vocab, d_s) = h_s.shape[0], w_s.shape
    out = h_s.new_empty((n, len(OUTPUTS)), dtype=acc)
    dh = h_s.new_empty((n, d_s) if grads else (0,), dtype=s_dtype)
    dw = h_s.new_empty((vocab, d_s) if grads else (0,), dtype=acc)
    db = h_s.new_empty((vocab,) if grads and b_s is not None else (0,), dtype=acc)
    return out, dh, dw, db


def run_chunks(h_s, w_s, b_s, labels, row_scale, form: TeacherForm, teacher: tuple,
               opts: DistillOptions, backend: str, chunk: int, dtypes, grads: bool):
    """`chunk_loop` through the custom op when the form has an op key, else eagerly (the
    vocab-parallel form: its collectives stay outside any graph). Returns (per-token, (dH, dW,
    db)), None for absent gradients."""
    key = form.op_key()
    if key is None:
        out, *grads_out = chunk_loop(h_s, w_s, b_s, labels, row_scale, form, teacher, opts,
                                     backend, chunk, dtypes, grads)
        return out, grads_out
    out, dh, dw, db = torch.ops.fastkd.chunk_loop(
        h_s, w_s, b_s, labels, row_scale, key, list(teacher), backend, chunk, dtypes[0],
        dtypes[1], grads, *options.op_args(opts),
    )
    if not grads:
        return out, (None, None, None)
    return out, (dh, dw, None if b_s is None else db)


# ---- the autograd Function ---------------------------------------------------------------------

def counted_scale(labels, n: int, opts: DistillOptions, acc: torch.dtype, device):
    """(valid, r): the counted-token mask and each token's gradient scale for the reduction (1
    for "sum", 1/count for "mean", 0 at ignored tokens)."""
    valid = (torch.ones(n, dtype=torch.bool, device=device) if labels is None
             else labels != opts.ignore_index)
    scale = valid.to(acc)
    if opts.reduction == "mean":
        scale = scale / valid.sum().clamp(min=1)
    return valid, scale


def first_order_only() -> None:
    """Autograd runs a backward in grad mode only for create_graph=True: refuse it loudly."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastkd's fused losses have no second derivative: their gradients come from "
            "kernels, not from differentiable ops, so create_graph=True (double backward, "
            "Hessian-vector products, gradient penalties) would silently drop terms. Use "
            "backend='reference' for those."
        )


def input_grads(grads, need, in_dtypes, g):
    """(dH, dW, db) cast to their inputs' dtypes, None where not needed; times the upstream
    scalar g unless it is None (already folded in)."""
    out = []
    for grad, needed, dtype in zip(grads, need, in_dtypes, strict=True):
        if not needed or grad is None:
            out.append(None)
            continue
        cast = grad.to(dtype)  # a new tensor only when the dtype changes: scale it in place
        if g is not None:
            cast = cast.mul_(g) if cast is not grad else grad * g
        out.append(cast)
    return out


class FusedLossFunction(torch.autograd.Function):
    """Every fused loss: student inputs flattened to (N, D), the teacher as a form and its
    tensors (last, so autograd sees them as inputs that get no gradient); returns (loss, ce, kd,
    entropy) reduced by opts.reduction."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, labels, form: TeacherForm, opts: DistillOptions, backend,
                chunk, dtypes, grad_enabled, *teacher):
        # needs_input_grad ignores torch.no_grad(); grad_enabled (the caller's grad mode) does not.
        need = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        grads_now = any(need) and opts.reduction != "none"
        valid, scale = counted_scale(labels, h_s.shape[0], opts, accumulator_dtype(dtypes),
                                     h_s.device)
        per_token, (dh, dw, db) = run_chunks(h_s, w_s, b_s, labels, scale, form, teacher, opts,
                                             backend, chunk, dtypes, grads_now)
        ctx.form, ctx.opts, ctx.backend, ctx.chunk, ctx.dtypes = form, opts, backend, chunk, dtypes
        ctx.in_dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        if grads_now:
            ctx.save_for_backward(dh, dw, db)
        elif any(need):  # reduction "none"
            ctx.save_for_backward(h_s, w_s, b_s, labels, valid, *teacher)
        ctx.grads_now = grads_now
        out = [reference.reduce(x, valid, opts.reduction) for x in per_token.unbind(1)]
        ctx.mark_non_differentiable(*out[1:])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_components):
        first_order_only()
        need = ctx.needs_input_grad[:3]
        if ctx.grads_now:
            dh, dw, db = ctx.saved_tensors
            g = grad_loss.to(dw.dtype)
        else:  # reduction "none": recompute the chunks with the upstream gradient as row scale
            h_s, w_s, b_s, labels, valid, *teacher = ctx.saved_tensors
            scale = grad_loss.to(accumulator_dtype(ctx.dtypes)) * valid
            _, (dh, dw, db) = run_chunks(h_s, w_s, b_s, labels, scale, ctx.form, tuple(teacher),
                                         ctx.opts, ctx.backend, ctx.chunk, ctx.dtypes, True)
            g = None
        out = input_grads((dh, dw, db), need, ctx.in_dtypes, g)
        return (*out, *[None] * (len(ctx.needs_input_grad) - 3))
