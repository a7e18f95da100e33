"""The vocab-parallel row op: each rank holds a slice of both LM heads' vocabulary rows.

Rank r holds student ids [v0, v0 + V_r) and teacher ids [v0, v0 + V_t,r); over the ranks, in rank
order, each model's rows tile its vocabulary. Every rank has the same tokens (hidden states and
global labels). Per chunk, each rank forms its own logit columns only, and the row op splits the
kernel's passes around all-reduces of a few floats per token (never logits):

    1. local statistics per row: L_s, L_a, L_b (log-sum-exps over this shard), e (the KL
       divergences' expectation, normalised by this shard's mass), s_y (the label's logit, scaled
       and softcapped, if this shard owns the label, else 0) and H_r (the entropy of q
       restricted to this shard and renormalised there)
    2. all-reduce MAX of (L_s, L_a, L_b), then SUM of (w = exp(L - M) for each, w_e e, s_y,
       w_a (H_r - log w_a)): global L = M + log(sum w), e = sum(w_e e) / sum(w_e), and the
       entropy H = sum_r pi_r (H_r - log pi_r), pi_r = w_a,r / sum w_a (the shards' shares of q)
    3. (jsd, skew KLs, tvd) local partial sums (D, S = sum q g) given the global L; all-reduce SUM
    4. the gradient of this shard's logit columns given the global per-row parameters

Per token: loss = w_ce (L_s - s_y) + w_kd T^2 D, the same on every rank. dL/dh_s is all-reduced
once per call (each rank's G W_r is a partial sum). Backends: the Triton kernels' entry points
(`dense_stats`, `dense_partials`, `dense_grad`), or the same passes in torch built from the
spec's elementwise terms (`reference.divergence_terms`, `reference.divergence_g`).

`VocabParallelTeacher` is the dense teacher form with this row op. Before the chunk loop, one
all-gather of a fixed-size row of numbers per rank (`agree`) carries what the ranks must agree on:
whether the rank's own checks passed, its shard, its token and counted-token counts, its label
range, its chunk size, its compute dtype and every field of its DistillOptions. Every rank reads
the same table, so a bad input anywhere raises the same error everywhere, at once, instead of
leaving the others in a collective until the process group's timeout (or gloo's abort on
collectives of different sizes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from fastkd import options, reference
from fastkd.backends import RowOp
from fastkd.checks import positive_int
from fastkd.dense import DenseTeacher
from fastkd.frontend import Call
from fastkd.options import DistillOptions


@dataclass(frozen=True)
class VocabParallelTeacher(DenseTeacher):
    """The dense teacher with both heads split by vocabulary rows over the ranks of `group`: this
    rank holds student rows [vocab_start, vocab_start + V_r) and teacher rows [vocab_start,
    vocab_start + V_t,r). Runs eagerly (its collectives stay outside any compiled graph)."""

    name = "vocab-parallel"
    native_rows = False  # its own row passes, around all-reduces
    reference_backend = False
    collective = True
    group: dist.ProcessGroup
    vocab_start: int

    def op_key(self) -> None:
        return None

    def check(self, teacher, h_s, vocab, opts):
        positive_int("vocab_start", self.vocab_start, or_zero=True)
        return super().check(teacher, h_s, vocab, opts)

    def row_op(self, backend):
        return functools.partial(vocab_parallel_rows, group=self.group,
                                 vocab_start=self.vocab_start, backend=backend)

    def student_grad(self, dh):
        dh_sum = dh.float() if dh.dtype in (torch.float16, torch.bfloat16) else dh.clone()
        dist.all_reduce(dh_sum, group=self.group)  # in fp32: half-precision partial sums round
        return dh_sum.to(dh.dtype)

    def agree(self, call: Call | Exception) -> Call:
        return agree(self.group, call)


# ---- the agreement: one all-gather before the chunk loop ---------------------------------------

# One float64 per entry (exact for the integers here); the options follow, one per field.
AGREED = ("checks passed", "vocab_start", "student rows", "teacher rows", "tokens",
          "counted tokens", "chunk", "lowest label", "highest label", "accumulator bits",
          "labels given", "gradients wanted")


def _row(call: Call | Exception) -> list[float]:
    if isinstance(call, Exception):
        return [0.0] * (len(AGREED) + len(options.NAMES))
    lo, hi = call.label_range or (float("inf"), float("-inf"))
    counted = -1 if call.n_counted is None else call.n_counted
    plan = call.plan
    return [1.0, plan.form.vocab_start, call.w_s.shape[0], call.teacher[1].shape[0],
            call.h_s.shape[0], counted, plan.chunk, lo, hi, 8 * plan.acc.itemsize,
            call.labels is not None, call.grads, *options.encode(plan.opts)]


def collective_device(group) -> torch.device:
    """Where the group's collectives take tensors: gloo gathers CPU tensors only; NCCL needs
    them on the current CUDA device."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group, call: Call | Exception) -> Call:
    """All-gather every rank's `_row`; raise the same error on every rank when a rank's checks
    failed or the ranks disagree; else the call with what the ranks settle on: the smallest
    chunk (every rank must run as many chunks, each a round of collectives), the labels' range
    over all ranks and the whole vocabulary to check it against."""
    world = dist.get_world_size(group)
    mine = torch.tensor(_row(call), dtype=torch.float64, device=collective_device(group))
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    failed = [r for r, row in enumerate(rows) if row[0] != 1.0]
    if failed:  # every rank knows: fetch the first failure's message, raise it everywhere
        error = call if isinstance(call, Exception) else None
        reports = [None] * world
        dist.all_gather_object(reports, None if error is None else
                               (type(error).__name__, str(error)), group=group)
        kind, text = reports[failed[0]]
        raise {"TypeError": TypeError}.get(kind, ValueError)(
            f"vocab-parallel loss: rank {failed[0]} rejected its inputs: {text}") from error
    column = dict(zip(AGREED + options.NAMES, zip(*rows, strict=True), strict=True))

    def by_rank(name):
        if name in options.NAMES:
            return [options.decode(name, v) for v in column[name]]
        return [int(v) if v.is_integer() else v for v in column[name]]

    for name in ("tokens", "counted tokens", "accumulator bits", "labels given",
                 "gradients wanted", *options.NAMES):
        if len(set(column[name])) > 1:
            raise ValueError(
                f"vocab-parallel loss: every rank must pass the same tokens, labels and options; "
                f"the ranks disagree on {name}: {by_rank(name)} by rank")
    expected = 0
    for rank, (v0, s_rows, t_rows) in enumerate(zip(column["vocab_start"], column["student rows"],
                                                    column["teacher rows"], strict=True)):
        if v0 != expected or (rank < world - 1 and s_rows != t_rows):
            raise ValueError(
                "the ranks' head shards must tile the vocabulary in rank order: rank r holds "
                "student rows [v0, v0 + student_weight.shape[0]) and teacher rows [v0, v0 + "
                "teacher_weight.shape[0]), each starting where rank r-1's end (only the last "
                "rank's two shards may differ in size); got (vocab_start, student rows, teacher "
                f"rows) by rank: {list(zip(*(by_rank(c) for c in AGREED[1:4]), strict=True))}"
            )
        expected = v0 + s_rows
    lo, hi = min(column["lowest label"]), max(column["highest label"])
    return replace(call, plan=replace(call.plan, chunk=int(min(column["chunk"]))),
                   vocab=int(expected), label_range=None if lo > hi else (int(lo), int(hi)))


