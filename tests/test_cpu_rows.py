"""The fused CPU row ops (fastkd/cpu_rows.py, cpu_rows.cpp) against the float64 spec, row op by
row op: every divergence and tail, sizes that are not multiples of the 16-wide vectors, ignored
tokens, T != 1, softcaps and logit scales on both heads, extreme logits, NaN from a model, bf16
and fp16 buffers; a zero weight skipping its term; the fallback where nothing can be built.
(The public losses on the CPU path run these row ops too: tests/test_distill.py and
tests/test_sparse.py hold them to the spec end to end.)"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _spec_check import TOL

import fastkd
from fastkd import DistillOptions, cpu_rows, reference
from fastkd.autograd import padded_rows

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
CPU = torch.device("cpu")

built = pytest.mark.skipif(cpu_rows.library() is None, reason="no C++ compiler here")


def _buffer(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in a padded chunk buffer, as the chunk loop passes it."""
    buf = padded_rows(x.shape[0], x.shape[1], dtype, CPU)
    buf.copy_(x)
    return buf


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g}"


def dense_case(n=13, vocab=1003, shared=997, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, shared, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[3] = -100
    row_scale = torch.rand(n, generator=g, dtype=torch.float64)
    return s, t, labels, row_scale


def run_dense(s, t, labels, row_scale, opts, dtype=torch.float32, grad=True, components=True):
    """The native row op on copies of s, t in dtype: (G or the untouched buffer, out)."""
    buf = _buffer(s, dtype)
    out = torch.full((s.shape[0], 4), math.nan)
    t_buf = None if t is None else _buffer(t, dtype)
    assert cpu_rows.dense_rows(buf, t_buf, labels, row_scale.float(), out, opts, grad, components)
    return buf, out


def spec_dense(s, t, labels, row_scale, opts, dtype=torch.float32):
    """The spec in float64 on the logits rounded to dtype, as the row op sees them."""
    s, t = (x.to(dtype).double() for x in (s, t))
    per_token, grad = reference.token_losses_and_grad(s, t, labels, opts)
    return grad * row_scale.float().double().unsqueeze(-1), torch.stack(per_token.columns(), 1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("heads", [{}, {"student_softcap": 6.0, "teacher_softcap": 9.0,
                                        "student_logit_scale": 0.8, "teacher_logit_scale": 1.3}])
@built
def test_dense_rows_match_the_spec(divergence, heads):
    """Odd V and K (K < V), an ignored row, T != 1, the heads' scales and softcaps."""
    s, t, labels, row_scale = dense_case()
    opts = DistillOptions(temperature=1.7, divergence=divergence, beta=0.3, skew=0.2, **heads)
    grad, out = run_dense(s, t, labels, row_scale, opts)
    want_grad, want_out = spec_dense(s, t, labels, row_scale, opts)
    _close(grad, want_grad, torch.float32, "grad")
    for k, name in enumerate(("loss", "ce", "kd", "entropy")):
        _close(out[:, k], want_out[:, k], torch.float32, name)
    assert torch.equal(grad[3], torch.zeros_like(grad[3])) and torch.equal(out[3], torch.zeros(4))


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_dense_rows_in_half_precision_buffers(dtype, divergence):
    """bf16 and fp16 logit buffers are read and written in place (the gradient rounded once)."""
    s, t, labels, row_scale = dense_case(n=7, vocab=515, shared=515, seed=1, scale=2.0)
    opts = DistillOptions(temperature=2.0, divergence=divergence)
    grad, out = run_dense(s, t, labels, row_scale, opts, dtype)
    assert grad.dtype == dtype
    want_grad, want_out = spec_dense(s, t, labels, row_scale, opts, dtype)
    _close(grad, want_grad, dtype, "grad")
    _close(out, want_out, torch.float32, "out")  # computed in fp32 from the rounded logits


@built
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_rows_at_extreme_logits_and_temperature_one(divergence):
    """Logits of magnitude 1e4 (every exp finite), T = 1 with K = V (CE's and q's exponentials
    shared), a row that is nearly one-hot."""
    s, t, labels, row_scale = dense_case(n=5, vocab=257, shared=257, seed=2, scale=3e3)
    opts = DistillOptions(temperature=1.0, divergence=divergence)
    grad, out = run_dense(s, t, labels, row_scale, opts)
    want_grad, want_out = spec_dense(s, t, labels, row_scale, opts)
    assert torch.isfinite(grad).all() and torch.isfinite(out).all()
    # 1e4 logits carry ~1e-3 of fp32 rounding; relative to the gradient's size, as plain torch
    assert (grad.double() - want_grad).abs().max() <= 1e-4 * want_grad.abs().max()
    assert (out[:, 0].double() - want_out[:, 0]).abs().max() <= 1e-5 * want_out[:, 0].abs().max()


@built
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_dense_rows_keep_a_models_nan(where):
    """A NaN logit makes that row's loss NaN (and its gradient), never a finite loss; the other
    rows are untouched by it."""
    s, t, labels, row_scale = dense_case(n=4, vocab=100, shared=100, seed=3)
    (s if where == "student" else t)[1, 17] = math.nan
    for divergence in DIVERGENCES:
        opts = DistillOptions(temperature=2.0, divergence=divergence)
        grad, out = run_dense(s, t, labels, row_scale, opts)
        assert math.isnan(out[1, 0]) and torch.isnan(grad[1]).any(), divergence
        assert torch.isfinite(out[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@built
def test_dense_rows_skip_a_zero_weighted_term_when_its_value_is_not_wanted():
    """components=False: kd_weight=0 runs no teacher work (t may be None: the value is NaN,
    never read), ce_weight=0 no CE pass; the loss and gradient are the spec's either way."""
    s, t, labels, row_scale = dense_case(n=6, vocab=301, shared=290, seed=4)
    ce_only = DistillOptions(ce_weight=1.0, kd_weight=0.0, temperature=2.0)
    grad, out = run_dense(s, None, labels, row_scale, ce_only, components=False)
    want_grad, want_out = spec_dense(s, t, labels, row_scale, ce_only)
    _close(grad, want_grad, torch.float32, "grad")
    _close(out[:, :2], want_out[:, :2], torch.float32, "loss, ce")
    assert torch.isnan(out[[0, 1, 2, 4, 5], 2:]).all()  # kd and entropy: not computed
    kd_only = DistillOptions(ce_weight=0.0, kd_weight=1.0, divergence="jsd")
    grad, out = run_dense(s, t, labels, row_scale, kd_only, components=False)
    want_grad, want_out = spec_dense(s, t, labels, row_scale, kd_only)
    _close(grad, want_grad, torch.float32, "grad")
    _close(out[:, [0, 2, 3]], want_out[:, [0, 2, 3]], torch.float32, "loss, kd, entropy")
    assert torch.isnan(out[[0, 1, 2, 4, 5], 1]).all()  # ce: not computed


@built
def test_kd_weight_zero_runs_no_teacher_gemm(monkeypatch):
    """The CPU path at kd_weight=0 without return_components never forms the teacher's logits;
    with return_components it does (the kd component is reported), and both equal the spec."""
    from fastkd import dense

    calls = []
    real = dense.linear_into
    monkeypatch.setattr(dense, "linear_into",
                        lambda h, w, b, out: calls.append(w.shape) or real(h, w, b, out))
    g = torch.Generator().manual_seed(5)
    args = dict(student_hidden=torch.randn(20, 8, generator=g, requires_grad=True),
                student_weight=torch.randn(97, 8, generator=g, requires_grad=True),
                teacher_hidden=torch.randn(20, 12, generator=g),
                teacher_weight=torch.randn(97, 12, generator=g),
                labels=torch.randint(0, 97, (20,), generator=g))
    loss = fastkd.fused_distill_loss(**args, ce_weight=1.0, kd_weight=0.0)
    assert calls == []
    out = fastkd.fused_distill_loss(**args, ce_weight=1.0, kd_weight=0.0, return_components=True)
    assert calls and torch.isfinite(out.kd)
    want = reference.distill_loss(args["student_hidden"].double(),
                                  args["student_weight"].double(),
                                  args["teacher_hidden"].double(), args["teacher_weight"].double(),
                                  args["labels"], DistillOptions(ce_weight=1.0, kd_weight=0.0))
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert out.kd.item() == pytest.approx(want.kd.item(), rel=1e-5)


def sparse_case(n=11, vocab=701, k=19, seed=6, tail="bucket"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    log_p = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2, -1)
    top = log_p.topk(k, -1)
    ids, logprobs = top.indices.clone(), top.values.float()
    ids[2, 5:] = -1  # unused slots
    ids[5, 0] = -1
    if tail == "ignore":
        ids[4, 1] = ids[4, 0]  # a repeated id: sampled targets add up
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[3] = -100
    labels[6] = ids[6, 2]  # a label among the slots
    return s, ids, logprobs, labels, torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tail,divergence", [("bucket", d) for d in DIVERGENCES]
                         + [("renormalize", d) for d in DIVERGENCES]
                         + [("ignore", "forward_kl")])
@built
def test_sparse_rows_match_the_spec(tail, divergence):
    s, ids, logprobs, labels, row_scale = sparse_case(tail=tail)
    opts = DistillOptions(temperature=1.5, divergence=divergence, beta=0.4, skew=0.3,
                          student_softcap=7.0, student_logit_scale=0.9)
    buf = _buffer(s, torch.float32)
    out = torch.full((s.shape[0], 4), math.nan)
    assert cpu_rows.sparse_rows(buf, ids.int(), logprobs, labels, row_scale.float(), out, opts,
                                tail, True)
    per_token, grad = reference.sparse_token_losses_and_grad(
        s.float().double(), ids, logprobs.double(), labels, opts, tail)
    _close(buf, grad * row_scale.float().double().unsqueeze(-1), torch.float32, "grad")
    _close(out, torch.stack(per_token.columns(), 1), torch.float32, "out")


@built
def test_sparse_rows_when_the_slots_cover_the_vocabulary():
    """bucket with no rest bucket (the ids are the whole vocabulary), renormalize with a row whose
    slots carry no mass (P = 0: no divergence)."""
    n, vocab = 3, 40
    g = torch.Generator().manual_seed(7)
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    ids = torch.argsort(torch.rand(n, vocab, generator=g), -1)
    logprobs = log_p.gather(-1, ids).float()
    labels = torch.randint(0, vocab, (n,), generator=g)
    opts = DistillOptions(temperature=2.0, divergence="jsd")
    for tail, lp in (("bucket", logprobs), ("renormalize", logprobs.index_fill(0, torch.tensor(
            [1]), -math.inf))):
        buf = _buffer(s, torch.float32)
        out = torch.empty(n, 4)
        assert cpu_rows.sparse_rows(buf, ids, lp, labels, torch.ones(n), out, opts, tail, True)
        per_token, grad = reference.sparse_token_losses_and_grad(s.float().double(), ids,
                                                                 lp.double(), labels, opts, tail)
        _close(buf, grad, torch.float32, f"{tail} grad")
        _close(out, torch.stack(per_token.columns(), 1), torch.float32, f"{tail} out")


def test_without_a_compiler_the_spec_runs_and_says_so_once(tmp_path, monkeypatch):
    """No C++ compiler (an empty cache, CXX pointing nowhere): one RuntimeWarning, and the CPU
    path runs the spec chunk by chunk, with the same results."""
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_rows, "_STATE", {})
    g = torch.Generator().manual_seed(8)
    args = dict(student_hidden=torch.randn(9, 8, generator=g), student_weight=torch.randn(
        50, 8, generator=g), teacher_hidden=torch.randn(9, 8, generator=g),
        teacher_weight=torch.randn(50, 8, generator=g), labels=torch.randint(0, 50, (9,),
                                                                             generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [fastkd.fused_distill_loss(**args, divergence="jsd", temperature=2.0)
                  for _ in range(2)]
    said = [w for w in caught if issubclass(w.category, RuntimeWarning)
            and "fused CPU row op is unavailable" in str(w.message)]
    assert len(said) == 1 and "no-such-compiler" in str(said[0].message)
    assert cpu_rows.library() is None and not list(tmp_path.rglob("*.so"))
    want = reference.distill_loss(*(args[k].double() for k in (
        "student_hidden", "student_weight", "teacher_hidden", "teacher_weight")), args["labels"],
        DistillOptions(divergence="jsd", temperature=2.0))
    for loss in losses:
        assert loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    # kd_weight=0 without components: no teacher GEMM there either (the spec gets the student
    # in the teacher's place, weighted 0)
    ce_only = DistillOptions(ce_weight=1.0, kd_weight=0.0)
    loss = fastkd.fused_distill_loss(**args, ce_weight=1.0, kd_weight=0.0)
    want = reference.distill_loss(*(args[k].double() for k in (
        "student_hidden", "student_weight", "teacher_hidden", "teacher_weight")), args["labels"],
        ce_only)
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-5)


@built
def test_the_build_is_cached_per_source_and_machine():
    """build() compiles once: a second call finds the file under the cache (its name keys the
    source, compiler, flags and CPU)."""
    first = cpu_rows.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_rows.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent.name == "native" and first.name.startswith("cpu_rows-")


_RACER = """
import ctypes, sys, time
from pathlib import Path
from fastkd import cpu_rows
cpu_rows.SOURCE = Path(sys.argv[1])
ready, go = Path(sys.argv[3] + ".ready"), Path(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.01)
path = cpu_rows.build(Path(sys.argv[2]))
print(path, ctypes.CDLL(str(path)).fastkd_answer())
"""


def test_concurrent_first_builds_publish_one_complete_library(tmp_path):
    """Two processes building into an empty cache at once (two trainings' first calls): each
    compiles in its own temp folder and renames the result into place, so both load the same
    complete file and no temp folder is left (a shared output path would let one load the
    other's half-written file). A one-function source keeps the builds short."""
    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int fastkd_answer() { return 42; }\n')
    cache, go = tmp_path / "cache", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(source), str(cache),
                                str(tmp_path / f"racer{i}"), str(go)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    while not all((tmp_path / f"racer{i}.ready").exists() for i in range(2)):
        assert all(r.poll() is None for r in racers), [r.communicate() for r in racers]
    go.touch()  # both start building now
    outs = [r.communicate(timeout=300) for r in racers]
    if any("no working C++ compiler" in err for _, err in outs):
        pytest.skip("no C++ compiler here")
    assert all(r.returncode == 0 for r in racers), outs
    (path_a, answer_a), (path_b, answer_b) = (out.split() for out, _ in outs)
    assert path_a == path_b and answer_a == answer_b == "42"
    assert [p.name for p in (cache / "native").iterdir()] == [Path(path_a).name]


@built
def test_routed_teachers_run_the_native_row_ops(monkeypatch):
    """The routed form's dense and sparse members run the native row ops (through the
    single-teacher forms' torch row ops), and the loss and the student's gradients equal the
    float64 spec."""
    from test_multi_teacher import routed_problem, run

    calls = []
    for name in ("dense_rows", "sparse_rows"):
        real = getattr(cpu_rows, name)
        monkeypatch.setattr(cpu_rows, name, lambda *a, real=real, name=name, **k: calls.append(
            name) or real(*a, **k))
    problem = routed_problem(lead=(2, 11), seed=4)
    loss, grads = run(problem, "torch", temperature=1.5, divergence="jsd", chunk_size=6)
    assert set(calls) == {"dense_rows", "sparse_rows"}
    want, want_grads = run(problem, "spec", temperature=1.5, divergence="jsd")
    _close(loss.reshape(1), want.reshape(1), torch.float32, "loss")
    for name, grad in grads.items():
        _close(grad, want_grads[name], torch.float32, name)


@built
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_sparse_rows_at_extreme_logits(tail):
    """Logits of magnitude 1e4: every exp finite, the dense term of renormalize (none) never
    0 x inf."""
    s, ids, logprobs, labels, row_scale = sparse_case(n=8, vocab=301, k=7, seed=9, tail=tail)
    s = s * 3e3
    opts = DistillOptions(temperature=2.0, divergence="forward_kl")
    buf = _buffer(s, torch.float32)
    out = torch.empty(s.shape[0], 4)
    assert cpu_rows.sparse_rows(buf, ids, logprobs, labels, row_scale.float(), out, opts, tail,
                                True)
    per_token, grad = reference.sparse_token_losses_and_grad(
        s.float().double(), ids, logprobs.double(), labels, opts, tail)
    assert torch.isfinite(buf).all() and torch.isfinite(out).all()
    want = grad * row_scale.float().double().unsqueeze(-1)
    assert (buf.double() - want).abs().max() <= 1e-4 * want.abs().max()
    _close(out[:, 0], per_token.loss, torch.float32, "loss")
