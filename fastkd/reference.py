"""The plain-torch definition of the distillation loss: the spec.

Tests hold the kernels to it in float64, the CPU path runs `token_losses_and_grad` on chunks of
logits (so the CPU path and the spec cannot drift apart), and benchmarks use it as the naive
baseline. It materialises full N x V logits, so use it for checking, not for training at scale.

The gradient w.r.t. the student logits is given in closed form too (`token_losses_and_grad`, the
formulas of docs/math.md), so the CPU path needs no autograd graph per chunk; tests hold it to
autograd of `token_losses` in float64.

Both are written to be well-conditioned in fp32 too, since the CPU path and backend="reference"
evaluate them there: log-probabilities as (x - max) - log sum exp(x - max) (`log_softmax`), and
each divergence's gradient as q (g - E_q[g]), a difference of comparable terms, never
q g - q sum(q g) (whose two products round separately: at |g| ~ 10 that loses a digit).

Notation (one token): student logits s (V ids), teacher logits t (V_t ids), each its head's
output h W^T + b, K = min(V, V_t) shared ids, temperature T, label y.

    s <- c_s * tanh(sigma_s s / c_s),  t <- c_t * tanh(sigma_t t / c_t)
                        (logit scales sigma, default 1, then optional softcaps: `head_logits`)
    CE  = logsumexp(s) - s_y                                      (full student vocab, T = 1)
    q   = softmax(s[:K] / T),  p = softmax(t[:K] / T)
    forward_kl: KL(p || q)     reverse_kl: KL(q || p)
    jsd:        beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q
    skew_forward_kl: KL(p || alpha p + (1 - alpha) q)
    skew_reverse_kl: KL(q || (1 - alpha) p + alpha q)
    tvd:        1/2 sum |p - q|
    (0 log 0 = 0: teacher ids at -inf, p = 0, contribute nothing)
    loss = ce_weight * CE + kd_weight * T**2 * D
    entropy H(q) = -sum_v q_v log q_v   (reported, not trained: the student's entropy at T over
                                         the distribution the divergence compares)

The scale multiplies the head's output, bias included, before the softcap, as transformers'
Cohere (logit_scale), Granite (1 / logits_scaling), Falcon-H1 (lm_head_multiplier) and Muse
Glimmer (output_multiplier, then the softcap) heads do, and as TRL 1.16's DistillationTrainer
applies logit_scale and final_logit_softcapping; the temperature divides after both. The student
logit gradient gets the chain-rule factor sigma_s (1 - (s / c_s)^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd.checks import choice
from fastkd.options import DistillOptions


class Components(tuple):
    """What `return_components=True` returns: unpacks as (loss, ce, kd), as it always has, and
    also carries the student's entropy: `.entropy` (and `.loss`, `.ce`, `.kd` by name). Per token
    (the spec's `token_losses`) or reduced like the loss (the public functions)."""

    def __new__(cls, loss, ce, kd, entropy):
        out = super().__new__(cls, (loss, ce, kd))
        out.entropy = entropy
        return out

    def __getnewargs__(self):  # copy and pickle: the four values
        return (*self, self.entropy)

    loss = property(lambda self: self[0])
    ce = property(lambda self: self[1])
    kd = property(lambda self: self[2])

    def columns(self) -> tuple:
        """(loss, ce, kd, entropy)."""
        return (*self, self.entropy)

    def __repr__(self) -> str:
        return (f"Components(loss={self[0]!r}, ce={self[1]!r}, kd={self[2]!r}, "
                f"entropy={self.entropy!r})")


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2 style logit softcapping `cap * tanh(logits / cap)`; identity for cap=None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def head_logits(logits: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """The logits the loss sees from a head's output h W^T + b: times the head's logit scale,
    then softcapped, `cap * tanh(scale * logits / cap)` (the temperature divides after both)."""
    return softcap(logits if scale == 1.0 else logits * scale, cap)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim as (x - m) - log sum exp(x - m), m the row's max (held constant
    for autograd: the value does not depend on it). At the largest entries, the ones that carry
    the mass, this is 3-5x closer to the exact value in fp32 than x - logsumexp(x), whose rounded
    logsumexp (|L| ~ 15 at logits of std 3) shifts every entry, or torch.log_softmax on CPU."""
    m = x.detach().amax(-1, keepdim=True)
    z = x - torch.where(torch.isfinite(m), m, 0.0)
    return z - z.exp().sum(-1, keepdim=True).log()


def _xlog_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x * (log x - log y), with 0 where x = 0 (0 log 0 = 0: a teacher id at -inf adds nothing);
    NaN stays NaN (a test of x != 0, not x > 0: a NaN from a model must not vanish)."""
    return torch.where(x != 0, x * (log_x - log_y), 0.0)


def _log_mix(log_u: torch.Tensor, log_v: torch.Tensor, w: float) -> torch.Tensor:
    """log(w u + (1 - w) v) as a logaddexp, never the log of a sum of small probabilities."""
    log_w = math.log(w) if w > 0 else float("-inf")
    return torch.logaddexp(log_u + log_w, log_v + math.log1p(-w))


def divergence_terms(log_q: torch.Tensor, log_p: torch.Tensor, opts: DistillOptions,
                     q: torch.Tensor | None = None, p: torch.Tensor | None = None) -> torch.Tensor:
    """Per-id terms d_v of the divergence D = sum_v d_v of teacher p and student q, both given as
    log-probabilities (..., K) (and as probabilities, if given; else exp of the logs). Every
    divergence fastkd offers is such a sum, which is what lets a vocabulary split across ranks
    add up its partial sums."""
    q = log_q.exp() if q is None else q
    p = log_p.exp() if p is None else p
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
    """Per-row divergence of teacher p and student q, given as log-probabilities over whole rows
    (..., K); p and q renormalised over the row (see `divergence_grad`)."""
    return divergence_terms(log_q, log_p, opts, _renormalised(log_q), _renormalised(log_p)).sum(-1)


def divergence_g(log_q: torch.Tensor, log_p: torch.Tensor, opts: DistillOptions) -> torch.Tensor:
    """Per-id g_v = dD/dq_v up to a constant (which cancels in `divergence_grad`), formed without
    dividing by q, (..., K), for every divergence but forward_kl (whose g = -p / q is never formed:
    its gradient is q - p):
        reverse_kl       log q - log p
        jsd              (1 - beta) (log q - log m),   m = beta p + (1 - beta) q
        skew_forward_kl  -(1 - alpha) p / m,           m = alpha p + (1 - alpha) q
        skew_reverse_kl  log(q / m) - alpha q / m,     m = (1 - alpha) p + alpha q
        tvd              sign(q - p) / 2               (the subgradient, sign(0) = 0)"""
    name = opts.divergence
    if name == "reverse_kl":
        return log_q - log_p
    if name == "jsd":
        return (1 - opts.beta) * (log_q - _log_mix(log_p, log_q, opts.beta))
    if name == "skew_forward_kl":
        return -(1 - opts.skew) * (log_p - _log_mix(log_p, log_q, opts.skew)).exp()
    if name == "skew_reverse_kl":
        log_ratio = log_q - _log_mix(log_q, log_p, opts.skew)
        return log_ratio - opts.skew * log_ratio.exp()
    if name == "tvd":
        return 0.5 * torch.sign(log_q.exp() - log_p.exp())
    raise ValueError(f"divergence_g has no g for {name!r} (forward_kl's gradient is q - p)")


def divergence_grad(log_q: torch.Tensor, log_p: torch.Tensor,
                    opts: DistillOptions) -> torch.Tensor:
    """dD/da, a = s[:K] / T (so q = softmax(a)), in closed form over whole rows, (..., K): q - p
    for forward_kl, else, through the softmax, q_v (g_v - S) with g = `divergence_g` and S =
    E_q[g] = sum_u q_u g_u (for reverse_kl S = D: q (log q - log p - D)).

    q and p are exp(log q) and exp(log p) renormalised over the row: exp of a log-softmax sums to
    1 only up to the rounding of the row's log-normaliser, a relative bias shared by every id, and
    a gradient whose ids do not sum to 0 sends that bias coherently into dH = G W_s (measured: 2-4x
    the error of dH in fp32). (A vocabulary split across ranks cannot renormalise per shard: it
    adds up S from the ranks' partial sums instead.)"""
    q = _renormalised(log_q)
    if opts.divergence == "forward_kl":
        return q - _renormalised(log_p)
    g = divergence_g(log_q, log_p, opts)
    return q * (g - (q * g).sum(-1, keepdim=True))


def entropy(log_q: torch.Tensor) -> torch.Tensor:
    """Per-row entropy -sum q log q of q given as log-probabilities (..., K) (0 log 0 = 0)."""
    return -torch.where(log_q != float("-inf"), log_q.exp() * log_q, 0.0).sum(-1)


def _renormalised(log_x: torch.Tensor) -> torch.Tensor:
    """exp(log x) / its row's sum (a row of empty slots, all exp = 0, stays 0)."""
    x = log_x.exp()
    total = x.sum(-1, keepdim=True)
    return x / torch.where(total > 0, total, 1.0)


def _student_teacher(student_logits, teacher_logits, opts):
    """The student's logits as the loss sees them (`head_logits`) and the tempered
    log-probabilities over the K shared ids."""
    s = head_logits(student_logits, opts.student_logit_scale, opts.student_softcap)
    t = head_logits(teacher_logits, opts.teacher_logit_scale, opts.teacher_softcap)
    k = min(s.shape[-1], t.shape[-1])
    log_q = log_softmax(s[..., :k] / opts.temperature)
    log_p = log_softmax(t[..., :k] / opts.temperature)
    return s, log_q, log_p


def _weigh(ce, kd, ent, labels, opts):
    """(loss, ce, kd, entropy) per token as `Components`, 0 at ignored tokens, and the
    counted-token mask (None without labels)."""
    valid = None
    if labels is not None:
        valid = labels != opts.ignore_index
        ce, kd, ent = (torch.where(valid, x, 0.0) for x in (ce, kd, ent))
    loss = opts.ce_weight * ce + (opts.kd_weight * opts.temperature**2) * kd
    return Components(loss, ce, kd, ent), valid


def _cross_entropy(s, labels, opts, grad=False):
    """Per-token CE over the full vocabulary at T = 1 (0 without labels) and, if grad, its logit
    gradient softmax(s) - onehot(y) (None without labels)."""
    if labels is None:
        return torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device), None
    y = torch.where(labels != opts.ignore_index, labels, 0).unsqueeze(-1)
    log_soft = log_softmax(s)
    ce = -log_soft.gather(-1, y).squeeze(-1)
    if not grad:
        return ce, None
    return ce, log_soft.exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=s.dtype))


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
) -> Components:
    """Per-token (loss, ce, kd) and .entropy from the heads' logits (before scale and softcap):
    (N, V), (N, V_t) -> four (N,).

    Ignored tokens (label == ignore_index) get 0 in all four. Computes in the logits' dtype; pass
    fp32 or fp64 logits (`distill_loss` upcasts half precision first).
    """
    s, log_q, log_p = _student_teacher(student_logits, teacher_logits, opts)
    kd = divergence(log_q, log_p, opts)
    return _weigh(_cross_entropy(s, labels, opts)[0], kd, entropy(log_q), labels, opts)[0]


