"""The dense teacher form: the teacher as its hidden states and LM head, its logits per chunk.

Per chunk of tokens the chunk loop forms the student's logits S; this form forms the teacher's,
T = H_t W_t[:K]^T + b_t over the K = min(V, V_t) shared ids, into a reused buffer, in the
teacher's own compute dtype; then the row op (the Triton kernel of `fastkd.kernels.dense`, or on
CPU `torch_rows`: the native loop of `fastkd.cpu_rows`, else the spec's closed form) writes the
per-token losses and G = dloss/dS over S. FLOPs 2 N V (3 D_s + D_t), the floor: the teacher's
logits are formed once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastkd import cpu_rows, reference
from fastkd.autograd import cast_or_none, linear_into, padded_rows
from fastkd.backends import RowOp
from fastkd.forms import Plan, TeacherForm, register
from fastkd.frontend import check_bias, check_devices, check_tensor, model_dtype


def torch_rows(s, t, labels, row_scale, out, opts, compute_grad, components=True):
    """CPU row op: the native loop (`fastkd.cpu_rows.dense_rows`), else the spec's `token_losses`
    (and its closed-form logit gradient) on one chunk in fp32 (fp64 for fp64 logits). t is None
    when the KD term is skipped (kd_weight=0, components not wanted)."""
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


DENSE_ROWS = RowOp(torch=torch_rows, triton="dense.dense_rows")


@register
@dataclass(frozen=True)
class DenseTeacher(TeacherForm):
    """The teacher as its hidden states and LM head: teacher = (hidden (N, D_t), weight (V_t,
    D_t), bias (V_t,) or None); its logits over the K = min(V, V_t) shared ids are formed per
    chunk, in its own compute dtype."""

    name = "dense"
    native_rows = True

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

    def reference(self, teacher, h_s, w_s, b_s, labels, plan: Plan):
        h_t, w_t, b_t = (cast_or_none(x, plan.dtypes[1]) for x in teacher)
        return reference.distill_loss(h_s, w_s, h_t, w_t, labels, plan.opts, b_s, b_t)

    def row_op(self, backend: str):
        return DENSE_ROWS.on(backend)

    def rows(self, teacher, labels, row_scale, out, plan: Plan, grads, vocab, t_buf=None):
        """`TeacherForm.rows`; t_buf: a (>= chunk, >= K) buffer of the teacher's compute dtype
        to form its logits in (the routed form shares one between its dense teachers; None: one
        is allocated here)."""
        h_t, w_t, b_t = teacher
        t_dtype = plan.dtypes[1]
        k = min(vocab, w_t.shape[0])  # the shared ids (this rank's, if sharded)
        h_t = h_t.detach().reshape(-1, h_t.shape[-1]).to(t_dtype)
        w_t = w_t.detach()[:k].to(t_dtype)
        b_t = None if b_t is None else b_t.detach()[:k].to(t_dtype)
        row_op = self.row_op(plan.backend)
        lean = plan.backend == "torch" and self.native_rows and not plan.components
        if lean:  # a zero-weighted term may be skipped
            row_op = functools.partial(row_op, components=False)
        if lean and plan.opts.kd_weight == 0:
            t_buf = None  # the row op skips the KD term (t=None): no teacher GEMM either
        elif t_buf is None:
            t_buf = padded_rows(plan.chunk, k, t_dtype, h_t.device)
        else:
            t_buf = t_buf[:, :k]

        def rows(i0, i1, s):
            t = None if t_buf is None else t_buf[: i1 - i0]
            if t is not None:
                linear_into(h_t[i0:i1], w_t, b_t, t)
            row_labels = None if labels is None else labels[i0:i1]
            row_op(s, t, row_labels, row_scale[i0:i1], out[i0:i1], plan.opts, grads)

        return rows
