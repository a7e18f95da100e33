"""The mixture teacher form: K <= 4 dense teachers on every token, weighted per token.

Per chunk of tokens this form forms each teacher's logits T_j = H_t,j W_t,j[:K]^T + b_t,j into one
reused (K teachers, chunk, K ids) buffer, in the teachers' compute dtype; then one row op reads the
student's logits, the K teachers' and the weights, and writes the per-token losses, each teacher's
divergence and G = dloss/dS over S (the Triton kernel of `fastkd.kernels.mixture`, or on CPU the
spec's closed form, `torch_rows`). FLOPs 2 N V (3 D_s + sum_j D_t,j), the floor: each teacher's
logits once per token, the student's once. The objective (`fastkd.reference_multi`):

    "divergences"  D = sum_j w_j D(p_j || q), every divergence
    "ensemble"     D = KL(pbar || q), pbar = sum_j w_j p_j (forward_kl)

Every teacher shares the same K = min(V, V_t,j) ids with the student (the one q it is compared
with) and computes in one dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import reference_multi
from fastkd.autograd import OUTPUTS, cast_or_none, linear_into, padded_rows
from fastkd.backends import RowOp
from fastkd.dense import DenseTeacher
from fastkd.forms import Deferred, Plan, TeacherForm, register
from fastkd.frontend import check_devices, check_tensor, model_dtype
from fastkd.reference_multi import TeacherComponents
from fastkd.routed import member_checks
from fastkd.teachers import TeacherHead

MAX_TEACHERS = 4  # the kernel takes each teacher's head settings as 4 scalars (kernels/mixture.py)


def torch_rows(s, t, weights, labels, row_scale, out, opts, heads, ensemble, compute_grad):
    """CPU row op: the spec's `mixture_token_losses` (and its closed-form logit gradient) on one
    chunk, in fp32 (fp64 for fp64 logits): s (n, V), t (K teachers, n, K ids), weights (n, K)."""
    acc = out.dtype
    result = reference_multi.mixture_token_losses(
        s.to(acc), [x.to(acc) for x in t.unbind(0)], weights.to(acc), labels, opts, heads,
        ensemble, grad=compute_grad)
    if compute_grad:
        s.copy_(result[2].mul_(row_scale.to(acc).unsqueeze(-1)))
    out.copy_(torch.cat([torch.stack(result[0].columns(), 1), result[1]], 1))


MIXTURE_ROWS = RowOp(torch=torch_rows, triton="mixture.mixture_rows")


def weight_tolerance(weights: torch.Tensor) -> float:
    """How far a token's weights may sum from 1: K eps, eps of their dtype (at least fp32's)."""
    eps = max(torch.finfo(weights.dtype).eps, torch.finfo(torch.float32).eps)
    return weights.shape[-1] * eps


def weight_checks(weights: torch.Tensor, lead: torch.Size, n_teachers: int) -> list[Deferred]:
    """teacher_weights' shape now ((K,) or the leading shape + (K,)); their values in the host
    sync: >= 0 (not NaN), and sum_k w_k = 1 per token within `weight_tolerance`."""
    check_tensor("teacher_weights", weights)
    if weights.shape not in ((n_teachers,), (*lead, n_teachers)):
        raise ValueError(f"teacher_weights must have shape ({n_teachers},) (every token alike) or "
                         f"the hidden states' leading shape + ({n_teachers},), "
                         f"{(*lead, n_teachers)}; got {tuple(weights.shape)}")
    bad = ~(weights >= 0)
    total = weights.double().sum(-1)
    tol = weight_tolerance(weights)
    off = ~((total - 1).abs() <= tol)
    return [
        Deferred(bad.sum(), lambda: ValueError(
            f"teacher_weights must be >= 0 (and not NaN); found {weights[bad][0].item()}")),
        Deferred(off.sum(), lambda: ValueError(
            f"teacher_weights must sum to 1 over the teachers (within {tol:.2g}) at every token; "
            f"found a sum of {total[off].reshape(-1)[0].item():.9g}")),
    ]


@register
@dataclass(frozen=True)
class MixedTeachers(TeacherForm):
    """K dense teachers mixed on every token: teacher = (weights (K,) or (..., K), then each
    teacher's hidden, weight, bias); heads: each teacher's (softcap, logit_scale)."""

    name = "mixture"
    heads: tuple[tuple[float | None, float], ...] = ()
    ensemble: bool = False

    @property
    def extra_outputs(self) -> int:
        return len(self.heads)

    def op_key(self) -> str:
        heads = "|".join(f"{cap!r}@{scale!r}" for cap, scale in self.heads)
        return f"{self.name}:{int(self.ensemble)}:{heads}"

    @classmethod
    def from_op_key(cls, key: str) -> MixedTeachers:
        _, ensemble, heads = key.split(":")
        pairs = [h.split("@") for h in heads.split("|")]
        return cls(tuple((None if c == "None" else float(c), float(s)) for c, s in pairs),
                   bool(int(ensemble)))

    def _teachers(self, teacher) -> list[tuple]:
        rest = teacher[1:]
        return [tuple(rest[3 * j:3 * j + 3]) for j in range(len(self.heads))]

    def check(self, teacher, h_s, vocab, opts):
        if self.ensemble and opts.divergence != "forward_kl":
            raise ValueError(f'mixture="ensemble" is KL(sum_k w_k p_k || q): divergence='
                             f'"forward_kl" only, got {opts.divergence!r} (mixture='
                             '"divergences" mixes any divergence)')
        deferred = []
        for j, (own, (cap, scale)) in enumerate(zip(self._teachers(teacher), self.heads,
                                                    strict=True)):
            deferred += member_checks(j, DenseTeacher(), own, h_s, vocab,
                                      reference_multi.head_options(opts, cap, scale))
        widths = [min(vocab, w.shape[0]) for _, w, _ in self._teachers(teacher)]
        if len(set(widths)) > 1:
            raise ValueError(
                f"mixed teachers compare one student distribution over K = min(V, V_t) shared "
                f"ids, so every teacher must share as many: got K = {widths} by teacher (pass "
                "each head's first K rows, weight[:K], to mix them over the same ids)")
        weights = teacher[0]
        deferred += weight_checks(weights, h_s.shape[:-1], len(self.heads))
        check_devices(h_s.device, teacher_weights=weights)
        return deferred

    def compute_dtype(self, teacher, s_dtype):
        dtypes = [model_dtype(f"teachers[{j}]", own, own[0].device.type)
                  for j, own in enumerate(self._teachers(teacher))]
        if len(set(dtypes)) > 1:
            raise TypeError(f"mixed teachers compute in one dtype, got {[str(d) for d in dtypes]} "
                            "by teacher outside torch.autocast; cast them or run under autocast")
        return dtypes[0]

    def select(self, teacher, index):
        weights = teacher[0]
        if weights.dim() > 1:
            weights = weights.reshape(-1, weights.shape[-1]).index_select(0, index)
        heads = [(h.reshape(-1, h.shape[-1]).index_select(0, index), w, b)
                 for h, w, b in self._teachers(teacher)]
        return (weights, *(x for own in heads for x in own))

    def width(self, teacher, vocab, device):
        shared = min(vocab, teacher[2].shape[0])
        n = len(self.heads)
        # the K teachers' logit buffers; on CPU the torch row op holds about as much again per
        # teacher beside the student's (V + K)-wide temporaries
        return n * shared if device.type == "cuda" else n * shared + (n - 1) * (vocab + shared)

    def reference(self, teacher, h_s, w_s, b_s, labels, plan: Plan):
        teachers = [TeacherHead(*(cast_or_none(x, plan.dtypes[1]) for x in own), softcap=cap,
                                logit_scale=scale)
                    for own, (cap, scale) in zip(self._teachers(teacher), self.heads, strict=True)]
        return reference_multi.mixture_distill_loss(h_s, w_s, teachers, teacher[0], labels,
                                                    plan.opts, self.ensemble, b_s)

    def components(self, out, call):
        labels, opts = call.labels, call.plan.opts
        valid = (torch.ones(call.h_s.shape[0], dtype=torch.bool, device=call.h_s.device)
                 if labels is None else labels != opts.ignore_index)
        tokens = reference_multi.teacher_tokens(None, valid, len(self.heads))
        return TeacherComponents(*out[:len(OUTPUTS)], torch.stack(out[len(OUTPUTS):], -1), tokens)

    def rows(self, teacher, labels, row_scale, out, plan: Plan, grads, vocab):
        t_dtype, n_teachers = plan.dtypes[1], len(self.heads)
        weights, n = teacher[0], row_scale.shape[0]
        weights = weights.detach().to(out.dtype).reshape(-1, n_teachers).expand(n, n_teachers)
        weights = weights.contiguous()  # the kernel reads a token's K weights at w_ptr + K i
        shared = min(vocab, teacher[2].shape[0])
        heads = [(h.detach().reshape(-1, h.shape[-1]).to(t_dtype), w.detach()[:shared].to(t_dtype),
                  None if b is None else b.detach()[:shared].to(t_dtype))
                 for h, w, b in self._teachers(teacher)]
        t_buf = padded_rows(n_teachers * plan.chunk, shared, t_dtype, row_scale.device).unflatten(
            0, (n_teachers, plan.chunk))
        row_op = MIXTURE_ROWS.on(plan.backend)

        def rows(i0, i1, s):
            t = t_buf[:, : i1 - i0]
            for j, (h_t, w_t, b_t) in enumerate(heads):
                linear_into(h_t[i0:i1], w_t, b_t, t[j])
            row_labels = None if labels is None else labels[i0:i1]
            row_op(s, t, weights[i0:i1], row_labels, row_scale[i0:i1], out[i0:i1], plan.opts,
                   self.heads, self.ensemble, grads)

        return rows


def check_mixture_size(n_teachers: int) -> None:
    if not 1 <= n_teachers <= MAX_TEACHERS:
        raise ValueError(f"teacher_weights mixes 1 to {MAX_TEACHERS} teachers, got "
                         f"{n_teachers} (route tokens with teacher_index instead, any number)")