# ---- the passes in torch (CPU) ----------------------------------------------------------------

def _torch_logits(s, t, inv_t, opts):
    """fp32 (fp64 for fp64) s as the loss sees it (`reference.head_logits`), and a = s[:, :K] / T,
    b = t / T over the shared ids."""
    acc = torch.promote_types(s.dtype, torch.float32)
    s = reference.head_logits(s.to(acc), opts.student_logit_scale, opts.student_softcap)
    b = reference.head_logits(t.to(acc), opts.teacher_logit_scale, opts.teacher_softcap) * inv_t
    return s, s[:, : b.shape[1]] * inv_t, b


def _label_column(labels, vocab_start, width, opts):
    """(valid, here, column): counted rows, rows whose label this shard owns, and its column."""
    valid = labels != opts.ignore_index
    col = labels - vocab_start
    here = valid & (col >= 0) & (col < width)
    return valid, here, torch.where(here, col, 0)


def _torch_stats(s, t, labels, stats, vocab_start, opts):
    s, a, b = _torch_logits(s, t, 1.0 / opts.temperature, opts)
    lse_s, lse_a, lse_b = (torch.logsumexp(x, -1) for x in (s, a, b))
    if opts.divergence == "forward_kl":
        p = (b - lse_b.unsqueeze(-1)).exp()
        e = torch.where(p > 0, p * (b - a), 0.0).sum(-1)
    elif opts.divergence == "reverse_kl":
        e = ((a - lse_a.unsqueeze(-1)).exp() * (a - b)).sum(-1)
    else:
        e = torch.zeros_like(lse_s)
    s_y = torch.zeros_like(lse_s)
    if labels is not None:
        _, here, col = _label_column(labels, vocab_start, s.shape[1], opts)
        s_y = torch.where(here, s.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)
    local_h = reference.entropy(a - lse_a.unsqueeze(-1))  # 0 on a shard without shared ids
    stats.copy_(torch.stack([lse_s, lse_a, lse_b, e, s_y, local_h], 1))


def _torch_log_probs(s, t, params, opts):
    s, a, b = _torch_logits(s, t, 1.0 / opts.temperature, opts)
    return s, a, b, a - params[:, 1:2], b - params[:, 2:3]


def _torch_partials(s, t, params, out, opts):
    _, _, _, log_q, log_p = _torch_log_probs(s, t, params, opts)
    out[:, 0] = reference.divergence_terms(log_q, log_p, opts).sum(-1)
    out[:, 1] = (log_q.exp() * reference.divergence_g(log_q, log_p, opts)).sum(-1)


