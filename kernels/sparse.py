"""Row kernel of the fused sparse distillation loss: the teacher as k (id, log-probability) pairs.

For one chunk of n tokens the caller has formed, with cuBLAS, the student logits z (n, V), bias
included; per token it passes k slots: teacher ids id_j (-1: an unused slot) and log-probabilities
lp_j = log p_j, already at temperature T. One program handles one row, in fp32 whatever the buffer
dtype (the spec is `fastkd.reference.sparse_token_losses`):

    s = c tanh(sigma z / c) (HAS_S_CAP; else sigma z, sigma the logit scale),  a = s / T,
    S = the used ids,  P = sum_j p_j
    L_s = lse_v s_v,  L_a = lse_v a_v,  q = exp(a - L_a),  CE = L_s - s_y,
    H(q) = log l_a + h_a / l_a over the whole vocabulary (the online state of `online_entropy`,
    for TAIL=bucket the ids outside S merged with the gathered ids)

    0. gather s at the k ids (`_load_slots`; and s_y); for TAIL=bucket, write -inf over the ids
       in the buffer (`_mark_slots`, a barrier on each side), so that
    1. pass 1 (`_lse_pass`: online max/sum over V) gives lse over the ids outside S: log(1 - Q)
       = lse_out - L_a without cancellation; L = logaddexp(lse_out, lse over the gathered ids).
       Other tails: pass 1 gives L_s, L_a directly.
    2. the divergence on one BLOCK_K tile of slots (`_bucket_slots`, `_renormalize_slots`,
       `_ignore_slots`; slot k = the rest bucket for TAIL=bucket; empty slots get log-probability
       EMPTY_LOG on both sides and add exactly 0):
        bucket:       buckets (p_1..p_k, 1 - P) vs (q_id_1..q_id_k, 1 - Q); G = dD/dc over the
                      buckets, c = (a_id_1..a_id_k, lse_out), as in the dense kernel:
                      forward_kl Q - P;  the others Q (g - sum(Q g)), g from
                      `divergence_terms` (reverse_kl: g = log Q - log P)
        renormalize:  the same over p / P and softmax(a_id) restricted to S (no rest bucket)
        ignore:       D = sum_j p_j (log M_j - log q_id_j), M_j = the summed mass of id_j's
                      duplicate slots (a BLOCK_K x BLOCK_M comparison per column tile)
    3. last pass (`_dense_grad_pass`, if COMPUTE_GRAD), written over z: the dense term for every
       v, as if v were outside S,
        1. CE:          w_ce (softmax(s)_v - [v = y])
        2. bucket:      w_kd T G_rest exp(a_v - lse_out)     (q_v / (1 - Q) times dD/dc_rest)
           ignore:      w_kd T P q_v
           renormalize: 0
        3. the head:    times 1 - (s_v / c)^2 (softcap) and sigma (logit scale, folded into the
                        row's scale r, 0 if ignored)
    4. a barrier, then the sparse fix-up (`_fix_slots`): at each used id v = id_j the full value,
       from the gathered s_v: CE as in 1., KD w_kd T G_j (bucket, renormalize) or w_kd T (P q_v -
       M_j) (ignore; duplicate slots write the same value), softcap as in 3.
    (w_kd T^2 dD/ds = w_kd T dD/da since a = s / T.)

Outputs per row, one (OUTPUTS,) fp32 row each: loss = w_ce CE + w_kd T^2 D, ce = CE, kd = D, entropy
= H(q), all 0 at ignored rows (`store_row`). The row streams its logits twice (pass 1, gradient) and
touches k ids three times; bytes per row about 3 V itemsize + k (ids + logprobs). Row offsets are
int64 (n V passes 2^31 at large V). With COMPUTE_GRAD off the buffer is scratch (bucket leaves -inf
at the ids). """

from __future__ import annotations

