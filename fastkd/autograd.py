"""The autograd layer: a chunk loop over tokens that never holds more than chunk x V logits.

Per chunk of tokens (rows i0:i1), with G = dloss/dS:
    S = H_s W_s^T + b_s      (chunk, V)  cuBLAS, in the compute dtype, into a reused buffer
    T = H_t W_t[:K]^T + b_t  (chunk, K)  cuBLAS; teacher logits past the shared ids are never used
    row op: per-token loss, and G written over S (the Triton kernel; on CPU the spec + autograd)
    dH_s[i0:i1] = G W_s,  dW_s += G^T H_s,  db_s += sum_rows G    (dW_s, db_s accumulated in fp32)
FLOPs: 2 N V (3 D_s + D_t), the floor; the teacher's logits are formed once.

The loss is the last op of a training step, so for reduction "mean"/"sum" the gradients are
computed in the forward pass with the reduction's scale folded in, and backward only multiplies
them by the upstream scalar. For reduction "none" the upstream gradient differs per token, so
backward recomputes the chunks with it as the row scale.
"""

from __future__ import annotations

import torch

from fastkd import reference
from fastkd.options import DistillOptions


def _torch_rows(s, t, labels, row_scale, loss_out, ce_out, kd_out, opts, compute_grad):
    """CPU row op: the spec's `token_losses` (and its closed-form logit gradient) on one chunk in
    fp32 (fp64 for fp64 logits)."""
    acc_dtype = loss_out.dtype
    s_acc, t_acc = s.to(acc_dtype), t.to(acc_dtype)
    if compute_grad:
        loss, ce, kd, grad = reference.token_losses_and_grad(s_acc, t_acc, labels, opts)
        s.copy_(grad.mul_(row_scale.to(acc_dtype).unsqueeze(-1)))
    else:
        loss, ce, kd = reference.token_losses(s_acc, t_acc, labels, opts)
    loss_out.copy_(loss)
    ce_out.copy_(ce)
    kd_out.copy_(kd)


def _triton_rows(*args):
    from fastkd.kernels.distill import distill_rows

    distill_rows(*args)


ROW_OPS = {"torch": _torch_rows, "triton": _triton_rows}


GPU_CHUNK_BUDGET = 512 * 2**20  # bytes of the two logit buffers (the kernel allocates nothing)
CPU_CHUNK_BUDGET = 256 * 2**20  # bytes of the buffers and the torch row op's temporaries
# The torch row op (the spec's closed-form gradient) holds at most about this many (V + K)-wide
# rows of its accumulation dtype per token at its peak, the buffers included: 5.5 to 9 measured
# for jsd, the largest (tests/test_loss_api.py checks the peak against the budget).
CPU_ROW_OP_COPIES = 10


def default_chunk_size(
    n_tokens: int, vocab: int, shared: int, itemsize: int, device: torch.device
) -> int:
    """Tokens per chunk so a chunk's memory fits a budget: on GPU the two logit buffers in 512
    MiB; on CPU the buffers and the row op's temporaries in 256 MiB.

    Each chunk re-reads and re-writes the fp32 dW accumulator (V x D_s), so fewer, larger chunks
    cost less traffic; 512 MiB gives 1024-token chunks at V = 128k in bf16 (unmeasured on a GPU).
    """
    if device.type == "cuda":
        rows = GPU_CHUNK_BUDGET // ((vocab + shared) * itemsize)
    else:
        rows = CPU_CHUNK_BUDGET // ((vocab + shared) * max(itemsize, 4) * CPU_ROW_OP_COPIES)
    rows = max(1, rows)
    if rows >= 128:
        rows -= rows % 128  # keep the GEMM's M dimension a multiple of the tile size
    return min(rows, max(n_tokens, 1))


ROW_ALIGN = 64  # elements: logit buffer rows start 128 bytes apart whatever V is


