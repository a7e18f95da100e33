"""The public API's contract: bad input fails early and clearly; memory stays bounded by the
chunk.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _device import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd


def good(n=6, d_s=4, d_t=5, vocab=11, vocab_t=11):
    g = torch.Generator().manual_seed(0)
    return dict(
        student_hidden=torch.randn(n, d_s, generator=g, requires_grad=True),
        student_weight=torch.randn(vocab, d_s, generator=g, requires_grad=True),
        teacher_hidden=torch.randn(n, d_t, generator=g),
        teacher_weight=torch.randn(vocab_t, d_t, generator=g),
        labels=torch.randint(0, vocab, (n,), generator=g),
    )


def with_(**changes):
    args = good()
    args.update(changes)
    return args


BAD_TENSORS = [
    ("student_hidden", with_(student_hidden=torch.randn(6, 3)), ValueError),
    ("teacher_hidden", with_(teacher_hidden=torch.randn(6, 4)), ValueError),
    ("leading shape", with_(teacher_hidden=torch.randn(7, 5)), ValueError),
    ("labels shape", with_(labels=torch.zeros(5, dtype=torch.long)), ValueError),
    ("labels must be an integer", with_(labels=torch.zeros(6)), TypeError),
    ("labels must lie in", with_(labels=torch.tensor([0, 1, 2, 11, 3, 4])), ValueError),
    ("labels must lie in", with_(labels=torch.tensor([0, 1, -5, 1, 3, 4])), ValueError),
    ("student_hidden must be a floating", with_(student_hidden=torch.ones(6, 4, dtype=torch.long)),
     TypeError),
    ("teacher_weight must be a floating",
     with_(teacher_weight=torch.ones(11, 5, dtype=torch.int32)), TypeError),
    ("student_weight must have 2 dims", with_(student_weight=torch.randn(11, 4, 1)), ValueError),
    ("student_hidden must be a torch.Tensor", with_(student_hidden=[[1.0] * 4] * 6), TypeError),
    ("student_bias has 10 entries", with_(student_bias=torch.randn(10)), ValueError),
    ("one device", with_(labels=torch.zeros(6, dtype=torch.long, device="meta")), ValueError),
    ("one device", with_(teacher_weight=torch.randn(11, 5, device="meta")), ValueError),
    ("dtypes differ", with_(student_weight=torch.randn(11, 4, dtype=torch.bfloat16)), TypeError),
]


@pytest.mark.parametrize("match,args,error", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensors(match, args, error):
    with pytest.raises(error, match=match):
        fastkd.fused_distill_loss(**args)


BAD_OPTIONS = [
    ("temperature must be > 0", dict(temperature=0.0), ValueError),
    ("temperature must be > 0", dict(temperature=-1.0), ValueError),
    ("temperature must be finite", dict(temperature=float("nan")), ValueError),
    ("temperature must be a real number", dict(temperature="2"), TypeError),
    ("divergence must be one of", dict(divergence="kl"), ValueError),
    ("reduction must be one of", dict(reduction="avg"), ValueError),
    ("beta must lie strictly inside", dict(divergence="jsd", beta=0.0), ValueError),
    ("beta must lie strictly inside", dict(divergence="jsd", beta=1.0), ValueError),
    ("ce_weight must be >= 0", dict(ce_weight=-0.1), ValueError),
    ("kd_weight must be >= 0", dict(kd_weight=-1.0), ValueError),
    ("student_softcap must be > 0", dict(student_softcap=0.0), ValueError),
    ("student_logit_scale must be > 0", dict(student_logit_scale=0.0), ValueError),
    ("teacher_logit_scale must be > 0", dict(teacher_logit_scale=-2.0), ValueError),
    ("student_logit_scale must be finite", dict(student_logit_scale=float("nan")), ValueError),
    ("teacher_logit_scale must be finite", dict(teacher_logit_scale=float("inf")), ValueError),
    ("student_logit_scale must be a real number", dict(student_logit_scale=True), TypeError),
    ("teacher_logit_scale must be a real number", dict(teacher_logit_scale="2"), TypeError),
    ("backend must be one of", dict(backend="cuda"), ValueError),
    ("chunk_size must be a positive int", dict(chunk_size=0), ValueError),
    ("ignore_index must be an int", dict(ignore_index=1.5), TypeError),
]


@pytest.mark.parametrize("match,kw,error", BAD_OPTIONS, ids=[b[0] + str(b[1]) for b in BAD_OPTIONS])
def test_bad_options(match, kw, error):
    with pytest.raises(error, match=match):
        fastkd.fused_distill_loss(**good(), **kw)


def test_labels_none_needs_zero_ce_weight():
    with pytest.raises(ValueError, match="labels=None needs ce_weight == 0"):
        fastkd.fused_distill_loss(**with_(labels=None))
    assert torch.isfinite(fastkd.fused_distill_loss(**with_(labels=None), ce_weight=0.0))


TRITON_ON_CPU = r"""
import os, sys, torch, fastkd
g = torch.Generator().manual_seed(0)
args = [torch.randn(5, 8, generator=g, requires_grad=True), torch.randn(30, 8, generator=g),
        torch.randn(5, 6, generator=g), torch.randn(31, 6, generator=g),
        torch.randint(0, 30, (5,), generator=g)]
