"""Row kernel of the fused mixture loss: NUM_T <= 4 dense teachers on every token, weighted.

For one chunk of n tokens the caller has formed, with cuBLAS, the student logits z_s (n, V) and
each teacher's logits z_t,j over the K = min(V, V_t,j) ids they all share, in one (NUM_T, n, K)
buffer; w (n, NUM_T) holds the weights (>= 0, summing to 1 per row). One program per row streams
the row in BLOCK_V tiles, the teachers' tiles as one [BLOCK_T, BLOCK_V] block (BLOCK_T = the next
power of 2 >= NUM_T; the padding rows re-read teacher 0 with weight 0: finite, never counted), in
fp32 whatever the buffers' dtype (the spec is `fastkd.reference_multi.mixture_token_losses`):

    s, a = s / T, L_s, L_a, q = exp(a - L_a), H(q) as in `dense.py`;  per teacher j its own head,
    t_j = c_j tanh(sigma_j z_t,j / c_j) (or sigma_j z_t,j), b_j = t_j / T, L_b,j,
    p_j = exp(b_j - L_b,j);  a teacher with w_j = 0 is not consulted (its terms are dropped, not
    multiplied by 0: its D_j may be infinite)

    pass 1 (statistics): the student's online states, and per teacher (m_b,j, l_b,j) and for the
        KLs the rescaled sum e_j:
            forward_kl: D_j = E_pj[b_j - a] - L_b,j + L_a
            reverse_kl: D_j = E_q[a - b_j] - L_a + L_b,j
    pass 2 (the other divergences): D_j = sum_v d_j,v and S_j = E_q[g_j] per teacher
        (`divergence_terms` on the [BLOCK_T, BLOCK_V] block)
    "divergences": D = sum_j w_j D_j
    last pass (if COMPUTE_GRAD): G = dloss/dz_s, written over z_s in place:
        1. CE:          w_ce (softmax(s)_v - [v = y])                               all v < V
        2. forward_kl:  w_kd T (q_v - pbar_v),  pbar_v = sum_j w_j p_j,v   (both mixtures)
        3. reverse_kl:  w_kd T q_v sum_j w_j ((a_v - b_j,v) - E_q[a - b_j])
        4. the others:  w_kd T q_v sum_j w_j (g_j,v - S_j)
        5. the head:    times 1 - (s_v / c_s)^2 (softcap) and sigma_s (folded into r)
    ENSEMBLE (forward_kl): D = KL(pbar || q) = sum_v pbar_v (log pbar_v - log q_v), log pbar_v =
        logsumexp_j (log w_j + log p_j,v); it needs every L_b,j first, so the last pass forms it
        (that pass runs over the K shared ids without writing G when COMPUTE_GRAD is off)

The streaming state grows with NUM_T: 3 NUM_T + 5 scalars per row in pass 1 (the student's 5,
then m_b, l_b, e per teacher), 2 NUM_T in pass 2. Passes per row as one teacher's: 2 for the KLs
(1 without the gradient; the ensemble 2 either way), 3 for the others; bytes per row about
passes (V + NUM_T K) + V elements.

Outputs per row, one (OUTPUTS + NUM_T,) fp32 row each: loss = w_ce CE + w_kd T^2 D, ce = CE,
kd = D, entropy = H(q) (`store_row`), then D_j of each teacher; all 0 at ignored rows. Row
offsets are int64. Buffers are padded as in `dense.py` (rows 64 elements apart: 128-bit loads).
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
    softcap,
    store_grad_tile,
    store_row,
)

__all__ = ["MAX_TEACHERS", "block_v_for", "mixture_rows"]

MAX_TEACHERS = 4  # the per-teacher head settings are 4 scalar arguments each


def block_v_for(block_t: int) -> int:
    """The vocabulary tile beside a [block_t, BLOCK_V] teachers' block: DEFAULT_BLOCK_V (the
    student's tiles 128-bit per thread, as the dense kernel's) up to 2 teachers; half of it for
    3-4, where ptxas 13 (sm_90) spilled 68 bytes in the JSD variant at the full width and none
    at half (64-bit student accesses). Unmeasured on a GPU."""
    return DEFAULT_BLOCK_V if block_t <= 2 else DEFAULT_BLOCK_V // 2


@triton.jit
def _per_teacher(offs_t, x0, x1, x2, x3):
    """[BLOCK_T] of the scalars x_j at j = offs_t (x3 beyond)."""
    return tl.where(offs_t == 0, x0, tl.where(offs_t == 1, x1, tl.where(offs_t == 2, x2, x3)))


@triton.jit
def _teacher_tile(t_rows, offs, stride_t, K, inv_t, t_scale, t_cap, HAS_T_CAP: tl.constexpr):
    """[BLOCK_T, BLOCK_V] b = t / T of every teacher at ids offs, each with its own scale and
    softcap (a cap <= 0: none), -inf at ids >= K. t_rows, t_scale, t_cap: [BLOCK_T, 1]."""
    z = tl.load(t_rows + offs[None, :], mask=offs[None, :] < stride_t, other=0.0)
    z = z.to(tl.float32) * t_scale
    if HAS_T_CAP:
        capped = t_cap > 0.0
        z = tl.where(capped, softcap(z, tl.where(capped, t_cap, 1.0)), z)
    return tl.where(offs[None, :] < K, z, float("-inf")) * inv_t


@triton.jit
def _online_rows(m_i, l_i, x):
    """`online_update` of a [BLOCK_T] state by a [BLOCK_T, BLOCK_V] block, row by row."""
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    return m_new, l_i * alpha + tl.sum(tl.exp(x - m_ref[:, None]), axis=1), alpha


@triton.jit
def _lse_rows(x):
    """logsumexp over the teachers (axis 0) of a [BLOCK_T, BLOCK_V] block; -inf, not NaN, where
    every entry is -inf."""
    m = tl.max(x, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.sum(tl.exp(x - m_ref[None, :]), axis=0))


@triton.jit
def _stats_pass(s_row, t_rows, stride_s, stride_t, V, K, inv_t, s_scale, s_cap, t_scale, t_cap,
                DIVERGENCE: tl.constexpr, HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: the student's L_s, (m_a, log l_a) and H(q); per teacher (m_b, log l_b) and e
    (E_p[b - a] for forward_kl, E_q[a - b] for reverse_kl, else 0), each [BLOCK_T]."""
    offs0 = tl.arange(0, BLOCK_V)
    m_s = tl.full([], float("-inf"), tl.float32)
    m_a = m_s
    l_s = tl.zeros([], tl.float32)
    l_a = l_s
    h_a = l_s
    m_b = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_b = tl.zeros([BLOCK_T], tl.float32)
    acc = l_b  # forward: sum exp(b - m_b) (b - a);  reverse: sum exp(a - m_a) (a - b)
    for v0 in range(0, K, BLOCK_V):  # tiles holding shared ids
        offs = v0 + offs0
        in_k = offs < K
        s = load_row_tile(s_row, offs, stride_s, V, s_scale, s_cap, HAS_S_CAP, False)
        m_s, l_s, _ = online_update(m_s, l_s, s)
        a = tl.where(in_k, s * inv_t, float("-inf"))
        b = _teacher_tile(t_rows, offs, stride_t, K, inv_t, t_scale, t_cap, HAS_T_CAP)
        m_a, l_a, h_a, alpha_a = online_entropy(m_a, l_a, h_a, a)
        m_b, l_b, alpha_b = _online_rows(m_b, l_b, b)
        if DIVERGENCE == FORWARD_KL:  # p = 0 (b = -inf) adds 0, not 0 * -inf
            term = tl.where(b > float("-inf"), tl.exp(b - m_b[:, None]) * (b - a[None, :]), 0.0)
            acc = acc * alpha_b + tl.sum(term, axis=1)
        elif DIVERGENCE == REVERSE_KL:
            term = tl.where(in_k[None, :], tl.exp(a - m_a)[None, :] * (a[None, :] - b), 0.0)
            acc = acc * alpha_a + tl.sum(term, axis=1)
    for v0 in range(tl.cdiv(K, BLOCK_V) * BLOCK_V, V, BLOCK_V):  # student-only tail, ids >= K
        s = load_row_tile(s_row, v0 + offs0, stride_s, V, s_scale, s_cap, HAS_S_CAP, False)
        m_s, l_s, _ = online_update(m_s, l_s, s)
    l_e = l_b if DIVERGENCE == FORWARD_KL else l_a
    e = tl.where(l_e > 0.0, acc / l_e, 0.0)
    return m_s + tl.log(l_s), m_a, tl.log(l_a), m_b, tl.log(l_b), e, entropy(l_a, h_a)


