"""The pipeline below the front-end (`fastkd.frontend.fused_loss`): one autograd Function, one
custom op, one chunk loop over the student's tokens, and the buffers they reuse.

The layers, top to bottom (each name says which layer it is):
    FusedLossFunction      autograd: gradients formed in forward, scaled (or recomputed) in backward
                           (`forward_only` when there is nothing to differentiate)
    run_chunks             the chunk loop, through the custom op `fastkd::chunk_loop` when the
                           teacher form allows it (opaque to torch.compile), else eagerly
    chunk_loop             per chunk of tokens (rows i0:i1), with G = dloss/dS:
        S = H_s W_s^T + b_s      (chunk, V)  cuBLAS, in the compute dtype, into a reused buffer
        rows(i0, i1, S)          the teacher form's row op: per-token (loss, ce, kd, entropy),
                                 and G over S
        dH_s[i0:i1] = G W_s,  dW_s += G^T H_s,  db_s += sum_rows G    (dW_s, db_s in fp32)
    TeacherForm.rows       what differs per teacher form (`fastkd.forms`): the dense teacher forms
                           its logits T = H_t W_t[:K]^T + b_t per chunk (FLOPs 2 N V (3 D_s +
                           D_t), the floor); the sparse teacher brings k (id, log-probability)
                           pairs per token; the vocab-parallel teacher wraps the dense one around
                           all-reduces. Its row op runs on a backend (`fastkd.backends.RowOp`).

One `fastkd.forms.Plan` (form, options, backend, chunk, dtypes) rides through every layer; the
custom op alone takes it apart, into its schema's arguments (`op_args`), and builds it again.

The loss is the last op of a training step, so for reduction "mean"/"sum" the gradients are
computed in the forward pass with the reduction's scale folded in, and backward only multiplies
them by the upstream scalar. For reduction "none" the upstream gradient differs per token, so
backward recomputes the chunks with it as the row scale.
"""

from __future__ import annotations

import torch

from fastkd import options, reference
from fastkd.forms import FORMS, Plan, accumulator_dtype
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
# The native CPU row op (`fastkd.cpu_rows`) holds the two logit buffers alone: they get the whole
# budget, up to 512 rows, where the GEMMs run within a few % of their rate on 2048 (D_s = 256,
# D_t = 512, 2 threads: 128 rows cost them 40% more, 256 rows 15%); more rows would add memory
# and little speed.
CPU_NATIVE_MAX_ROWS = 512


