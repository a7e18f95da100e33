"""What the fused-loss tests share: a loss, its components and its student gradients against the
float64 spec, with a tolerance by dtype (max |got - want| / max |want|)."""

from __future__ import annotations

import torch

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def assert_close(got, want, dtype, what="", scale=None):
    """max |got - want| / max |want| (or / scale) within the dtype's tolerance."""
    assert got.dtype != torch.float64 or want.dtype == torch.float64
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max() if scale is None else scale
    err = (got.double() - want).abs().max() / scale.clamp_min(1e-30)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


def check_against_spec(run, inputs, backend, dtype, upstream=None, **kw):
    """run(inputs, backend, upstream, components=True, **kw) -> (`fastkd.Components`, student
    gradients), on `backend` and on "spec" (the reference in float64): the loss, every gradient,
    and the components ce, kd, entropy, a component relative to the larger of its own size and
    the loss's (a D near 0, e.g. skew near 1, carries the rounding of its terms, which are the
    size of the loss's). Returns the loss and the gradients."""
    got, grads = run(inputs, backend, upstream, components=True, **kw)
    want, want_grads = run(inputs, "spec", upstream, components=True, **kw)
    assert_close(got.loss, want.loss, dtype, "loss")
    for name, x, y in zip(("ce", "kd", "entropy"), got.columns()[1:], want.columns()[1:],
                          strict=True):
        assert_close(x, y, dtype, name, torch.maximum(y.abs().max(), want.loss.abs().max()))
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name], want_grads[name], dtype, name)
    return got.loss, grads
