"""The plain-torch definition of the distillation loss: the spec.

Tests hold the kernels to it in float64, the CPU path runs `token_losses_and_grad` on chunks of
logits (so the CPU path and the spec cannot drift apart), and benchmarks use it as the naive
baseline. It materialises full N x V logits, so use it for checking, not for training at scale.

The gradient w.r.t. the student logits is given in closed form too (`token_losses_and_grad`, the
formulas of MATH.md), so the CPU path needs no autograd graph per chunk; tests hold it to autograd
of `token_losses` in float64.

Notation (one token): student logits s (V ids), teacher logits t (V_t ids), K = min(V, V_t) shared
ids, temperature T, label y.

    s <- c_s * tanh(s / c_s),  t <- c_t * tanh(t / c_t)          (optional softcaps)
    CE  = logsumexp(s) - s_y                                      (full student vocab, T = 1)
    q   = softmax(s[:K] / T),  p = softmax(t[:K] / T)
    forward_kl: KL(p || q)     reverse_kl: KL(q || p)
    jsd:        beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q
    skew_forward_kl: KL(p || alpha p + (1 - alpha) q)
    skew_reverse_kl: KL(q || (1 - alpha) p + alpha q)
    tvd:        1/2 sum |p - q|
    (0 log 0 = 0: teacher ids at -inf, p = 0, contribute nothing)
    loss = ce_weight * CE + kd_weight * T**2 * D
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd.options import DistillOptions


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2 style logit softcapping `cap * tanh(logits / cap)`; identity for cap=None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _xlog_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x * (log x - log y), with 0 where x = 0 (0 log 0 = 0: a teacher id at -inf adds nothing)."""
    return torch.where(x > 0, x * (log_x - log_y), 0.0)


def _log_mix(log_u: torch.Tensor, log_v: torch.Tensor, w: float) -> torch.Tensor:
    """log(w u + (1 - w) v) as a logaddexp, never the log of a sum of small probabilities."""
    log_w = math.log(w) if w > 0 else float("-inf")
    return torch.logaddexp(log_u + log_w, log_v + math.log1p(-w))


def divergence_terms(log_q: torch.Tensor, log_p: torch.Tensor,
                     opts: DistillOptions) -> torch.Tensor:
    """Per-id terms d_v of the divergence D = sum_v d_v of teacher p and student q, both given as
    log-probabilities (..., K). Every divergence fastkd offers is such a sum, which is what lets a
    vocabulary split across ranks add up its partial sums."""
    p, q = log_p.exp(), log_q.exp()
    name = opts.divergence
    if name == "forward_kl":  # KL(p || q)
        return _xlog_ratio(p, log_p, log_q)
    if name == "reverse_kl":  # KL(q || p): +inf where the student puts mass on a p = 0 id
        return q * (log_q - log_p)
    if name == "jsd":  # beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
        log_m = _log_mix(log_p, log_q, opts.beta)
        return opts.beta * _xlog_ratio(p, log_p, log_m) + (1 - opts.beta) * q * (log_q - log_m)
    if name == "skew_forward_kl":  # KL(p || alpha p + (1 - alpha) q)
        return _xlog_ratio(p, log_p, _log_mix(log_p, log_q, opts.skew))
    if name == "skew_reverse_kl":  # KL(q || (1 - alpha) p + alpha q)
        return q * (log_q - _log_mix(log_q, log_p, opts.skew))
    if name == "tvd":  # total variation; autograd's subgradient of |x| is sign(x), sign(0) = 0
        return 0.5 * (p - q).abs()
    raise ValueError(f"unknown divergence {name!r}")


def divergence(log_q: torch.Tensor, log_p: torch.Tensor, opts: DistillOptions) -> torch.Tensor:
    """Per-row divergence of teacher p and student q, given as log-probabilities (..., K)."""
    return divergence_terms(log_q, log_p, opts).sum(-1)