def token_losses_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
) -> tuple[Components, torch.Tensor]:
    """(`token_losses`, d loss_i / d student_logits (N, V)), the gradient in closed form, no
    autograd graph:

        CE:       w_ce (softmax(s) - onehot(y))                    all V ids
        KD:       w_kd T dD/da  (`divergence_grad`; a = s / T)      the K shared ids, 0 beyond
        head:     times sigma_s (1 - (s / c_s)^2)  (logit scale, softcap);  ignored tokens: 0
    """
    s, log_q, log_p = _student_teacher(student_logits, teacher_logits, opts)
    kd = divergence(log_q, log_p, opts)
    ce, grad = _cross_entropy(s, labels, opts, grad=True)
    if grad is None:
        grad = torch.zeros_like(s)
    else:
        grad.mul_(opts.ce_weight)
    k = log_q.shape[-1]
    grad[..., :k] += (opts.kd_weight * opts.temperature) * divergence_grad(log_q, log_p, opts)
    return _finish(s, grad, ce, kd, entropy(log_q), labels, opts)


def _finish(s, grad, ce, kd, ent, labels, opts):
    """(`Components` per token, grad) from CE, D, H and the gradient w.r.t. the logits s the loss
    sees: the head's chain rule applied (softcap, logit scale), everything 0 at ignored tokens."""
    if opts.student_softcap is not None:
        grad.mul_(1 - (s / opts.student_softcap) ** 2)
    if opts.student_logit_scale != 1.0:
        grad.mul_(opts.student_logit_scale)
    per_token, valid = _weigh(ce, kd, ent, labels, opts)
    if valid is not None:
        grad.masked_fill_(~valid.unsqueeze(-1), 0.0)  # not a product: NaN * 0 would stay NaN
    return per_token, grad


def reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-token values (already 0 at ignored tokens); mean divides by the counted ones."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _reduced(per_token: Components, flat_labels, opts: DistillOptions, lead) -> Components:
    """Per-token components reduced by opts.reduction over the counted tokens; all but the loss
    detached; "none" back to the leading shape."""
    loss = per_token.loss
    if flat_labels is None:
        valid = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    else:
        valid = flat_labels != opts.ignore_index
    out = [reduce(x, valid, opts.reduction)
           for x in (loss, *(x.detach() for x in per_token.columns()[1:]))]
    if opts.reduction == "none":
        out = [x.reshape(lead) for x in out]
    return Components(*out)


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> Components:
    """(loss, ce, kd) and .entropy with full logits; ce, kd and entropy reduced like loss,
    unweighted, detached, kd without T**2.

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
    return _reduced(token_losses(s, t, flat_labels, opts), flat_labels, opts, lead)


# ---------------------------------------------------------------------------------------------
# The sparse loss (`fastkd.fused_sparse_distill_loss`): the teacher as k (id, log-probability)
# pairs per token, e.g. from a teacher cache, instead of its logits.
#
#     a = s / T over the full student vocabulary,  q = softmax(a);  per token, slots j < k with
#     ids id_j (-1: unused slot) and teacher log-probabilities lp_j = log p_j (already at T);
#     S = the set of used ids,  P = sum_j p_j,  Q = sum_{v in S} q_v.
#     bucket:       D over the k + 1 buckets (p_1..p_k, 1 - P) and (q_id_1..q_id_k, 1 - Q), with
#                   log(1 - Q) = logsumexp_{v not in S} log q_v (no cancellation)
#                   and log(1 - P) = log(-expm1(log P)) in fp64 (-inf where P rounds to >= 1);
#                   the rest bucket is dropped when S covers the whole vocabulary
#     renormalize:  D of p / P and q / Q over S (rows with P = 0 carry no divergence)
#     ignore:       forward_kl only, D = sum_j p_j (log M_j - log q_id_j), M_j = the mass of id_j
#                   summed over its duplicate slots (entries add up)
#     loss = ce_weight * CE + kd_weight * T**2 * D, CE over the full vocabulary at T = 1;
#     entropy H(q) over the full vocabulary (the student's logit scale and softcap apply to s as
#     for the dense loss; the teacher's are already in its log-probabilities).
#
# Every divergence of `divergence_terms` applies to bucket and renormalize: the buckets are a
# distribution, student buckets a softmax of c = (a_id_1..a_id_k, logsumexp_{v not in S} a_v),
# so dD/dc is `divergence_grad` over the buckets and the chain rule gives, per student id v,
#     bucket:       dD/da_v = G_j at v = id_j,  G_rest q_v / (1 - Q) outside S
#     renormalize:  dD/da_v = G_j at v = id_j (a softmax over S alone), 0 outside S
#     ignore:       dD/da_v = P q_v - M_v   (M_v = 0 outside S)
# and the student logit gradient is w_kd T dD/da, as for the dense loss.

SPARSE_TAILS = ("bucket", "renormalize", "ignore")
# The log-probability given to a slot that holds no bucket (an unused slot, an empty rest bucket)
# on both sides: finite, so x (log x - log y) and q (g - sum q g) give exactly 0, not 0 * NaN.
EMPTY_LOG = -1e30


def _sparse_buckets(student_logits, ids, logprobs, opts, tail):
    """The logits s the loss sees (`head_logits`), log q = log softmax(s / T) over the full
    vocabulary, the used-slot mask, the slots' ids (0 in unused slots) and the per-slot (log_q,
    log_p) the divergence sees, plus for "bucket" the membership mask (..., V) and log(1 - Q),
    for "ignore" log M (merged masses)."""
    choice("tail", tail, SPARSE_TAILS)
    s = head_logits(student_logits, opts.student_logit_scale, opts.student_softcap)
    log_q_all = log_softmax(s / opts.temperature)
    used = ids >= 0
    safe = torch.where(used, ids, 0).long()
    log_q_k = log_q_all.gather(-1, safe)
    log_p = torch.where(used, logprobs.to(s.dtype), float("-inf"))
    extra = {}
    if tail == "ignore":
        same = (safe.unsqueeze(-1) == safe.unsqueeze(-2)) & used.unsqueeze(-2)
        extra["log_m"] = torch.logsumexp(
            torch.where(same, log_p.unsqueeze(-2), float("-inf")), -1)
        return s, log_q_all, used, safe, log_q_k, log_p, extra
    if tail == "renormalize":
        lse_p = torch.logsumexp(log_p, -1, keepdim=True)  # log P
        used = used & (lse_p > float("-inf"))
        log_big_q = torch.logsumexp(torch.where(used, log_q_k, float("-inf")), -1, keepdim=True)
        log_q = torch.where(used, log_q_k - log_big_q, EMPTY_LOG)
        log_p = torch.where(used, log_p - lse_p, EMPTY_LOG)
        return s, log_q_all, used, safe, log_q, log_p, extra
    member = torch.zeros(s.shape, dtype=torch.long, device=s.device).scatter_add_(
        -1, safe, used.long()) > 0
    # log(1 - Q) as the logsumexp of log q outside S: no 1 - Q to cancel when Q is near 1
    log_q_rest = torch.logsumexp(log_q_all.masked_fill(member, float("-inf")), -1, keepdim=True)
    # log(1 - P) in fp64 whatever the compute dtype: 1 - P cancels when P is near 1
    log_big_p = torch.logsumexp(log_p.double(), -1, keepdim=True).clamp(max=0.0)
    log_p_rest = torch.log(-torch.expm1(log_big_p)).to(s.dtype)
    no_rest = log_q_rest == float("-inf")  # S covers the vocabulary
    log_q = torch.cat([torch.where(used, log_q_k, EMPTY_LOG),
                       torch.where(no_rest, EMPTY_LOG, log_q_rest)], -1)
    log_p = torch.cat([torch.where(used, log_p, EMPTY_LOG),
                       torch.where(no_rest, EMPTY_LOG, log_p_rest)], -1)
    extra.update(member=member, log_q_rest=log_q_rest)
    return s, log_q_all, used, safe, log_q, log_p, extra


def _sparse_divergence(used, log_q, log_p, extra, opts, tail):
    if tail == "ignore":
        if opts.divergence != "forward_kl":
            raise ValueError(f'tail="ignore" is forward_kl only, got {opts.divergence!r}')
        terms = _xlog_ratio(log_p.exp(), extra["log_m"], log_q)
        return torch.where(used, terms, 0.0).sum(-1)
    return divergence(log_q, log_p, opts)


def sparse_token_losses(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    tail: str = "bucket",
) -> Components:
    """Per-token (loss, ce, kd) and .entropy of the sparse loss: logits (N, V), ids (N, k)
    integer (-1 for an unused slot), logprobs (N, k) -> four (N,), 0 at ignored tokens. Computes
    in the logits' dtype (pass fp32 or fp64)."""
    s, log_q_all, used, _, log_q, log_p, extra = _sparse_buckets(student_logits, ids, logprobs,
                                                                 opts, tail)
    kd = _sparse_divergence(used, log_q, log_p, extra, opts, tail)
    return _weigh(_cross_entropy(s, labels, opts)[0], kd, entropy(log_q_all), labels, opts)[0]


