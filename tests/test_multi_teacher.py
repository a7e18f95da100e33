"""The multi-teacher loss (`fastkd.fused_multi_teacher_loss`): routing (each token one teacher,
dense and sparse teachers in one call) and mixtures (every token K <= 4 dense teachers), on the
chunked torch path and the Triton kernels (under TRITON_INTERPRET=1 on CPU), against the float64
spec (`fastkd.reference_multi`), against the single-teacher loss (K = 1 bit for bit, each
teacher's tokens on their own), and every bad input."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from _device import DEVICE
from _spec_check import assert_close, check_against_spec
from test_loss_api import LargestTensor

import fastkd
from fastkd import DistillOptions, reference, reference_multi
from fastkd.options import DIVERGENCES
from fastkd.teachers import TeacherHead, TeacherLogprobs

BACKENDS = ["torch", "triton"]
STUDENT = ("student_hidden", "student_weight", "student_bias")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def student(lead, d_s=12, vocab=301, dtype=torch.float32, seed=0, ignore_every=5, bias=True):
    g = gen(seed)
    labels = torch.randint(0, vocab, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    out = dict(student_hidden=torch.randn(*lead, d_s, generator=g).to(dtype),
               student_weight=(torch.randn(vocab, d_s, generator=g) * 0.5).to(dtype),
               labels=labels)
    if bias:
        out["student_bias"] = torch.randn(vocab, generator=g).to(dtype)
    return {k: v.to(DEVICE) for k, v in out.items()}


def head(rows, d_t, vocab_t, seed, dtype=torch.float32, bias=True, **settings):
    """A dense teacher whose hidden states have leading shape `rows`."""
    g = gen(seed)
    h = torch.randn(*rows, d_t, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(vocab_t, d_t, generator=g) * 0.5).to(dtype).to(DEVICE)
    b = torch.randn(vocab_t, generator=g).to(dtype).to(DEVICE) if bias else None
    return TeacherHead(h, w, b, **settings)


def logprobs(rows, vocab, k, seed, temperature=2.0, dtype=torch.float32, tail="bucket"):
    """A sparse teacher: the top-k of random logits at T, an unused slot or two."""
    g = gen(seed)
    n = math.prod(rows)
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(t / temperature, -1).topk(k, -1)
    ids = ids.clone()
    ids[0, -2:] = -1
    return TeacherLogprobs(ids.reshape(*rows, k).to(DEVICE),
                           lp.reshape(*rows, k).to(dtype).to(DEVICE), tail=tail)


def as_double(teacher):
    if isinstance(teacher, TeacherHead):
        return dataclasses.replace(teacher, hidden=teacher.hidden.double(),
                                   weight=teacher.weight.double(),
                                   bias=None if teacher.bias is None else teacher.bias.double())
    return dataclasses.replace(teacher, logprobs=teacher.logprobs.double())


def run(inputs, backend, upstream=None, components=False, **kw):
    """The loss (with components=True: its `TeacherComponents`, detached) and the student's
    gradients; backend "spec" is the reference in float64."""
    args = {}
    for name, x in inputs.items():
        if name == "teachers":
            x = [as_double(t) for t in x] if backend == "spec" else x
        elif isinstance(x, torch.Tensor) and x.is_floating_point() and name in STUDENT:
            x = x.detach().double() if backend == "spec" else x.detach().clone()
            x.requires_grad_()
        args[name] = x
    parts = fastkd.fused_multi_teacher_loss(
        **args, backend="reference" if backend == "spec" else backend, return_components=True,
        **kw)
    loss = parts.loss
    out = loss if upstream is None else loss * upstream.to(loss.device, loss.dtype)
    out.sum().backward()
    grads = {k: args[k].grad for k in STUDENT if k in args}
    if components:
        return reference_multi.TeacherComponents(
            *(x.detach() for x in parts.columns()), parts.teacher_kd, parts.teacher_tokens), grads
    return loss.detach(), grads


def check(inputs, backend, dtype=torch.float32, upstream=None, **kw):
    """`check_against_spec` (loss, ce, kd, entropy, every gradient) and each teacher's kd and
    tokens; one run on each side."""
    runs = {}

    def once(inputs, side, upstream, components, **kw):
        runs[side] = run(inputs, side, upstream, components=True, **kw)
        return runs[side]

    loss, grads = check_against_spec(once, inputs, backend, dtype, upstream, **kw)
    (got, _), (want, _) = runs[backend], runs["spec"]
    assert_close(got.teacher_kd, want.teacher_kd, dtype, "teacher_kd",
                 torch.maximum(want.teacher_kd.abs().max(), want.loss.abs().max()))
    assert torch.equal(got.teacher_tokens.cpu(), want.teacher_tokens.cpu())
    return loss, grads, got


def routed_problem(lead=(3, 13), dtype=torch.float32, seed=0, compact=True, ignore_every=5):
    """Three teachers: dense with a wider, padded vocabulary and a softcap (every token's rows);
    sparse (its own tokens); dense with a narrower vocabulary, a logit scale and no bias (its own
    tokens, compact); every teacher has tokens, the index in a random order."""
    n, vocab = math.prod(lead), 301
    inputs = student(lead, dtype=dtype, seed=seed, ignore_every=ignore_every)
    index = torch.randint(0, 3, lead, generator=gen(seed + 1)).to(DEVICE)
    index.view(-1)[:3] = torch.tensor([0, 1, 2])
    counts = [int((index == k).sum()) for k in range(3)]
    rows = [(c,) if compact else lead for c in counts]
    teachers = [
        head(lead, 20, 311, seed + 2, dtype, softcap=4.0),
        logprobs(rows[1], vocab, 6, seed + 3, dtype=dtype),
        head(rows[2], 16, 290, seed + 4, dtype, bias=False, logit_scale=1.6),
    ]
    assert n == sum(counts)
    return dict(inputs, teachers=teachers, teacher_index=index)


# ---- one teacher: the single-teacher loss, bit for bit ---------------------------------------

def _equal(got, want):
    (a, ga), (b, gb) = got, want
    for x, y in zip(a.columns(), b.columns(), strict=True):
        assert torch.equal(x, y)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


def _single(inputs, teacher, backend, upstream=None, **kw):
    """The single-teacher loss on the same tensors (`fused_distill_loss`,
    `fused_sparse_distill_loss`): components and student gradients."""
    args = {k: v.detach().clone().requires_grad_() if k in STUDENT else v
            for k, v in inputs.items() if k not in ("teachers", "teacher_index", "teacher_weights")}
    if isinstance(teacher, TeacherHead):
        parts = fastkd.fused_distill_loss(
            **args, teacher_hidden=teacher.hidden, teacher_weight=teacher.weight,
            teacher_bias=teacher.bias, teacher_softcap=teacher.softcap,
            teacher_logit_scale=teacher.logit_scale, backend=backend, return_components=True,
            **kw)
    else:
        parts = fastkd.fused_sparse_distill_loss(
            **args, teacher_ids=teacher.ids, teacher_logprobs=teacher.logprobs, tail=teacher.tail,
            backend=backend, return_components=True, **kw)
    (parts.loss if upstream is None else parts.loss * upstream).sum().backward()
    return (fastkd.Components(*(x.detach() for x in parts.columns())),
            {k: args[k].grad for k in STUDENT if k in args})


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_teacher_is_the_single_teacher_loss_bit_for_bit(backend, kind):
    """K = 1 three ways, each equal to today's single-teacher loss bit for bit: the teacher
    alone; routed to it with teacher_index (the routed form, its own chunk loop); and a second
    teacher beside it that no token is routed to (its teacher_kd 0, over 0 tokens)."""
    lead = (3, 11)
    inputs = student(lead, seed=1)
    teacher = (head(lead, 20, 311, 2, softcap=4.0, logit_scale=0.8) if kind == "dense"
               else logprobs(lead, 301, 6, 3))
    kw = dict(temperature=2.0, divergence="jsd", beta=0.3, chunk_size=7)
    want = _single(inputs, teacher, backend, **kw)
    alone = run(dict(inputs, teachers=[teacher]), backend, components=True, **kw)
    _equal(alone, want)
    zeros = torch.zeros(lead, dtype=torch.long, device=DEVICE)
    routed = run(dict(inputs, teachers=[teacher], teacher_index=zeros), backend,
                 components=True, **kw)
    _equal(routed, want)
    idle = head((0,), 9, 301, 4)  # compact: no rows, since no token is routed to it
    two = run(dict(inputs, teachers=[teacher, idle], teacher_index=zeros), backend,
              components=True, **kw)
    _equal(two, want)
    counted = int((inputs["labels"] != -100).sum())
    for out in (alone[0], routed[0], two[0]):
        assert torch.equal(out.teacher_kd[0], want[0].kd)
    assert two[0].teacher_kd[1] == 0 and two[0].teacher_tokens.tolist() == [counted, 0]


# ---- routing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_is_each_teachers_tokens_on_their_own(backend, reduction):
    """Routing equals running each teacher's tokens through the single-teacher loss and adding
    them up: with reduction "sum" the losses and gradients add; "mean" divides by every counted
    token; "none" is each token's own; teacher_kd is each teacher's own kd over its tokens."""
    problem = routed_problem(lead=(41,), compact=False)
    index, labels = problem["teacher_index"], problem["labels"]
    kw = dict(temperature=2.0, divergence="forward_kl", chunk_size=9)
    upstream = (torch.randn(41, generator=gen(9)).to(DEVICE) if reduction == "none"
                else torch.tensor(-1.5, device=DEVICE))
    got, grads = run(problem, backend, upstream, components=True, reduction=reduction, **kw)
    counted = (labels != -100).sum()
    # the single losses with reduction "sum" (or "none"), weighted as the routed reduction does
    scale = upstream / counted if reduction == "mean" else upstream
    loss, total = 0.0, {k: torch.zeros_like(v) for k, v in grads.items()}
    for k, teacher in enumerate(problem["teachers"]):
        mine = torch.where(index == k, labels, -100)  # only teacher k's tokens count
        alone, g = _single(dict(problem, labels=mine), teacher, backend, scale,
                           reduction="none" if reduction == "none" else "sum", **kw)
        loss = loss + alone.loss.double()
        for name in g:
            total[name] += g[name]
        n_k = (mine != -100).sum()
        want_kd = alone.kd / n_k.clamp(min=1) if reduction == "mean" else alone.kd
        torch.testing.assert_close(got.teacher_kd[..., k], want_kd, rtol=1e-5, atol=1e-6)
        assert got.teacher_tokens[k] == n_k
    want_loss = loss / counted if reduction == "mean" else loss
    torch.testing.assert_close(got.loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], total[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_matches_spec(backend, dtype):
    # dense (padded vocab, softcap) + sparse + dense (narrower vocab, logit scale), compact,
    # ignored tokens, T != 1, chunks that split the teachers' segments
    problem = routed_problem(dtype=dtype)
    check(problem, backend, dtype, temperature=2.0, divergence="reverse_kl", chunk_size=8)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_routing_every_divergence(divergence):
    problem = routed_problem(lead=(2, 9), seed=3)
    check(problem, "torch", temperature=0.7, divergence=divergence, beta=0.4, skew=0.2,
          chunk_size=5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_reductions_with_upstream_gradient(backend, reduction):
    problem = routed_problem(lead=(2, 10), seed=4)
    upstream = torch.tensor(-2.5)
    if reduction == "none":
        upstream = torch.randn(2, 10, generator=gen(5)).to(DEVICE)
    loss, _, got = check(problem, backend, torch.float32, upstream, reduction=reduction,
                         temperature=2.0, chunk_size=6)
    assert loss.shape == ((2, 10) if reduction == "none" else ())
    if reduction == "none":
        assert got.teacher_kd.shape == (2, 10, 3)
        assert (got.teacher_kd[problem["labels"] == -100] == 0).all()
        others = torch.nn.functional.one_hot(problem["teacher_index"], 3) == 0
        assert (got.teacher_kd[others] == 0).all()


def test_per_row_index_and_compact_rows_are_per_token_index_and_full_rows():
    """teacher_index (B,) for (B, L, D) hidden states routes whole rows; compact teachers hold
    their own tokens in token order. Both give the same bits as a per-token index over full
    tensors."""
    lead = (4, 9)
    inputs = student(lead, seed=6)
    rows = torch.tensor([1, 0, 1, 1], device=DEVICE)
    full = [head(lead, 10, 301, 7, softcap=3.0), logprobs(lead, 301, 5, 8)]
    per_token = rows.unsqueeze(1).expand(lead)
    compact = [TeacherHead(full[0].hidden[rows == 0].reshape(-1, 10), full[0].weight, full[0].bias,
                           softcap=3.0),
               TeacherLogprobs(full[1].ids[rows == 1].reshape(-1, 5),
                               full[1].logprobs[rows == 1].reshape(-1, 5))]
    kw = dict(temperature=2.0, chunk_size=7, reduction="none")
    want = run(dict(inputs, teachers=full, teacher_index=per_token), "torch", components=True,
               **kw)
    for teachers, index in ((full, rows), (compact, rows), (compact, per_token)):
        got = run(dict(inputs, teachers=teachers, teacher_index=index), "torch",
                  components=True, **kw)
        _equal(got, want)
        assert torch.equal(got[0].teacher_kd, want[0].teacher_kd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_where_a_teacher_has_only_ignored_tokens(backend):
    problem = routed_problem(lead=(17,), seed=7, compact=False, ignore_every=0)
    problem["labels"][problem["teacher_index"] == 1] = -100
    _, _, got = check(problem, backend, temperature=2.0)
    assert got.teacher_kd[1] == 0 and got.teacher_tokens[1] == 0


def test_routing_without_labels_and_without_grad():
    problem = routed_problem(lead=(15,), seed=8, compact=False)
    problem["labels"] = None
    check(problem, "torch", ce_weight=0.0, kd_weight=1.0, temperature=3.0)
    with torch.no_grad():
        loss = fastkd.fused_multi_teacher_loss(**problem, ce_weight=0.0, kd_weight=1.0)
    want, _ = run(problem, "torch", ce_weight=0.0, kd_weight=1.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# ---- mixtures ----------------------------------------------------------------------------------

def mixed_problem(n_teachers=2, lead=(29,), dtype=torch.float32, seed=10, per_token=True,
                  ignore_every=5):
    """K dense teachers, each with its own head settings and a vocabulary at least the
    student's (K = V shared ids each); per-token weights (one token all on one teacher, one
    with a zero weight) or global ones."""
    inputs = student(lead, dtype=dtype, seed=seed, ignore_every=ignore_every)
    settings = [dict(softcap=4.0), dict(logit_scale=1.4), dict(softcap=6.0, logit_scale=0.7),
                dict()]
    teachers = [head(lead, 14 + 4 * j, 301 + 5 * j, seed + 1 + j, dtype, bias=j != 1,
                     **settings[j]) for j in range(n_teachers)]
    g = gen(seed + 9)
    if per_token:
        weights = torch.rand(*lead, n_teachers, generator=g, dtype=torch.float64) + 0.05
        weights.view(-1, n_teachers)[0] = torch.eye(n_teachers, dtype=torch.float64)[0]
        weights.view(-1, n_teachers)[1, -1] = 0.0
        weights = weights / weights.sum(-1, keepdim=True)
    else:
        weights = torch.softmax(torch.randn(n_teachers, generator=g, dtype=torch.float64), 0)
    return dict(inputs, teachers=teachers, teacher_weights=weights.float().to(DEVICE))


MIXTURES = [(d, "divergences") for d in DIVERGENCES] + [("forward_kl", "ensemble")]


@pytest.mark.parametrize("divergence,mixture", MIXTURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_matches_spec(backend, divergence, mixture):
    # 3 teachers (the kernel's padded 4th row), per-token weights with a one-hot and a zero,
    # each teacher's own softcap / logit scale, vocabularies padded past the student's, biases,
    # ignored tokens, T != 1, a student softcap, uneven chunks
    problem = mixed_problem(n_teachers=3)
    check(problem, backend, temperature=1.5, divergence=divergence, beta=0.3, skew=0.2,
          mixture=mixture, chunk_size=8, student_softcap=8.0)


@pytest.mark.parametrize("mixture", ["divergences", "ensemble"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_reductions_global_weights_and_bf16(backend, reduction, mixture):
    for dtype in (torch.float32, torch.bfloat16):
        problem = mixed_problem(n_teachers=4, lead=(3, 7), dtype=dtype, per_token=False)
        upstream = (torch.randn(3, 7, generator=gen(11)).to(DEVICE) if reduction == "none"
                    else torch.tensor(0.7))
        check(problem, backend, dtype, upstream, reduction=reduction, mixture=mixture,
              temperature=2.0, chunk_size=5)


@pytest.mark.parametrize("n_teachers", [1, 2, 4])
@pytest.mark.parametrize("divergence,mixture", [("forward_kl", "ensemble"),
                                                ("reverse_kl", "divergences"),
                                                ("jsd", "divergences")])
def test_mixture_kernel_writes_every_output(divergence, mixture, n_teachers):
    """Poison the outputs and the padded buffers' pad columns, run the kernel on one chunk with
    and without the gradient, compare row by row with the torch row op; an ignored row's
    gradient is exactly 0. Odd V, K < V, each teacher its own softcap and scale."""
    from fastkd.autograd import padded_rows
    from fastkd.mixture import MIXTURE_ROWS

    g = gen(40 + n_teachers)
    n, vocab, shared = 11, 1500, 1379
    s = torch.randn(n, vocab, generator=g).mul(4).to(DEVICE)
    t = torch.randn(n_teachers, n, shared, generator=g).mul(3).to(DEVICE)
    weights = torch.softmax(torch.randn(n, n_teachers, generator=g), -1).to(DEVICE)
    if n_teachers > 1:
        weights[2] = torch.nn.functional.one_hot(torch.tensor(1), n_teachers).float()
    labels = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    labels[3] = -100
    scale = torch.rand(n, generator=g).to(DEVICE)
    heads = ((5.0, 1.2), (None, 0.7), (9.0, 1.0), (None, 1.3))[:n_teachers]
    opts = DistillOptions(temperature=1.7, divergence=divergence, student_softcap=6.0,
                          student_logit_scale=0.8)
    for grads in (True, False):
        results = {}
        for backend in BACKENDS:
            out = torch.full((n, 4 + n_teachers), float("nan"), device=DEVICE)
            grad = padded_rows(n, vocab, s.dtype, DEVICE)
            teachers = padded_rows(n_teachers * n, shared, t.dtype, DEVICE).unflatten(
                0, (n_teachers, n))
            for buf, x in ((grad, s), (teachers, t)):
                buf.as_strided((buf.numel() // buf.stride(-2), buf.stride(-2)),
                               (buf.stride(-2), 1)).fill_(float("nan"))
                buf.copy_(x)
            MIXTURE_ROWS.on(backend)(grad, teachers, weights, labels, scale, out, opts, heads,
                                     mixture == "ensemble", grads)
            results[backend] = (grad, out)
        for got, want in zip(results["triton"], results["torch"], strict=True):
            if grads or got is results["triton"][1]:
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if grads:
            assert torch.equal(results["triton"][0][3], torch.zeros(vocab, device=DEVICE))


def test_spec_mixture_closed_form_gradient_is_autograds():
    g = gen(12)
    n, vocab = 9, 41
    s = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ts = [torch.randn(n, w, generator=g, dtype=torch.float64) * 3 for w in (41, 45, 50)]
    ts[1][:, ::7] = float("-inf")  # banned ids: p = 0 there
    weights = torch.rand(n, 3, generator=g, dtype=torch.float64)
    weights[0] = torch.tensor([0.0, 1.0, 0.0])
    weights = weights / weights.sum(-1, keepdim=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    heads = [(5.0, 1.2), (None, 0.8), (3.0, 1.0)]
    for divergence, mixture in MIXTURES:
        if divergence.endswith("reverse_kl"):  # infinite where the student covers a banned id
            continue
        opts = DistillOptions(temperature=1.3, divergence=divergence, beta=0.3, skew=0.2,
                              ce_weight=0.6, kd_weight=1.4, student_softcap=7.0,
                              student_logit_scale=0.9)
        ensemble = mixture == "ensemble"
        per_token, teacher_kd = reference_multi.mixture_token_losses(s, ts, weights, labels, opts,
                                                                     heads, ensemble)
        (want,) = torch.autograd.grad(per_token.loss.sum(), s)
        got, got_kd, grad = reference_multi.mixture_token_losses(s.detach(), ts, weights, labels,
                                                                 opts, heads, ensemble, grad=True)
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-11)
        for x, y in zip(got.columns(), per_token.columns(), strict=True):
            torch.testing.assert_close(x, y.detach(), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(grad).all() and (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("mixture", ["divergences", "ensemble"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_one_mixture_is_the_single_teacher(backend, mixture):
    """All the weight on one teacher is that teacher alone (a second one at weight 0 is not
    consulted), to fp32 rounding: the same sums in another order."""
    problem = mixed_problem(n_teachers=2, seed=13)
    kw = dict(temperature=2.0, divergence="forward_kl", chunk_size=8, mixture=mixture)
    want = _single(problem, problem["teachers"][0], backend, temperature=2.0, chunk_size=8)
    for teachers, weights in (([problem["teachers"][0]], [1.0]),
                              (problem["teachers"], [1.0, 0.0])):
        weights = torch.tensor(weights, device=DEVICE)
        got, grads = run(dict(problem, teachers=teachers, teacher_weights=weights), backend,
                         components=True, **kw)
        for x, y in zip(got.columns(), want[0].columns(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.teacher_kd[0], want[0].kd, rtol=1e-6, atol=1e-7)
        for name in grads:
            torch.testing.assert_close(grads[name], want[1][name], rtol=1e-5, atol=1e-7)


def test_ensemble_and_divergences_share_the_gradient_and_differ_by_the_teachers_js():
    """For forward_kl, sum_k w_k KL(p_k || q) and KL(pbar || q) have the same gradient, q - pbar,
    and differ by H(pbar) - sum_k w_k H(p_k) (free of the student), checked in float64 against
    the teachers' distributions formed here."""
    problem = mixed_problem(n_teachers=3, seed=14, ignore_every=0)
    # weights that sum to 1 exactly (else sum_k w_k (q - p_k) = (sum_k w_k) q - pbar)
    dyadic = torch.tensor([0.125, 0.375, 0.5])
    problem["teacher_weights"] = torch.stack([dyadic[torch.randperm(3, generator=gen(i))]
                                              for i in range(29)]).to(DEVICE)
    kw = dict(temperature=2.0, divergence="forward_kl")
    div, div_grads = run(problem, "spec", **kw)
    ens, ens_grads = run(problem, "spec", mixture="ensemble", **kw)
    for name in div_grads:
        torch.testing.assert_close(div_grads[name], ens_grads[name], rtol=1e-10, atol=1e-13)
    w = problem["teacher_weights"].double()
    probs = []
    for t in problem["teachers"]:
        z = (t.hidden.double() @ t.weight.double().T + (0 if t.bias is None else t.bias.double()))
        z = reference.head_logits(z, t.logit_scale, t.softcap)[:, :301] / 2.0
        probs.append(torch.softmax(z, -1))
    pbar = sum(w[:, k:k + 1] * p for k, p in enumerate(probs))

    def entropy(p):
        return -(p * p.clamp_min(1e-300).log()).sum(-1)

    js = entropy(pbar) - sum(w[:, k] * entropy(p) for k, p in enumerate(probs))
    assert (js > 0).all()
    gap = 0.5 * 4.0 * js.mean()  # kd_weight T^2, mean over the tokens
    torch.testing.assert_close(div - ens, gap, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_with_banned_ids_extreme_logits_and_a_nan_teacher(backend):
    """A teacher's ids at -inf (p = 0: 0 log 0) for every divergence but the reverse KLs; logits
    of ~2e3 (the online maxima keep every exp finite); a NaN teacher makes the loss NaN where it
    has weight, and is not consulted where its weight is 0."""
    problem = mixed_problem(n_teachers=2, seed=15)
    with torch.no_grad():
        problem["teachers"][0].bias[::7] = float("-inf")
    for divergence, mixture in MIXTURES:
        if not divergence.endswith("reverse_kl"):
            check(problem, backend, temperature=2.0, divergence=divergence, mixture=mixture,
                  chunk_size=10)
    loud = mixed_problem(n_teachers=2, seed=16)
    with torch.no_grad():
        for teacher in loud["teachers"]:
            teacher.hidden.mul_(300.0)
        loud["student_hidden"].mul_(300.0)
    z = loud["student_hidden"] @ loud["student_weight"].T
    assert z.abs().max() > 2000
    loss, grads = run(loud, backend, temperature=2.0, divergence="jsd")
    want, want_grads = run(loud, "spec", temperature=2.0, divergence="jsd")
    assert abs(loss.double() - want) <= 1e-5 * want.abs()
    for name, grad in grads.items():
        err = (grad.double() - want_grads[name]).abs().max() / want_grads[name].abs().max()
        assert torch.isfinite(grad).all() and err <= 1e-4, (name, float(err))
    sick = mixed_problem(n_teachers=2, seed=17, ignore_every=0)
    with torch.no_grad():
        sick["teachers"][1].hidden[4, 0] = float("nan")
    weights = sick["teacher_weights"].clone()
    for mixture in ("divergences", "ensemble"):
        loss, _ = run(sick, backend, mixture=mixture)
        assert torch.isnan(loss), mixture
        weights[4] = torch.tensor([1.0, 0.0])  # the NaN teacher not consulted at its NaN token
        loss, grads = run(dict(sick, teacher_weights=weights), backend, mixture=mixture)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_master_weights(backend):
    """Under torch.autocast(bf16) every teacher and the student compute in bf16 and the
    gradients come back in their inputs' dtype (fp32), within bf16's tolerance of the spec."""
    for problem, kw in ((routed_problem(lead=(2, 9), seed=18), {}),
                        (mixed_problem(n_teachers=2, lead=(2, 9), seed=19), {})):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss, grads = run(problem, backend, temperature=2.0, **kw)
        want, want_grads = run(problem, "spec", temperature=2.0, **kw)
        assert_close(loss, want, torch.bfloat16, "loss")
        for name, grad in grads.items():
            assert grad.dtype == torch.float32, name
            assert_close(grad, want_grads[name], torch.bfloat16, name)
        assert not torch.equal(loss, run(problem, backend, temperature=2.0, **kw)[0])


# ---- bad input ---------------------------------------------------------------------------------

def _small(**changes):
    lead = (2, 3)
    inputs = student(lead, d_s=4, vocab=11, seed=20, ignore_every=0, bias=False)
    teachers = [head(lead, 5, 11, 21), head(lead, 3, 13, 22)]
    return {**inputs, "teachers": teachers, **changes}


INDEX = torch.tensor([[0, 1, 0], [1, 1, 0]])
WEIGHTS = torch.tensor([0.25, 0.75])
BAD = [
    ("teacher_index must lie in \\[0, 2\\)", dict(teacher_index=INDEX * 2), ValueError),
    ("teacher_index must lie in", dict(teacher_index=INDEX - 1), ValueError),
    ("teacher_index must be an integer", dict(teacher_index=INDEX.float()), TypeError),
    ("teacher_index must have the hidden states' leading shape",
     dict(teacher_index=INDEX[:, :2]), ValueError),
    ("teacher_weights must be >= 0", dict(teacher_weights=torch.tensor([-0.5, 1.5])), ValueError),
    ("teacher_weights must be >= 0", dict(teacher_weights=torch.tensor([math.nan, 1.0])),
     ValueError),
    ("must sum to 1", dict(teacher_weights=torch.tensor([0.5, 0.6])), ValueError),
    ("must sum to 1", dict(teacher_weights=torch.full((2, 3, 2), 0.4)), ValueError),
    ("teacher_weights must have shape \\(2,\\)", dict(teacher_weights=torch.ones(3) / 3),
     ValueError),
    ("teacher_weights must have shape", dict(teacher_weights=torch.full((3, 2), 0.5)), ValueError),
    ("teacher_weights must be a floating", dict(teacher_weights=torch.tensor([0, 1])), TypeError),
    ("not both", dict(teacher_index=INDEX, teacher_weights=WEIGHTS), ValueError),
    ("2 teachers: pass teacher_index", dict(), ValueError),
    ('mixture="ensemble" is KL', dict(teacher_weights=WEIGHTS, mixture="ensemble",
                                      divergence="jsd"), ValueError),
    ("mixture='ensemble' needs teacher_weights", dict(mixture="ensemble"), ValueError),
    ("mixture must be one of", dict(teacher_weights=WEIGHTS, mixture="mean"), ValueError),
    ("unexpected keyword argument 'teacher_softcap'",
     dict(teacher_index=INDEX, teacher_softcap=3.0), TypeError),
    ("teachers\\[1\\]: teacher_hidden last dim",
     dict(teachers=[head((2, 3), 5, 11, 21), TeacherHead(torch.randn(2, 3, 4),
                                                         torch.randn(13, 3))],
          teacher_index=INDEX), ValueError),
    ("teachers\\[1\\].hidden must be a floating",
     dict(teachers=[head((2, 3), 5, 11, 21), TeacherHead(torch.ones(2, 3, 3, dtype=torch.long),
                                                         torch.randn(13, 3))],
          teacher_index=INDEX), TypeError),
    ("teachers\\[1\\] holds 2 rows .* routes 3 tokens",
     dict(teachers=[head((2, 3), 5, 11, 21), head((2,), 3, 13, 22)], teacher_index=INDEX),
     ValueError),
    ("teachers\\[1\\]: its tensors must have",
     dict(teachers=[head((2, 3), 5, 11, 21), head((3, 1), 3, 13, 22)], teacher_index=INDEX),
     ValueError),
    ("teachers\\[1\\]: teacher_ids must lie in \\[0, 11\\)",
     dict(teachers=[head((2, 3), 5, 11, 21), TeacherLogprobs(torch.full((2, 3, 2), 11),
                                                             torch.full((2, 3, 2), -1.0))],
          teacher_index=INDEX), ValueError),
    ("teacher_weights mixes dense teachers \\(TeacherHead\\) only: teachers\\[1\\]",
     dict(teachers=[head((2, 3), 5, 11, 21), logprobs((2, 3), 11, 2, 3)],
          teacher_weights=WEIGHTS), ValueError),
    ("teacher_weights mixes 1 to 4 teachers, got 5",
     dict(teachers=[head((2, 3), 5, 11, 21 + j) for j in range(5)],
          teacher_weights=torch.full((5,), 0.2)), ValueError),
    ("every teacher must share as many: got K = \\[11, 9\\]",
     dict(teachers=[head((2, 3), 5, 11, 21), head((2, 3), 3, 9, 22)], teacher_weights=WEIGHTS),
     ValueError),
    ("mixed teachers compute in one dtype",
     dict(teachers=[head((2, 3), 5, 11, 21), head((2, 3), 3, 13, 22, dtype=torch.float64)],
          teacher_weights=WEIGHTS), TypeError),
    ("teachers must be a list or tuple", dict(teachers=head((2, 3), 5, 11, 21)), TypeError),
    ("teachers is empty", dict(teachers=[]), ValueError),
    ("teachers\\[1\\] must be a fastkd.TeacherHead or",
     dict(teachers=[head((2, 3), 5, 11, 21), torch.randn(2, 3, 5)], teacher_index=INDEX),
     TypeError),
    ("vocab_start=2 needs a process_group", dict(teacher_index=INDEX, vocab_start=2), ValueError),
    ("labels must lie in", dict(teacher_index=INDEX, labels=torch.full((2, 3), 11)), ValueError),
]


@pytest.mark.parametrize("match,changes,error", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_input(match, changes, error):
    args = _small()
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                 for k, v in changes.items()})
    with pytest.raises(error, match=match):
        fastkd.fused_multi_teacher_loss(**args)


