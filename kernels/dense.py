"""Row kernel of the fused dense loss: per-token loss and dloss/dlogits over the vocabulary.

For one chunk of n tokens the caller has formed, with cuBLAS, the student logits z_s (n, V) and the
teacher logits z_t (n, K), K = min(V, V_t), bias included. One program handles one row (token) and
streams it in BLOCK_V tiles with an online max/sum (state m_*, l_*), in fp32 whatever the buffer
dtype:

    s = c_s tanh(sigma_s z_s / c_s)  (HAS_S_CAP; else sigma_s z_s),  t likewise with sigma_t, c_t
        (the logit scales sigma multiply each tile as it loads: `load_row_tile`)
    a = s / T,  b = t / T  over v < K;  L_s = lse_{v<V} s,  L_a = lse_{v<K} a,  L_b = lse_{v<K} b
    q = exp(a - L_a),  p = exp(b - L_b)

    pass 1 (statistics): m_s/l_s, m_a/l_a, m_b/l_b, and for the two KL divergences the rescaled sums
        forward_kl: D = sum_v p_v (b_v - a_v) - L_b + L_a
        reverse_kl: D = sum_v q_v (a_v - b_v) - L_a + L_b
      and beside m_a/l_a the entropy's h_a = sum_v exp(a_v - m_a)(m_a - a_v):
        H(q) = -sum_v q_v log q_v = log l_a + h_a / l_a  (a sum of terms >= 0, `online_entropy`)
    pass 2 (the other divergences): D = sum_v d_v and S = E_q[g] = sum_v q_v g_v, g_v = dD/dq_v
        (up to a constant, which cancels below), with mixtures as logaddexps, log mix(u, v; w) =
        log(w u + (1 - w) v), never the log of a sum of small probabilities (`_common.py`):
        jsd (beta):       m = mix(p, q; beta)
                          d = beta p (log p - log m) + (1 - beta) q (log q - log m)
                          g = (1 - beta) (log q - log m)
        skew_forward_kl:  m = mix(p, q; alpha),  d = p (log p - log m),  g = -(1 - alpha) p / m
        skew_reverse_kl:  m = mix(q, p; alpha),  d = q (log q - log m),
                          g = log q - log m - alpha q / m
        tvd:              d = |p - q| / 2,  g = sign(q - p) / 2  (subgradient, sign(0) = 0)
    last pass (if COMPUTE_GRAD): G = dloss/dz_s, written over z_s in place:
        1. CE:          w_ce (softmax(s)_v - [v = y])                         all v < V
        2. forward_kl:  w_kd T (q_v - p_v)                                     v < K, 0 beyond
        3. reverse_kl:  w_kd T q_v (log q_v - log p_v - D) = w_kd T q_v ((a_v - b_v) - E_q[a - b])
        4. the others:  w_kd T q_v (g_v - S)            (dD/da_v through the softmax q = softmax(a);
                        a difference of comparable terms, not q g - q S, whose products round apart)
        5. the head:    times 1 - (s_v / c_s)^2 (softcap) and sigma_s (logit scale, folded into
                        the row's scale r, 0 if ignored), as ds/dz_s = sigma_s (1 - (s / c_s)^2)
    (w_kd T^2 dD/ds = w_kd T dD/da since a = s / T.)

Outputs per row, one (OUTPUTS,) fp32 row each: loss = w_ce CE + w_kd T^2 D, ce = CE, kd = D, entropy
= H(q), all 0 at ignored rows (`store_row`). Each row streams its logits 2 (forward/reverse KL) or 3
(the others) times; bytes per row ~ (passes * (V + K) + V) * itemsize. Row offsets are int64: n * V
passes 2^31 for large chunks at V = 256k.

Teacher ids at -inf (banned or masked ids, p_v = 0) contribute 0 log 0 = 0 wherever p log p
appears; reverse_kl (and skew_reverse_kl at alpha = 0) is +inf when the student puts mass there,
as the math says.

Row padding: each buffer's row stride is its padded width (the caller rounds V and K up to a
multiple of 64). Loads and stores are masked by that width, not by V or K, so the mask is constant
over 16-element groups and the compiler keeps 128-bit accesses for any vocabulary size (V = 50257
would otherwise give scalar loads); ids in [V, stride) read as -inf and the gradient there is
written as 0. Those pad columns are scratch the kernel reads and overwrites.
"""

