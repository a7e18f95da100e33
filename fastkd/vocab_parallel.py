"""The vocab-parallel row op: each rank holds a slice of both LM heads' vocabulary rows.

Rank r holds student ids [v0, v0 + V_r) and teacher ids [v0, v0 + V_t,r); over the ranks, in rank
order, each model's rows tile its vocabulary. Every rank has the same tokens (hidden states and
global labels). Per chunk, each rank forms its own logit columns only, and the row op splits the
kernel's passes around all-reduces of a few floats per token (never logits):

    1. local statistics per row: L_s, L_a, L_b (log-sum-exps over this shard), e (the KL
       divergences' expectation, normalised by this shard's mass) and s_y (the label's softcapped
       logit if this shard owns the label, else 0)
    2. all-reduce MAX of (L_s, L_a, L_b), then SUM of (exp(L - M) for each, exp(L_e - M_e) e, s_y):
       global L = M + log(sum), e = sum(w e) / sum(w)
    3. (jsd, skew KLs, tvd) local partial sums (D, S = sum q g) given the global L; all-reduce SUM
    4. the gradient of this shard's logit columns given the global per-row parameters

Per token: loss = w_ce (L_s - s_y) + w_kd T^2 D, the same on every rank. The caller all-reduces
dL/dh_s once per call (each rank's G W_r is a partial sum). Backends: the Triton kernels'
entry points (`distill_stats`, `distill_partials`, `distill_grad`), or the same passes in torch
built from the spec's elementwise terms (`reference.divergence_terms`, `reference.divergence_qg`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastkd import reference
from fastkd.options import DistillOptions

THREE_PASS = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's head rows sit: the process group, the first id, and the full vocabulary
    sizes (checked by `check_tiling`)."""

    group: dist.ProcessGroup
    vocab_start: int
    vocab: int  # V, the student's full vocabulary
    teacher_vocab: int  # V_t


def check_tiling(group, vocab_start: int, n_tokens: int, student_rows: int, teacher_rows: int,
                 device: torch.device) -> VocabShard:
    """One all-gather of (vocab_start, rows, tokens) per call; a ValueError on every rank (they all
    see the same table) when the shards do not tile both vocabularies in rank order."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    world = dist.get_world_size(group)
    # gloo gathers CPU tensors only; NCCL needs them on the current CUDA device
    gather_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([vocab_start, student_rows, teacher_rows, n_tokens], dtype=torch.int64,
                        device=gather_device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    tokens = {r[3] for r in rows}
    if len(tokens) > 1:
        raise ValueError(f"every rank must pass the same tokens; token counts by rank: "
                         f"{[r[3] for r in rows]}")
    expected = 0
    for rank, (v0, s_rows, t_rows, _) in enumerate(rows):
        last = rank == world - 1
        if v0 != expected or (not last and s_rows != t_rows):
            raise ValueError(
                "the ranks' head shards must tile the vocabulary in rank order: rank r holds "
                "student rows [v0, v0 + student_weight.shape[0]) and teacher rows [v0, v0 + "
                "teacher_weight.shape[0]), each starting where rank r-1's end (only the last "
                "rank's two shards may differ in size); got (vocab_start, student rows, teacher "
                f"rows) by rank: {[tuple(r[:3]) for r in rows]}"
            )
        expected = v0 + s_rows
    v0, s_rows, t_rows, _ = rows[-1]
    return VocabShard(group, vocab_start, v0 + s_rows, v0 + t_rows)


# ---- the passes in torch (CPU) ----------------------------------------------------------------

def _torch_logits(s, t, inv_t, opts):
    """fp32 (fp64 for fp64) softcapped s, and a = s[:, :K] / T, b = t / T over the shared ids."""
    acc = torch.promote_types(s.dtype, torch.float32)
    s = reference.softcap(s.to(acc), opts.student_softcap)
    b = reference.softcap(t.to(acc), opts.teacher_softcap) * inv_t
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
    stats.copy_(torch.stack([lse_s, lse_a, lse_b, e, s_y], 1))


def _torch_log_probs(s, t, params, opts):
    s, a, b = _torch_logits(s, t, 1.0 / opts.temperature, opts)
    return s, a, b, a - params[:, 1:2], b - params[:, 2:3]


def _torch_partials(s, t, params, out, opts):
    _, _, _, log_q, log_p = _torch_log_probs(s, t, params, opts)
    out[:, 0] = reference.divergence_terms(log_q, log_p, opts).sum(-1)
    out[:, 1] = reference.divergence_qg(log_q, log_p, opts).sum(-1)


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
    else:
        dkd = reference.divergence_qg(log_q, log_p, opts) - q * c
    grad[:, : dkd.shape[1]] += (opts.kd_weight * opts.temperature) * dkd
    if opts.student_softcap is not None:
        grad.mul_(1 - (s / opts.student_softcap) ** 2)
    grad.mul_(row_scale.to(s.dtype).unsqueeze(1))
    if labels is not None:
        grad.masked_fill_((labels == opts.ignore_index).unsqueeze(1), 0.0)
    s_buf.copy_(grad)


def _triton_passes():
    from fastkd.kernels import distill as k

    return k.distill_stats, k.distill_partials, k.distill_grad


PASSES = {"torch": lambda: (_torch_stats, _torch_partials, _torch_grad), "triton": _triton_passes}


# ---- the row op ---------------------------------------------------------------------------------

def _combine_lse(lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global log-sum-exps of per-rank ones (n, c): all-reduce MAX, then the caller's SUM of
    exp(lse - M). Returns (M, w = exp(lse - M)), with M = 0 where every rank has -inf."""
    m = lse.clone()
    dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m, (lse - m).exp()


