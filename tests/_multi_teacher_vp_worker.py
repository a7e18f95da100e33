"""Ranks of the vocab-parallel routing test: `python _multi_teacher_vp_worker.py WORLD`.

Each rank builds the same student and two teachers from one seed (one with a padded, wider
vocabulary and its own rows for its tokens only), keeps its rows of every head, runs the routed
multi-teacher loss over the process group, and checks the loss, its components, each teacher's kd
and every gradient against the single-process routed loss over the full heads (same backend) and
the float64 spec. Then bad input on one rank raises the same error on every rank at once. A failed
check raises, which fails that rank and the script.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _vocab_parallel_worker import expect_same_error, max_err

import fastkd
from fastkd import DistillOptions, reference_multi

D_S = 16
VOCAB = 37


def problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    lead = (3, 7)
    index = torch.randint(0, 2, lead, generator=g)
    index[0, :2] = torch.tensor([0, 1])
    labels = torch.randint(0, VOCAB, lead, generator=g)
    labels[:, ::4] = -100
    labels[1, :2] = torch.tensor([0, VOCAB - 1])  # a label in each rank's shard
    n_b = int((index == 1).sum())
    return dict(
        h_s=torch.randn(*lead, D_S, generator=g), w_s=torch.randn(VOCAB, D_S, generator=g) * 0.5,
        b_s=torch.randn(VOCAB, generator=g), labels=labels, index=index,
        a=fastkd.TeacherHead(torch.randn(*lead, 20, generator=g),
                             torch.randn(VOCAB, 20, generator=g) * 0.5,
                             torch.randn(VOCAB, generator=g), softcap=3.0),
        b=fastkd.TeacherHead(torch.randn(n_b, 12, generator=g),  # compact: its tokens only
                             torch.randn(VOCAB + 8, 12, generator=g) * 0.5, logit_scale=1.4),
        upstream=torch.randn(*lead, generator=g))


def shard(teacher, v0: int, rows: int, last: bool):
    """This rank's rows of a head: [v0, v0 + rows), the last rank every row from v0 on."""
    end = None if last else v0 + rows
    return dataclasses.replace(teacher, weight=teacher.weight[v0:end],
                               bias=None if teacher.bias is None else teacher.bias[v0:end])


def check_case(rank, world, group, backend, divergence, reduction, seed):
    p = problem(seed)
    per_rank = -(-VOCAB // world)
    v0, last = per_rank * rank, rank == world - 1
    rows = VOCAB - v0 if last else per_rank
    kw = dict(temperature=2.0, divergence=divergence, reduction=reduction, beta=0.3,
              return_components=True, backend=backend, chunk_size=5, teacher_index=p["index"])

    def leaves(w, b):
        return (p["h_s"].clone().requires_grad_(), w.clone().requires_grad_(),
                b.clone().requires_grad_())

    def backward(out):
        loss = out.loss * p["upstream"] if reduction == "none" else out.loss
        loss.sum().backward()

    hs, w, b = leaves(p["w_s"][v0:v0 + rows], p["b_s"][v0:v0 + rows])
    teachers = [shard(p["a"], v0, rows, last), shard(p["b"], v0, rows, last)]
    out = fastkd.fused_multi_teacher_loss(hs, w, teachers, p["labels"], student_bias=b,
                                          process_group=group, vocab_start=v0, **kw)
    backward(out)
    hs1, w1, b1 = leaves(p["w_s"], p["b_s"])
    one = fastkd.fused_multi_teacher_loss(hs1, w1, [p["a"], p["b"]], p["labels"],
                                          student_bias=b1, **kw)
    backward(one)
    hs64, w64, b64 = (x.double().requires_grad_() for x in (p["h_s"], p["w_s"], p["b_s"]))
    doubled = [dataclasses.replace(t, hidden=t.hidden.double(), weight=t.weight.double(),
                                   bias=None if t.bias is None else t.bias.double())
               for t in (p["a"], p["b"])]
    opts = DistillOptions(temperature=2.0, divergence=divergence, reduction=reduction, beta=0.3)
    spec = reference_multi.routed_distill_loss(hs64, w64, doubled, p["index"], p["labels"], opts,
                                               b64)
    backward(spec)
    pairs = [("loss", out.loss, one.loss, spec.loss), ("ce", out.ce, one.ce, spec.ce),
             ("kd", out.kd, one.kd, spec.kd), ("entropy", out.entropy, one.entropy, spec.entropy),
             ("teacher_kd", out.teacher_kd, one.teacher_kd, spec.teacher_kd),
             ("dh", hs.grad, hs1.grad, hs64.grad),
             ("dW", w.grad, w1.grad[v0:v0 + rows], w64.grad[v0:v0 + rows]),
             ("db", b.grad, b1.grad[v0:v0 + rows], b64.grad[v0:v0 + rows])]
    for name, x, want_one, want_spec in pairs:
        assert torch.isfinite(x).all(), (rank, name)
        e1, e2 = max_err(x, want_one), max_err(x, want_spec)
        assert e1 <= 2e-5 and e2 <= 2e-5, (rank, backend, divergence, reduction, name, e1, e2)
    assert torch.equal(out.teacher_tokens, spec.teacher_tokens)


def bad_input(rank, world, group):
    """One rank's bad input, or ranks that route differently: the same error everywhere."""
    p = problem(5)
    per_rank = -(-VOCAB // world)
    v0, last = per_rank * rank, rank == world - 1
    rows = VOCAB - v0 if last else per_rank
    teachers = [shard(p["a"], v0, rows, last), shard(p["b"], v0, rows, last)]

    def loss(teachers=teachers, index=p["index"]):
        out = fastkd.fused_multi_teacher_loss(
            p["h_s"].clone().requires_grad_(), p["w_s"][v0:v0 + rows], teachers, p["labels"],
            teacher_index=index, process_group=group, vocab_start=v0, temperature=2.0)
        out.backward()

    moved = p["index"].clone()
    moved[0, :2] = moved[0, :2].flip(0)  # two tokens swap teachers: the same tokens per teacher
    expect_same_error(group, lambda: loss(index=moved if last else p["index"]), ValueError,
                      "every rank must route the same tokens to the same teachers")
    narrow = dataclasses.replace(teachers[0], hidden=p["a"].hidden[..., :5])
    expect_same_error(group, lambda: loss(teachers=[narrow, teachers[1]] if last else teachers),
                      ValueError, f"rank {world - 1} rejected its inputs: teachers[0]: "
                      "teacher_hidden last dim 5")
    expect_same_error(group, lambda: loss(index=p["index"][:, :2] if last else p["index"]),
                      ValueError, "teacher_index must have the hidden states' leading shape")
    loss()  # the group is still in step


def main(rank, world, store):
    from _interpreter import speed_up

    speed_up()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        cases = [("torch", "forward_kl", "mean"), ("triton", "jsd", "none"),
                 ("torch", "reverse_kl", "sum"), ("triton", "forward_kl", "mean")]
        for seed, (backend, divergence, reduction) in enumerate(cases):
            check_case(rank, world, group, backend, divergence, reduction, seed)
        bad_input(rank, world, group)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1])
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(world, os.path.join(tmp, "store")), nprocs=world, join=True)
    print("ok", world)