if sys.argv[1] == "compiled-first":
    import triton  # imported for compiling, before any backend="triton" call
out = {}
for backend in ("triton", "torch"):
    try:
        out[backend] = fastkd.fused_distill_loss(*args, divergence="jsd", backend=backend).item()
    except ValueError as error:
        out[backend] = str(error)
print(repr((out, os.environ.get("TRITON_INTERPRET"))))
"""


def test_triton_backend_on_cpu_in_a_fresh_process():
    """Issue 25 item 6: backend="triton" on CPU tensors, TRITON_INTERPRET unset, each in a fresh
    process (the two run side by side). In a process that has not imported triton yet, fastkd
    switches Triton's interpreter on itself (for good) and the interpreted kernels give the torch
    path's loss; once triton was imported for compiling, a ValueError says what to set and when."""
    import ast
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {first: subprocess.Popen([sys.executable, "-c", TRITON_ON_CPU, first], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for first in ("fresh", "compiled-first")}
    results = {}
    for first, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results[first] = ast.literal_eval(stdout.strip().splitlines()[-1])
    (fresh, interpret), (compiled, still_unset) = results["fresh"], results["compiled-first"]
    assert isinstance(fresh["torch"], float) and isinstance(compiled["torch"], float)
    assert fresh["triton"] == pytest.approx(fresh["torch"], rel=1e-6) and interpret == "1"
    assert "TRITON_INTERPRET=1" in compiled["triton"] and still_unset is None
    assert "before the process starts" in compiled["triton"]


@pytest.mark.parametrize("name", ["FusedDistillLoss", "FusedSparseDistillLoss"])
def test_module_constructors_take_settings_by_name_only(name):
    """Every setting of the modules' constructors is keyword-only: a positional one is Python's
    TypeError, not a silently misplaced option."""
    import inspect

    module = getattr(fastkd, name)
    params = inspect.signature(module).parameters.values()
    assert all(p.kind is p.KEYWORD_ONLY for p in params), [p.name for p in params]
    with pytest.raises(TypeError, match="positional"):
        module(2.0)
    crit = module(temperature=2.0, divergence="jsd", beta=0.4, student_logit_scale=0.5)
    assert crit.options == fastkd.DistillOptions(temperature=2.0, divergence="jsd", beta=0.4,
                                                 student_logit_scale=0.5)


API = {"fused_distill_loss": (), "FusedDistillLoss": (),
       "fused_sparse_distill_loss": ("teacher_softcap", "teacher_logit_scale"),
       "FusedSparseDistillLoss": ("teacher_softcap", "teacher_logit_scale")}


@pytest.mark.parametrize("name", API)
def test_option_docs_and_signature_come_from_the_options_table(name):
    """Each API's signature and docstring list every option it takes, with the default and the
    description of its DistillOptions field, and none it does not take (the sparse loss's teacher
    comes as log-probabilities: no teacher softcap or scale)."""
    import dataclasses
    import inspect

    api = getattr(fastkd, name)
    fn = api.__init__ if inspect.isclass(api) else api
    doc = " ".join(inspect.getdoc(fn).split())
    params = inspect.signature(fn).parameters
    for field in dataclasses.fields(fastkd.DistillOptions):
        if field.name in API[name]:
            assert field.name not in params and f"{field.name} (" not in doc, field.name
            continue
        assert params[field.name].default == field.default, field.name
        line = f"{field.name} ({field.type}, default {field.default!r}): {field.metadata['doc']}"
        assert " ".join(line.split()) in doc, field.name


def test_docs_option_table_matches_the_signature():
    """docs/loss.md's table of arguments gives each one's default as the signature has it (the
    options' from DistillOptions' fields), and lists every option."""
    import ast
    import inspect
    import re
    from pathlib import Path

    params = inspect.signature(fastkd.fused_distill_loss).parameters
    listed = set()
    for line in (Path(__file__).parents[1] / "docs" / "loss.md").read_text().splitlines():
        cells = line.split(" | ")
        names = re.findall(r"`(\w+)`", cells[0])
        if len(cells) < 3 or not names or not set(names) <= set(params):
            continue
        defaults = [ast.literal_eval(x) for x in re.findall(r"`([^`]+)`", cells[1])]
        for name, default in zip(names, defaults * len(names) if len(defaults) == 1 else defaults,
                                 strict=True):
            assert params[name].default == default, (name, default)
            listed.add(name)
    assert {f.name for f in dataclasses.fields(fastkd.DistillOptions)} <= listed


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        fastkd.FusedDistillLoss(temperature=0)
    with pytest.raises(ValueError, match="backend"):
        fastkd.FusedDistillLoss(backend="gpu")


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


def on_device(args):
    return {k: v.detach().to(DEVICE).requires_grad_(v.requires_grad) for k, v in args.items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_never_allocates_n_by_v(backend):
    from fastkd.autograd import ROW_ALIGN

    n, d, vocab, chunk = 300, 16, 3001, 32
    args = on_device(good(n=n, d_s=d, d_t=d, vocab=vocab, vocab_t=vocab))
    # fp32 bytes of a chunk of logits (rows padded to ROW_ALIGN), a weight, the hidden states
    padded = -(-vocab // ROW_ALIGN) * ROW_ALIGN
    bound = 4 * max(chunk * padded, vocab * d, n * d)
    assert bound * 8 <= 4 * n * vocab
    with LargestTensor() as probe:
        fastkd.fused_distill_loss(**args, divergence="jsd", chunk_size=chunk,
                                  backend=backend).backward()
    assert probe.largest <= bound, (probe.largest, bound)
    # the probe sees full logits when they exist: the spec materialises them
    with LargestTensor() as probe:
        fastkd.fused_distill_loss(**on_device(good(n=n, d_s=d, d_t=d, vocab=vocab, vocab_t=vocab)),
                                  backend="reference").backward()
    assert probe.largest >= 4 * n * vocab


def test_default_chunk_size_bounds_memory():
    from fastkd.autograd import CPU_CHUNK_BUDGET, CPU_ROW_OP_COPIES, default_chunk_size

    cpu = torch.device("cpu")
    assert default_chunk_size(10, 128256, 128256, 4, cpu) == 10  # never more rows than tokens
    rows = default_chunk_size(100_000, 128256, 128256, 4, cpu)
    assert rows * (128256 * 2) * 4 * CPU_ROW_OP_COPIES <= CPU_CHUNK_BUDGET and rows >= 1
    rows = default_chunk_size(100_000, 256000, 256000, 2, torch.device("cuda"))
    assert rows % 128 == 0 and rows * 512000 * 2 <= 512 * 2**20


@pytest.mark.skipif(DEVICE.type != "cpu", reason="measures the CPU path's resident memory")
@pytest.mark.parametrize("divergence", ["jsd", "forward_kl"])
def test_cpu_default_chunk_keeps_its_memory_budget(divergence):
    """The CPU budget counts what the torch row op really allocates, not just the logits: the
    peak resident memory of a fwd+bwd beyond the inputs stays within it (plus the gradients)."""
    from _bench import import_bench

    from fastkd.autograd import CPU_CHUNK_BUDGET, default_chunk_size

    measure_peak = import_bench("harness").measure_peak
    n, d, vocab = 1536, 32, 32000
    args = good(n=n, d_s=d, d_t=d, vocab=vocab, vocab_t=vocab)
    chunk = default_chunk_size(n, vocab, vocab, 4, torch.device("cpu"))
    assert 8 <= chunk < n  # several chunks

    def step():
        loss = fastkd.fused_distill_loss(**args, divergence=divergence, temperature=2.0)
        return torch.autograd.grad(loss, (args["student_hidden"], args["student_weight"]))

    step()
    grads, peak = measure_peak(step, torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc peak-RSS accounting on this system")
    extra = peak - sum(g.numel() * g.element_size() for g in grads)
    assert extra <= 1.15 * CPU_CHUNK_BUDGET, (divergence, extra / 2**20)


def test_fits_a_fullgraph_compiled_graph_with_check_labels_false():
    """check_labels=False has no host sync and the chunk loop is one custom op: torch.compile(
    fullgraph=True) traces the loss whole (a graph break would raise), and the compiled loss and
    gradients equal eager ones (ignored tokens included, computed and masked), and so does the
    components' entropy (the `Components` tuple traces too)."""
    args = good(n=9, vocab=50, vocab_t=53)
    args["labels"][:3] = -100

    def loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
        out = fastkd.fused_distill_loss(student_hidden, student_weight, teacher_hidden,
                                        teacher_weight, labels, temperature=2.0,
                                        divergence="jsd", check_labels=False,
                                        student_logit_scale=0.7, return_components=True)
        return out.loss, out.entropy

    def step(fn):
        loss, entropy = fn(**args)
        return loss, entropy, *torch.autograd.grad(loss, (args["student_hidden"],
                                                          args["student_weight"]))

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(step(compiled), step(loss_fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("where", ["teacher NaN", "teacher inf", "student NaN"])
def test_a_non_finite_model_output_gives_a_nan_loss_never_a_finite_one(backend, where):
    """NaN or inf from either model on one counted token makes the loss NaN on every backend and
    divergence, never a finite loss over NaN gradients (forward and skew forward KL once dropped
    the teacher's NaN as if p were 0: 0 log 0)."""
    for divergence in DIVERGENCES:
        args = good()
        hidden = "student_hidden" if where.startswith("student") else "teacher_hidden"
        with torch.no_grad():
            args[hidden][3, 1] = float("nan") if where.endswith("NaN") else float("inf")
        args = on_device(args)
        loss = fastkd.fused_distill_loss(**args, divergence=divergence, temperature=2.0,
                                         backend=backend)
        assert torch.isnan(loss), (divergence, loss)
        if backend == "reference":  # full logits: like plain PyTorch, a NaN at an ignored
            continue  # token still reaches dW through 0 * NaN
        # the same token ignored: loss and gradients finite again (compaction drops the token)
        labels = args["labels"].clone()
        labels[3] = -100
        loss = fastkd.fused_distill_loss(**{**args, "labels": labels}, divergence=divergence,
                                         temperature=2.0, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(args["student_weight"].grad).all(), (
            divergence)