def default_chunk_size(
    n_tokens: int, vocab: int, shared: int, itemsize: int, device: torch.device,
    native: bool = False,
) -> int:
    """Tokens per chunk so a chunk's memory fits a budget: on GPU the two logit buffers in 512
    MiB; on CPU the buffers and the row op's temporaries in 256 MiB (`native`: the native CPU row
    op, which has none; at most CPU_NATIVE_MAX_ROWS). `shared`: the teacher side's width per token
    (the dense teacher's K logits).

    Each chunk re-reads and re-writes the fp32 dW accumulator (V x D_s), so fewer, larger chunks
    cost less traffic; 512 MiB gives 1024-token chunks at V = 128k in bf16 (unmeasured on a GPU).
    """
    if device.type == "cuda":
        rows = GPU_CHUNK_BUDGET // ((vocab + shared) * itemsize)
    else:
        if native:  # the logit buffers in their own dtype, no temporaries
            rows = min(CPU_CHUNK_BUDGET // ((vocab + shared) * itemsize), CPU_NATIVE_MAX_ROWS)
        else:
            rows = CPU_CHUNK_BUDGET // ((vocab + shared) * max(itemsize, 4) * CPU_ROW_OP_COPIES)
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


class MatmulAccumulator:
    """acc += a @ b, acc fp32 (or fp64) and a, b possibly half precision, called once a chunk.

    Where the GEMM cannot write fp32 from half-precision operands (CPU: oneDNN's bf16 GEMM writes
    bf16), the product goes to a (V, D) half-precision buffer and is added into acc through a
    fp32 slab of SLAB rows, both allocated once and reused by every chunk: a fresh product and a
    fresh fp32 copy each chunk cost more than the GEMM at V = 128256 (page faults on 200 MB),
    and torch's mixed-dtype add_ runs at a tenth of the memory's bandwidth."""

    SLAB = 8192

    def __init__(self, acc: torch.Tensor):
        self.acc, self.product, self.slab = acc, None, None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        acc = self.acc
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
            return
        if _fp32_addmm_works(acc.device):
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # fp32 C in the epilogue
            return
        if self.product is None:
            self.product = torch.empty(acc.shape, dtype=a.dtype, device=acc.device)
            self.slab = torch.empty(min(self.SLAB, acc.shape[0]), *acc.shape[1:],
                                    dtype=acc.dtype, device=acc.device)
        torch.mm(a, b, out=self.product)
        for r0 in range(0, acc.shape[0], self.SLAB):
            r1 = min(r0 + self.SLAB, acc.shape[0])
            slab = self.slab[: r1 - r0]
            slab.copy_(self.product[r0:r1])
            acc[r0:r1].add_(slab)


# ---- the chunk loop, the custom op ------------------------------------------------------------

def chunk_loop(h_s, w_s, b_s, labels, row_scale, teacher: tuple, plan: Plan, grads: bool):
    """The shared student loop. Returns per-token (n, OUTPUTS + the form's extra_outputs) values
    and, if grads, (dH, dW, db) (else Nones); the per-token values, dW and db in fp32 (fp64 for
    fp64 inputs). Each model's GEMM runs in its own compute dtype (plan.dtypes)."""
    dtype, acc = plan.dtypes[0], plan.acc
    n, d_s = h_s.shape
    vocab, dev = w_s.shape[0], h_s.device
    chunk = plan.chunk  # <= max(n, 1): the front-end's
    out = torch.empty(n, len(OUTPUTS) + plan.form.extra_outputs, device=dev, dtype=acc)
    rows = plan.form.rows(teacher, labels, row_scale, out, plan, grads, vocab)
    h_s, w_s, b_s = h_s.to(dtype), w_s.to(dtype), cast_or_none(b_s, dtype)
    s_buf = padded_rows(chunk, vocab, dtype, dev)
    dh = torch.empty(n, d_s, device=dev, dtype=dtype) if grads else None
    dw = torch.zeros(vocab, d_s, device=dev, dtype=acc) if grads else None
    db = torch.zeros(vocab, device=dev, dtype=acc) if grads and b_s is not None else None
    accumulate_dw = MatmulAccumulator(dw) if grads else None
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        s, hs = s_buf[: i1 - i0], h_s[i0:i1]
        linear_into(hs, w_s, b_s, s)
        rows(i0, i1, s)
        if grads:  # s now holds G = dloss/dS for this chunk
            torch.mm(s, w_s, out=dh[i0:i1])
            accumulate_dw(s.t(), hs)
            if db is not None:
                db += s.sum(0, dtype=acc)
    if dh is not None:
        dh = plan.form.student_grad(dh)
    return out, dh, dw, db


def op_args(plan: Plan) -> tuple:
    """The plan as the custom op's trailing arguments (its schema's `_PLAN` part, then every
    DistillOptions field)."""
    return (plan.form.op_key(), plan.backend, plan.chunk, *plan.dtypes, plan.components,
            *options.op_args(plan.opts))


def from_op_args(form: str, backend: str, chunk: int, s_dtype, t_dtype, components: bool,
                 *option_values) -> Plan:
    """The plan again from `op_args`."""
    return Plan(FORMS[form.split(":")[0]].from_op_key(form), options.from_op_args(option_values),
                backend, chunk, (s_dtype, t_dtype), components)


_TENSORS = ("Tensor h_s, Tensor w_s, Tensor? b_s, Tensor? labels, Tensor row_scale, "
            "Tensor?[] teacher")
_PLAN = ("str form, str backend, int chunk, ScalarType s_dtype, ScalarType t_dtype, "
         "bool components")


# The chunk loop as one custom op: opaque to torch.compile (its buffers, out= GEMMs and kernel
# launches stay eager), so a compiled graph holds the loss whole when check_labels=False.
@torch.library.custom_op(
    "fastkd::chunk_loop", mutates_args=(),
    schema=f"({_TENSORS}, bool grads, {_PLAN}, {options.op_schema()}) -> (Tensor, Tensor, Tensor, "
           "Tensor)")
def _chunk_loop_op(h_s, w_s, b_s, labels, row_scale, teacher, grads, *plan_args):
    """(per-token, dH, dW, db) of `chunk_loop`; absent gradients as empty tensors."""
    out, *grads_out = chunk_loop(h_s, w_s, b_s, labels, row_scale, tuple(teacher),
                                 from_op_args(*plan_args), grads)
    return out, *(h_s.new_empty(0) if g is None else g for g in grads_out)


@_chunk_loop_op.register_fake
def _(h_s, w_s, b_s, labels, row_scale, teacher, grads, form, backend, chunk, s_dtype, t_dtype,
      components, *option_values):
    acc = accumulator_dtype((s_dtype, t_dtype))
    n, (vocab, d_s) = h_s.shape[0], w_s.shape
    columns = len(OUTPUTS) + FORMS[form.split(":")[0]].from_op_key(form).extra_outputs
    out = h_s.new_empty((n, columns), dtype=acc)
    dh = h_s.new_empty((n, d_s) if grads else (0,), dtype=s_dtype)
    dw = h_s.new_empty((vocab, d_s) if grads else (0,), dtype=acc)
    db = h_s.new_empty((vocab,) if grads and b_s is not None else (0,), dtype=acc)
    return out, dh, dw, db


def run_chunks(h_s, w_s, b_s, labels, row_scale, teacher: tuple, plan: Plan, grads: bool):
    """`chunk_loop` through the custom op when the form has an op key, else eagerly (the
    vocab-parallel form: its collectives stay outside any graph). Returns (per-token, (dH, dW,
    db)), None for absent gradients."""
    if plan.form.op_key() is None:
        out, *grads_out = chunk_loop(h_s, w_s, b_s, labels, row_scale, teacher, plan, grads)
        return out, grads_out
    out, dh, dw, db = torch.ops.fastkd.chunk_loop(h_s, w_s, b_s, labels, row_scale, list(teacher),
                                                  grads, *op_args(plan))
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
    """Every fused loss: student inputs flattened to (N, D), the plan, the teacher's tensors (last,
    so autograd sees them as inputs that get no gradient); returns (loss, ce, kd, entropy) and the
    form's extra columns, reduced by the plan's reduction. Applied in grad mode only (else
    `forward_only`)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, labels, plan: Plan, *teacher):
        need = ctx.needs_input_grad[:3]
        reduction = plan.opts.reduction
        grads_now = any(need) and reduction != "none"
        valid, scale = counted_scale(labels, h_s.shape[0], plan.opts, plan.acc, h_s.device)
        per_token, (dh, dw, db) = run_chunks(h_s, w_s, b_s, labels, scale, teacher, plan,
                                             grads_now)
        ctx.plan = plan
        ctx.in_dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        if grads_now:
            ctx.save_for_backward(dh, dw, db)
        elif any(need):  # reduction "none"
            ctx.save_for_backward(h_s, w_s, b_s, labels, valid, *teacher)
        ctx.grads_now = grads_now
        out = [reference.reduce(x, valid, reduction) for x in per_token.unbind(1)]
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
            scale = grad_loss.to(ctx.plan.acc) * valid
            _, (dh, dw, db) = run_chunks(h_s, w_s, b_s, labels, scale, tuple(teacher), ctx.plan,
                                         True)
            g = None
        out = input_grads((dh, dw, db), need, ctx.in_dtypes, g)
        return (*out, *[None] * (len(ctx.needs_input_grad) - 3))


def forward_only(h_s, w_s, b_s, labels, plan: Plan, *teacher) -> tuple:
    """`FusedLossFunction` without autograd, for a call with nothing to differentiate (grad mode
    off, or no input requires grad: an evaluation step). torch.compile needs it: in that case
    Dynamo inlines an autograd Function's forward, and drops its ctx whenever the call's argument
    count equals forward's parameter count (it counts *teacher as one; the sparse form's two
    teacher tensors hit that), which binds every argument one place off."""
    valid, scale = counted_scale(labels, h_s.shape[0], plan.opts, plan.acc, h_s.device)
    per_token, _ = run_chunks(h_s, w_s, b_s, labels, scale, teacher, plan, False)
    return tuple(reference.reduce(x, valid, plan.opts.reduction) for x in per_token.unbind(1))
