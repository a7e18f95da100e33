"""The spec's closed-form logit gradient (what the CPU path runs) against autograd of the spec's
own values, in float64: every divergence, temperatures, logit scales, softcaps, padded
vocabularies either way, ignored tokens, large logits, teacher ids at -inf; and the spec's
entropy, scale and softcap order against their definitions."""

from __future__ import annotations

import pytest
import torch

from fastkd import DistillOptions, reference
from fastkd.options import DIVERGENCES


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,caps,logit_scales,scale", [  # scale: the logits' size
    (1.0, (None, None), (1.0, 1.0), 1.0), (2.0, (4.0, 3.0), (0.6, 1.7), 3.0),
    (0.5, (None, 6.0), (2.5, 1.0), 1.0), (10.0, (None, None), (1.0, 0.3), 30.0),
])
@pytest.mark.parametrize("vocab,vocab_t", [(61, 61), (67, 59), (59, 67)])
def test_closed_form_gradient_is_autograds(divergence, temperature, caps, logit_scales, scale,
                                           vocab, vocab_t):
    g = torch.Generator().manual_seed(vocab * 7 + vocab_t)
    n = 13
    s = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale).requires_grad_()
    t = torch.randn(n, vocab_t, generator=g, dtype=torch.float64) * scale
    t[2, ::5] = float("-inf")  # banned teacher ids: 0 log 0 = 0
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    opts = DistillOptions(temperature=temperature, divergence=divergence, beta=0.3, skew=0.2,
                          ce_weight=0.7, kd_weight=1.3, student_softcap=caps[0],
                          teacher_softcap=caps[1], student_logit_scale=logit_scales[0],
                          teacher_logit_scale=logit_scales[1])
    if divergence in ("reverse_kl",):
        t[2] = torch.randn(vocab_t, generator=g, dtype=torch.float64)  # KL(q||p) = inf there
    per_token = reference.token_losses(s, t, labels, opts)
    loss, ce, kd = per_token  # unpacks as three, as before
    (want,) = torch.autograd.grad(loss.sum(), s)
    got, grad = reference.token_losses_and_grad(s.detach(), t, labels, opts)
    for x, exp in zip((*got.columns(), grad), (*per_token.columns(), want), strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, exp.detach(), rtol=1e-10, atol=1e-12)
    assert (grad[labels == -100] == 0).all()
    # the definitions, written out: scale, then softcap, then T; H(q) over the shared ids
    k = min(vocab, vocab_t)
    z = s.detach()[:, :k] * logit_scales[0]
    if caps[0] is not None:
        z = caps[0] * torch.tanh(z / caps[0])
    q = torch.softmax(z / temperature, -1)
    counted = labels != -100
    entropy = torch.where(counted, -(q * q.log()).sum(-1), 0.0)
    torch.testing.assert_close(per_token.entropy, entropy, rtol=1e-10, atol=1e-12)


def test_closed_form_gradient_without_labels():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 40, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(5, 37, generator=g, dtype=torch.float64)
    opts = DistillOptions(ce_weight=0.0, kd_weight=1.0, divergence="jsd", temperature=2.0)
    loss, _, _ = reference.token_losses(s, t, None, opts)
    (want,) = torch.autograd.grad(loss.sum(), s)
    grad = reference.token_losses_and_grad(s.detach(), t, None, opts)[1]
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    assert (grad[:, 37:] == 0).all()  # ids past the shared K get no KD gradient