import triton
import triton.language as tl
from fastkd.kernels._common import (
    DEFAULT_BLOCK_V,
    DEFAULT_NUM_WARPS,
    FORWARD_KL,
    OUTPUTS,
    divergence_terms,
    entropy,
    launch_meta,
    load_label,
    load_row_tile,
    logaddexp,
    lse,
    online_entropy,
    online_update,
    option_scalars,
    softcap,
    store_grad_tile,
    store_row,
)

BUCKET = tl.constexpr(0)
RENORMALIZE = tl.constexpr(1)
IGNORE = tl.constexpr(2)
TAIL_IDS = {"bucket": 0, "renormalize": 1, "ignore": 2}
EMPTY_LOG: tl.constexpr = tl.constexpr(-1e30)  # as fastkd.reference.EMPTY_LOG
BLOCK_M_DEFAULT = 16  # slots per column tile of the duplicate merge (tail="ignore")


@triton.jit
def _log_rest(log_p):
    """log(1 - sum exp(log_p)) in fp64 (k values per row: cheap), -inf where the sum reaches 1.
    In fp32, 1 - P near P = 1 keeps only the digits fp32's exp rounding left."""
    rest = 1.0 - tl.sum(tl.exp(log_p.to(tl.float64)), axis=0)
    return tl.log(tl.maximum(rest, 0.0)).to(tl.float32)


@triton.jit
def _bucket_divergence(log_q, log_p, mix, DIVERGENCE: tl.constexpr):
    """D and G = dD/dc over a tile of buckets given as log-probabilities, q = softmax(c):
    G = q (g - sum(q g)) with g from `divergence_terms` (q - p for forward_kl)."""
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    d, g = divergence_terms(log_p, log_q, p, q, mix, DIVERGENCE)
    if DIVERGENCE == FORWARD_KL:
        grad = q - p
    else:
        grad = q * (g - tl.sum(q * g, axis=0))
    return tl.sum(d, axis=0), grad


@triton.jit
def _load_slots(ids_row, lp_row, s_row, K_SLOTS, inv_t, s_scale, s_cap, HAS_S_CAP: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """0. The row's slots: ids (int64), used (id >= 0), safe (the id, 0 at an unused slot), the
    teacher's log p and the student's s and a = s / T gathered at the ids (-inf at unused
    slots), s as the loss sees it (scaled, softcapped)."""
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_row + offs_k, mask=offs_k < K_SLOTS, other=-1).to(tl.int64)
    used = ids >= 0
    safe = tl.where(used, ids, 0)
    log_p = tl.load(lp_row + offs_k, mask=used, other=0.0).to(tl.float32)
    log_p = tl.where(used, log_p, float("-inf"))
    s_k = tl.load(s_row + safe, mask=used, other=0.0).to(tl.float32) * s_scale
    if HAS_S_CAP:
        s_k = softcap(s_k, s_cap)
    s_k = tl.where(used, s_k, float("-inf"))
    return ids, used, safe, log_p, s_k, s_k * inv_t


@triton.jit
def _mark_slots(s_row, safe, used, BLOCK_K: tl.constexpr):
    """TAIL=bucket: -inf over the used ids in the buffer, so pass 1 sums the ids outside S only.
    The barriers: every thread's gathers of step 0 come before, pass 1's loads after."""
    tl.debug_barrier()
    # -inf made in fp32, then cast: Triton 3.6's interpreter has no bf16 constant for tl.full
    neg_inf = tl.full([BLOCK_K], float("-inf"), tl.float32).to(s_row.dtype.element_ty)
    tl.store(s_row + safe, neg_inf, mask=used)
    tl.debug_barrier()