def divergence_qg(log_q: torch.Tensor, log_p: torch.Tensor,
                  opts: DistillOptions) -> torch.Tensor:
    """Per-id q_v g_v, g_v = dD/dq_v up to a constant (which cancels in `divergence_grad`), formed
    without dividing by q, (..., K):
        forward_kl       -p                              (g = -p / q)
        reverse_kl       q (log q - log p)               (the terms d_v themselves)
        jsd              (1 - beta) q (log q - log m),   m = beta p + (1 - beta) q
        skew_forward_kl  -(1 - alpha) q p / m,           m = alpha p + (1 - alpha) q
        skew_reverse_kl  q (log q - log m) - alpha q^2 / m,  m = (1 - alpha) p + alpha q
        tvd              q sign(q - p) / 2               (the subgradient, sign(0) = 0)"""
    q = log_q.exp()
    name = opts.divergence
    if name == "forward_kl":
        return -log_p.exp()
    if name == "reverse_kl":
        return q * (log_q - log_p)
    if name == "jsd":
        return (1 - opts.beta) * q * (log_q - _log_mix(log_p, log_q, opts.beta))
    if name == "skew_forward_kl":
        return -(1 - opts.skew) * (log_q + log_p - _log_mix(log_p, log_q, opts.skew)).exp()
    if name == "skew_reverse_kl":
        log_ratio = log_q - _log_mix(log_q, log_p, opts.skew)
        return q * log_ratio - opts.skew * (log_q + log_ratio).exp()
    if name == "tvd":
        return 0.5 * q * torch.sign(q - log_p.exp())
    raise ValueError(f"unknown divergence {name!r}")


def divergence_grad(log_q: torch.Tensor, log_p: torch.Tensor,
                    opts: DistillOptions) -> torch.Tensor:
    """dD/da, a = s[:K] / T (so q = softmax(a)), in closed form, (..., K): through the softmax,
    q_v (g_v - sum_u q_u g_u) = qg_v - q_v S with qg = `divergence_qg` and S = sum_u qg_u (for
    forward_kl S = -1 and this is q - p; for reverse_kl S = D and it is q (log q - log p - D)).
    A vocabulary split across ranks adds up S from the ranks' partial sums."""
    qg = divergence_qg(log_q, log_p, opts)
    return qg - log_q.exp() * qg.sum(-1, keepdim=True)


def _student_teacher(student_logits, teacher_logits, opts):
    """Softcapped logits and the tempered log-probabilities over the K shared ids."""
    s = softcap(student_logits, opts.student_softcap)
    t = softcap(teacher_logits, opts.teacher_softcap)
    k = min(s.shape[-1], t.shape[-1])
    log_q = torch.log_softmax(s[..., :k] / opts.temperature, dim=-1)
    log_p = torch.log_softmax(t[..., :k] / opts.temperature, dim=-1)
    return s, log_q, log_p


