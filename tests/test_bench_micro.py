"""pytest-benchmark microbenchmarks of the CPU path: fastkd's chunked torch backend beside the
plain-torch reference, forward and forward+backward, at a small distillation shape.

Skipped by the default run (`--benchmark-skip` in addopts); run them with `pytest --benchmark-only`.
"""

import pytest
import torch

import fastkd

N, D_S, D_T, V = 256, 128, 256, 4000


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(N, D_S, generator=gen).requires_grad_()
    w_s = (torch.randn(V, D_S, generator=gen) * 2 / D_S**0.5).requires_grad_()
    h_t = torch.randn(N, D_T, generator=gen)
    w_t = torch.randn(V, D_T, generator=gen) * 2 / D_T**0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    return h_s, w_s, h_t, w_t, labels


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_distill_cpu(benchmark, inputs, backend, mode):
    h_s, w_s, h_t, w_t, labels = inputs
    benchmark.group = f"distill {mode} N={N} D_s={D_S} D_t={D_T} V={V}"

    def loss():
        return fastkd.fused_distill_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0,
                                         backend=backend)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return (loss(),)
        value = loss()
        return (value, *torch.autograd.grad(value, (h_s, w_s)))

    assert all(torch.isfinite(t).all() for t in benchmark(step))