def padded_rows(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (rows, width) buffer whose row stride is width rounded up to ROW_ALIGN.

    The row kernel masks its loads and stores by the stride, so a stride divisible by 16 keeps
    them 128-bit wide at any vocabulary size (V = 50257 would give scalar loads); the GEMMs
    write the (rows, width) view through cuBLAS's leading dimension, with no copy."""
    stride = -(-width // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(rows, stride, device=device, dtype=dtype)[:, :width]


def accumulator_dtype(dtypes: tuple[torch.dtype, torch.dtype]) -> torch.dtype:
    """fp32 for half-precision and fp32 compute, fp64 when either model computes in fp64."""
    return torch.promote_types(torch.promote_types(*dtypes), torch.float32)


def cast_or_none(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def student_chunks(h_s, w_s, b_s, chunk, dtype, acc, grads, rows):
    """The student side of every fused loss: per chunk of tokens i0:i1, form S = H_s W_s^T + b_s in
    the compute dtype into a reused (chunk, V) buffer, call `rows(i0, i1, S)` (which computes the
    chunk's per-token outputs and, if grads, writes G = dloss/dS over S), then dH_s[i0:i1] = G W_s,
    dW_s += G^T H_s, db_s += sum_rows G. Returns (dH, dW, db), dW and db accumulated in `acc`."""
    n, d_s = h_s.shape
    vocab, dev = w_s.shape[0], h_s.device
    h_s, w_s, b_s = h_s.to(dtype), w_s.to(dtype), cast_or_none(b_s, dtype)
    s_buf = padded_rows(min(chunk, n), vocab, dtype, dev)
    dh = torch.empty(n, d_s, device=dev, dtype=dtype) if grads else None
    dw = torch.zeros(vocab, d_s, device=dev, dtype=acc) if grads else None
    db = torch.zeros(vocab, device=dev, dtype=acc) if grads and b_s is not None else None
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        s, hs = s_buf[: i1 - i0], h_s[i0:i1]
        _linear(hs, w_s, b_s, s)
        rows(i0, i1, s)
        if grads:  # s now holds G = dloss/dS for this chunk
            torch.mm(s, w_s, out=dh[i0:i1])
            _accumulate_mm(dw, s.t(), hs)
            if db is not None:
                db += s.sum(0, dtype=acc)
    return dh, dw, db


def _chunked(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts, row_op, chunk, dtypes, grads):
    """The dense loss's chunk loop. Returns per-token (loss, ce, kd) and, if grads, (dH, dW, db);
    the per-token values, dW and db are accumulated in fp32 (fp64 for fp64 inputs).
    dtypes: the (student, teacher) compute dtypes; each model's GEMM runs in its own."""
    dtype, t_dtype = dtypes
    acc = accumulator_dtype(dtypes)
    n = h_s.shape[0]
    shared = min(w_s.shape[0], w_t.shape[0])
    dev = h_s.device
    h_t, w_t, b_t = h_t.to(t_dtype), w_t[:shared].to(t_dtype), cast_or_none(b_t, t_dtype)
    if b_t is not None:
        b_t = b_t[:shared]
    loss, ce, kd = (torch.empty(n, device=dev, dtype=acc) for _ in range(3))
    t_buf = padded_rows(min(chunk, n), shared, t_dtype, dev)

    def rows(i0, i1, s):
        t = t_buf[: i1 - i0]
        _linear(h_t[i0:i1], w_t, b_t, t)
        rows_labels = None if labels is None else labels[i0:i1]
        row_op(s, t, rows_labels, row_scale[i0:i1], loss[i0:i1], ce[i0:i1], kd[i0:i1], opts, grads)

    return loss, ce, kd, student_chunks(h_s, w_s, b_s, chunk, dtype, acc, grads, rows)


# The chunk loop as one custom op: opaque to torch.compile (its buffers, out= GEMMs and kernel
# launches stay eager), so a compiled graph holds the loss whole when check_labels=False.
@torch.library.custom_op("fastkd::distill_chunks", mutates_args=())
def _distill_chunks(
    h_s: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None, h_t: torch.Tensor,
    w_t: torch.Tensor, b_t: torch.Tensor | None, labels: torch.Tensor | None,
    row_scale: torch.Tensor, temperature: float, ce_weight: float, kd_weight: float,
    divergence: str, beta: float, skew: float, ignore_index: int,
    student_softcap: float | None, teacher_softcap: float | None, backend: str, chunk: int,
    s_dtype: torch.dtype, t_dtype: torch.dtype, grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd, dH, dW, db) of `_chunked`; absent gradients as empty tensors."""
    opts = DistillOptions(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                          divergence=divergence, beta=beta, skew=skew, ignore_index=ignore_index,
                          student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    loss, ce, kd, grads_out = _chunked(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts,
                                       ROW_OPS[backend], chunk, (s_dtype, t_dtype), grads)
    return loss, ce, kd, *(h_s.new_empty(0) if g is None else g for g in grads_out)


@_distill_chunks.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, temperature, ce_weight, kd_weight,
      divergence, beta, skew, ignore_index, student_softcap, teacher_softcap, backend, chunk,
      s_dtype, t_dtype, grads):
    acc = accumulator_dtype((s_dtype, t_dtype))
    n, (vocab, d_s) = h_s.shape[0], w_s.shape
    per_token = [h_s.new_empty(n, dtype=acc) for _ in range(3)]
    dh = h_s.new_empty((n, d_s) if grads else (0,), dtype=s_dtype)
    dw = h_s.new_empty((vocab, d_s) if grads else (0,), dtype=acc)
    db = h_s.new_empty((vocab,) if grads and b_s is not None else (0,), dtype=acc)
    return *per_token, dh, dw, db


def _chunked_op(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts, backend, chunk, dtypes,
                grads):
    """`_chunked` through the custom op: (loss, ce, kd, (dH, dW, db)), None for absent grads."""
    out = torch.ops.fastkd.distill_chunks(
        h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts.temperature, opts.ce_weight,
        opts.kd_weight, opts.divergence, opts.beta, opts.skew, opts.ignore_index,
        opts.student_softcap, opts.teacher_softcap, backend, chunk, dtypes[0], dtypes[1], grads,
    )
    dh, dw, db = out[3:] if grads else (None, None, None)
    return *out[:3], (dh, dw, None if b_s is None else db)


def _chunks(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts, backend, chunk, dtypes, grads,
            shard):
    """One process: the custom op. Vocab-parallel (shard given): `_chunked` with the vocab-parallel
    row op, then dH summed over the ranks (each rank's G W_r is a partial sum), once per call."""
    if shard is None:
        return _chunked_op(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts, backend, chunk,
                           dtypes, grads)
    from fastkd.vocab_parallel import vocab_parallel_rows

    def row_op(*args):
        vocab_parallel_rows(*args, shard=shard, backend=backend)

    loss, ce, kd, (dh, dw, db) = _chunked(h_s, w_s, b_s, h_t, w_t, b_t, labels, row_scale, opts,
                                          row_op, chunk, dtypes, grads)
    if dh is not None:
        dh_sum = dh.to(dw.dtype)  # summed in fp32: half-precision partial sums would round
        torch.distributed.all_reduce(dh_sum, group=shard.group)
        dh = dh_sum.to(dh.dtype)
    return loss, ce, kd, (dh, dw, db)


def _linear(h, w, b, out):
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


def counted_scale(labels, n: int, opts: DistillOptions, acc: torch.dtype, device):
    """(valid, r): the counted-token mask and each token's gradient scale for the reduction (1
    for "sum", 1/count for "mean", 0 at ignored tokens)."""
    valid = (torch.ones(n, dtype=torch.bool, device=device) if labels is None
             else labels != opts.ignore_index)
    scale = valid.to(acc)
    if opts.reduction == "mean":
        scale = scale / valid.sum().clamp(min=1)
    return valid, scale


def reduced_outputs(ctx, per_token, valid, opts: DistillOptions):
    """(loss, ce, kd) reduced by opts.reduction; ce and kd carry no gradient."""
    out = [reference.reduce(x, valid, opts.reduction) for x in per_token]
    ctx.mark_non_differentiable(out[1], out[2])
    return out[0], out[1], out[2]


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


class FusedDistillFunction(torch.autograd.Function):
    """Inputs flattened to (N, D); returns (loss, ce, kd) reduced by opts.reduction."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, opts: DistillOptions, backend, chunk,
                dtypes, grad_enabled, shard=None):
        # needs_input_grad ignores torch.no_grad(); grad_enabled (the caller's grad mode) does not.
        need = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        grads_now = any(need) and opts.reduction != "none"
        valid, scale = counted_scale(labels, h_s.shape[0], opts, accumulator_dtype(dtypes),
                                     h_s.device)
        loss_i, ce_i, kd_i, (dh, dw, db) = _chunks(
            h_s, w_s, b_s, h_t, w_t, b_t, labels, scale, opts, backend, chunk, dtypes, grads_now,
            shard,
        )
        ctx.opts, ctx.backend, ctx.chunk, ctx.dtypes = opts, backend, chunk, dtypes
        ctx.shard = shard
        ctx.in_dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        if grads_now:
            ctx.save_for_backward(dh, dw, db)
        elif any(need):  # reduction "none"
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, valid)
        ctx.grads_now = grads_now
        return reduced_outputs(ctx, (loss_i, ce_i, kd_i), valid, opts)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        first_order_only()
        need = ctx.needs_input_grad[:3]
        if ctx.grads_now:
            dh, dw, db = ctx.saved_tensors
            g = grad_loss.to(dw.dtype)
        else:  # reduction "none": recompute the chunks with the upstream gradient as row scale
            h_s, w_s, b_s, h_t, w_t, b_t, labels, valid = ctx.saved_tensors
            scale = grad_loss.to(accumulator_dtype(ctx.dtypes)) * valid
            _, _, _, (dh, dw, db) = _chunks(
                h_s, w_s, b_s, h_t, w_t, b_t, labels, scale, ctx.opts, ctx.backend, ctx.chunk,
                ctx.dtypes, True, ctx.shard,
            )
            g = None
        out = input_grads((dh, dw, db), need, ctx.in_dtypes, g)
        return (*out, None, None, None, None, None, None, None, None, None, None)