def test_vocab_parallel_takes_dense_routing_only():
    """Under a process group (here one gloo rank, the agreement's error path) a sparse teacher
    and a mixture are refused, with the same message on every rank."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        for match, changes in (
                ("rank 0 rejected its inputs: teachers\\[0\\] is a TeacherLogprobs: a sparse "
                 "teacher's ids are global", dict(teachers=[logprobs((2, 3), 11, 2, 3)])),
                ("mixtures are not vocab-parallel", dict(teacher_weights=WEIGHTS))):
            with pytest.raises(ValueError, match=match):
                fastkd.fused_multi_teacher_loss(**_small(**changes), process_group=group)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_routing_on_two_ranks():
    """Two gloo ranks, each with its rows of the student's and both teachers' heads (one
    padded wider, compact rows): loss, components, each teacher's kd and every gradient equal
    one process over the full heads and the float64 spec, on both backends; ranks that route
    differently, or one rank's bad teacher or index, raise the same error everywhere at once
    (tests/_multi_teacher_vp_worker.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_multi_teacher_vp_worker.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(worker), "2"], env=env, capture_output=True,
                          text=True, timeout=600)
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, tail
    assert "ok 2" in proc.stdout


def test_bad_teacher_settings_and_options_entry():
    with pytest.raises(ValueError, match="softcap must be > 0"):
        TeacherHead(torch.randn(2, 3), torch.randn(4, 3), softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        TeacherHead(torch.randn(2, 3), torch.randn(4, 3), logit_scale=-1.0)
    with pytest.raises(ValueError, match="tail must be one of"):
        TeacherLogprobs(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), tail="rest")
    with pytest.raises(TypeError, match="positional"):
        TeacherHead(torch.randn(2, 3), torch.randn(4, 3), None, 3.0)
    args = _small(teacher_index=INDEX.to(DEVICE))
    with pytest.raises(ValueError, match="teacher_softcap and teacher_logit_scale unset"):
        fastkd.multi_teacher_distill(*(args.pop(k) for k in ("student_hidden", "student_weight",
                                                             "teachers", "labels")),
                                     DistillOptions(teacher_softcap=2.0), **args)


