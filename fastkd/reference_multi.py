"""The plain-torch definition of the multi-teacher loss: the spec beside `fastkd.reference`, built
from the single-teacher spec's functions (no second copy of the loss math). Tests hold the fused
paths to it in float64; the CPU path runs `mixture_token_losses` on chunks of logits.

Notation as in `fastkd.reference`; K teachers, each a `fastkd.TeacherHead` (dense: logits t_k,
its own softcap c_k and logit scale sigma_k) or a `fastkd.TeacherLogprobs` (sparse: k ids and
log-probabilities, its tail).

    routing (teacher_index k_i per token): token i's loss is the single-teacher loss against
        teacher k_i alone: `reference.token_losses` with t = t_k_i, c_k_i, sigma_k_i (dense) or
        `reference.sparse_token_losses` with its tail (sparse); each token its teacher's K ids
    mixtures (teacher_weights w_i,k >= 0, sum_k w_i,k = 1, over dense teachers that share the
        same K = min(V, V_t,k) ids; q = softmax(s[:K] / T), p_k = softmax(t_k[:K] / T)):
        "divergences":  D_i = sum_k w_i,k D(p_k || q)              every divergence
        "ensemble":     D_i = KL(pbar || q),  pbar = sum_k w_i,k p_k   forward_kl only;
                        log pbar = logsumexp_k(log w_k + log p_k), never log of a sum
        loss_i = w_ce CE_i + w_kd T^2 D_i;  entropy H(q) over the K shared ids
        A teacher with weight 0 at a token is not consulted there: its term is 0 even where its
        divergence is infinite or NaN.
        For forward_kl the two have the same gradient, q - pbar, and differ in value by a term
        free of the student: sum_k w_k KL(p_k || q) - KL(pbar || q) = H(pbar) - sum_k w_k H(p_k)
        (the weights' Jensen-Shannon divergence of the teachers, >= 0).
    teacher_kd: D(p_k || q) of each teacher (without T^2), at the tokens routed to it (routing)
        or at every token (mixtures); reduced over each teacher's counted tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from fastkd import reference
from fastkd.options import DistillOptions
from fastkd.reference import Components
from fastkd.teachers import TeacherHead


class TeacherComponents(Components):
    """What a multi-teacher loss's `return_components=True` returns: a `fastkd.Components`
    (unpacks as (loss, ce, kd), carries .entropy), plus, per teacher,

        teacher_kd      D(p_k || q) without T^2, reduced over the counted tokens routed to
                        teacher k (routing) or over every counted token (mixtures): (K,) for
                        reduction "mean" (each teacher's own mean) and "sum"; the leading
                        shape + (K,) for "none" (routing: 0 where a token has another teacher)
        teacher_tokens  (K,) int64, the counted tokens each teacher's teacher_kd covers
    """

    def __new__(cls, loss, ce, kd, entropy, teacher_kd, teacher_tokens):
        out = super().__new__(cls, loss, ce, kd, entropy)
        out.teacher_kd = teacher_kd
        out.teacher_tokens = teacher_tokens
        return out

    def __getnewargs__(self):  # copy and pickle: every value
        return (*self.columns(), self.teacher_kd, self.teacher_tokens)

    def __repr__(self) -> str:
        return (f"TeacherComponents(loss={self[0]!r}, ce={self[1]!r}, kd={self[2]!r}, "
                f"entropy={self.entropy!r}, teacher_kd={self.teacher_kd!r}, "
                f"teacher_tokens={self.teacher_tokens!r})")


def head_options(opts: DistillOptions, softcap: float | None, logit_scale: float) -> DistillOptions:
    """opts with one teacher's head settings as its teacher_softcap and teacher_logit_scale."""
    return replace(opts, teacher_softcap=softcap, teacher_logit_scale=logit_scale)


def teacher_tokens(route: torch.Tensor | None, valid: torch.Tensor, n_teachers: int):
    """(K,) int64: the counted tokens each teacher sees, those routed to it (route (N,) given),
    else every counted one."""
    if route is None:
        return valid.sum().expand(n_teachers).clone()
    return torch.zeros(n_teachers, dtype=torch.long, device=valid.device).index_add_(
        0, route.clamp(0, n_teachers - 1), valid.long())


def reduce_teacher_kd(teacher_kd: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                      reduction: str) -> torch.Tensor:
    """Per-token teacher_kd (N, K), 0 where a teacher does not see a counted token, reduced over
    each teacher's counted tokens (`TeacherComponents`); "none" as it is."""
    if reduction == "none":
        return teacher_kd
    total = teacher_kd.sum(0)
    return total if reduction == "sum" else total / tokens.clamp(min=1).to(total.dtype)


def _reduced(per_token: Components, teacher_kd, route, flat_labels, opts, lead):
    valid = (torch.ones(teacher_kd.shape[0], dtype=torch.bool, device=teacher_kd.device)
             if flat_labels is None else flat_labels != opts.ignore_index)
    columns = per_token.columns()
    out = [reference.reduce(x, valid, opts.reduction)
           for x in (columns[0], *(x.detach() for x in columns[1:]))]
    tokens = teacher_tokens(route, valid, teacher_kd.shape[1])
    kd = reduce_teacher_kd(teacher_kd.detach(), tokens, valid, opts.reduction)
    if opts.reduction == "none":
        out = [x.reshape(lead) for x in out]
        kd = kd.reshape(*lead, -1)
    return TeacherComponents(*out, kd, tokens)


def _student_logits(student_hidden, student_weight, student_bias):
    s = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
                 student_bias)
    return s.float() if s.dtype in (torch.float16, torch.bfloat16) else s