@triton.jit
def _lse_pass(s_row, s_k, a_k, stride_s, V, inv_t, s_scale, s_cap, TAIL: tl.constexpr,
              HAS_S_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """1. One stream over the row: L_s, L_a and H(q) over the whole vocabulary, and lse_out, the
    log-sum-exp of a over the ids outside S (TAIL=bucket, whose marks pass 1 skips: S's ids are
    merged in from the gathered slots; other tails: lse_out = L_a)."""
    offs0 = tl.arange(0, BLOCK_V)
    m_s = tl.full([], float("-inf"), tl.float32)
    l_s = tl.zeros([], tl.float32)
    m_a = m_s
    l_a = l_s
    h_a = l_s
    for v0 in range(0, V, BLOCK_V):
        z = load_row_tile(s_row, v0 + offs0, stride_s, V, s_scale, s_cap, HAS_S_CAP, True)
        m_s, l_s, _ = online_update(m_s, l_s, z)
        m_a, l_a, h_a, _ = online_entropy(m_a, l_a, h_a, z * inv_t)
    lse_s = m_s + tl.log(l_s)
    lse_a = m_a + tl.log(l_a)
    lse_out = lse_a
    ent = entropy(l_a, h_a)
    if TAIL == BUCKET:
        lse_s = logaddexp(lse_s, lse(s_k))
        lse_a = logaddexp(lse_out, lse(a_k))
        _, l_all, h_all, _ = online_entropy(m_a, l_a, h_a, a_k)  # S's ids, marked in pass 1
        ent = entropy(l_all, h_all)
    return lse_s, lse_a, lse_out, ent


@triton.jit
def _ignore_slots(ids, used, log_p, a_k, lse_a, ids_row, lp_row, K_SLOTS,
                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """2. TAIL=ignore: D = sum_j p_j (log M_j - log q_id_j), M_j the summed mass of id_j's
    duplicate slots (one BLOCK_K x BLOCK_M comparison per column tile), G_j = P q_id_j - M_j,
    and P, the dense gradient's coefficient."""
    log_q = a_k - lse_a
    p = tl.where(used, tl.exp(log_p), 0.0)
    m_j = tl.zeros([BLOCK_K], tl.float32)  # duplicate slots' masses, summed
    for j0 in range(0, K_SLOTS, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        ids_m = tl.load(ids_row + offs_m, mask=offs_m < K_SLOTS, other=-1).to(tl.int64)
        lp_m = tl.load(lp_row + offs_m, mask=ids_m >= 0, other=0.0).to(tl.float32)
        p_m = tl.where(ids_m >= 0, tl.exp(lp_m), 0.0)
        same = ids[:, None] == ids_m[None, :]
        m_j += tl.sum(tl.where(same, p_m[None, :], 0.0), axis=1)
    kd = tl.sum(tl.where(p > 0.0, p * (tl.log(m_j) - log_q), 0.0), axis=0)
    total = tl.sum(p, axis=0)
    return kd, total * tl.exp(log_q) - m_j, total


@triton.jit
def _renormalize_slots(used, log_p, a_k, mix, DIVERGENCE: tl.constexpr):
    """2. TAIL=renormalize: D and G over p / P and softmax(a) restricted to S (a row with P = 0
    has no divergence)."""
    lse_p = lse(log_p)
    used_d = tl.where(lse_p > float("-inf"), used, False)
    lse_in = lse(tl.where(used_d, a_k, float("-inf")))
    log_q = tl.where(used_d, a_k - lse_in, EMPTY_LOG)
    log_pn = tl.where(used_d, log_p - lse_p, EMPTY_LOG)
    kd, g_k = _bucket_divergence(log_q, log_pn, mix, DIVERGENCE)
    return kd, tl.where(used_d, g_k, 0.0)


@triton.jit
def _bucket_slots(used, log_p, a_k, lse_a, lse_out, K_SLOTS, mix, DIVERGENCE: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """2. TAIL=bucket: D and G over the buckets (p_1..p_k, 1 - P) and (q_id_1..q_id_k, 1 - Q);
    slot K_SLOTS is the rest bucket, dropped when S covers the vocabulary. Returns D, G at the
    slots, the rest bucket's G (the dense gradient's coefficient) and the log-normaliser of the
    dense term, lse_out (0 without a rest bucket)."""
    is_rest = tl.arange(0, BLOCK_K) == K_SLOTS
    no_rest = lse_out == float("-inf")
    log_p_rest = _log_rest(log_p)
    log_q = tl.where(used, a_k - lse_a, EMPTY_LOG)
    log_q = tl.where(is_rest, tl.where(no_rest, EMPTY_LOG, lse_out - lse_a), log_q)
    log_pb = tl.where(used, log_p, EMPTY_LOG)
    log_pb = tl.where(is_rest, tl.where(no_rest, EMPTY_LOG, log_p_rest), log_pb)
    kd, g = _bucket_divergence(log_q, log_pb, mix, DIVERGENCE)
    rest_coef = tl.sum(tl.where(is_rest, g, 0.0), axis=0)
    return kd, tl.where(used, g, 0.0), rest_coef, tl.where(no_rest, 0.0, lse_out)


@triton.jit
def _dense_grad_pass(s_row, stride_s, V, inv_t, lse_s, lse_dense, dense_coef, y_local, valid, r,
                     ce_weight, kd_weight, temperature, s_scale, s_cap, TAIL: tl.constexpr,
                     HAS_LABELS: tl.constexpr, HAS_S_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """3. The dense term of G over the whole row, written in place, every id v as if v were
    outside S (the fix-up rewrites S's ids)."""
    offs0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + offs0
        z = load_row_tile(s_row, offs, stride_s, V, s_scale, s_cap, HAS_S_CAP, True)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_LABELS:  # 1. CE
            grad = ce_weight * (tl.exp(z - lse_s) - tl.where(offs == y_local, 1.0, 0.0))
        if TAIL != RENORMALIZE:  # 2.
            grad += kd_weight * temperature * dense_coef * tl.exp(z * inv_t - lse_dense)
        if HAS_S_CAP:  # 3. (0 at the bucket tail's -inf marks: the fix-up rewrites them)
            grad = grad * tl.where(z == float("-inf"), 0.0, 1.0 - (z / s_cap) * (z / s_cap))
        store_grad_tile(s_row, offs, grad, r, valid, V, stride_s, HAS_LABELS)


@triton.jit
def _fix_slots(s_row, safe, used, s_k, g_k, lse_s, y_local, valid, r, ce_weight, kd_weight,
               temperature, s_cap, HAS_LABELS: tl.constexpr, HAS_S_CAP: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """4. The sparse fix-up, after a barrier (pass 3's stores first): the full G at each used id,
    from the gathered s (duplicate slots write the same value)."""
    tl.debug_barrier()
    grad_k = tl.zeros([BLOCK_K], dtype=tl.float32)
    if HAS_LABELS:
        grad_k = ce_weight * (tl.exp(s_k - lse_s) - tl.where(safe == y_local, 1.0, 0.0))
    grad_k += kd_weight * temperature * g_k
    if HAS_S_CAP:
        grad_k = grad_k * (1.0 - (s_k / s_cap) * (s_k / s_cap))
    grad_k = grad_k * r
    if HAS_LABELS:
        grad_k = tl.where(valid, grad_k, 0.0)
    tl.store(s_row + safe, grad_k.to(s_row.dtype.element_ty), mask=used)


@triton.jit
def sparse_rows_kernel(
    # pointers
    s_ptr,  # (n, V) student logits z, rows stride_s >= V apart; overwritten by dloss/dz if
    #         COMPUTE_GRAD (0 in the pad columns [V, stride_s)), else scratch
    ids_ptr,  # (n, k) int32/int64 teacher ids, -1 for an unused slot
    lp_ptr,  # (n, k) teacher log-probabilities at T, any float dtype
    y_ptr,  # (n,) int64 labels (unused without HAS_LABELS)
    scale_ptr,  # (n,) fp32 gradient scale r per row
    out_ptr,  # (n, OUTPUTS) fp32 out: loss = w_ce CE + w_kd T^2 D, CE, D, H(q) per row
    # sizes
    V,
    K_SLOTS,
    # strides (elements, rows); stride_s is the padded row width, also the load/store bound
    stride_s,
    stride_ids,
    stride_lp,
    # scalars
    ignore_index,
    temperature,
    ce_weight,
    kd_weight,
    mix,  # beta for jsd, alpha for the skew KLs
    s_cap,
    s_scale,  # the student's logit scale sigma
    # meta
    TAIL: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_S_CAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= k + 1 (the rest bucket's slot)
    BLOCK_M: tl.constexpr,
):
    """The whole row in one program: the slots, pass 1, the divergence, the gradient."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    ids_row = ids_ptr + row * stride_ids
    lp_row = lp_ptr + row * stride_lp
    inv_t = 1.0 / temperature

    ids, used, safe, log_p, s_k, a_k = _load_slots(ids_row, lp_row, s_row, K_SLOTS, inv_t,
                                                   s_scale, s_cap, HAS_S_CAP, BLOCK_K)
    valid, y_local, s_y = load_label(y_ptr, row, s_row, 0, V, ignore_index, s_scale, s_cap,
                                     HAS_LABELS, HAS_S_CAP, False)  # before the bucket marks
    if TAIL == BUCKET:
        _mark_slots(s_row, safe, used, BLOCK_K)
    lse_s, lse_a, lse_out, ent = _lse_pass(s_row, s_k, a_k, stride_s, V, inv_t, s_scale, s_cap,
                                           TAIL, HAS_S_CAP, BLOCK_V)
    ce = lse_s - s_y if HAS_LABELS else 0.0

    dense_coef = 0.0  # KD gradient outside S: dense_coef exp(a_v - lse_dense)
    lse_dense = lse_a
    if TAIL == IGNORE:
        kd, g_k, dense_coef = _ignore_slots(ids, used, log_p, a_k, lse_a, ids_row, lp_row,
                                            K_SLOTS, BLOCK_K, BLOCK_M)
    elif TAIL == RENORMALIZE:
        kd, g_k = _renormalize_slots(used, log_p, a_k, mix, DIVERGENCE)
    else:
        kd, g_k, dense_coef, lse_dense = _bucket_slots(used, log_p, a_k, lse_a, lse_out, K_SLOTS,
                                                       mix, DIVERGENCE, BLOCK_K)
    store_row(out_ptr + row * OUTPUTS, ce, kd, ent, valid, ce_weight, kd_weight, temperature,
              HAS_LABELS)

    if COMPUTE_GRAD:
        r = tl.load(scale_ptr + row) * s_scale  # 3. the logit scale's factor, once per row
        _dense_grad_pass(s_row, stride_s, V, inv_t, lse_s, lse_dense, dense_coef, y_local, valid,
                         r, ce_weight, kd_weight, temperature, s_scale, s_cap, TAIL, HAS_LABELS,
                         HAS_S_CAP, BLOCK_V)
        _fix_slots(s_row, safe, used, s_k, g_k, lse_s, y_local, valid, r, ce_weight, kd_weight,
                   temperature, s_cap, HAS_LABELS, HAS_S_CAP, BLOCK_K)


def sparse_rows(
    student_logits,
    ids,
    logprobs,
    labels,
    row_scale,
    out,
    opts,
    tail: str,
    compute_grad: bool,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> None:
    """Launch one program per row; writes out (n, OUTPUTS) (loss, ce, kd, entropy per row) and, if
    compute_grad, the gradient over student_logits (else the buffer is scratch). Shapes as in the
    kernel's pointer comments; rows of every tensor have unit inner stride. `opts` is a
    fastkd.DistillOptions and `tail` one of TAIL_IDS (read, not checked: the caller checks)."""
    n, vocab = student_logits.shape
    k = ids.shape[1]
    if n == 0:
        return
    block_k = triton.next_power_of_2(k + 1)
    sparse_rows_kernel[(n,)](
        student_logits, ids, logprobs, labels if labels is not None else row_scale, row_scale,
        out, vocab, k, student_logits.stride(0), ids.stride(0), logprobs.stride(0),
        **option_scalars(opts, sparse_rows_kernel), TAIL=TAIL_IDS[tail],
        COMPUTE_GRAD=compute_grad,
        BLOCK_K=block_k, BLOCK_M=min(BLOCK_M_DEFAULT, block_k),
        **launch_meta(opts, labels is not None, vocab, block_v, num_warps),
    )
