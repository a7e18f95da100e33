"""What the row kernels share: launch defaults, the divergence ids, and the @triton.jit helpers.

Notation as in `dense.py`: a = s / T and b = t / T the tempered logits of the student and the
teacher, q = softmax(a), p = softmax(b), online-logsumexp state (m_i, l_i). Written once here, for
the dense kernel's streamed rows and the sparse kernel's buckets alike: the divergences' per-id
terms (`divergence_terms`), a tile's load (logit scale, then softcap: `load_row_tile`), the
online logsumexp and entropy states, a row's label (`load_label`), and a row's ends: its
per-token outputs (`store_row`) and its gradient tiles (`store_grad_tile`).
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
def softcap(z, cap):
    # cap * tanh(z / cap) with tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflow gives +-cap, never NaN.
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))


@triton.jit
def load_row_tile(row_ptr, offs, row_width, n_valid, scale, cap, HAS_CAP: tl.constexpr,
                   MARKED: tl.constexpr):
    """fp32 logits of one tile as the loss sees them, softcap(scale z), -inf where offs >=
    n_valid. The load's mask is the padded row width (a multiple of 16 elements: vector loads),
    the -inf fill is by n_valid. MARKED: -inf entries are marks (the sparse kernel's ids) and
    stay -inf under the softcap (which maps a logit of -inf to -cap; the scale, > 0, keeps
    them)."""
    z = tl.load(row_ptr + offs, mask=offs < row_width, other=0.0).to(tl.float32) * scale
    if HAS_CAP:
        capped = softcap(z, cap)
        if MARKED:
            capped = tl.where(z == float("-inf"), z, capped)
        z = capped
    return tl.where(offs < n_valid, z, float("-inf"))


@triton.jit
def load_label(y_ptr, row, s_row, vocab_start, V, ignore_index, s_scale, s_cap,
               HAS_LABELS: tl.constexpr, HAS_S_CAP: tl.constexpr, IN_RANGE: tl.constexpr):
    """(valid, y_local, s_y): whether the row counts, its label as a column of this row (may lie
    outside [0, V) when another rank owns it, or be ignore_index), and the student's logit there
    as the loss sees it (scaled, softcapped). Without labels: (True, -1, 0).

    IN_RANGE: s_y is read only where the column lies in [0, V) (0 elsewhere): a vocab-parallel
    shard holds some columns only, and the dense kernels guard a caller's out-of-range label
    (check_labels=False) so. The sparse kernel reads the counted label's column unchecked: the
    check cost it up to 8 registers (ptxas, sm_90) for what the front-end's label check makes."""
    valid = True
    y_local = -1
    s_y = 0.0
    if HAS_LABELS:
        y = tl.load(y_ptr + row)
        valid = y != ignore_index
        y_local = y - vocab_start
        if IN_RANGE:
            here = valid & (y_local >= 0) & (y_local < V)
            s_y = tl.load(s_row + tl.where(here, y_local, 0)).to(tl.float32) * s_scale
        else:
            s_y = tl.load(s_row + tl.where(valid, y_local, 0)).to(tl.float32) * s_scale
        if HAS_S_CAP:
            s_y = softcap(s_y, s_cap)
        if IN_RANGE:
            s_y = tl.where(here, s_y, 0.0)
    return valid, y_local, s_y


@triton.jit
def store_row(out, ce, kd, ent, valid, ce_weight, kd_weight, temperature,
              HAS_LABELS: tl.constexpr):
    """The row's per-token outputs at `out` (its first column): loss = w_ce CE + w_kd T^2 D, CE,
    D, H(q); all 0 at an ignored row (it counts for nothing)."""
    loss = ce_weight * ce + kd_weight * temperature * temperature * kd
    if HAS_LABELS:
        loss = tl.where(valid, loss, 0.0)
        ce = tl.where(valid, ce, 0.0)
        kd = tl.where(valid, kd, 0.0)
        ent = tl.where(valid, ent, 0.0)
    tl.store(out + LOSS, loss)
    tl.store(out + CE, ce)
    tl.store(out + KD, kd)
    tl.store(out + ENTROPY, ent)


@triton.jit
def store_grad_tile(row_ptr, offs, grad, r, valid, V, stride_s, HAS_LABELS: tl.constexpr):
    """One tile of G = r dloss/dz, written over the row in its dtype: 0 in the pad columns [V,
    stride_s), and exactly 0 at an ignored row, whatever its logits hold."""
    grad = tl.where(offs < V, grad * r, 0.0)
    if HAS_LABELS:
        grad = tl.where(valid, grad, 0.0)
    tl.store(row_ptr + offs, grad.to(row_ptr.dtype.element_ty), mask=offs < stride_s)


@triton.jit
def logaddexp(x, y):
    """log(exp x + exp y); -inf (not NaN) when both are -inf."""
    m = tl.maximum(x, y)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.exp(x - m_ref) + tl.exp(y - m_ref))


@triton.jit
def lse(x):
    """logsumexp of a tile; -inf (not NaN) when every entry is -inf."""
    m = tl.max(x, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.sum(tl.exp(x - m_ref), axis=0))


@triton.jit
def log_mix(log_u, log_v, w):
    """log(w u + (1 - w) v) from log u, log v as a logaddexp, never the log of a sum of small
    probabilities."""
    return logaddexp(tl.log(w) + log_u, tl.log(1.0 - w) + log_v)


@triton.jit
def online_update(m_i, l_i, x):
    """Online logsumexp state (m_i, l_i) after seeing tile x (entries -inf are ignored; a state
    still at -inf after the tile stays (-inf, 0), never exp(-inf - -inf) = NaN)."""
    m_new = tl.maximum(m_i, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    return m_new, l_i * alpha + tl.sum(tl.exp(x - m_ref), axis=0), alpha


@triton.jit
def online_entropy(m_i, l_i, h_i, x):
    """`online_update` that also keeps h = sum_v exp(x_v - m)(m - x_v) >= 0 for the entropy of
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
def entropy(l_i, h_i):
    """H from the online state (`online_entropy`); 0 for an empty state (no ids: a shard)."""
    return tl.where(l_i > 0.0, tl.log(l_i) + h_i / l_i, 0.0)


@triton.jit
def divergence_terms(log_p, log_q, p, q, mix, DIVERGENCE: tl.constexpr):
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
        log_m = log_mix(log_p, log_q, mix)
        g = (1.0 - mix) * (log_q - log_m)
        d = tl.where(p != 0.0, mix * p * (log_p - log_m), 0.0) + q * g
    elif DIVERGENCE == SKEW_FORWARD_KL:
        log_m = log_mix(log_p, log_q, mix)
        d = tl.where(p != 0.0, p * (log_p - log_m), 0.0)
        g = -(1.0 - mix) * tl.exp(log_p - log_m)
    elif DIVERGENCE == SKEW_REVERSE_KL:
        log_ratio = log_q - log_mix(log_q, log_p, mix)
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