def sparse_token_losses_and_grad(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    tail: str = "bucket",
) -> tuple[Components, torch.Tensor]:
    """(`sparse_token_losses`, d loss_i / d student_logits (N, V)), the gradient in closed form
    (the chain rule above; tests hold it to autograd in float64)."""
    s, log_q_all, used, safe, log_q, log_p, extra = _sparse_buckets(student_logits, ids, logprobs,
                                                                    opts, tail)
    kd = _sparse_divergence(used, log_q, log_p, extra, opts, tail)
    k = ids.shape[-1]
    if tail == "ignore":  # P q_v - M_v
        p = torch.where(used, log_p.exp(), 0.0)
        grad_kd = (log_q_all.exp() * p.sum(-1, keepdim=True)).scatter_add_(-1, safe, -p)
    elif tail == "renormalize":
        g = torch.where(used, divergence_grad(log_q, log_p, opts), 0.0)
        grad_kd = torch.zeros_like(s).scatter_add_(-1, safe, g)
    else:  # outside S: G_rest q_v / (1 - Q)
        g = divergence_grad(log_q, log_p, opts)
        rest = extra["log_q_rest"]
        outside = g[..., k:] * (log_q_all - torch.where(rest > float("-inf"), rest, 0.0)).exp()
        grad_kd = torch.where(extra["member"], 0.0, outside).scatter_add_(
            -1, safe, torch.where(used, g[..., :k], 0.0))
    ce, grad_ce = _cross_entropy(s, labels, opts, grad=True)
    grad = (opts.kd_weight * opts.temperature) * grad_kd
    if grad_ce is not None:
        grad += opts.ce_weight * grad_ce
    return _finish(s, grad, ce, kd, entropy(log_q_all), labels, opts)


def sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    tail: str = "bucket",
    student_bias: torch.Tensor | None = None,
) -> Components:
    """(loss, ce, kd) and .entropy of the sparse loss with full logits, reduced like
    `distill_loss`:
    hidden (..., D), weight (V, D), teacher_ids / teacher_logprobs (..., k)."""
    lead = student_hidden.shape[:-1]
    s = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    k = teacher_ids.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    per_token = sparse_token_losses(s, teacher_ids.reshape(-1, k),
                                    teacher_logprobs.reshape(-1, k).detach(), flat_labels, opts,
                                    tail)
    return _reduced(per_token, flat_labels, opts, lead)
