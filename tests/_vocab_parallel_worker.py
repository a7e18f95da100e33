"""Ranks of the vocab-parallel tests: `python _vocab_parallel_worker.py WORLD SUITE`, SUITE
"matrix", "probe" or both ("matrix+probe", in one process group).

Each rank builds the same full heads from one seed, keeps its slice of both, runs the
vocab-parallel loss, and checks the loss and every gradient against the single-process fused loss
over the full heads (same backend and dtype) and against the float64 spec. A failed check raises,
which fails that rank, which makes torch.multiprocessing.spawn (and so the script) fail.
"""

from __future__ import annotations

import datetime
import itertools
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd import reference
from fastkd.loss import fused_distill_loss
from fastkd.options import DIVERGENCES, DistillOptions

D_S, D_T = 24, 20


def make_inputs(n, vocab, t_vocab, bias, seed):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, D_S, generator=g)
    w_s = torch.randn(vocab, D_S, generator=g) * 0.5
    h_t = torch.randn(n, D_T, generator=g)
    w_t = torch.randn(t_vocab, D_T, generator=g) * 0.5
    b_s = torch.randn(vocab, generator=g) if bias else None
    b_t = torch.randn(t_vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    upstream = torch.randn(n, generator=g)
    return h_s, w_s, h_t, w_t, b_s, b_t, labels, upstream


def max_err(x, want):
    return ((x.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)
            ).item()


def run_case(rank, world, group, case):
    vocab, t_vocab, parts = case["vocab"], case["t_vocab"], case["parts"]
    dtype, backend, reduction = case["dtype"], case["backend"], case["reduction"]
    n = case.get("n", 13)
    h_s, w_s, h_t, w_t, b_s, b_t, labels, upstream = make_inputs(n, vocab, t_vocab, case["bias"],
                                                                 case["seed"])
    v0 = sum(parts[:rank])
    rows = parts[rank] if rank < world - 1 else vocab - v0
    t_rows = parts[rank] if rank < world - 1 else t_vocab - v0
    labels[:world] = torch.tensor([sum(parts[:r]) for r in range(world)])  # a label in each shard
    kw = dict(temperature=case["T"], divergence=case["divergence"], beta=0.3, skew=0.2,
              reduction=reduction, student_softcap=case["cap"], teacher_softcap=case["cap"],
              student_logit_scale=case["scales"][0], teacher_logit_scale=case["scales"][1],
              return_components=True, backend=backend, chunk_size=case.get("chunk"))

    def leaves(ws, bs):
        hs = h_s.to(dtype, copy=True).requires_grad_()
        w = ws.to(dtype, copy=True).requires_grad_()
        b = None if bs is None else bs.to(dtype, copy=True).requires_grad_()
        return hs, w, b

    def backward(loss):
        (loss * upstream.to(loss.dtype) if reduction == "none" else loss).sum().backward()

    # vocab-parallel: this rank's rows only
    hs, w, b = leaves(w_s[v0:v0 + rows], None if b_s is None else b_s[v0:v0 + rows])
    wt = w_t[v0:v0 + t_rows].to(dtype)
    bt = None if b_t is None else b_t[v0:v0 + t_rows].to(dtype)
    out = fused_distill_loss(hs, w, h_t.to(dtype), wt, labels, student_bias=b, teacher_bias=bt,
                             process_group=group, vocab_start=v0, **kw)
    backward(out[0])
    # one process, full heads, same backend and dtype
    hs1, w1, b1 = leaves(w_s, b_s)
    one = fused_distill_loss(hs1, w1, h_t.to(dtype), w_t.to(dtype), labels, student_bias=b1,
                             teacher_bias=None if b_t is None else b_t.to(dtype), **kw)
    backward(one[0])
    # the float64 spec, on the same (dtype-rounded) inputs
    def f64(x):
        return None if x is None else x.to(dtype).double()

    hs64, w64 = f64(h_s).requires_grad_(), f64(w_s).requires_grad_()
    b64 = None if b_s is None else f64(b_s).requires_grad_()
    opts = DistillOptions(**{k: kw[k] for k in ("temperature", "divergence", "beta", "skew",
                                                 "reduction", "student_softcap",
                                                 "teacher_softcap", "student_logit_scale",
                                                 "teacher_logit_scale")})
    spec = reference.distill_loss(hs64, w64, f64(h_t), f64(w_t), labels, opts, b64, f64(b_t))
    backward(spec[0])

    tol_one = 2e-5 if dtype == torch.float32 else 1.5e-2
    tol_spec = 2e-5 if dtype == torch.float32 else 2e-2
    if dtype == torch.bfloat16 and case["divergence"] == "tvd":
        # sign(q - p) flips where bf16 logits and the fp64 spec's disagree on q ~ p: the gradient
        # moves by O(1/N) there (measured 3.9e-2 of its max); one process agrees to 4e-3
        tol_spec = 5e-2
    pairs = [("loss", out[0], one[0], spec[0]), ("ce", out[1], one[1], spec[1]),
             ("kd", out[2], one[2], spec[2]), ("entropy", out.entropy, one.entropy, spec.entropy),
             ("dh", hs.grad, hs1.grad, hs64.grad),
             ("dW", w.grad, w1.grad[v0:v0 + rows], w64.grad[v0:v0 + rows])]
    if b is not None:
        pairs.append(("db", b.grad, b1.grad[v0:v0 + rows], b64.grad[v0:v0 + rows]))
    for name, x, want_one, want_spec in pairs:
        assert torch.isfinite(x).all(), (case, name)
        e1, e2 = max_err(x, want_one), max_err(x, want_spec)
        assert e1 <= tol_one and e2 <= tol_spec, (rank, case, name, e1, e2)
        if os.environ.get("FASTKD_VP_REPORT") and rank == 0:  # the errors, for notes
            print(f"{case['divergence']} {case['backend']} {case['dtype']} {name} "
                  f"vs-one {e1:.1e} vs-spec {e2:.1e}", flush=True)
    return hs.grad


def suite(name: str, world: int) -> list[dict]:
    cases = []
    if name == "matrix":
        # every divergence x backend; dtypes, reductions, T, softcap and bias rotate; the padded
        # vocabularies both ways (teacher smaller: the shared ids end inside the last shard)
        layouts = {2: [(37, 33, [20]), (37, 45, [11])],
                   3: [(41, 30, [10, 15]), (41, 25, [12, 13])]}[world]  # (3: empty teacher shard)
        pairs = list(itertools.product(DIVERGENCES, ("torch", "triton")))
        if world == 3:  # each divergence once, the backends alternating (the suite's time)
            pairs = [(div, ("torch", "triton")[i % 2]) for i, div in enumerate(DIVERGENCES)]
        for i, (div, backend) in enumerate(pairs):
            # each option cycles on its own period, so every value meets both backends
            dtype = (torch.float32, torch.bfloat16)[i % 2]
            reduction = ("mean", "none", "sum")[i % 3]
            temp = (1.0, 2.0, 0.5)[(i // 3) % 3]
            cap = (None, 3.0)[(i // 2) % 2]
            scales = ((1.0, 1.0), (0.7, 1.6), (1.3, 0.6))[(i // 2) % 3]  # logit scales (s, t)
            bias = (False, True)[(i // 4) % 2]
            vocab, t_vocab, parts = layouts[i % 2]
            cases.append(dict(vocab=vocab, t_vocab=t_vocab, parts=parts, divergence=div,
                              backend=backend, dtype=dtype, reduction=reduction, T=temp, cap=cap,
                              scales=scales, bias=bias, seed=i,
                              chunk=5 if i % 3 == 0 else None))
    return cases


def memory_probe(rank, world, group):
    """No tensor of the full vocabulary's width (or N x V elements) is created on any rank."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, n = 1000, 16
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.append(tuple(t.shape))
            return out

    h_s, w_s, h_t, w_t, _, _, labels, _ = make_inputs(n, vocab, vocab, False, 7)
    rows = vocab // world
    v0 = rank * rows
    rows = rows if rank < world - 1 else vocab - v0
    w = w_s[v0:v0 + rows].clone().requires_grad_()
    hs = h_s.clone().requires_grad_()
    with Shapes():
        loss = fused_distill_loss(hs, w, h_t, w_t[v0:v0 + rows].clone(), labels,
                                  divergence="jsd", process_group=group, vocab_start=v0)
        loss.backward()
    assert seen and all(vocab not in s for s in seen), [s for s in seen if vocab in s]
    assert max(torch.Size(s).numel() for s in seen) < n * vocab


def dtensor_head(rank, world, group):
    """The README's example: ColwiseParallel on the student's lm_head (torch.distributed.tensor
    .parallel) gives each rank a Shard(0) DTensor of vocabulary rows; its local shard goes in."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    vocab, n = 37, 11  # 37 rows over 2 ranks: torch.chunk's layout, 19 + 18
    h_s, w_s, h_t, w_t, _, _, labels, _ = make_inputs(n, vocab, vocab, False, 3)
    mesh = init_device_mesh("cpu", (world,))
    head = torch.nn.Linear(D_S, vocab, bias=False)
    head.weight.data.copy_(w_s)
    parallelize_module(head, mesh, ColwiseParallel())
    w = head.weight.to_local()
    v0 = -(-vocab // world) * rank
    w_t_local = w_t[v0:v0 + w.shape[0]]
    hs = h_s.clone().requires_grad_()
    loss = fused_distill_loss(hs, w, h_t, w_t_local, labels, process_group=mesh.get_group(),
                       vocab_start=v0, temperature=2.0)
    loss.backward()
    hs1, w1 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    want = fused_distill_loss(hs1, w1, h_t, w_t, labels, temperature=2.0)
    want.backward()
    assert max_err(loss, want) < 1e-5 and max_err(hs.grad, hs1.grad) < 1e-5
    assert max_err(head.weight.grad.full_tensor(), w1.grad) < 1e-5


def bad_tiling(rank, world, group):
    """A gap between shards: the same ValueError on every rank, no hang."""
    w = torch.randn(10, D_S)
    try:
        fused_distill_loss(torch.randn(4, D_S), w, torch.randn(4, D_T), torch.randn(10, D_T),
                           torch.zeros(4, dtype=torch.long), process_group=group,
                           vocab_start=rank * 11)
    except ValueError as e:
        assert "tile the vocabulary" in str(e), e
    else:
        raise AssertionError("a gap between the shards was accepted")


def expect_same_error(group, call, kind, match):
    """`call` raises `kind` (matching `match`) on every rank, the same message everywhere, within
    seconds; a rank left waiting in a collective would instead hit the group's 60 s timeout."""
    start = time.monotonic()
    try:
        call()
    except Exception as e:  # noqa: BLE001 -- checked below
        error = e
    else:
        error = None
    elapsed = time.monotonic() - start
    rank = dist.get_rank(group)
    assert isinstance(error, kind) and match in str(error), (rank, match, repr(error))
    assert elapsed < 10, (rank, match, elapsed)
    seen = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, (type(error).__name__, str(error)), group=group)
    assert len(set(seen)) == 1, seen


def disagreements(rank, world, group):
    """Bad input on one rank, or ranks that disagree: the same error on every rank, at once (gloo
    would otherwise wait out its timeout, or abort on collectives of different sizes)."""
    vocab, n = 40, 12
    h_s, w_s, h_t, w_t, _, _, labels, _ = make_inputs(n, vocab, vocab, False, 11)
    rows = vocab // world
    v0 = rank * rows
    rows = rows if rank < world - 1 else vocab - v0
    last = rank == world - 1

    def loss(**changes):
        kw = dict(student_hidden=h_s.clone().requires_grad_(), student_weight=w_s[v0:v0 + rows],
                  teacher_hidden=h_t, teacher_weight=w_t[v0:v0 + rows], labels=labels,
                  process_group=group, vocab_start=v0, divergence="jsd", temperature=2.0)
        kw.update(changes if last else {})
        out = fused_distill_loss(**kw)
        out.backward()
        return out

    expect_same_error(group, lambda: loss(vocab_start=-1), ValueError,
                      f"rank {world - 1} rejected its inputs: vocab_start must be a non-negative "
                      "int, got -1")
    expect_same_error(group, lambda: loss(vocab_start=None), ValueError, "got None")
    expect_same_error(group, lambda: loss(student_hidden=h_s.long()), TypeError,
                      "student_hidden must be a floating tensor")
    expect_same_error(group, lambda: loss(temperature=0.0), ValueError,
                      "temperature must be > 0")  # an option rejected by DistillOptions
    fewer = labels.clone()
    fewer[torch.nonzero(fewer != -100)[0]] = -100  # one counted token less
    expect_same_error(group, lambda: loss(labels=fewer), ValueError,
                      "the ranks disagree on counted tokens")
    expect_same_error(group, lambda: loss(divergence="forward_kl"), ValueError,
                      "the ranks disagree on divergence: ")
    expect_same_error(group, lambda: loss(temperature=3.0), ValueError,
                      f"the ranks disagree on temperature: {[2.0] * (world - 1) + [3.0]} by rank")
    wrong = labels.clone()
    wrong[0] = vocab
    expect_same_error(group, lambda: loss(labels=wrong), ValueError,
                      f"labels must lie in [0, {vocab})")
    # the group is still in step: a good call gives the single-process loss
    hs1 = h_s.clone().requires_grad_()
    want = fused_distill_loss(hs1, w_s, h_t, w_t, labels, divergence="jsd", temperature=2.0)
    assert max_err(loss(), want) < 1e-5


def main(rank, world, name, store):
    from _interpreter import speed_up

    speed_up()
    # a rank left waiting fails in a minute (gloo's default is 30)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        if "matrix" in name.split("+"):
            for case in suite("matrix", world):
                run_case(rank, world, group, case)
        if "probe" in name.split("+"):
            memory_probe(rank, world, group)
            dtensor_head(rank, world, group)
            bad_tiling(rank, world, group)
            disagreements(rank, world, group)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    world, name = int(sys.argv[1]), sys.argv[2]
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(world, name, os.path.join(tmp, "store")), nprocs=world, join=True)
    print("ok", world, name)