def test_check_labels_false_takes_the_index_on_trust_but_not_out_of_range():
    """Under check_labels=False the host sync is skipped; the routed row op still reads its
    segment sizes (one sync inside the loop) and refuses an index out of range there."""
    args = _small(teacher_index=(INDEX * 2).to(DEVICE))
    with pytest.raises(ValueError, match="teacher_index must lie in \\[0, 2\\)"):
        fastkd.fused_multi_teacher_loss(**args, check_labels=False)


# ---- the API around it -------------------------------------------------------------------------

def test_module_and_components():
    problem = routed_problem(lead=(2, 7), seed=30)
    crit = fastkd.FusedMultiTeacherLoss(temperature=2.0, divergence="jsd", return_components=True)
    assert "mixture='divergences'" in repr(crit)
    out = crit(**{k: v for k, v in problem.items()})
    loss, ce, kd = out  # three, as every Components
    want, _ = run(problem, "torch", components=True, temperature=2.0, divergence="jsd")
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert isinstance(out, fastkd.TeacherComponents) and out.teacher_kd.shape == (3,)
    copied = pickle.loads(pickle.dumps(reference_multi.TeacherComponents(
        *(x.detach() for x in out.columns()), out.teacher_kd, out.teacher_tokens)))
    assert torch.equal(copied.teacher_kd, out.teacher_kd)
    assert torch.equal(copied.teacher_tokens, out.teacher_tokens) and copied.entropy == out.entropy
    with pytest.raises(TypeError, match="positional"):
        fastkd.FusedMultiTeacherLoss(2.0)
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        fastkd.FusedMultiTeacherLoss(teacher_logit_scale=2.0)
    with pytest.raises(ValueError, match="mixture must be one of"):
        fastkd.FusedMultiTeacherLoss(mixture="sum")