def vocab_parallel_rows(s, t, labels, row_scale, loss_out, ce_out, kd_out, opts: DistillOptions,
                        compute_grad: bool, shard: VocabShard, backend: str) -> None:
    """The row op of `autograd._chunked` for one chunk of this rank's logit columns: the per-token
    (loss, ce, kd) of the whole vocabulary into the outputs (the same on every rank), and, if
    compute_grad, this shard's G = r dloss/ds written over s."""
    stats_pass, partials_pass, grad_pass = PASSES[backend]()
    n, group, acc = s.shape[0], shard.group, loss_out.dtype
    stats = torch.empty(n, 5, device=s.device, dtype=acc)  # fp32 (fp64 for fp64 inputs)
    stats_pass(s, t, labels, stats, shard.vocab_start, opts)
    lse = stats[:, :3]
    m, w = _combine_lse(lse, group)
    e_weight = w[:, 2] if opts.divergence == "forward_kl" else w[:, 1]
    sums = torch.cat([w, (e_weight * stats[:, 3]).unsqueeze(1), stats[:, 4:5]], 1)
    dist.all_reduce(sums, group=group)
    lse = m + sums[:, :3].log()
    e_mass = sums[:, 2] if opts.divergence == "forward_kl" else sums[:, 1]
    e = torch.where(e_mass > 0, sums[:, 3] / e_mass, 0.0)
    lse_s, lse_a, lse_b = lse.unbind(1)
    params = torch.stack([lse_s, lse_a, lse_b, e], 1)
    if opts.divergence == "forward_kl":
        kd = e - lse_b + lse_a
    elif opts.divergence == "reverse_kl":
        kd = e - lse_a + lse_b
    else:
        partials = torch.empty(n, 2, device=s.device, dtype=acc)
        partials_pass(s, t, params, partials, opts)
        dist.all_reduce(partials, group=group)
        kd, params[:, 3] = partials[:, 0], partials[:, 1]
    if labels is None:
        ce = torch.zeros_like(kd)
        loss = (opts.kd_weight * opts.temperature**2) * kd
    else:
        valid = labels != opts.ignore_index
        ce = torch.where(valid, lse_s - sums[:, 4], 0.0)
        kd = torch.where(valid, kd, 0.0)
        loss = opts.ce_weight * ce + (opts.kd_weight * opts.temperature**2) * kd
    loss_out.copy_(loss)
    ce_out.copy_(ce)
    kd_out.copy_(kd)
    if compute_grad:
        grad_pass(s, t, labels, row_scale, params, shard.vocab_start, opts)