@triton.jit
def _partials_pass(s_row, t_rows, stride_s, stride_t, K, inv_t, m_a, ll_a, m_b, ll_b, mix,
                   s_scale, s_cap, t_scale, t_cap, DIVERGENCE: tl.constexpr,
                   HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """Pass 2 (all but forward/reverse KL): per teacher D_j = sum d and S_j = sum q g over the
    shared ids, [BLOCK_T] each."""
    offs0 = tl.arange(0, BLOCK_V)
    kd = tl.zeros([BLOCK_T], tl.float32)
    sum_qg = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(0, K, BLOCK_V):
        offs = v0 + offs0
        in_k = (offs < K)[None, :]
        a = load_row_tile(s_row, offs, stride_s, K, s_scale, s_cap, HAS_S_CAP, False) * inv_t
        b = _teacher_tile(t_rows, offs, stride_t, K, inv_t, t_scale, t_cap, HAS_T_CAP)
        log_q = ((a - m_a) - ll_a)[None, :]
        log_p = (b - m_b[:, None]) - ll_b[:, None]
        q = tl.exp(log_q)
        d, g = divergence_terms(log_p, log_q, tl.exp(log_p), q, mix, DIVERGENCE)
        kd += tl.sum(tl.where(in_k, d, 0.0), axis=1)
        sum_qg += tl.sum(tl.where(in_k, q * g, 0.0), axis=1)
    return kd, sum_qg


@triton.jit
def _grad_pass(s_row, t_rows, stride_s, stride_t, V, K, inv_t, lse_s, m_a, ll_a, m_b, ll_b, c,
               w, y_local, valid, r, ce_weight, kd_weight, temperature, mix, s_scale, s_cap,
               t_scale, t_cap, DIVERGENCE: tl.constexpr, ENSEMBLE: tl.constexpr,
               HAS_LABELS: tl.constexpr, HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr,
               WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Last pass: G = r dloss/dz_s over the row, written in place if WRITE_GRAD; returns the
    ensemble's KL(pbar || q) (0 unless ENSEMBLE). c [BLOCK_T]: E_q[a - b_j] (reverse_kl) or S_j;
    w [BLOCK_T]: the weights, 0 in the padding."""
    offs0 = tl.arange(0, BLOCK_V)
    on = (w > 0.0)[:, None]
    w = w[:, None]
    log_w = tl.where(on, tl.log(tl.where(on, w, 1.0)), float("-inf"))
    r = r * s_scale  # 5. the logit scale's chain-rule factor, once per row
    ens = tl.zeros([], tl.float32)
    end = V
    if not WRITE_GRAD:
        end = K  # the ensemble's value alone: the shared ids
    for v0 in range(0, end, BLOCK_V):
        offs = v0 + offs0
        in_k = offs < K
        s = load_row_tile(s_row, offs, stride_s, V, s_scale, s_cap, HAS_S_CAP, False)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_LABELS:  # 1. CE
            grad = ce_weight * (tl.exp(s - lse_s) - tl.where(offs == y_local, 1.0, 0.0))
        log_q = tl.where(in_k, (s * inv_t - m_a) - ll_a, float("-inf"))
        b = _teacher_tile(t_rows, offs, stride_t, K, inv_t, t_scale, t_cap, HAS_T_CAP)
        log_p = (b - m_b[:, None]) - ll_b[:, None]
        q = tl.exp(log_q)
        if DIVERGENCE == FORWARD_KL:  # 2.
            dkd = q - tl.sum(tl.where(on, w * tl.exp(log_p), 0.0), axis=0)
            if ENSEMBLE:
                log_pbar = _lse_rows(tl.where(on, log_w + log_p, float("-inf")))
                pbar = tl.exp(log_pbar)
                ens += tl.sum(tl.where(in_k & (pbar != 0.0), pbar * (log_pbar - log_q), 0.0),
                              axis=0)
        elif DIVERGENCE == REVERSE_KL:  # 3.
            a = (s * inv_t)[None, :]
            dkd = q * tl.sum(tl.where(on, w * ((a - b) - c[:, None]), 0.0), axis=0)
        else:  # 4.
            _, g = divergence_terms(log_p, log_q[None, :], tl.exp(log_p), q[None, :], mix,
                                    DIVERGENCE)
            dkd = q * tl.sum(tl.where(on, w * (g - c[:, None]), 0.0), axis=0)
        grad += kd_weight * temperature * tl.where(in_k, dkd, 0.0)
        if HAS_S_CAP:  # 5.
            grad = grad * (1.0 - (s / s_cap) * (s / s_cap))
        if WRITE_GRAD:
            store_grad_tile(s_row, offs, grad, r, valid, V, stride_s, HAS_LABELS)
    return ens


@triton.jit
def _store_teachers(out, offs_t, kd_t, valid, NUM_T: tl.constexpr, HAS_LABELS: tl.constexpr):
    """Each teacher's D_j after the row's OUTPUTS columns; 0 at an ignored row."""
    if HAS_LABELS:
        kd_t = tl.where(valid, kd_t, 0.0)
    tl.store(out + OUTPUTS + offs_t, kd_t, mask=offs_t < NUM_T)


@triton.jit
def mixture_rows_kernel(
    # pointers
    s_ptr,  # (n, V) student logits z_s, rows stride_s >= V apart; overwritten by dloss/dz_s
    t_ptr,  # (NUM_T, n, K) teacher logits: teacher j's row i at j stride_tt + i stride_t
    w_ptr,  # (n, NUM_T) fp32 weights
    y_ptr,  # (n,) int64 labels (unused without HAS_LABELS)
    scale_ptr,  # (n,) fp32 gradient scale r per row
    out_ptr,  # (n, OUTPUTS + NUM_T) fp32 out: loss, CE, D, H(q), then D_j per teacher
    # sizes
    V,
    K,
    # strides (elements): rows of the student's and the teachers' buffers, and between teachers
    stride_s,
    stride_t,
    stride_tt,
    # scalars
    ignore_index,
    temperature,
    ce_weight,
    kd_weight,
    mix,  # beta for jsd, alpha for the skew KLs
    s_cap,
    s_scale,
    t_cap0, t_cap1, t_cap2, t_cap3,  # each teacher's softcap (<= 0: none)
    t_scale0, t_scale1, t_scale2, t_scale3,  # each teacher's logit scale
    # meta
    DIVERGENCE: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_S_CAP: tl.constexpr,
    HAS_T_CAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    NUM_T: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The whole row in one program: pass 1, pass 2 (three-pass divergences), the last pass."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    offs_t = tl.arange(0, BLOCK_T)
    teacher = tl.where(offs_t < NUM_T, offs_t, 0).to(tl.int64)  # the padding re-reads teacher 0
    t_rows = (t_ptr + teacher * stride_tt + row * stride_t)[:, None]
    t_scale = _per_teacher(offs_t, t_scale0, t_scale1, t_scale2, t_scale3)[:, None]
    t_cap = _per_teacher(offs_t, t_cap0, t_cap1, t_cap2, t_cap3)[:, None]
    w = tl.load(w_ptr + row * NUM_T + offs_t, mask=offs_t < NUM_T, other=0.0)
    inv_t = 1.0 / temperature
    lse_s, m_a, ll_a, m_b, ll_b, e, ent = _stats_pass(
        s_row, t_rows, stride_s, stride_t, V, K, inv_t, s_scale, s_cap, t_scale, t_cap,
        DIVERGENCE, HAS_S_CAP, HAS_T_CAP, BLOCK_T, BLOCK_V)
    valid, y_local, s_y = load_label(y_ptr, row, s_row, 0, V, ignore_index, s_scale, s_cap,
                                     HAS_LABELS, HAS_S_CAP, True)
    ce = lse_s - s_y if HAS_LABELS else 0.0
    c = e  # E_q[a - b_j] for reverse_kl
    if DIVERGENCE == FORWARD_KL:
        kd_t = e + ((m_a - m_b) + (ll_a - ll_b))
    elif DIVERGENCE == REVERSE_KL:
        kd_t = e + ((m_b - m_a) + (ll_b - ll_a))
    else:
        kd_t, c = _partials_pass(s_row, t_rows, stride_s, stride_t, K, inv_t, m_a, ll_a, m_b,
                                 ll_b, mix, s_scale, s_cap, t_scale, t_cap, DIVERGENCE,
                                 HAS_S_CAP, HAS_T_CAP, BLOCK_T, BLOCK_V)
    out = out_ptr + row * (OUTPUTS + NUM_T)
    _store_teachers(out, offs_t, kd_t, valid, NUM_T, HAS_LABELS)
    if ENSEMBLE:  # its value needs every L_b,j: the last pass forms it
        kd = _grad_pass(s_row, t_rows, stride_s, stride_t, V, K, inv_t, lse_s, m_a, ll_a, m_b,
                        ll_b, c, w, y_local, valid, tl.load(scale_ptr + row), ce_weight,
                        kd_weight, temperature, mix, s_scale, s_cap, t_scale, t_cap, DIVERGENCE,
                        True, HAS_LABELS, HAS_S_CAP, HAS_T_CAP, COMPUTE_GRAD, BLOCK_T, BLOCK_V)
        store_row(out, ce, kd, ent, valid, ce_weight, kd_weight, temperature, HAS_LABELS)
    else:
        kd = tl.sum(tl.where(w > 0.0, w * kd_t, 0.0), axis=0)
        store_row(out, ce, kd, ent, valid, ce_weight, kd_weight, temperature, HAS_LABELS)
        if COMPUTE_GRAD:
            _grad_pass(s_row, t_rows, stride_s, stride_t, V, K, inv_t, lse_s, m_a, ll_a, m_b,
                       ll_b, c, w, y_local, valid, tl.load(scale_ptr + row), ce_weight,
                       kd_weight, temperature, mix, s_scale, s_cap, t_scale, t_cap, DIVERGENCE,
                       False, HAS_LABELS, HAS_S_CAP, HAS_T_CAP, True, BLOCK_T, BLOCK_V)


def _padded(values: list, fill: float) -> list:
    return list(values) + [fill] * (MAX_TEACHERS - len(values))


def mixture_rows(student_logits, teacher_logits, weights, labels, row_scale, out, opts, heads,
                 ensemble: bool, compute_grad: bool, block_v: int | None = None,
                 num_warps: int = DEFAULT_NUM_WARPS) -> None:
    """Launch one program per row: student_logits (n, V), teacher_logits (NUM_T, n, K) (rows of
    unit inner stride), weights (n, NUM_T) fp32 contiguous, out (n, OUTPUTS + NUM_T) fp32; heads
    NUM_T (softcap or None, logit scale). Writes out and, if compute_grad, the gradient over
    student_logits. block_v: default `block_v_for`. `opts` is a fastkd.DistillOptions (read,
    not checked: the caller checks)."""
    n, vocab = student_logits.shape
    num_t, _, shared = teacher_logits.shape
    if n == 0:
        return
    block_t = triton.next_power_of_2(num_t)
    caps = _padded([cap or 0.0 for cap, _ in heads], 0.0)
    scales = _padded([scale for _, scale in heads], 1.0)
    settings = {**{f"t_cap{j}": x for j, x in enumerate(caps)},
                **{f"t_scale{j}": x for j, x in enumerate(scales)}}
    meta = launch_meta(opts, labels is not None, vocab, block_v or block_v_for(block_t),
                       num_warps)
    mixture_rows_kernel[(n,)](
        student_logits, teacher_logits, weights, labels if labels is not None else row_scale,
        row_scale, out, vocab, shared, student_logits.stride(0), teacher_logits.stride(1),
        teacher_logits.stride(0), **option_scalars(opts, mixture_rows_kernel), **settings,
        ENSEMBLE=ensemble, HAS_T_CAP=any(cap is not None for cap, _ in heads),
        COMPUTE_GRAD=compute_grad, NUM_T=num_t, BLOCK_T=block_t, **meta,
    )