@pytest.mark.parametrize("api", ["fused_multi_teacher_loss", "FusedMultiTeacherLoss"])
def test_option_docs_and_signature_come_from_the_options_table(api):
    import inspect

    fn = getattr(fastkd, api)
    fn = fn.__init__ if inspect.isclass(fn) else fn
    doc = " ".join(inspect.getdoc(fn).split())
    params = inspect.signature(fn).parameters
    for field in dataclasses.fields(DistillOptions):
        if field.name in ("teacher_softcap", "teacher_logit_scale"):
            assert field.name not in params and f"{field.name} (" not in doc
            continue
        assert params[field.name].default == field.default, field.name
        line = f"{field.name} ({field.type}, default {field.default!r}): {field.metadata['doc']}"
        assert " ".join(line.split()) in doc, field.name


def test_fits_a_fullgraph_compiled_graph_with_check_labels_false():
    """check_labels=False: routing (the index sorted, segments read inside the custom op) and a
    mixture trace whole under torch.compile(fullgraph=True), equal to eager."""
    routed = routed_problem(lead=(2, 8), seed=31, compact=False)
    mixed = mixed_problem(n_teachers=2, lead=(2, 8), seed=32)
    for problem in (routed, mixed):
        args = {k: v.detach().clone().requires_grad_() if k in STUDENT else v
                for k, v in problem.items()}

        def loss_fn(**kw):
            out = fastkd.fused_multi_teacher_loss(**kw, temperature=2.0, check_labels=False,
                                                  return_components=True)
            return out.loss, out.teacher_kd

        def step(fn, args=args):
            loss, teacher_kd = fn(**args)
            return loss, teacher_kd, *torch.autograd.grad(
                loss, (args["student_hidden"], args["student_weight"]))

        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        for got, want in zip(step(compiled), step(loss_fn), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_routing_and_mixtures_never_allocate_n_by_v():
    n, vocab, chunk = 512, 2003, 32
    inputs = student((n,), d_s=16, vocab=vocab, seed=33)
    index = torch.randint(0, 2, (n,), generator=gen(34)).to(DEVICE)
    teachers = [head((n,), 16, vocab, 35), head((int((index == 1).sum()),), 12, vocab + 7, 36)]
    bound = 4 * max(2 * chunk * 2048, vocab * 16)  # two chunks of padded logits, a weight
    assert bound * 4 <= 4 * n * vocab
    for kw in (dict(teachers=teachers, teacher_index=index),
               dict(teachers=[teachers[0], head((n,), 12, vocab, 37)],
                    teacher_weights=torch.tensor([0.5, 0.5], device=DEVICE))):
        args = dict(inputs, **kw)
        args["student_hidden"] = args["student_hidden"].detach().requires_grad_()
        with LargestTensor() as probe:
            fastkd.fused_multi_teacher_loss(**args, chunk_size=chunk, divergence="jsd").backward()
        assert probe.largest <= bound, (kw.keys(), probe.largest, bound)


def test_the_benchmark_runs_from_python_m_bench(tmp_path, monkeypatch):
    """`python -m bench --multi-teacher --quick` (the hookup, the cases, the files it writes); its
    numbers are the benchmark's business, not a test's."""
    import json
    import sys

    from _bench import import_bench

    monkeypatch.setattr(sys, "path", sys.path[:])  # bench's main drops the repo root from it
    code = import_bench("__main__").main(["--multi-teacher", "--quick", "--device", "cpu",
                                          "--out", str(tmp_path)])
    assert code in (0, 1)  # 1: a target missed (a loaded machine's quick run may)
    doc = json.loads((tmp_path / "results.json").read_text())
    cases = {c["case"] for c in doc["cases"]}
    assert cases == {"routed-2", "routed-2, chunk 64", "routed-4", "routed-4, chunk 64",
                     "mixture-2"}
    assert all(c["ratio"] > 0 for c in doc["cases"]) and doc["load_before"]
    assert "CPU numbers, not GPU" in (tmp_path / "results.md").read_text()