def _weigh(ce, kd, labels, opts):
    """(loss, ce, kd) per token, 0 at ignored tokens, and the counted-token mask."""
    if labels is None:
        return opts.ce_weight * ce + (opts.kd_weight * opts.temperature**2) * kd, ce, kd, None
    valid = labels != opts.ignore_index
    ce, kd = torch.where(valid, ce, 0.0), torch.where(valid, kd, 0.0)
    return opts.ce_weight * ce + (opts.kd_weight * opts.temperature**2) * kd, ce, kd, valid


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (loss, ce, kd) from logits before softcap: (N, V), (N, V_t) -> three (N,).

    Ignored tokens (label == ignore_index) get 0 in all three. Computes in the logits' dtype; pass
    fp32 or fp64 logits (`distill_loss` upcasts half precision first).
    """
    s, log_q, log_p = _student_teacher(student_logits, teacher_logits, opts)
    kd = divergence(log_q, log_p, opts)
    if labels is None:
        ce = torch.zeros_like(kd)
    else:
        ce = F.cross_entropy(s, torch.where(labels != opts.ignore_index, labels, 0),
                             reduction="none")
    return _weigh(ce, kd, labels, opts)[:3]


def token_losses_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_losses` and d loss_i / d student_logits (N, V) in closed form, no autograd graph:

        CE:       w_ce (softmax(s) - onehot(y))                    all V ids
        KD:       w_kd T dD/da  (`divergence_grad`; a = s / T)      the K shared ids, 0 beyond
        softcap:  times 1 - (s / c_s)^2;  ignored tokens: exactly 0
    """
    s, log_q, log_p = _student_teacher(student_logits, teacher_logits, opts)
    kd = divergence(log_q, log_p, opts)
    grad = torch.zeros_like(s)
    if labels is None:
        ce = torch.zeros_like(kd)
    else:
        log_soft = torch.log_softmax(s, dim=-1)
        y = torch.where(labels != opts.ignore_index, labels, 0).unsqueeze(-1)
        ce = -log_soft.gather(-1, y).squeeze(-1)
        grad = log_soft.exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=s.dtype))
        grad.mul_(opts.ce_weight)
        del log_soft
    k = log_q.shape[-1]
    grad[..., :k] += (opts.kd_weight * opts.temperature) * divergence_grad(log_q, log_p, opts)
    if opts.student_softcap is not None:
        grad.mul_(1 - (s / opts.student_softcap) ** 2)
    loss, ce, kd, valid = _weigh(ce, kd, labels, opts)
    if valid is not None:
        grad.masked_fill_(~valid.unsqueeze(-1), 0.0)  # not a product: NaN * 0 would stay NaN
    return loss, ce, kd, grad


def reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-token values (already 0 at ignored tokens); mean divides by the counted ones."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _reduced(loss, ce, kd, flat_labels, opts: DistillOptions, lead):
    """Per-token (loss, ce, kd) reduced by opts.reduction over the counted tokens; ce and kd
    detached; "none" back to the leading shape."""
    if flat_labels is None:
        valid = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    else:
        valid = flat_labels != opts.ignore_index
    out = [reduce(x, valid, opts.reduction) for x in (loss, ce.detach(), kd.detach())]
    if opts.reduction == "none":
        out = [x.reshape(lead) for x in out]
    return out[0], out[1], out[2]


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd) with full logits; ce and kd reduced like loss, unweighted, kd without T**2.

    Logits are formed in the inputs' dtype (as `F.linear` would) and the softmax math runs in fp32
    for half-precision inputs, in the inputs' dtype otherwise. `reduction="none"` returns the
    leading shape.
    """
    lead = student_hidden.shape[:-1]
    s = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    with torch.no_grad():
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        t = F.linear(h_t, teacher_weight, teacher_bias)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    t = t.to(s.dtype)
    flat_labels = None if labels is None else labels.reshape(-1)
    loss, ce, kd = token_losses(s, t, flat_labels, opts)
    return _reduced(loss, ce, kd, flat_labels, opts, lead)


# ---------------------------------------------------------------------------------------------
# The sparse loss (`fastkd.fused_sparse_distill_loss`): the teacher as k (id, log-probability)
# pairs per token, e.g. from a teacher cache, instead of its logits.
#
#     a = s / T over the full student vocabulary,  q = softmax(a);  per token, slots j < k with
#     ids id_j (-1: unused slot) and teacher log-probabilities lp_j = log p_j (already at T);
#     S = the set of used ids,  P = sum_j p_j,  Q = sum_{v in S} q_v.
#     bucket:       D over the k + 1 buckets (p_1..p_k, 1 - P) and (q_id_1..q_id_k, 1 - Q), with
#                   log(1 - Q) = logsumexp_{v not in S} a_v - logsumexp_v a_v (no cancellation)
#                   and log(1 - P) = log(-expm1(log P)) in fp64 (-inf where P rounds to >= 1);
#                   the rest bucket is dropped when S covers the whole vocabulary
#     renormalize:  D of p / P and q / Q over S (rows with P = 0 carry no divergence)
#     ignore:       forward_kl only, D = sum_j p_j (log M_j - log q_id_j), M_j = the mass of id_j
#                   summed over its duplicate slots (entries add up)
#     loss = ce_weight * CE + kd_weight * T**2 * D, CE over the full vocabulary at T = 1.
#
# Every divergence of `divergence_terms` applies to bucket and renormalize: the buckets are a
# distribution, student buckets a softmax of c = (a_id_1..a_id_k, logsumexp_{v not in S} a_v),
# so dD/dc is `divergence_grad` over the buckets and the chain rule gives, per student id v,
#     bucket:       dD/da_v = G_j at v = id_j,  G_rest q_v / (1 - Q) = G_rest exp(a_v - lse_out)
#                   outside S
#     renormalize:  dD/da_v = G_j at v = id_j (a softmax over S alone), 0 outside S
#     ignore:       dD/da_v = P q_v - M_v   (M_v = 0 outside S)
# and the student logit gradient is w_kd T dD/da, as for the dense loss.

SPARSE_TAILS = ("bucket", "renormalize", "ignore")
# The log-probability given to a slot that holds no bucket (an unused slot, an empty rest bucket)
# on both sides: finite, so x (log x - log y) and q (g - sum q g) give exactly 0, not 0 * NaN.
EMPTY_LOG = -1e30


def _sparse_buckets(student_logits, ids, logprobs, opts, tail):
    """The softcapped logits s, a = s / T, logsumexp(a), the used-slot mask, the slots' ids (0 in
    unused slots) and the per-slot (log_q, log_p) the divergence sees, plus for "bucket" the
    membership mask (..., V) and logsumexp of a outside S, for "ignore" log M (merged masses)."""
    s = softcap(student_logits, opts.student_softcap)
    a = s / opts.temperature
    lse_a = torch.logsumexp(a, -1, keepdim=True)
    used = ids >= 0
    safe = torch.where(used, ids, 0).long()
    a_k = a.gather(-1, safe)
    log_p = torch.where(used, logprobs.to(a.dtype), float("-inf"))
    extra = {}
    if tail == "ignore":
        same = (safe.unsqueeze(-1) == safe.unsqueeze(-2)) & used.unsqueeze(-2)
        extra["log_m"] = torch.logsumexp(
            torch.where(same, log_p.unsqueeze(-2), float("-inf")), -1)
        return s, a, lse_a, used, safe, a_k - lse_a, log_p, extra
    if tail == "renormalize":
        lse_p = torch.logsumexp(log_p, -1, keepdim=True)  # log P
        used = used & (lse_p > float("-inf"))
        lse_in = torch.logsumexp(torch.where(used, a_k, float("-inf")), -1, keepdim=True)  # log Q
        log_q = torch.where(used, a_k - lse_in, EMPTY_LOG)
        log_p = torch.where(used, log_p - lse_p, EMPTY_LOG)
        return s, a, lse_a, used, safe, log_q, log_p, extra
    if tail != "bucket":
        raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")
    member = torch.zeros(a.shape, dtype=torch.long, device=a.device).scatter_add_(
        -1, safe, used.long()) > 0
    lse_out = torch.logsumexp(a.masked_fill(member, float("-inf")), -1, keepdim=True)
    # log(1 - P) in fp64 whatever the compute dtype: 1 - P cancels when P is near 1
    log_big_p = torch.logsumexp(log_p.double(), -1, keepdim=True).clamp(max=0.0)
    log_p_rest = torch.log(-torch.expm1(log_big_p)).to(a.dtype)
    no_rest = lse_out == float("-inf")  # S covers the vocabulary
    log_q = torch.cat([torch.where(used, a_k - lse_a, EMPTY_LOG),
                       torch.where(no_rest, EMPTY_LOG, lse_out - lse_a)], -1)
    log_p = torch.cat([torch.where(used, log_p, EMPTY_LOG),
                       torch.where(no_rest, EMPTY_LOG, log_p_rest)], -1)
    extra.update(member=member, lse_out=lse_out)
    return s, a, lse_a, used, safe, log_q, log_p, extra


def _sparse_divergence(used, log_q, log_p, extra, opts, tail):
    if tail == "ignore":
        if opts.divergence != "forward_kl":
            raise ValueError(f'tail="ignore" is forward_kl only, got {opts.divergence!r}')
        terms = _xlog_ratio(log_p.exp(), extra["log_m"], log_q)
        return torch.where(used, terms, 0.0).sum(-1)
    return divergence(log_q, log_p, opts)


def _ce(s, labels, opts):
    if labels is None:
        return torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    return F.cross_entropy(s, torch.where(labels != opts.ignore_index, labels, 0),
                           reduction="none")


def sparse_token_losses(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    tail: str = "bucket",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (loss, ce, kd) of the sparse loss: logits (N, V), ids (N, k) integer (-1 for an
    unused slot), logprobs (N, k) -> three (N,), 0 at ignored tokens. Computes in the logits'
    dtype (pass fp32 or fp64)."""
    s, _, _, used, _, log_q, log_p, extra = _sparse_buckets(student_logits, ids, logprobs, opts,
                                                            tail)
    kd = _sparse_divergence(used, log_q, log_p, extra, opts, tail)
    return _weigh(_ce(s, labels, opts), kd, labels, opts)[:3]