# ---- routing -------------------------------------------------------------------------------------

def routed_token_losses(student_logits, teachers, route, labels, opts: DistillOptions):
    """Per-token `Components` (N,) and teacher_kd (N, K) of the routed loss: student logits (N, V),
    route (N,) the teacher of each token, each teacher's tensors for every token (N leading) or
    for its own tokens in token order (n_k leading). Differentiable in the student's logits."""
    n, n_teachers = student_logits.shape[0], len(teachers)
    columns = [student_logits.new_zeros(n) for _ in range(4)]
    teacher_kd = student_logits.new_zeros(n, n_teachers)
    for k, teacher in enumerate(teachers):
        mine = torch.nonzero(route == k).squeeze(1)
        if mine.numel() == 0:
            continue
        # a teacher's tensors cover every token, or (compact) its own tokens in token order
        full = teacher.tensors()[0].shape[:-1].numel() == n

        def own(x, full=full, mine=mine):  # this teacher's rows at its tokens, in token order
            x = x.reshape(-1, x.shape[-1])
            return x.index_select(0, mine) if full else x

        s = student_logits.index_select(0, mine)
        y = None if labels is None else labels.index_select(0, mine)
        if isinstance(teacher, TeacherHead):
            with torch.no_grad():
                t = F.linear(own(teacher.hidden), teacher.weight, teacher.bias).to(s.dtype)
            part = reference.token_losses(s, t, y, head_options(opts, teacher.softcap,
                                                                teacher.logit_scale))
        else:
            part = reference.sparse_token_losses(s, own(teacher.ids).long(),
                                                 own(teacher.logprobs).detach().to(s.dtype), y,
                                                 opts, teacher.tail)
        columns = [c.index_put((mine,), x) for c, x in zip(columns, part.columns(), strict=True)]
        teacher_kd = teacher_kd.index_put((mine, torch.full_like(mine, k)), part.kd.detach())
    return Components(*columns), teacher_kd


def routed_distill_loss(student_hidden, student_weight, teachers, teacher_index, labels,
                        opts: DistillOptions, student_bias=None) -> TeacherComponents:
    """The routed loss with full logits, reduced like `reference.distill_loss`, as a
    `TeacherComponents`. teacher_index: integer, the hidden states' leading shape (a teacher per
    token) or (B,) for (B, L, D) hidden states (a teacher per row)."""
    lead = student_hidden.shape[:-1]
    route = teacher_index
    if route.shape != lead:  # per row
        route = route.reshape(-1, *[1] * (len(lead) - 1)).expand(lead)
    route = route.reshape(-1).long()
    flat_labels = None if labels is None else labels.reshape(-1)
    s = _student_logits(student_hidden, student_weight, student_bias)
    per_token, teacher_kd = routed_token_losses(s, teachers, route, flat_labels, opts)
    return _reduced(per_token, teacher_kd, route, flat_labels, opts, lead)


# ---- mixtures ------------------------------------------------------------------------------------