from __future__ import annotations

import triton
import triton.language as tl
from fastkd.kernels._common import (
    DEFAULT_BLOCK_V,
    DEFAULT_NUM_WARPS,
    FORWARD_KL,
    OUTPUTS,
    REVERSE_KL,
    divergence_terms,
    entropy,
    launch_meta,
    load_label,
    load_row_tile,
    online_entropy,
    online_update,
    option_scalars,
    store_grad_tile,
    store_row,
)

__all__ = ["DEFAULT_BLOCK_V", "DEFAULT_NUM_WARPS", "ROW_PARAMS", "STATS", "dense_grad",
           "dense_partials", "dense_rows", "dense_stats"]


@triton.jit
def _stats_pass(s_row, t_row, stride_s, stride_t, V, K, inv_t, s_scale, s_cap, t_scale, t_cap,
                DIVERGENCE: tl.constexpr, HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Pass 1: online logsumexp states of s (all V), a = s/T and b = t/T (v < K), e, the
    expectation of b - a under p (forward_kl) or of a - b under q (reverse_kl) over the row, and
    the entropy H(q). Returns L_s, then L_a and L_b each as the pair (m, log l), L = m + log l
    (the later passes form log q = (a - m_a) - log l_a, closer in fp32 at the large entries than
    a - L_a, whose rounded L_a (|L_a| ~ 15 at logits of std 3) would shift every entry), e, H."""
    offs0 = tl.arange(0, BLOCK_V)
    m_s = tl.full([], float("-inf"), tl.float32)
    l_s = tl.zeros([], tl.float32)
    m_a = m_s
    l_a = l_s
    m_b = m_s
    l_b = l_s
    h_a = l_s  # the entropy's sum exp(a - m_a) (m_a - a)
    acc = l_s  # forward: sum exp(b - m_b) (b - a);  reverse: sum exp(a - m_a) (a - b)
    for v0 in range(0, K, BLOCK_V):  # tiles holding shared ids: student and teacher
        offs = v0 + offs0
        in_k = offs < K
        s = load_row_tile(s_row, offs, stride_s, V, s_scale, s_cap, HAS_S_CAP, False)
        m_s, l_s, _ = online_update(m_s, l_s, s)
        a = tl.where(in_k, s * inv_t, float("-inf"))
        b = load_row_tile(t_row, offs, stride_t, K, t_scale, t_cap, HAS_T_CAP, False) * inv_t
        m_a, l_a, h_a, alpha_a = online_entropy(m_a, l_a, h_a, a)
        m_b, l_b, alpha_b = online_update(m_b, l_b, b)
        if DIVERGENCE == FORWARD_KL:  # p_v = 0 (b = -inf, or v >= K) adds 0, not 0 * -inf
            term = tl.where(b > float("-inf"), tl.exp(b - m_b) * (b - a), 0.0)
            acc = acc * alpha_b + tl.sum(term, axis=0)
        elif DIVERGENCE == REVERSE_KL:
            term = tl.where(in_k, tl.exp(a - m_a) * (a - b), 0.0)
            acc = acc * alpha_a + tl.sum(term, axis=0)
    for v0 in range(tl.cdiv(K, BLOCK_V) * BLOCK_V, V, BLOCK_V):  # student-only tail, ids >= K
        s = load_row_tile(s_row, v0 + offs0, stride_s, V, s_scale, s_cap, HAS_S_CAP, False)
        m_s, l_s, _ = online_update(m_s, l_s, s)
    l_e = l_b if DIVERGENCE == FORWARD_KL else l_a
    e = tl.where(l_e > 0.0, acc / l_e, 0.0)  # a shard without shared ids has no mass: 0
    return m_s + tl.log(l_s), m_a, tl.log(l_a), m_b, tl.log(l_b), e, entropy(l_a, h_a)


@triton.jit
def _partials_pass(s_row, t_row, stride_s, stride_t, K, inv_t, m_a, ll_a, m_b, ll_b, mix,
                   s_scale, s_cap, t_scale, t_cap, DIVERGENCE: tl.constexpr,
                   HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 2 (all but forward/reverse KL): D = sum d and S = sum q g over the row's shared ids,
    given the (global) log-normalisers L_a = m_a + ll_a and L_b = m_b + ll_b."""
    offs0 = tl.arange(0, BLOCK_V)
    kd = tl.zeros([], tl.float32)
    sum_qg = tl.zeros([], tl.float32)
    for v0 in range(0, K, BLOCK_V):
        offs = v0 + offs0
        in_k = offs < K
        a = load_row_tile(s_row, offs, stride_s, K, s_scale, s_cap, HAS_S_CAP, False) * inv_t
        b = load_row_tile(t_row, offs, stride_t, K, t_scale, t_cap, HAS_T_CAP, False) * inv_t
        log_q = (a - m_a) - ll_a
        log_p = (b - m_b) - ll_b
        q = tl.exp(log_q)
        d, g = divergence_terms(log_p, log_q, tl.exp(log_p), q, mix, DIVERGENCE)
        kd += tl.sum(tl.where(in_k, d, 0.0), axis=0)
        sum_qg += tl.sum(tl.where(in_k, q * g, 0.0), axis=0)
    return kd, sum_qg


@triton.jit
def _grad_pass(s_row, t_row, out_row, stride_s, stride_t, V, K, inv_t, lse_s, m_a, ll_a, m_b,
               ll_b, c, y_local, valid, r, ce_weight, kd_weight, temperature, mix, s_scale, s_cap,
               t_scale, t_cap, DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr,
               HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Last pass: G = r dloss/dz_s over the row, written to out_row (the student row itself).
    c is E_q[a - b] for reverse_kl, S = E_q[g] for the three-pass divergences."""
    offs0 = tl.arange(0, BLOCK_V)
    r = r * s_scale  # 5. the logit scale's chain-rule factor, once per row
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + offs0
        in_k = offs < K
        s = load_row_tile(s_row, offs, stride_s, V, s_scale, s_cap, HAS_S_CAP, False)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_LABELS:  # 1. CE (the label's column may belong to another rank: no -1 here)
            grad = ce_weight * (tl.exp(s - lse_s) - tl.where(offs == y_local, 1.0, 0.0))
        # KD terms; tiles past K load nothing (all masked) and add 0
        log_q = tl.where(in_k, (s * inv_t - m_a) - ll_a, float("-inf"))
        b = load_row_tile(t_row, offs, stride_t, K, t_scale, t_cap, HAS_T_CAP, False) * inv_t
        log_p = (b - m_b) - ll_b
        q = tl.exp(log_q)
        if DIVERGENCE == FORWARD_KL:  # 2.
            dkd = q - tl.exp(log_p)
        elif DIVERGENCE == REVERSE_KL:  # 3. log q - log p - D = (a - b) - E_q[a - b]
            dkd = q * ((s * inv_t - b) - c)
        else:  # 4.
            _, g = divergence_terms(log_p, log_q, tl.exp(log_p), q, mix, DIVERGENCE)
            dkd = q * (g - c)
        grad += kd_weight * temperature * tl.where(in_k, dkd, 0.0)
        if HAS_S_CAP:  # 5.
            grad = grad * (1.0 - (s / s_cap) * (s / s_cap))
        store_grad_tile(out_row, offs, grad, r, valid, V, stride_s, HAS_LABELS)


@triton.jit
def dense_rows_kernel(
    # pointers
    s_ptr,  # (n, V) student logits z_s, rows stride_s >= V apart, any float dtype; overwritten
    #         by dloss/dz_s if COMPUTE_GRAD (and 0 in the pad columns [V, stride_s))
    t_ptr,  # (n, K) teacher logits z_t, rows stride_t >= K apart
    y_ptr,  # (n,) int64 labels (unused without HAS_LABELS)
    scale_ptr,  # (n,) fp32 gradient scale r per row
    out_ptr,  # (n, OUTPUTS) fp32 out: loss = w_ce CE + w_kd T^2 D, CE, D, H(q) per row
    # sizes
    V,
    K,
    # strides (elements, rows): the padded row widths, also the load/store masks' bound
    stride_s,
    stride_t,
    # scalars
    ignore_index,
    temperature,
    ce_weight,
    kd_weight,
    mix,  # beta for jsd, alpha for the skew KLs
    s_cap,
    t_cap,
    s_scale,  # the logit scales sigma_s, sigma_t
    t_scale,
    # meta
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_S_CAP: tl.constexpr,
    HAS_T_CAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The whole row in one program: pass 1, pass 2 (three-pass divergences), the gradient."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    inv_t = 1.0 / temperature
    lse_s, m_a, ll_a, m_b, ll_b, e, ent = _stats_pass(s_row, t_row, stride_s, stride_t, V, K,
                                                      inv_t, s_scale, s_cap, t_scale, t_cap,
                                                      DIVERGENCE, HAS_S_CAP, HAS_T_CAP, BLOCK_V)
    valid, y_local, s_y = load_label(y_ptr, row, s_row, 0, V, ignore_index, s_scale, s_cap,
                                 HAS_LABELS, HAS_S_CAP, True)  # after pass 1: fewer live regs
    ce = lse_s - s_y if HAS_LABELS else 0.0
    c = e  # E_q[a - b] for reverse_kl: the gradient uses it directly, not kd + lse terms
    if DIVERGENCE == FORWARD_KL:  # L_a - L_b summed from the small parts first
        kd = e + ((m_a - m_b) + (ll_a - ll_b))
    elif DIVERGENCE == REVERSE_KL:
        kd = e + ((m_b - m_a) + (ll_b - ll_a))
    else:
        kd, c = _partials_pass(s_row, t_row, stride_s, stride_t, K, inv_t, m_a, ll_a, m_b, ll_b,
                               mix, s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HAS_S_CAP,
                               HAS_T_CAP, BLOCK_V)

    store_row(out_ptr + row * OUTPUTS, ce, kd, ent, valid, ce_weight, kd_weight, temperature,
              HAS_LABELS)
    if COMPUTE_GRAD:
        _grad_pass(s_row, t_row, s_row, stride_s, stride_t, V, K, inv_t, lse_s, m_a, ll_a, m_b,
                   ll_b, c, y_local, valid, tl.load(scale_ptr + row), ce_weight, kd_weight,
                   temperature, mix, s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HAS_LABELS,
                   HAS_S_CAP, HAS_T_CAP, BLOCK_V)


# ---- vocab-parallel entry points: the same passes, split around the ranks' all-reduces --------
# On a rank holding vocabulary ids [vocab_start, vocab_start + V) of the student (K of them shared
# with the teacher), the caller runs dense_stats_kernel, combines the rows' statistics over the
# ranks (logsumexps, e weighted by each rank's mass, s_y summed, the entropies weighted by each
# rank's share of q), then for the three-pass divergences dense_partials_kernel and an
# all-reduce of (D, S), then dense_grad_kernel.
STATS = tl.constexpr(6)  # per row: L_s, L_a, L_b, e, s_y, H (local)
ROW_PARAMS = tl.constexpr(4)  # per row: L_s, L_a, L_b, c (global)


@triton.jit
def dense_stats_kernel(
    s_ptr, t_ptr, y_ptr,  # as dense_rows_kernel
    stats_ptr,  # (n, STATS) fp32 out: this shard's L_s, L_a, L_b, e, s_y (0 if y elsewhere), H
    V, K, stride_s, stride_t, vocab_start, ignore_index, temperature, s_cap, t_cap, s_scale,
    t_scale, DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_S_CAP: tl.constexpr,
    HAS_T_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    lse_s, m_a, ll_a, m_b, ll_b, e, ent = _stats_pass(s_row, t_row, stride_s, stride_t, V, K,
                                                      1.0 / temperature, s_scale, s_cap, t_scale,
                                                      t_cap, DIVERGENCE, HAS_S_CAP, HAS_T_CAP,
                                                      BLOCK_V)
    _, _, s_y = load_label(y_ptr, row, s_row, vocab_start, V, ignore_index, s_scale, s_cap,
                           HAS_LABELS, HAS_S_CAP, True)
    out = stats_ptr + row * STATS
    tl.store(out, lse_s)
    tl.store(out + 1, m_a + ll_a)
    tl.store(out + 2, m_b + ll_b)
    tl.store(out + 3, e)
    tl.store(out + 4, s_y)
    tl.store(out + 5, ent)


@triton.jit
def dense_partials_kernel(
    s_ptr, t_ptr,  # as dense_rows_kernel
    params_ptr,  # (n, ROW_PARAMS) fp32: global L_s, L_a, L_b (c unused)
    out_ptr,  # (n, 2) fp32 out: this shard's D and S = sum q g
    K, stride_s, stride_t, temperature, mix, s_cap, t_cap, s_scale, t_scale,
    DIVERGENCE: tl.constexpr, HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    params = params_ptr + row * ROW_PARAMS
    kd, sum_qg = _partials_pass(s_ptr + row * stride_s, t_ptr + row * stride_t, stride_s,
                                stride_t, K, 1.0 / temperature, tl.load(params + 1), 0.0,
                                tl.load(params + 2), 0.0, mix, s_scale, s_cap, t_scale, t_cap,
                                DIVERGENCE, HAS_S_CAP, HAS_T_CAP, BLOCK_V)
    tl.store(out_ptr + row * 2, kd)
    tl.store(out_ptr + row * 2 + 1, sum_qg)


@triton.jit
def dense_grad_kernel(
    s_ptr, t_ptr, y_ptr, scale_ptr,  # as dense_rows_kernel; G is written over s_ptr
    params_ptr,  # (n, ROW_PARAMS) fp32: global L_s, L_a, L_b and c (E_q[a - b] or S)
    V, K, stride_s, stride_t, vocab_start, ignore_index, temperature, ce_weight, kd_weight, mix,
    s_cap, t_cap, s_scale, t_scale,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_S_CAP: tl.constexpr,
    HAS_T_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    valid, y_local, _ = load_label(y_ptr, row, s_row, vocab_start, V, ignore_index, s_scale,
                                   s_cap, HAS_LABELS, HAS_S_CAP, True)
    params = params_ptr + row * ROW_PARAMS
    _grad_pass(s_row, t_ptr + row * stride_t, s_row, stride_s, stride_t, V, K, 1.0 / temperature,
               tl.load(params), tl.load(params + 1), 0.0, tl.load(params + 2), 0.0,
               tl.load(params + 3), y_local, valid, tl.load(scale_ptr + row), ce_weight, kd_weight,
               temperature, mix, s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HAS_LABELS,
               HAS_S_CAP, HAS_T_CAP, BLOCK_V)


def _meta(opts, labels, vocab: int, block_v: int, num_warps: int) -> dict:
    return dict(launch_meta(opts, labels is not None, vocab, block_v, num_warps),
                HAS_T_CAP=opts.teacher_softcap is not None)


def _teacher_rows(student_logits, teacher_logits):
    """A vocab-parallel rank may hold no teacher ids (K = 0): hand the kernel a (n, 0) view with
    a valid base pointer and row width 0, so every teacher load is masked off."""
    if teacher_logits.numel() or teacher_logits.shape[1]:
        return teacher_logits
    return student_logits.as_strided((student_logits.shape[0], 0), (0, 1))


def dense_rows(
    student_logits,
    teacher_logits,
    labels,
    row_scale,
    out,
    opts,
    compute_grad: bool,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> None:
    """Launch one program per row; writes out (n, OUTPUTS) (loss, ce, kd, entropy per row) and, if
    compute_grad, the gradient over student_logits. Shapes as in the kernel's pointer comments;
    rows must have unit inner stride, and the columns between a row's end and the next row's start
    are scratch (padded buffers from `fastkd.autograd.padded_rows`: 128-bit loads at any V).
    `opts` is a fastkd.DistillOptions (read, not checked: the caller checks)."""
    n, vocab = student_logits.shape
    if n == 0:
        return
    teacher_logits = _teacher_rows(student_logits, teacher_logits)
    dense_rows_kernel[(n,)](
        student_logits, teacher_logits, labels if labels is not None else row_scale, row_scale,
        out, vocab, teacher_logits.shape[1], student_logits.stride(0), teacher_logits.stride(0),
        **option_scalars(opts, dense_rows_kernel), COMPUTE_GRAD=compute_grad,
        **_meta(opts, labels, vocab, block_v, num_warps),
    )


def dense_stats(student_logits, teacher_logits, labels, stats_out, vocab_start: int, opts,
                  block_v: int = DEFAULT_BLOCK_V, num_warps: int = DEFAULT_NUM_WARPS) -> None:
    """This shard's per-row statistics into stats_out (n, STATS), for the vocab-parallel loss."""
    n, vocab = student_logits.shape
    if n == 0:
        return
    teacher_logits = _teacher_rows(student_logits, teacher_logits)
    dense_stats_kernel[(n,)](
        student_logits, teacher_logits, labels if labels is not None else stats_out, stats_out,
        vocab, teacher_logits.shape[1], student_logits.stride(0), teacher_logits.stride(0),
        vocab_start, **option_scalars(opts, dense_stats_kernel),
        **_meta(opts, labels, vocab, block_v, num_warps),
    )


def dense_partials(student_logits, teacher_logits, params, out, opts,
                     block_v: int = DEFAULT_BLOCK_V, num_warps: int = DEFAULT_NUM_WARPS) -> None:
    """This shard's (D, S) per row into out (n, 2), given the global params (n, ROW_PARAMS)."""
    n, vocab = student_logits.shape
    if n == 0:
        return
    teacher_logits = _teacher_rows(student_logits, teacher_logits)
    meta = _meta(opts, None, vocab, block_v, num_warps)
    del meta["HAS_LABELS"]
    dense_partials_kernel[(n,)](
        student_logits, teacher_logits, params, out, teacher_logits.shape[1],
        student_logits.stride(0), teacher_logits.stride(0),
        **option_scalars(opts, dense_partials_kernel), **meta,
    )


def dense_grad(student_logits, teacher_logits, labels, row_scale, params, vocab_start: int,
                 opts, block_v: int = DEFAULT_BLOCK_V,
                 num_warps: int = DEFAULT_NUM_WARPS) -> None:
    """G = r dloss/dz_s over student_logits, given the global params (n, ROW_PARAMS)."""
    n, vocab = student_logits.shape
    if n == 0:
        return
    teacher_logits = _teacher_rows(student_logits, teacher_logits)
    dense_grad_kernel[(n,)](
        student_logits, teacher_logits, labels if labels is not None else row_scale, row_scale,
        params, vocab, teacher_logits.shape[1], student_logits.stride(0),
        teacher_logits.stride(0), vocab_start, **option_scalars(opts, dense_grad_kernel),
        **_meta(opts, labels, vocab, block_v, num_warps),
    )