def _torch_grad(s_buf, t, labels, row_scale, params, vocab_start, opts):
    s, a, b, log_q, log_p = _torch_log_probs(s_buf, t, params, opts)
    c = params[:, 3:4]
    grad = torch.zeros_like(s)
    if labels is not None:
        _, here, col = _label_column(labels, vocab_start, s.shape[1], opts)
        grad = opts.ce_weight * (s - params[:, 0:1]).exp()
        grad.scatter_add_(1, col.unsqueeze(1), -opts.ce_weight * here.to(s.dtype).unsqueeze(1))
    q = log_q.exp()
    if opts.divergence == "forward_kl":
        dkd = q - log_p.exp()
    elif opts.divergence == "reverse_kl":  # q (log q - log p - D) = q ((a - b) - E_q[a - b])
        dkd = q * ((a - b) - c)
    else:  # q (g - S), S = E_q[g] over the whole vocabulary
        dkd = q * (reference.divergence_g(log_q, log_p, opts) - c)
    grad[:, : dkd.shape[1]] += (opts.kd_weight * opts.temperature) * dkd
    if opts.student_softcap is not None:
        grad.mul_(1 - (s / opts.student_softcap) ** 2)
    grad.mul_((row_scale.to(s.dtype) * opts.student_logit_scale).unsqueeze(1))
    if labels is not None:
        grad.masked_fill_((labels == opts.ignore_index).unsqueeze(1), 0.0)
    s_buf.copy_(grad)


STATS_PASS = RowOp(torch=_torch_stats, triton="dense.dense_stats")
PARTIALS_PASS = RowOp(torch=_torch_partials, triton="dense.dense_partials")
GRAD_PASS = RowOp(torch=_torch_grad, triton="dense.dense_grad")
STATS = 6  # per row, local: L_s, L_a, L_b, e, s_y, H_r (kernels/dense.py's STATS)
PARTIALS = 2  # per row, local: D, S


# ---- the row op ---------------------------------------------------------------------------------

def _combine_lse(lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global log-sum-exps of per-rank ones (n, c): all-reduce MAX, then the caller's SUM of
    exp(lse - M). Returns (M, w = exp(lse - M)), with M = 0 where every rank has -inf."""
    m = lse.clone()
    dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m, (lse - m).exp()


def vocab_parallel_rows(s, t, labels, row_scale, out, opts: DistillOptions, compute_grad: bool,
                        group, vocab_start: int, backend: str) -> None:
    """The dense row op for one chunk of this rank's logit columns: the per-token (loss, ce, kd,
    entropy) of the whole vocabulary into out (the same on every rank), and, if compute_grad,
    this shard's G = r dloss/ds written over s."""
    n, acc = s.shape[0], out.dtype
    stats = torch.empty(n, STATS, device=s.device, dtype=acc)  # fp32 (fp64 for fp64 inputs)
    STATS_PASS.on(backend)(s, t, labels, stats, vocab_start, opts)
    lse = stats[:, :3]
    m, w = _combine_lse(lse, group)
    e_weight = w[:, 2] if opts.divergence == "forward_kl" else w[:, 1]
    # the entropy's share: w_a (H_r - log w_a), log w_a = L_a,r - M_a (0 where w_a = 0)
    h_term = torch.where(w[:, 1] > 0, w[:, 1] * (stats[:, 5] - (lse[:, 1] - m[:, 1])), 0.0)
    sums = torch.cat([w, (e_weight * stats[:, 3]).unsqueeze(1), stats[:, 4:5],
                      h_term.unsqueeze(1)], 1)
    dist.all_reduce(sums, group=group)
    lse = m + sums[:, :3].log()
    ent = sums[:, 5] / sums[:, 1] + sums[:, 1].log()  # q's mass is on some rank: sum w_a >= 1
    e_mass = sums[:, 2] if opts.divergence == "forward_kl" else sums[:, 1]
    e = torch.where(e_mass > 0, sums[:, 3] / e_mass, 0.0)
    lse_s, lse_a, lse_b = lse.unbind(1)
    params = torch.stack([lse_s, lse_a, lse_b, e], 1)
    if opts.divergence == "forward_kl":
        kd = e - lse_b + lse_a
    elif opts.divergence == "reverse_kl":
        kd = e - lse_a + lse_b
    else:
        partials = torch.empty(n, PARTIALS, device=s.device, dtype=acc)
        PARTIALS_PASS.on(backend)(s, t, params, partials, opts)
        dist.all_reduce(partials, group=group)
        kd, params[:, 3] = partials[:, 0], partials[:, 1]
    if labels is None:
        ce = torch.zeros_like(kd)
        loss = (opts.kd_weight * opts.temperature**2) * kd
    else:
        valid = labels != opts.ignore_index
        ce = torch.where(valid, lse_s - sums[:, 4], 0.0)
        kd, ent = torch.where(valid, kd, 0.0), torch.where(valid, ent, 0.0)
        loss = opts.ce_weight * ce + (opts.kd_weight * opts.temperature**2) * kd
    out.copy_(torch.stack([loss, ce, kd, ent], 1))
    if compute_grad:
        GRAD_PASS.on(backend)(s, t, labels, row_scale, params, vocab_start, opts)