def sparse_token_losses_and_grad(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    tail: str = "bucket",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sparse_token_losses` and d loss_i / d student_logits (N, V) in closed form (the chain rule
    above; tests hold it to autograd in float64)."""
    s, a, lse_a, used, safe, log_q, log_p, extra = _sparse_buckets(student_logits, ids, logprobs,
                                                                   opts, tail)
    kd = _sparse_divergence(used, log_q, log_p, extra, opts, tail)
    k = ids.shape[-1]
    if tail == "ignore":  # P q_v - M_v
        p = torch.where(used, log_p.exp(), 0.0)
        grad_kd = ((a - lse_a).exp() * p.sum(-1, keepdim=True)).scatter_add_(-1, safe, -p)
    elif tail == "renormalize":
        g = torch.where(used, divergence_grad(log_q, log_p, opts), 0.0)
        grad_kd = torch.zeros_like(a).scatter_add_(-1, safe, g)
    else:
        g = divergence_grad(log_q, log_p, opts)
        lse_out = extra["lse_out"]
        outside = g[..., k:] * (a - torch.where(lse_out > float("-inf"), lse_out, 0.0)).exp()
        grad_kd = torch.where(extra["member"], 0.0, outside).scatter_add_(
            -1, safe, torch.where(used, g[..., :k], 0.0))
    ce = _ce(s, labels, opts)
    grad = (opts.kd_weight * opts.temperature) * grad_kd
    if labels is not None:
        y = torch.where(labels != opts.ignore_index, labels, 0).unsqueeze(-1)
        soft = torch.softmax(s, -1).scatter_add_(-1, y, torch.full_like(y, -1, dtype=s.dtype))
        grad += opts.ce_weight * soft
    if opts.student_softcap is not None:
        grad.mul_(1 - (s / opts.student_softcap) ** 2)
    loss, ce, kd, valid = _weigh(ce, kd, labels, opts)
    if valid is not None:
        grad.masked_fill_(~valid.unsqueeze(-1), 0.0)
    return loss, ce, kd, grad


def sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    tail: str = "bucket",
    student_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd) of the sparse loss with full logits, reduced like `distill_loss`:
    hidden (..., D), weight (V, D), teacher_ids / teacher_logprobs (..., k)."""
    lead = student_hidden.shape[:-1]
    s = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    k = teacher_ids.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    loss, ce, kd = sparse_token_losses(s, teacher_ids.reshape(-1, k),
                                       teacher_logprobs.reshape(-1, k).detach(), flat_labels,
                                       opts, tail)
    return _reduced(loss, ce, kd, flat_labels, opts, lead)
