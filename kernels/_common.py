"""What the row kernels share: launch defaults, the divergence ids, and the @triton.jit helpers.

Notation as in `dense.py`: a = s / T and b = t / T the tempered logits of the student and the
teacher, q = softmax(a), p = softmax(b), online-logsumexp state (m_i, l_i). The divergences'
per-id terms are written once here (`_divergence_terms`), for the dense kernel's streamed rows
and the sparse kernel's buckets alike; so are a tile's load (logit scale, then softcap) and the
online entropy state.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Launch defaults: vocabulary tile and warps per row program. 16 warps put 8 elements (one 128-bit
# bf16 load) per thread per tile; at 8 warps ptxas 13.4 spilled inside the row loops of some
# variants (tests/test_dense.py checks the SASS). Unmeasured on a GPU: bench/gpu_profile.py
# sweeps both.
DEFAULT_BLOCK_V = 4096
DEFAULT_NUM_WARPS = 16

FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
DIVERGENCE_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3,
                  "skew_reverse_kl": 4, "tvd": 5}

# Per-token outputs: one (n, OUTPUTS) fp32 row per token, in this column order.
OUTPUTS = tl.constexpr(4)
LOSS = tl.constexpr(0)  # w_ce CE + w_kd T^2 D
CE = tl.constexpr(1)
KD = tl.constexpr(2)  # D (without T^2)
ENTROPY = tl.constexpr(3)  # H(q), the student's entropy at T


@triton.jit
def _softcap(z, cap):
    # cap * tanh(z / cap) with tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflow gives +-cap, never NaN.
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))


@triton.jit
def _load_row_tile(row_ptr, offs, row_width, n_valid, scale, cap, HAS_CAP: tl.constexpr,
                   MARKED: tl.constexpr):
    """fp32 logits of one tile as the loss sees them, softcap(scale z), -inf where offs >=
    n_valid. The load's mask is the padded row width (a multiple of 16 elements: vector loads),
    the -inf fill is by n_valid. MARKED: -inf entries are marks (the sparse kernel's ids) and
    stay -inf under the softcap (which maps a logit of -inf to -cap; the scale, > 0, keeps
    them)."""
    z = tl.load(row_ptr + offs, mask=offs < row_width, other=0.0).to(tl.float32) * scale
    if HAS_CAP:
        capped = _softcap(z, cap)
        if MARKED:
            capped = tl.where(z == float("-inf"), z, capped)
        z = capped
    return tl.where(offs < n_valid, z, float("-inf"))


@triton.jit
def _logaddexp(x, y):
    """log(exp x + exp y); -inf (not NaN) when both are -inf."""
    m = tl.maximum(x, y)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.exp(x - m_ref) + tl.exp(y - m_ref))


@triton.jit
def _lse(x):
    """logsumexp of a tile; -inf (not NaN) when every entry is -inf."""
    m = tl.max(x, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.sum(tl.exp(x - m_ref), axis=0))


@triton.jit
def _log_mix(log_u, log_v, w):
    """log(w u + (1 - w) v) from log u, log v as a logaddexp, never the log of a sum of small
    probabilities."""
    return _logaddexp(tl.log(w) + log_u, tl.log(1.0 - w) + log_v)


@triton.jit
def _online_update(m_i, l_i, x):
    """Online logsumexp state (m_i, l_i) after seeing tile x (entries -inf are ignored; a state
    still at -inf after the tile stays (-inf, 0), never exp(-inf - -inf) = NaN)."""
    m_new = tl.maximum(m_i, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    return m_new, l_i * alpha + tl.sum(tl.exp(x - m_ref), axis=0), alpha


@triton.jit
def _online_entropy(m_i, l_i, h_i, x):
    """`_online_update` that also keeps h = sum_v exp(x_v - m)(m - x_v) >= 0 for the entropy of
    softmax(x), H = log l + h / l: terms of one sign, no cancellation (E_q[x] subtracted from
    the logsumexp would cancel at |x| >> H). When m grows to m', exp(x - m')(m' - x) =
    alpha exp(x - m)((m - x) + (m' - m)), so h <- alpha (h + (m' - m) l) + the tile's terms."""
    m_new = tl.maximum(m_i, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    e = tl.exp(x - m_ref)
    shift = tl.where(l_i > 0.0, m_ref - m_i, 0.0)  # l = 0: nothing seen yet, h = 0
    terms = tl.where(x > float("-inf"), e * (m_ref - x), 0.0)
    h_new = alpha * (h_i + shift * l_i) + tl.sum(terms, axis=0)
    return m_new, l_i * alpha + tl.sum(e, axis=0), h_new, alpha


@triton.jit
def _entropy(l_i, h_i):
    """H from the online state (`_online_entropy`); 0 for an empty state (no ids: a shard)."""
    return tl.where(l_i > 0.0, tl.log(l_i) + h_i / l_i, 0.0)


@triton.jit
def _divergence_terms(log_p, log_q, p, q, mix, DIVERGENCE: tl.constexpr):
    """(d_v, g_v) from log p, log q and p = exp(log p), q = exp(log q): D = sum d_v, and g_v =
    dD/dq_v up to a constant (it cancels in q (g - E_q[g])), formed without dividing by q;
    forward_kl's g (-p / q) is never used (its gradient is q - p) and comes back as 0. mix is beta
    for jsd, alpha for the skew KLs. Terms with p_v = 0 add 0 log 0 = 0 (as
    `fastkd.reference.divergence_terms` and `divergence_g`); a NaN p_v stays NaN (p != 0, not
    p > 0: a NaN from the teacher must reach the loss, not vanish from it)."""
    if DIVERGENCE == FORWARD_KL:
        d = tl.where(p != 0.0, p * (log_p - log_q), 0.0)
        g = tl.zeros_like(d)
    elif DIVERGENCE == REVERSE_KL:
        g = log_q - log_p
        d = q * g
    elif DIVERGENCE == JSD:
        log_m = _log_mix(log_p, log_q, mix)
        g = (1.0 - mix) * (log_q - log_m)
        d = tl.where(p != 0.0, mix * p * (log_p - log_m), 0.0) + q * g
    elif DIVERGENCE == SKEW_FORWARD_KL:
        log_m = _log_mix(log_p, log_q, mix)
        d = tl.where(p != 0.0, p * (log_p - log_m), 0.0)
        g = -(1.0 - mix) * tl.exp(log_p - log_m)
    elif DIVERGENCE == SKEW_REVERSE_KL:
        log_ratio = log_q - _log_mix(log_q, log_p, mix)
        d = q * log_ratio
        g = log_ratio - mix * tl.exp(log_ratio)
    else:  # TVD: the subgradient, sign(0) = 0
        d = 0.5 * tl.abs(p - q)
        g = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
    return d, g


def launch_meta(opts, has_labels: bool, vocab: int, block_v: int, num_warps: int) -> dict:
    """The constexpr and launch arguments every row kernel takes, from a DistillOptions."""
    return dict(DIVERGENCE=DIVERGENCE_IDS[opts.divergence], HAS_LABELS=has_labels,
                HAS_S_CAP=opts.student_softcap is not None,
                BLOCK_V=min(block_v, triton.next_power_of_2(max(vocab, 1))), num_warps=num_warps)


def option_scalars(opts, kernel) -> dict:
    """The scalar arguments `kernel` takes of these, by name, from a DistillOptions: ignore_index,
    temperature, ce_weight, kd_weight, mix (beta or alpha), s_cap, t_cap (an absent cap as 1.0,
    unused: HAS_*_CAP is off), s_scale, t_scale (the logit scales)."""
    scalars = dict(ignore_index=opts.ignore_index, temperature=opts.temperature,
                   ce_weight=opts.ce_weight, kd_weight=opts.kd_weight, mix=opts.mix,
                   s_cap=opts.student_softcap or 1.0, t_cap=opts.teacher_softcap or 1.0,
                   s_scale=opts.student_logit_scale, t_scale=opts.teacher_logit_scale)
    return {name: value for name, value in scalars.items() if name in kernel.arg_names}