def shared_log_probs(logits: torch.Tensor, width: int, softcap, logit_scale, temperature):
    """log softmax(head(logits)[:width] / T) of a model's head output (`reference.head_logits`)."""
    return reference.log_softmax(
        reference.head_logits(logits, logit_scale, softcap)[..., :width] / temperature)


def mixture_token_losses(student_logits, teacher_logits, weights, labels, opts: DistillOptions,
                         heads, ensemble: bool = False, grad: bool = False):
    """Per-token `Components` (N,) and teacher_kd (N, K) of a mixture, and with grad the
    closed-form d loss_i / d student_logits (N, V) (no autograd graph; tests hold it to autograd
    in float64): student logits (N, V), teacher_logits K tensors (N, V_t,k) sharing K = min(V,
    V_t,k) ids, weights (N, K), heads K (softcap, logit_scale). Each term is the single-teacher
    spec's (`reference.token_losses_and_grad`): the cross-entropy once, the KD term per
    teacher (or once against pbar for the ensemble), added with the weights."""
    widths = {min(student_logits.shape[-1], t.shape[-1]) for t in teacher_logits}
    if len(widths) > 1:
        raise ValueError(f"mixed teachers must share as many ids with the student, got "
                         f"{sorted(widths)}")
    if ensemble and opts.divergence != "forward_kl":
        raise ValueError(f'mixture="ensemble" is forward_kl only, got {opts.divergence!r}')
    run = reference.token_losses_and_grad if grad else reference.token_losses

    def part(t, options):
        out = run(student_logits, t, labels, options)
        return out if grad else (out, None)

    ce_opts = head_options(replace(opts, kd_weight=0.0), *heads[0])
    (ce_part, ce_grad) = part(teacher_logits[0], ce_opts)
    kd_opts = replace(opts, ce_weight=0.0)
    w = weights.to(student_logits.dtype)
    on = w > 0
    parts = [part(t, head_options(kd_opts, *head)) for t, head in zip(teacher_logits, heads,
                                                                         strict=True)]
    teacher_kd = torch.stack([p.kd for p, _ in parts], -1)
    if ensemble:  # KL(pbar || q) against pbar as logits T log pbar (softmax(T log pbar / T) = pbar)
        width = widths.pop()
        log_p = torch.stack([shared_log_probs(t, width, *head, opts.temperature)
                             for t, head in zip(teacher_logits, heads, strict=True)], -2)
        log_pbar = torch.logsumexp(torch.where(on.unsqueeze(-1), w.log().unsqueeze(-1) + log_p,
                                               float("-inf")), -2)
        kd_part, kd_grad = part(opts.temperature * log_pbar, head_options(kd_opts, None, 1.0))
        kd = kd_part.kd
    else:
        kd = torch.where(on, w * teacher_kd, 0.0).sum(-1)
        kd_grad = None if not grad else sum(
            torch.where(on[:, k:k + 1], w[:, k:k + 1] * g, 0.0) for k, (_, g) in enumerate(parts))
    loss = ce_part.loss + (opts.kd_weight * opts.temperature**2) * kd
    per_token = Components(loss, ce_part.ce, kd, ce_part.entropy)
    if grad:
        return per_token, teacher_kd, ce_grad + kd_grad
    return per_token, teacher_kd


def mixture_distill_loss(student_hidden, student_weight, teachers, teacher_weights, labels,
                         opts: DistillOptions, ensemble: bool = False,
                         student_bias=None) -> TeacherComponents:
    """A mixture with full logits, reduced like `reference.distill_loss`, as a
    `TeacherComponents`: teachers K `TeacherHead`s, teacher_weights (K,) or the leading shape +
    (K,)."""
    lead = student_hidden.shape[:-1]
    s = _student_logits(student_hidden, student_weight, student_bias)
    n, n_teachers = s.shape[0], len(teachers)
    with torch.no_grad():
        ts = [F.linear(t.hidden.reshape(-1, t.hidden.shape[-1]), t.weight, t.bias).to(s.dtype)
              for t in teachers]
    weights = teacher_weights.reshape(-1, n_teachers).expand(n, n_teachers)
    flat_labels = None if labels is None else labels.reshape(-1)
    heads = [(t.softcap, t.logit_scale) for t in teachers]
    per_token, teacher_kd = mixture_token_losses(s, ts, weights, flat_labels, opts, heads,
                                                 ensemble)
    return _reduced(per_token, teacher_kd, None, flat_labels, opts, lead)
