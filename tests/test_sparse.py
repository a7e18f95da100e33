"""The fused sparse loss against the float64 spec (`fastkd.reference.sparse_token_losses`), on the
chunked torch path and the Triton kernel (under TRITON_INTERPRET=1 on CPU): every tail mode and
divergence, loss and every gradient; the spec's closed-form gradient against autograd; the dense
loss as the full-k limit; sampled targets' unbiasedness; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _device import DEVICE
from _spec_check import assert_close, check_against_spec

import fastkd
from fastkd import DistillOptions, reference
from fastkd.options import DIVERGENCES

BACKENDS = ["torch", "triton"]
TAIL_DIVERGENCES = [("bucket", d) for d in DIVERGENCES] + [
    ("renormalize", d) for d in DIVERGENCES] + [("ignore", "forward_kl")]
STUDENT = ("student_hidden", "student_weight", "student_bias")


def make_inputs(n=77, d=24, vocab=1003, k=7, dtype=torch.float32, temperature=2.0, seed=0,
                scale=1.0, lead=None, ignore_every=5, teacher_scale=2.0):
    """Student tensors and a top-k teacher cut from random teacher logits at T, with unused slots
    (-1), a row with none, ids 0 and V - 1 present, and ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    n = math.prod(lead)
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * teacher_scale
    t[0, 0] = t[0, -1] = 50.0  # the vocabulary's ends in the set
    logprobs, ids = torch.log_softmax(t / temperature, -1).topk(min(k, vocab), -1)
    ids = ids.clone()
    if k > 2 and n > 3:
        ids[1, k // 2:] = -1  # fewer than k entries
        ids[2] = -1  # none at all
    labels = torch.randint(0, vocab, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    inputs = dict(
        student_hidden=(torch.randn(*lead, d, generator=g) * scale).to(dtype),
        student_weight=(torch.randn(vocab, d, generator=g) * 0.5).to(dtype),
        student_bias=torch.randn(vocab, generator=g).to(dtype),
        teacher_ids=ids.reshape(*lead, -1),
        teacher_logprobs=logprobs.reshape(*lead, -1).to(dtype),
        labels=labels,
    )
    return {name: x.to(DEVICE) for name, x in inputs.items()}


def run(inputs, backend, upstream=None, components=False, **kw):
    """Loss (with components=True: return_components' `Components`, entropy included) and the
    student gradients; backend "spec" is the reference in float64."""
    args = {}
    for name, x in inputs.items():
        if x is not None and x.is_floating_point():
            x = x.detach().double() if backend == "spec" else x.detach().clone()
            x.requires_grad_(name in STUDENT)
        args[name] = x
    parts = fastkd.fused_sparse_distill_loss(
        **args, backend="reference" if backend == "spec" else backend, return_components=True,
        **kw)
    loss = parts.loss
    out = loss if upstream is None else loss * upstream.to(loss.device, loss.dtype)
    out.sum().backward()
    grads = {k: args[k].grad for k in STUDENT if args.get(k) is not None}
    if components:
        return fastkd.Components(*(x.detach() for x in parts.columns())), grads
    return loss.detach(), grads


def check(inputs, backend, dtype=torch.float32, upstream=None, **kw):
    return check_against_spec(run, inputs, backend, dtype, upstream, **kw)


# ---- the spec: closed-form gradient == autograd, the dense loss as the full-k limit --------------


@pytest.mark.parametrize("tail,divergence", TAIL_DIVERGENCES)
@pytest.mark.parametrize("temperature,cap,logit_scale,scale", [  # scale: the logits' size
    (1.0, None, 1.0, 1.0), (2.0, 4.0, 0.6, 3.0), (0.5, None, 1.7, 30.0)])
def test_spec_closed_form_gradient_is_autograds(tail, divergence, temperature, cap, logit_scale,
                                                scale):
    g = torch.Generator().manual_seed(3)
    n, vocab, k = 11, 61, 9
    s = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale).requires_grad_()
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    logprobs, ids = torch.log_softmax(t / temperature, -1).topk(k, -1)
    ids = ids.clone()
    ids[1, 4:] = -1
    ids[2] = -1
    ids[3] = torch.arange(k) * 7  # ids 0 and 56 (near V - 1); a spread, low-mass set
    ids[4, 0], ids[4, 1] = 0, vocab - 1
    logprobs[5] = logprobs[5] - 40.0  # P near 0
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    opts = DistillOptions(temperature=temperature, divergence=divergence, beta=0.3, skew=0.2,
                          ce_weight=0.7, kd_weight=1.3, student_softcap=cap,
                          student_logit_scale=logit_scale)
    per_token = reference.sparse_token_losses(s, ids, logprobs, labels, opts, tail)
    loss, ce, kd = per_token
    (want,) = torch.autograd.grad(loss.sum(), s)
    got, grad = reference.sparse_token_losses_and_grad(s.detach(), ids, logprobs, labels, opts,
                                                       tail)
    for x, exp in zip((*got.columns(), grad), (*per_token.columns(), want), strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, exp.detach(), rtol=1e-9, atol=1e-11)
    assert (grad[labels == -100] == 0).all()
    # no entries: no divergence (bucket: the rest buckets, both 1 up to fp64 rounding); D >= 0
    assert abs(kd[2]) <= 1e-12 and (kd >= -1e-12).all()
    # the entropy: of the student's full softmax at T, its logits scaled, then softcapped
    z = s.detach() * logit_scale
    q = torch.softmax((z if cap is None else cap * torch.tanh(z / cap)) / temperature, -1)
    entropy = torch.where(labels != -100, -(q * q.log()).sum(-1), 0.0)
    torch.testing.assert_close(per_token.entropy, entropy, rtol=1e-10, atol=1e-12)


def test_spec_tails_by_hand():
    # one token, V = 4, k = 2, T = 1: the three tails written out
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    ids = torch.tensor([[1, 3]])
    p = torch.tensor([[0.6, 0.1]], dtype=torch.float64)
    q = torch.softmax(s, -1)[0]
    qk = q[[1, 3]]
    opts = DistillOptions(ce_weight=0.0, kd_weight=1.0)
    kd = {tail: reference.sparse_token_losses(s, ids, p.log(), None, opts, tail)[2].item()
          for tail in reference.SPARSE_TAILS}
    pb = torch.cat([p[0], 1 - p.sum(-1)])
    qb = torch.cat([qk, 1 - qk.sum().reshape(1)])
    assert kd["bucket"] == pytest.approx((pb * (pb / qb).log()).sum().item(), rel=1e-12)
    pr, qr = p[0] / p.sum(), qk / qk.sum()
    assert kd["renormalize"] == pytest.approx((pr * (pr / qr).log()).sum().item(), rel=1e-12)
    assert kd["ignore"] == pytest.approx((p[0] * (p[0] / qk).log()).sum().item(), rel=1e-12)


@pytest.mark.parametrize("tail,divergence", [("bucket", "forward_kl"), ("bucket", "jsd"),
                                             ("bucket", "reverse_kl"), ("renormalize", "tvd"),
                                             ("ignore", "forward_kl")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_k_is_the_dense_loss(backend, tail, divergence):
    # k = V ids with the teacher's exact log-probabilities: every tail is the dense loss
    g = torch.Generator().manual_seed(4)
    n, d, vocab, temperature = 19, 16, 67, 2.0
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.5
    h_t, w_t = torch.randn(n, 8, generator=g), torch.randn(vocab, 8, generator=g)
    logprobs = torch.log_softmax((h_t @ w_t.T) / temperature, -1)
    ids = torch.randperm(vocab, generator=g).expand(n, vocab)  # in any order
    logprobs = logprobs.gather(-1, ids)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = -100
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3)
    dense, dense_grads = [], []
    for x in (h, w):
        x.requires_grad_()
    dense = fastkd.fused_distill_loss(h.double(), w.double(), h_t.double(), w_t.double(),
                                      labels, backend="reference", **kw)
    dense_grads = torch.autograd.grad(dense, (h, w))
    inputs = {"student_hidden": h.detach(), "student_weight": w.detach(), "teacher_ids": ids,
              "teacher_logprobs": logprobs, "labels": labels}
    inputs = {name: x.to(DEVICE) for name, x in inputs.items()}
    loss, grads = run(inputs, backend, tail=tail, **kw)
    assert_close(loss.cpu(), dense.detach(), torch.float32, "loss")
    assert_close(grads["student_hidden"].cpu(), dense_grads[0].double(), torch.float32, "dh")
    assert_close(grads["student_weight"].cpu(), dense_grads[1].double(), torch.float32, "dw")


# ---- the kernel and the torch path against the spec ------------------------------------------


@pytest.mark.parametrize("tail,divergence", TAIL_DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_spec(backend, tail, divergence):
    # N = 77, V = 1003, k = 7: unused slots, an empty row, the vocabulary's ends, ignored tokens,
    # T != 1, bias, chunks that split N unevenly
    check(make_inputs(), backend, temperature=2.0, divergence=divergence, tail=tail, beta=0.3,
          skew=0.2, chunk_size=20)


@pytest.mark.parametrize("k", [1, 64])
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_counts(backend, tail, k):
    check(make_inputs(k=k, seed=k), backend, temperature=1.5, tail=tail, chunk_size=32,
          student_logit_scale=0.7)


@pytest.mark.parametrize("tail", ["bucket", "ignore"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend, tail):
    check(make_inputs(n=33, vocab=517, dtype=torch.bfloat16, seed=5), backend, torch.bfloat16,
          temperature=2.0, tail=tail)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_logit_scale_and_extreme_logits(backend, divergence):
    inputs = make_inputs(n=29, vocab=301, k=7, seed=6, scale=40.0)
    check(inputs, backend, temperature=0.7, divergence=divergence, student_softcap=30.0,
          student_logit_scale=1.3, tail="bucket")
    check(inputs, backend, temperature=1.0, divergence=divergence, tail="renormalize",
          student_logit_scale=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_mass_near_one_without_cancellation(backend):
    # The set holds all but ~1e-15 of the student's mass: 1 - sum(q) in fp32 is 0 (log 0 = -inf
    # and an infinite KL), logsumexp over the ids outside the set is not. And P near 1.
    inputs = make_inputs(n=13, vocab=257, k=7, seed=7, ignore_every=0)
    ids = inputs["teacher_ids"]
    w = torch.zeros(257, 24, device=DEVICE)
    b = torch.full((257,), -40.0, device=DEVICE)
    b[ids[0]] = 0.0  # row 0's ids; other rows' sets hold almost nothing
    inputs.update(student_weight=w, student_bias=b)
    lp = torch.full_like(inputs["teacher_logprobs"], math.log(0.999999 / 7))
    inputs["teacher_logprobs"] = lp.masked_fill(ids < 0, 0.0)
    for divergence in ("forward_kl", "reverse_kl"):
        loss, _ = check(inputs, backend, divergence=divergence, ce_weight=0.0, kd_weight=1.0,
                        reduction="none", tail="bucket")
        assert torch.isfinite(loss).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_with_upstream_gradient(backend, reduction):
    inputs = make_inputs(n=23, vocab=411, k=5, seed=8, lead=(3, 8))
    lead = inputs["labels"].shape
    upstream = torch.tensor(-2.5)
    if reduction == "none":
        upstream = torch.randn(lead, generator=torch.Generator().manual_seed(9))
    loss, _ = check(inputs, backend, upstream=upstream, reduction=reduction, tail="bucket",
                    divergence="reverse_kl", temperature=2.0, chunk_size=7)
    assert loss.shape == (lead if reduction == "none" else ())
    if reduction == "none":
        assert (loss[inputs["labels"] == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels_and_components(backend):
    inputs = make_inputs(n=17, vocab=200, k=4, seed=10)
    inputs["labels"] = None
    check(inputs, backend, ce_weight=0.0, kd_weight=1.0, tail="renormalize", divergence="jsd")
    loss, ce, kd = fastkd.fused_sparse_distill_loss(
        **inputs, ce_weight=0.0, kd_weight=1.0, temperature=3.0, backend=backend,
        return_components=True)
    assert ce == 0 and loss.item() == pytest.approx(9.0 * kd.item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_add_up_with_ignore(backend):
    # sampled targets may repeat an id: ("ignore") the entries add up, so a row with id 5 twice
    # (p = 0.2, 0.1) is the row with id 5 once (p = 0.3)
    inputs = make_inputs(n=9, vocab=100, k=4, seed=11, ignore_every=0)
    ids = torch.tensor([[5, 5, 7, -1]] * 9, device=DEVICE)
    lp = torch.tensor([[0.2, 0.1, 0.4, 0.0]] * 9, device=DEVICE).log()
    merged_ids = torch.tensor([[5, 7, -1, -1]] * 9, device=DEVICE)
    merged_lp = torch.tensor([[0.3, 0.4, 0.0, 0.0]] * 9, device=DEVICE).log()
    dup = run({**inputs, "teacher_ids": ids, "teacher_logprobs": lp}, backend, tail="ignore")
    one = run({**inputs, "teacher_ids": merged_ids, "teacher_logprobs": merged_lp}, "spec",
              tail="ignore")
    assert_close(dup[0], one[0], torch.float32, "loss")
    for name in one[1]:
        assert_close(dup[1][name], one[1][name], torch.float32, name)


def test_module_and_no_grad():
    inputs = make_inputs(n=15, vocab=150, k=3, seed=12)
    crit = fastkd.FusedSparseDistillLoss(temperature=2.0, tail="renormalize", backend="torch")
    assert "renormalize" in repr(crit)
    want = fastkd.fused_sparse_distill_loss(**inputs, temperature=2.0, tail="renormalize",
                                            backend="torch")
    with torch.no_grad():
        got = crit(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_ids"],
                   inputs["teacher_logprobs"], inputs["labels"],
                   student_bias=inputs["student_bias"])
    torch.testing.assert_close(got, want)


# ---- sampled targets: an unbiased estimate of the full forward-KL gradient --------------------


def test_sampled_targets_are_unbiased_and_topk_is_not():
    """The mean over R sampled caches (n samples per token, `fastkd.cache.sample_targets`) of the
    "ignore" tail's logit gradient approaches the dense forward-KL gradient: per id the estimate
    is q_v - count_v / n, so its error over R caches has standard deviation
    sqrt(p_v (1 - p_v) / (n R)); every id must lie within 5 of those (a false alarm has
    probability < 1e-4 over all ids). Top-k with the same tail is off by far more."""
    from fastkd.cache_teacher import sample_targets

    g = torch.Generator().manual_seed(13)
    vocab, n_tok, samples, repeats, temperature = 40, 6, 16, 400, 1.5
    s = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64)
    t = torch.randn(n_tok, vocab, generator=g, dtype=torch.float64)
    opts = DistillOptions(temperature=temperature, ce_weight=0.0, kd_weight=1.0)
    grad_dense = reference.token_losses_and_grad(s, t, None, opts)[1]
    mean = torch.zeros_like(s)
    for r in range(repeats):
        ids, logprobs = sample_targets(t.float(), temperature, samples, samples, seed=r)
        mean += reference.sparse_token_losses_and_grad(s, ids, logprobs.double(), None, opts,
                                                       "ignore")[1]
    mean /= repeats
    p = torch.softmax(t / temperature, -1)
    # w_kd T (q - count / n): the estimate's sd per id
    sd = temperature * (p * (1 - p) / (samples * repeats)).sqrt()
    z = (mean - grad_dense).abs() / sd
    assert z.max() < 5.0, f"max z-score {z.max():.2f}"
    assert z.mean() < 1.5  # the errors look like noise of the predicted size, not a bias
    topk_lp, topk_ids = torch.log_softmax(t / temperature, -1).topk(samples, -1)
    grad_topk = reference.sparse_token_losses_and_grad(s, topk_ids, topk_lp, None, opts,
                                                       "ignore")[1]
    assert ((grad_topk - grad_dense).abs() / sd).max() > 20.0  # biased: the missing mass


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_inputs():
    inputs = make_inputs(n=8, vocab=50, k=3, seed=14)

    def call(**changes):
        return fastkd.fused_sparse_distill_loss(**{**inputs, **changes}, backend="torch")

    with pytest.raises(ValueError, match="teacher_ids must lie in \\[0, 50\\).*found 50"):
        call(teacher_ids=inputs["teacher_ids"].clone().index_fill_(1, torch.tensor([1]), 50))
    neg = inputs["teacher_ids"].clone()
    neg[5, 2] = -2
    with pytest.raises(ValueError, match="found -2"):
        call(teacher_ids=neg)
    dup = inputs["teacher_ids"].clone()
    dup[3, 1] = dup[3, 0]
    with pytest.raises(ValueError, match="repeat an id"):
        call(teacher_ids=dup)
    with pytest.raises(ValueError, match="repeat an id"):
        call(teacher_ids=dup, tail="renormalize")
    call(teacher_ids=dup, tail="ignore")  # allowed: entries add up
    with pytest.raises(ValueError, match="forward_kl\" only"):
        call(tail="ignore", divergence="jsd")
    with pytest.raises(ValueError, match="tail must be one of"):
        call(tail="rest")
    with pytest.raises(TypeError, match="teacher_ids must be an integer"):
        call(teacher_ids=inputs["teacher_ids"].float())
    with pytest.raises(TypeError, match="teacher_logprobs must be a floating"):
        call(teacher_logprobs=inputs["teacher_ids"])
    with pytest.raises(ValueError, match="teacher_logprobs shape"):
        call(teacher_logprobs=inputs["teacher_logprobs"][:, :2])
    with pytest.raises(ValueError, match="teacher_ids must have shape"):
        call(teacher_ids=inputs["teacher_ids"][:4])
    with pytest.raises(ValueError, match="log-probabilities"):
        call(teacher_logprobs=inputs["teacher_logprobs"] + 5.0)
    with pytest.raises(ValueError, match="labels must lie"):
        call(labels=inputs["labels"] + 100)
    with pytest.raises(ValueError, match="labels=None needs ce_weight == 0"):
        call(labels=None)
    with pytest.raises(ValueError, match="student_hidden last dim"):
        call(student_hidden=inputs["student_hidden"][:, :5])
    with pytest.raises(ValueError, match="tail must be one of"):
        fastkd.FusedSparseDistillLoss(tail="none")
    with pytest.raises(ValueError, match="student_logit_scale must be > 0"):
        call(student_logit_scale=-1.0)
    for teacher_only in ("teacher_softcap", "teacher_logit_scale"):  # in the log-probabilities
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{teacher_only}'"):
            call(**{teacher_only: 2.0})


def test_teacher_mass_above_one_is_an_error():
    """Issue 20: slots whose probabilities sum past 1 by more than their dtype's rounding are not
    log-probabilities (three slots at log-probability 0 gave a finite loss); with ids covering
    the whole vocabulary, tail="bucket" has no rest bucket, so a mass below 1 is an error too (it
    gave a negative forward KL)."""
    inputs = make_inputs(n=8, vocab=50, k=3, seed=15, ignore_every=0)

    def call(**changes):
        return fastkd.fused_sparse_distill_loss(**{**inputs, **changes}, backend="torch")

    with pytest.raises(ValueError, match="sum\\(exp\\(teacher_logprobs\\)\\) = 3 > 1"):
        call(teacher_logprobs=torch.zeros_like(inputs["teacher_logprobs"]))
    lp = inputs["teacher_logprobs"].clone()
    lp[4] = torch.tensor([1.01 / 3] * 3).log()  # P = 1.01 in fp32
    with pytest.raises(ValueError, match="= 1.01 > 1"):
        call(teacher_logprobs=lp)
    # every id of a 50-word vocabulary: the exact log-softmax passes in fp32 and as bf16 (also
    # upcast again: the values keep bf16's rounding), a mass of 0.01 does not under "bucket"
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(16)) * 3
    full_lp = torch.log_softmax(logits, -1)
    full_ids = torch.arange(50).expand(8, 50)
    full = dict(teacher_ids=full_ids, teacher_logprobs=full_lp)
    want = call(**full)
    for dtype in (torch.bfloat16, torch.float16):
        stored = full_lp.to(dtype)
        assert stored.double().exp().sum(-1).max() > 1 + 1e-4  # rounding pushed a row past 1
        for lp in (stored, stored.float()):
            assert torch.isfinite(call(teacher_ids=full_ids, teacher_logprobs=lp))
    with pytest.raises(ValueError, match="cover the whole vocabulary.*sum to 0.01"):
        call(teacher_ids=full_ids, teacher_logprobs=full_lp + math.log(0.01))
    renormalized = call(teacher_ids=full_ids, teacher_logprobs=full_lp + math.log(0.01),
                        tail="renormalize")
    torch.testing.assert_close(renormalized, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsigned_ids(backend):
    """Issue 20: uint8 ids (no unused slot can be spelled in them) give the int64 ids' loss and
    gradients; an out-of-range one is named, not read as -1 after a wrap."""
    inputs = make_inputs(n=9, vocab=200, k=4, seed=17)
    ids = inputs["teacher_ids"]
    used = (ids >= 0).all(-1)
    inputs = {k: (v[used] if v is not None and v.shape[:1] == used.shape else v)
              for k, v in inputs.items()}
    want_loss, want_grads = run(inputs, backend, tail="bucket", divergence="jsd")
    loss, grads = run({**inputs, "teacher_ids": inputs["teacher_ids"].to(torch.uint8)}, backend,
                      tail="bucket", divergence="jsd")
    torch.testing.assert_close(loss, want_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name])
    bad = inputs["teacher_ids"].to(torch.uint8)
    bad[0, 0] = 250
    with pytest.raises(ValueError, match="teacher_ids must lie in \\[0, 200\\).*found 250"):
        run({**inputs, "teacher_ids": bad}, backend)


def test_fits_a_fullgraph_compiled_graph_with_check_labels_false():
    """As the dense loss: check_labels=False skips the host sync, the chunk loop is the same
    custom op, so torch.compile(fullgraph=True) traces the sparse loss whole and equals eager."""
    inputs = make_inputs(n=9, vocab=50, k=3, seed=18)

    def loss_fn(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels):
        return fastkd.fused_sparse_distill_loss(
            student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
            temperature=2.0, divergence="jsd", check_labels=False, backend="torch")

    h = inputs["student_hidden"].requires_grad_()
    w = inputs["student_weight"].requires_grad_()
    args = (h, w, inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["labels"])

    def step(fn):
        loss = fn(*args)
        return loss, *torch.autograd.grad(loss, (h, w))

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(step(compiled), step(loss_fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["no input requires grad", "torch.no_grad"])
@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_an_evaluation_step_compiles_fullgraph(form, mode):
    """Issue 29 item 11: with nothing to differentiate (an evaluation step), the sparse loss
    inside torch.compile(fullgraph=True) raised "Data-dependent branching" (Dynamo inlined the
    autograd Function's forward with every argument one place off), while the dense loss
    compiled. Both compile now, and equal eager."""
    inputs = make_inputs(n=9, vocab=50, k=3, seed=18)
    grad = mode == "torch.no_grad"
    h = inputs["student_hidden"].detach().requires_grad_(grad)
    w = inputs["student_weight"].detach().requires_grad_(grad)
    if form == "sparse":
        teacher = (inputs["teacher_ids"], inputs["teacher_logprobs"])
        loss = fastkd.fused_sparse_distill_loss
    else:
        g = torch.Generator().manual_seed(19)
        teacher = tuple(torch.randn(*shape, generator=g).to(DEVICE) for shape in ((9, 6), (53, 6)))
        loss = fastkd.fused_distill_loss

    def loss_fn(h, w, labels, *teacher):
        return loss(h, w, *teacher, labels, temperature=2.0, divergence="jsd",
                    check_labels=False, backend="torch", return_components=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(not grad):
        got, want = compiled(h, w, inputs["labels"], *teacher), loss_fn(h, w, inputs["labels"],
                                                                         *teacher)
    assert not got.loss.requires_grad
    for a, b in zip(got.columns(), want.columns(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
