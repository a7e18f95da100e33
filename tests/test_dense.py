"""The fused dense loss against the float64 plain-torch spec, on both row ops: the chunked torch
path and the Triton kernels (under TRITON_INTERPRET=1, see conftest.py). Loss and every gradient
are compared.

The bf16 cases through backend="triton" also guard the interpreter's known bf16 `tl.dot` fault
(Triton 3.9 returns garbage for bf16 dot operands): any bf16 operand reaching a dot would fail
them.
"""

from __future__ import annotations

import functools
import itertools
import pickle

import pytest
import torch
from _device import DEVICE, ON_GPU
from _spec_check import assert_close, check_against_spec

import fastkd
from fastkd import DistillOptions, reference

BACKENDS = ["torch", "triton"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def make_inputs(n=77, d_s=24, d_t=40, vocab=1003, vocab_t=1011, dtype=torch.float32, bias=True,
                ignore_every=5, scale=1.0, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    lead = lead or (n,)
    inputs = dict(
        student_hidden=randn(*lead, d_s, s=scale).requires_grad_(),
        student_weight=randn(vocab, d_s, s=0.5).requires_grad_(),
        teacher_hidden=randn(*lead, d_t, s=scale),
        teacher_weight=randn(vocab_t, d_t, s=0.5),
        labels=torch.randint(0, vocab, lead, generator=g),
    )
    if ignore_every:
        inputs["labels"].view(-1)[::ignore_every] = -100
    if bias:
        inputs["student_bias"] = randn(vocab).requires_grad_()
        inputs["teacher_bias"] = randn(vocab_t)
    return {k: v.detach().to(DEVICE).requires_grad_(v.requires_grad) for k, v in inputs.items()}


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run(inputs, backend, upstream=None, components=False, **kw):
    """Loss (with components=True: all of return_components' `Components`, entropy included) and
    the student gradients; backend "spec" is the reference in float64."""
    args = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().double() if backend == "spec" else x.detach().clone()
            x.requires_grad_(name in STUDENT and inputs[name].requires_grad)
        args[name] = x
    parts = fastkd.fused_distill_loss(**args, backend="reference" if backend == "spec"
                                      else backend, return_components=True, **kw)
    loss = parts.loss
    out = loss if upstream is None else loss * upstream.to(loss.device, loss.dtype)
    out.sum().backward()
    grads = {k: args[k].grad for k in STUDENT if k in args and args[k].requires_grad}
    if components:
        return fastkd.Components(*(x.detach() for x in parts.columns())), grads
    return loss.detach(), grads


def check(inputs, backend, dtype, upstream=None, **kw):
    return check_against_spec(run, inputs, backend, dtype, upstream, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_spec(backend, divergence, dtype):
    # odd sizes, a padded teacher vocab, biases, ignored tokens, T != 1, chunks that split N
    # unevenly
    inputs = make_inputs(dtype=dtype)
    check(inputs, backend, dtype, temperature=2.0, divergence=divergence, beta=0.3, skew=0.2,
          chunk_size=20)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcaps_and_logit_scales(backend, divergence):
    # each model's logit scale with and without its softcap, each cap with and without a scale
    inputs = make_inputs(n=33, scale=3.0, seed=1)
    for heads in ({"student_softcap": 4.0, "teacher_logit_scale": 1.7},
                  {"teacher_softcap": 3.0, "student_logit_scale": 0.6},
                  {"student_softcap": 5.0, "teacher_softcap": 2.5, "student_logit_scale": 1.8,
                   "teacher_logit_scale": 0.7}):
        check(inputs, backend, torch.float32, temperature=1.5, divergence=divergence, **heads)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperatures(backend, temperature):
    inputs = make_inputs(n=29, vocab=517, vocab_t=517, seed=2)
    check(inputs, backend, torch.float32, temperature=temperature, divergence="reverse_kl")


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_weights(backend, weights):
    inputs = make_inputs(n=21, vocab=300, vocab_t=300, seed=3)
    check(inputs, backend, torch.float32, ce_weight=weights[0], kd_weight=weights[1],
          temperature=2.0, divergence="jsd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels(backend):
    inputs = make_inputs(n=19, vocab=257, vocab_t=250, seed=4)
    inputs["labels"] = None
    check(inputs, backend, torch.float32, ce_weight=0.0, kd_weight=1.0, temperature=3.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_with_upstream_gradient(backend, reduction):
    inputs = make_inputs(n=23, vocab=411, vocab_t=400, seed=5, lead=(3, 23 // 3 + 1))
    lead = inputs["labels"].shape
    # "not the last layer": the loss is scaled (per token for "none") before backward
    upstream = torch.tensor(-2.5)
    if reduction == "none":
        upstream = torch.randn(lead, generator=torch.Generator().manual_seed(9))
    loss, _ = check(inputs, backend, torch.float32, upstream, reduction=reduction,
                    divergence="forward_kl", temperature=2.0, chunk_size=7)
    assert loss.shape == (lead if reduction == "none" else ())
    if reduction == "none":
        assert (loss[inputs["labels"] == -100] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend, reduction):
    inputs = make_inputs(n=9, vocab=130, vocab_t=130, seed=6)
    inputs["labels"].fill_(-100)
    loss, grads = run(inputs, backend, reduction=reduction, divergence="jsd")
    assert torch.equal(loss, torch.zeros_like(loss))
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocabularies(backend):
    for vocab, vocab_t in ((515, 500), (500, 515)):  # student larger, then teacher larger
        inputs = make_inputs(n=17, vocab=vocab, vocab_t=vocab_t, seed=7)
        check(inputs, backend, torch.float32, divergence="reverse_kl", temperature=0.7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, divergence):
    # logits of magnitude ~1e4: the online max must keep every exp finite
    inputs = make_inputs(n=13, d_s=8, d_t=8, vocab=200, vocab_t=200, seed=8, bias=False)
    with torch.no_grad():
        inputs["student_hidden"].mul_(2e3)
        inputs["teacher_hidden"].mul_(2e3)
    s = inputs["student_hidden"] @ inputs["student_weight"].T
    assert s.abs().max() > 5e3
    # fp32 logits near 1e4 carry ~1e-3 absolute rounding from the GEMM alone, which the cancelling
    # reverse-KL gradient amplifies; 1e-4 of the largest gradient is what fp32 plain torch reaches.
    loss, grads = run(inputs, backend, divergence=divergence, temperature=2.0)
    want_loss, want_grads = run(inputs, "spec", divergence=divergence, temperature=2.0)
    assert torch.isfinite(loss) and abs(loss.double() - want_loss) <= 1e-5 * want_loss.abs()
    for name, grad in grads.items():
        err = (grad.double() - want_grads[name]).abs().max() / want_grads[name].abs().max()
        assert torch.isfinite(grad).all() and err <= 1e-4, (name, float(err))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab(backend):
    inputs = make_inputs(n=5, d_s=8, d_t=12, vocab=70001, vocab_t=70013, seed=10)
    check(inputs, backend, torch.float32, divergence="forward_kl", temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16(backend):
    inputs = make_inputs(n=31, vocab=600, vocab_t=610, dtype=torch.float16, seed=11)
    check(inputs, backend, torch.float16, divergence="jsd", temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_sizes_agree(backend):
    inputs = make_inputs(n=41, vocab=333, vocab_t=333, seed=12)
    kw = dict(divergence="jsd", temperature=2.0)
    want_loss, want_grads = run(inputs, backend, chunk_size=41, **kw)
    for chunk in (1, 6, 40, 1000):
        loss, grads = run(inputs, backend, chunk_size=chunk, **kw)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    inputs = make_inputs(n=30, vocab=257, vocab_t=260, seed=13, lead=(3, 10))
    # typical next-token shift: hidden[:, :-1] with labels[:, 1:]; weights as transposed views
    full = {k: v for k, v in inputs.items()}
    args = dict(full)
    args["student_hidden"] = full["student_hidden"].detach()[:, :-1].requires_grad_()
    args["teacher_hidden"] = full["teacher_hidden"][:, :-1]
    args["labels"] = full["labels"][:, 1:]
    args["student_weight"] = full["student_weight"].detach().t().contiguous().t().requires_grad_()
    assert not args["student_hidden"].is_contiguous()
    assert not args["student_weight"].is_contiguous()
    assert not args["labels"].is_contiguous()
    check(args, backend, torch.float32, divergence="forward_kl", temperature=2.0, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_master_weights(backend):
    inputs = make_inputs(n=25, vocab=301, vocab_t=301, seed=14)
    kw = dict(divergence="forward_kl", temperature=2.0, chunk_size=8)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grads = run(inputs, backend, **kw)
    want_loss, want_grads = run(inputs, "spec", **kw)
    assert_close(loss, want_loss, torch.bfloat16, "loss")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # each gradient in its input's own dtype
        assert_close(grad, want_grads[name], torch.bfloat16, name)
    # it really computed in bf16: not bitwise the fp32 answer
    fp32_loss, _ = run(inputs, backend, **kw)
    assert not torch.equal(loss.float(), fp32_loss)


def test_no_worse_than_plain_torch_in_same_dtype():
    # bf16 fused vs bf16 plain torch (the reference on bf16 inputs), both against the fp64 spec
    inputs = make_inputs(n=64, vocab=2003, vocab_t=2003, dtype=torch.bfloat16, seed=15)
    kw = dict(divergence="forward_kl", temperature=2.0)
    want_loss, want_grads = run(inputs, "spec", **kw)
    for backend in BACKENDS:
        loss, grads = run(inputs, backend, **kw)
        plain_loss, plain_grads = run(inputs, "reference", **kw)
        err = (loss.double() - want_loss).abs()
        plain_err = (plain_loss.double() - want_loss).abs()
        assert err <= 2 * plain_err + 1e-6, (backend, float(err), float(plain_err))
        for name in grads:
            e = (grads[name].double() - want_grads[name]).abs().max()
            pe = (plain_grads[name].double() - want_grads[name]).abs().max()
            assert e <= 2 * pe + 1e-6, (backend, name, float(e), float(pe))


def test_module_and_components():
    inputs = make_inputs(n=20, vocab=211, vocab_t=205, seed=16)
    kw = dict(temperature=2.0, ce_weight=0.3, kd_weight=0.7, divergence="jsd", beta=0.4)
    crit = fastkd.FusedDistillLoss(**kw, return_components=True)
    out = crit(**inputs)
    loss, ce, kd = out  # unpacks to three; the entropy is an attribute only
    assert (out.loss, out.ce, out.kd) == (loss, ce, kd) and len(out) == 3
    assert not ce.requires_grad and not kd.requires_grad and loss.requires_grad
    assert not out.entropy.requires_grad
    opts = DistillOptions(**kw)
    d = {k: (v.detach().double() if v.is_floating_point() else v) for k, v in inputs.items()}
    want = reference.distill_loss(d["student_hidden"], d["student_weight"], d["teacher_hidden"],
                                  d["teacher_weight"], d["labels"], opts, d["student_bias"],
                                  d["teacher_bias"])
    for got, exp in zip(out.columns(), want.columns(), strict=True):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-7)
    copied = pickle.loads(pickle.dumps(fastkd.Components(*(x.detach() for x in out.columns()))))
    assert torch.equal(copied.entropy, out.entropy) and torch.equal(copied[2], kd)
    torch.testing.assert_close(loss.double(), 0.3 * want[1] + 0.7 * 4.0 * want[2])
    assert fastkd.fused_distill_loss(**inputs, **kw).item() == pytest.approx(loss.item(), rel=1e-6)


def test_only_student_tensors_get_gradients():
    inputs = make_inputs(n=12, vocab=99, vocab_t=99, seed=17)
    inputs["teacher_hidden"].requires_grad_()
    inputs["teacher_weight"].requires_grad_()
    inputs["student_weight"].requires_grad_(False)
    loss = fastkd.fused_distill_loss(**inputs)
    loss.backward()
    assert inputs["student_hidden"].grad is not None
    assert inputs["student_bias"].grad is not None
    assert inputs["student_weight"].grad is None
    assert inputs["teacher_hidden"].grad is None and inputs["teacher_weight"].grad is None


def test_no_grad_mode_returns_the_same_loss():
    inputs = make_inputs(n=12, vocab=99, vocab_t=99, seed=18)
    with torch.no_grad():
        loss = fastkd.fused_distill_loss(**inputs)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(fastkd.fused_distill_loss(**inputs).item(), rel=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kernel_writes_every_output(divergence):
    """Poison the outputs, run the kernel on one chunk, compare row by row with the torch row op."""
    from fastkd.autograd import padded_rows
    from fastkd.dense import DENSE_ROWS

    g = torch.Generator().manual_seed(19)
    n, vocab, shared = 11, 1500, 1400  # not multiples of the block; K < V
    s, t = (torch.randn(n, w, generator=g).mul(4).to(DEVICE) for w in (vocab, shared))
    labels = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    labels[3] = -100
    scale = torch.rand(n, generator=g).to(DEVICE)
    opts = DistillOptions(temperature=1.7, divergence=divergence, student_softcap=6.0,
                          teacher_softcap=9.0, student_logit_scale=0.8, teacher_logit_scale=1.3)
    results = {}
    for backend in BACKENDS:
        out = torch.full((n, 4), float("nan"), device=DEVICE)
        # the chunk loop's padded buffers, pad columns poisoned: the kernel reads them (its loads
        # are masked by the padded width) but must never let them into a result
        grad = padded_rows(n, vocab, s.dtype, DEVICE)
        teacher = padded_rows(n, shared, t.dtype, DEVICE)
        for buf, x in ((grad, s), (teacher, t)):
            buf.as_strided((n, buf.stride(0)), buf.stride()).fill_(float("nan"))
            buf.copy_(x)
        DENSE_ROWS.on(backend)(grad, teacher, labels, scale, out, opts, True)
        results[backend] = (grad, out)
    for got, want in zip(results["triton"], results["torch"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(results["triton"][0][3], torch.zeros(vocab, device=DEVICE))  # ignored row


COMPILE_SCRIPT = r"""
import itertools, json, re, subprocess, tempfile, triton
from pathlib import Path
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas
from fastkd.kernels.dense import DEFAULT_BLOCK_V, DEFAULT_NUM_WARPS
from fastkd.kernels.dense import dense_rows_kernel as kernel
from fastkd.kernels.dense import dense_grad_kernel, dense_partials_kernel, dense_stats_kernel
from fastkd.kernels.sparse import BLOCK_M_DEFAULT, TAIL_IDS, sparse_rows_kernel
PTXAS = get_ptxas(90).path  # the ptxas Triton itself builds sm_90 with; cuobjdump ships beside it
CUOBJDUMP = str(Path(PTXAS).with_name("cuobjdump"))
# Specialised as a launch on the chunk loop's padded buffers would be: pointers 16-byte aligned,
# row strides divisible by 16 (the JIT's "tt.divisibility" attribute); V and K odd (V = 50257).
aligned = ("s_ptr", "t_ptr", "y_ptr", "scale_ptr", "out_ptr", "stride_s", "stride_t")
flags = (True, False)
jobs = []  # (kernel, types, constexprs, aligned args, variant), compiled in parallel below


def analyse(name, types, consts, aligned_names, variant):
    kernel = globals()[name]  # by name: the pool pickles the job, not the JITFunction
    sig = dict(zip(kernel.arg_names, types, strict=True))
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": DEFAULT_NUM_WARPS})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        Path(tmp, "k.cubin").write_bytes(compiled.asm["cubin"])
        info = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", "-o", "/dev/null", f"{tmp}/k.ptx"],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([CUOBJDUMP, "-sass", f"{tmp}/k.cubin"], capture_output=True,
                              text=True, check=True).stdout
    # SASS: local-memory accesses (LDL/STL) and loops (backward branches: target < address)
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.+?);", sass)]
    local = [a for a, op in code if re.search(r"\b(LDL|STL)\b", op)]
    loops = [(int(m.group(1), 16), a) for a, op in code
             if (m := re.search(r"BRA\s+0x([0-9a-f]+)", op)) and int(m.group(1), 16) < a]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    # the instruction mix: SASS opcodes by family (the part before the first dot), in the whole
    # kernel and inside its loops (where the row's time goes)
    mix, in_loops = {}, 0
    for a, op in code:
        family = re.match(r"(?:@!?\w+\s+)?(\w+)", op).group(1)  # past a predicate (@P0, @!PT)
        mix[family] = mix.get(family, 0) + 1
        in_loops += any(lo <= a <= hi for lo, hi in loops)
    return dict(variant=variant, cubin=len(compiled.asm["cubin"]),
                sass=len(code), sass_in_loops=in_loops, mix=mix,
                loads=re.findall(r"ld\.global[\w.:]*", ptx),
                stores=re.findall(r"st\.global[\w.:]*", ptx),
                regs=int(re.search(r"Used (\d+) registers", info).group(1)),
                spill_bytes=sum(spills), local_ops=len(local), loops=len(loops),
                local_in_loops=sum(lo <= a <= hi for a in local for lo, hi in loops))


for dt, div, labels, caps, grad in itertools.product(("bf16", "fp32"), range(6), flags, flags,
                                                     flags):
    if dt == "fp32" and not (labels and grad):
        continue
    types = ["*" + dt, "*" + dt, "*i64", "*fp32", "*fp32", "i32", "i32", "i64", "i64", "i32"] + [
        "fp32"] * 8 + ["constexpr"] * 6
    consts = dict(DIVERGENCE=div, HAS_LABELS=labels, HAS_S_CAP=caps, HAS_T_CAP=caps,
                  COMPUTE_GRAD=grad, BLOCK_V=DEFAULT_BLOCK_V)
    jobs.append(("kernel", types, consts, aligned, [dt, div, labels, caps, grad]))

# the vocab-parallel entry points, bf16 with labels and softcaps
ptrs = ("s_ptr", "t_ptr", "y_ptr", "scale_ptr", "stride_s", "stride_t")
for div in range(6):
    caps = dict(HAS_S_CAP=True, HAS_T_CAP=True, BLOCK_V=DEFAULT_BLOCK_V, DIVERGENCE=div)
    jobs.append(("dense_stats_kernel", ["*bf16", "*bf16", "*i64", "*fp32", "i32", "i32", "i64",
                                        "i64", "i32", "i32"] + ["fp32"] * 5
                 + ["constexpr"] * 5, dict(HAS_LABELS=True, **caps), ptrs[:3] + ptrs[4:],
                 ["tp-stats", div]))
    if div >= 2:
        jobs.append(("dense_partials_kernel", ["*bf16", "*bf16", "*fp32", "*fp32", "i32", "i64",
                                               "i64"] + ["fp32"] * 6
                     + ["constexpr"] * 4, caps, ptrs[:2] + ptrs[4:], ["tp-partials", div]))
    jobs.append(("dense_grad_kernel", ["*bf16", "*bf16", "*i64", "*fp32", "*fp32", "i32", "i32",
                                       "i64", "i64", "i32", "i32"] + ["fp32"] * 8
                 + ["constexpr"] * 5, dict(HAS_LABELS=True, **caps), ptrs, ["tp-grad", div]))
# the cached-teacher (sparse) kernel: every tail and divergence it takes, bf16 logits, int32 ids
# (the cache's), k = 64 slots, labels and a softcap; with and without the gradient
for tail, div, grad in itertools.product(TAIL_IDS, range(6), flags):
    if (tail == "ignore" and div != 0) or (not grad and (tail, div) != ("bucket", 0)):
        continue
    jobs.append(("sparse_rows_kernel", ["*bf16", "*i32", "*fp32", "*i64", "*fp32", "*fp32",
                                        "i32", "i32", "i64", "i64", "i64", "i32"] + ["fp32"] * 6
                 + ["constexpr"] * 8,
                 dict(TAIL=TAIL_IDS[tail], DIVERGENCE=div, HAS_LABELS=True, HAS_S_CAP=True,
                      COMPUTE_GRAD=grad, BLOCK_V=DEFAULT_BLOCK_V, BLOCK_K=128,
                      BLOCK_M=BLOCK_M_DEFAULT),
                 ("s_ptr", "ids_ptr", "lp_ptr", "y_ptr", "scale_ptr", "out_ptr", "stride_s"),
                 ["sparse", tail, div, grad]))
# the mixture kernel (several dense teachers), bf16, labels and softcaps: every divergence and the
# ensemble at 2 and 4 teachers, forward KL and JSD at 1 and 3; without the gradient at 2
from fastkd.kernels.mixture import block_v_for, mixture_rows_kernel
mixture_cases = [(n, d, e, True) for n in (2, 4) for d, e in [*((d, False) for d in range(6)),
                                                             (0, True)]]
mixture_cases += [(n, d, False, True) for n in (1, 3) for d in (0, 2)]
mixture_cases += [(2, 0, e, False) for e in flags]
for num_t, div, ensemble, grad in mixture_cases:
    block_t = triton.next_power_of_2(num_t)
    jobs.append(("mixture_rows_kernel", ["*bf16", "*bf16", "*fp32", "*i64", "*fp32", "*fp32",
                                         "i32", "i32", "i64", "i64", "i64", "i32"]
                 + ["fp32"] * 14 + ["constexpr"] * 9,
                 dict(DIVERGENCE=div, ENSEMBLE=ensemble, HAS_LABELS=True, HAS_S_CAP=True,
                      HAS_T_CAP=True, COMPUTE_GRAD=grad, NUM_T=num_t, BLOCK_T=block_t,
                      BLOCK_V=block_v_for(block_t)),
                 ("s_ptr", "t_ptr", "w_ptr", "y_ptr", "scale_ptr", "out_ptr", "stride_s",
                  "stride_t", "stride_tt"), ["mixture", num_t, div, ensemble, grad]))
# compile in parallel (fork: the workers inherit the kernels); results in job order
import multiprocessing, os
with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
    report = pool.starmap(analyse, jobs)
print(json.dumps(report))
"""


def test_kernel_compiles_for_hopper_with_vector_accesses_and_no_spills():
    """The interpreter is lenient; the real compiler is not. Build sm_90 cubins without a GPU,
    specialised as a launch on padded buffers would be, and read the PTX, ptxas's report and the
    SASS: every logit load and store is 128-bit (`.v4`) at V = 50257, and no local-memory access
    sits inside a loop. It also reports each variant's registers and SASS instruction mix (printed
    with -s), the numbers a kernel change is held to. Every kernel: the fused row kernel, the
    vocab-parallel entry points, the cached-teacher (sparse) kernel, whose k-slot gathers and
    scatters are scalar by nature, and the mixture kernel (1 to 4 teachers; its student stores
    64-bit from 3 teachers on). (ptxas parks a loop-invariant value or two in local memory in a
    few variants, stored once before the row loops and loaded once after: 8-32 bytes per program,
    reported as spill_bytes; the assertion is on what would cost, a spill in the loops.) Passes with
    Triton 3.9 and with 3.6, the version in the GPU machines' image."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in report:  # with -s: what a kernel change must keep (registers, instruction mix)
        top = sorted(r["mix"].items(), key=lambda kv: -kv[1])[:8]
        print(r["variant"], f"regs {r['regs']} sass {r['sass']} in loops {r['sass_in_loops']}",
              " ".join(f"{op} {n}" for op, n in top))
    mixture = [r for r in report if r["variant"][0] == "mixture"]
    assert len(mixture) == 2 * 7 + 2 * 2 + 2
    for r in mixture:  # the teachers' block and the student's row vectorised, no spill in loops
        num_t, grad = r["variant"][1], r["variant"][4]
        assert r["cubin"] > 1000 and r["loops"] >= 1, r
        assert r["local_in_loops"] == 0 and r["spill_bytes"] <= 32 and r["local_ops"] <= 8, r
        assert any(".v4." in x for x in r["loads"]), (r["variant"], r["loads"])
        if grad:  # 128-bit up to 2 teachers (kernels/mixture.py, block_v_for), else 64-bit
            wide = ".v4." if num_t <= 2 else ".v2."
            assert any(wide in x for x in r["stores"]), (r["variant"], r["stores"])
    report = [r for r in report if r not in mixture]
    sparse = [r for r in report if r["variant"][0] == "sparse"]
    tp = [r for r in report if str(r["variant"][0]).startswith("tp-")]
    assert len(sparse) == 6 + 6 + 1 + 1
    for r in sparse:  # dense passes over the row vectorised; the k-slot gathers/scatters scalar
        assert r["cubin"] > 1000 and r["loops"] >= 1, r
        assert r["local_in_loops"] == 0 and r["spill_bytes"] <= 32 and r["local_ops"] <= 8, r
        assert any(".v4." in x for x in r["loads"]), (r["variant"], r["loads"])
        if r["variant"][3]:
            assert any(".v4." in x for x in r["stores"]), (r["variant"], r["stores"])
    report = [r for r in report if r not in sparse]
    assert len(report) - len(tp) == 6 * 8 + 6 * 2 and len(tp) == 6 + 4 + 6
    for r in report:
        if r in tp:  # the vocab-parallel entry points: labels and softcaps, bf16
            name = r["variant"][0]
            dt, labels, grad = "bf16", name != "tp-partials", name == "tp-grad"
        else:
            dt, _, labels, _, grad = r["variant"]
        assert r["cubin"] > 1000, r["variant"]
        assert r["loops"] >= 1, r  # the SASS parse found the row loop(s)
        # outside the loops: a handful of local accesses once per program cost nothing measurable
        # (Triton 3.9: at most 16 bytes, 4 accesses; 3.6, the GPU image's: 32 bytes, 8 accesses)
        assert r["local_in_loops"] == 0 and r["spill_bytes"] <= 32 and r["local_ops"] <= 8, r
        # scalar accesses in the logits' width: only the label's logit s_y (a single element)
        scalar = "ld.global.b16" if dt == "bf16" else "ld.global.b32"
        n_scalar = r["loads"].count(scalar) - (dt == "fp32")  # fp32: the row scale is one more
        assert n_scalar <= int(labels), (r["variant"], r["loads"])
        assert any(".v4." in x for x in r["loads"]), (r["variant"], r["loads"])
        if grad:
            assert any(".v4." in x for x in r["stores"]), (r["variant"], r["stores"])
            assert "st.global.b16" not in r["stores"], (r["variant"], r["stores"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_in_its_own_dtype(backend):
    # an fp32 student beside a bf16 teacher: each model's GEMM runs in its own dtype
    inputs = make_inputs(n=19, vocab=301, vocab_t=310, seed=20)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        inputs[name] = inputs[name].bfloat16()
    # the teacher's logits are bf16-rounded (the spec forms them in fp64): bf16 tolerance
    loss, grads = check(inputs, backend, torch.bfloat16, divergence="forward_kl", temperature=2.0)
    assert loss.dtype == torch.float32 and grads["student_weight"].dtype == torch.float32


def test_half_precision_dw_accumulates_in_fp32():
    from fastkd import autograd

    g = torch.Generator().manual_seed(21)
    a = torch.randn(64, 24, generator=g).bfloat16().to(DEVICE)
    b = torch.randn(24, 16, generator=g).bfloat16().to(DEVICE)
    acc = torch.full((64, 16), 1e4, device=DEVICE)  # a bf16 accumulator would round it away
    accumulate = autograd.MatmulAccumulator(acc)
    accumulate.SLAB = 24  # rows 0:24, 24:48 and a short last slab 48:64
    want = 1e4 + 3 * a.double().matmul(b.double())
    for _ in range(3):  # its buffers reused
        accumulate(a, b)
    assert acc.dtype == torch.float32  # a bf16 one's ulp at 1e4 is 64; each product rounds to
    torch.testing.assert_close(acc.double(), want, rtol=0, atol=3 * 0.05)  # bf16 (|ab| < 25)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_on_the_torch_path_stays_float64(reduction):
    # the chunked torch path must not round fp64 inputs through fp32 anywhere
    inputs = make_inputs(n=23, vocab=301, vocab_t=290, dtype=torch.float64, seed=22)
    upstream = torch.randn(23, dtype=torch.float64, device=DEVICE) if reduction == "none" else None
    kw = dict(divergence="jsd", temperature=2.0, chunk_size=7, reduction=reduction)
    loss, grads = run(inputs, "torch", upstream, **kw)
    want_loss, want_grads = run(inputs, "spec", upstream, **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
    for name, grad in grads.items():
        assert grad.dtype == torch.float64, name
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_labels(backend):
    # the kernel reads label i at y_ptr + i: a strided column or an expanded scalar must arrive as
    # the logical values, not as whatever memory lies at those offsets
    inputs = make_inputs(n=24, vocab=301, vocab_t=301, seed=23)
    two = torch.stack([inputs["labels"], torch.randint_like(inputs["labels"], 0, 301)], dim=1)
    for labels in (two[:, 0], torch.tensor(7, device=DEVICE).expand(24)):
        assert not labels.is_contiguous()
        args = {**inputs, "labels": labels}
        check(args, backend, torch.float32, divergence="jsd", temperature=2.0, chunk_size=10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_ids_at_minus_inf(backend, divergence):
    # banned or masked teacher ids (logit -inf, p = 0) add 0 log 0 = 0; reverse KL is +inf where
    # the student puts mass on them, as the math says
    inputs = make_inputs(n=14, vocab=260, vocab_t=260, seed=24)
    with torch.no_grad():
        inputs["teacher_bias"][::7] = float("-inf")
    kw = dict(divergence=divergence, temperature=2.0)
    if divergence == "reverse_kl":
        loss, _ = run(inputs, backend, **kw)
        assert loss.item() == float("inf")
        return
    check(inputs, backend, torch.float32, **kw)


NEW_DIVERGENCES = ["skew_forward_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("temperature", [0.5, 10.0])
@pytest.mark.parametrize("divergence", NEW_DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_and_tvd_temperatures_and_padded_vocab(backend, divergence, temperature):
    # T at both ends (1 and 2 run in test_matches_spec), a padded vocabulary either way
    for vocab, vocab_t in ((263, 250), (250, 263)):
        inputs = make_inputs(n=15, vocab=vocab, vocab_t=vocab_t, seed=25)
        check(inputs, backend, torch.float32, divergence=divergence, skew=0.3,
              temperature=temperature, chunk_size=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_at_its_ends(backend):
    inputs = make_inputs(n=18, vocab=211, vocab_t=211, seed=26)
    kw = dict(temperature=2.0, chunk_size=7)
    for skewed, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        # alpha = 0 is the plain KL, to rounding
        loss, grads = run(inputs, backend, divergence=skewed, skew=0.0, **kw)
        want_loss, want_grads = run(inputs, backend, divergence=plain, **kw)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6)
        # alpha near 1: the mixture is almost the distribution itself, D -> 0, still exact
        check(inputs, backend, torch.float32, divergence=skewed, skew=0.99, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_logit_overflow_is_an_error_not_nan(backend):
    inputs = make_inputs(n=9, d_s=8, d_t=8, vocab=120, vocab_t=120, dtype=torch.float16, seed=27,
                         bias=False)
    with torch.no_grad():
        inputs["student_hidden"].mul_(8e3)  # logits ~1e5: past fp16's 65504
        inputs["student_weight"].mul_(4)
    assert torch.isfinite(inputs["student_hidden"]).all()
    assert (inputs["student_hidden"].float() @ inputs["student_weight"].float().T).abs().max() > 7e4
    with pytest.raises(ValueError, match="not finite in fp16.*bf16"):
        run(inputs, backend)
    # the same values in bf16 (fp32's range) are fine
    bf16 = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) if v.is_floating_point()
            else v for k, v in inputs.items()}
    loss, _ = run(bf16, backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_second_derivative_is_a_clear_error(backend):
    inputs = make_inputs(n=6, vocab=50, vocab_t=50, seed=28)
    loss = fastkd.fused_distill_loss(**inputs, backend=backend)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, inputs["student_hidden"], create_graph=True)
    # the reference (plain autograd) has one
    loss = fastkd.fused_distill_loss(**inputs, backend="reference")
    (g,) = torch.autograd.grad(loss, inputs["student_hidden"], create_graph=True)
    assert g.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_an_ignored_token_does_not_reach_the_gradients(backend):
    # ignored tokens are skipped, not masked: a NaN hidden state there must not enter G^T H
    inputs = make_inputs(n=20, vocab=130, vocab_t=130, seed=29)
    ignored = inputs["labels"] == -100
    clean = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    with torch.no_grad():
        inputs["student_hidden"][ignored] = float("nan")
        inputs["teacher_hidden"][ignored] = float("inf")
    for reduction in ("mean", "none"):
        upstream = torch.randn(20, device=DEVICE) if reduction == "none" else None
        loss, grads = run(inputs, backend, upstream, reduction=reduction, divergence="jsd")
        want_loss, want_grads = run(clean, backend, upstream, reduction=reduction,
                                    divergence="jsd")
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), name
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7)
        assert (grads["student_hidden"][ignored] == 0).all()


@pytest.mark.parametrize("dropped", [0, 25, 49, 50])  # of 50: none, half, all but one, all
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_share_of_ignored_tokens(backend, reduction, dropped):
    inputs = make_inputs(n=50, vocab=97, vocab_t=101, seed=30, ignore_every=0)
    drop = torch.randperm(50, generator=torch.Generator().manual_seed(31))[:dropped]
    inputs["labels"][drop.to(DEVICE)] = -100  # exactly that many ignored, spread over the chunks
    upstream = torch.randn(50, device=DEVICE) if reduction == "none" else None
    loss, grads = check(inputs, backend, torch.float32, upstream, reduction=reduction,
                        divergence="forward_kl", temperature=2.0, chunk_size=16)
    # the same with the ignored tokens computed and masked (no compaction) agrees
    loss2, grads2 = run(inputs, backend, upstream, reduction=reduction, divergence="forward_kl",
                        temperature=2.0, chunk_size=16, check_labels=False)
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-7)
    for name in grads:  # chunks hold other rows, so sums run in another order: fp32 rounding
        torch.testing.assert_close(grads[name], grads2[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_result_reads_uninitialised_memory(backend, monkeypatch):
    """Every float torch.empty poisoned with NaN, one CPU thread: the results stay finite and equal
    the spec. (The bf16 torch path gave rows of NaN in dL/dh_s: oneDNN's single-thread bf16 GEMM
    reads past each row of A into the padded logit buffer's uninitialised pad columns, and NaN
    there times B's zero padding is NaN; `padded_rows` now zeroes the pad.)"""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    inputs = make_inputs(n=45, vocab=1003, vocab_t=1011, dtype=torch.bfloat16, seed=32)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "empty", poisoned)
    torch.set_num_threads(1)
    try:
        check(inputs, backend, torch.bfloat16, temperature=2.0, divergence="skew_forward_kl",
              chunk_size=20)
    finally:
        torch.set_num_threads(threads)


# ---- fp32 accuracy against TRL's chunked divergence kernel ------------------------------------

TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # TRL's beta for fastkd's divergence
ACCURACY_CAP = 6.0  # a softcap that bends logits of std 3


def accuracy_inputs(n=16, d_s=32, d_t=48, vocab=8000, seed=40):
    """float64 inputs whose logits have std ~3 (issue 20's conditioning and V, fewer tokens),
    with biases; every token counted."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        h_s=torch.randn(n, d_s, generator=g, dtype=torch.float64),
        w_s=torch.randn(vocab, d_s, generator=g, dtype=torch.float64) * 3 / d_s**0.5,
        b_s=torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5,
        h_t=torch.randn(n, d_t, generator=g, dtype=torch.float64),
        w_t=torch.randn(vocab, d_t, generator=g, dtype=torch.float64) * 3 / d_t**0.5,
        b_t=torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5,
    )


def kd_term(impl, dtype, divergence, temperature, cap):
    """(per-token loss, dL/dh_s, dL/dW_s, dL/db_s) of the KD term alone (T^2 D, mean over tokens)
    from fastkd's backend `impl` or TRL's ChunkedDivergenceFunction ("trl")."""
    x = {k: v.to(dtype, copy=True) for k, v in accuracy_inputs().items()}
    student = [x[k].requires_grad_() for k in ("h_s", "w_s", "b_s")]
    teacher = [x[k] for k in ("h_t", "w_t", "b_t")]
    if impl == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        per_token = ChunkedDivergenceFunction.apply(*student, *teacher, TRL_BETA[divergence],
                                                    temperature, 1.0, cap, 1.0, cap)[0]
        per_token = per_token * temperature**2
    else:
        h_s, w_s, b_s = student
        h_t, w_t, b_t = teacher
        per_token = fastkd.fused_distill_loss(
            h_s, w_s, h_t, w_t, None, student_bias=b_s, teacher_bias=b_t, ce_weight=0.0,
            kd_weight=1.0, divergence=divergence, temperature=temperature, beta=0.5, skew=0.1,
            student_softcap=cap, teacher_softcap=cap, backend=impl, reduction="none")
    return [per_token.detach(), *torch.autograd.grad(per_token.mean(), student)]


@functools.lru_cache
def kd_errors(impl, divergence, temperature, cap):
    """(relative, absolute) errors of kd_term's four results in fp32 against float64:
    |error| / |value| and |error|, in the 2-norm over all entries (a stable statistic; the
    largest entry's error, which issue 20 measured, is dominated at these sizes by the one or two
    entries that round worst)."""
    want = kd_term_fp64(divergence, temperature, cap)
    got = kd_term(impl, torch.float32, divergence, temperature, cap)
    absolute = [(x.double() - w).norm().item() for x, w in zip(got, want, strict=True)]
    return [a / w.norm().item() for a, w in zip(absolute, want, strict=True)], absolute


@functools.lru_cache
def kd_term_fp64(divergence, temperature, cap):
    return kd_term("reference", torch.float64, divergence, temperature, cap)


def tvd_kink_gap(temperature, cap):
    """The smallest |q - p| / max(q, p) of the float64 inputs over the ids that carry mass: TVD's
    subgradient sign(q - p) jumps at q = p, so an id within rounding of it moves the gradient by
    q there in any precision (one seed put an id 2.5e-7 away: 50x TRL's KL errors)."""
    x = accuracy_inputs()
    a = reference.softcap(x["h_s"] @ x["w_s"].T + x["b_s"], cap) / temperature
    b = reference.softcap(x["h_t"] @ x["w_t"].T + x["b_t"], cap) / temperature
    q, p = a.softmax(-1), b.softmax(-1)
    mass = torch.maximum(q, p) > 1e-4 * q.amax(-1, keepdim=True)
    return ((q - p).abs() / torch.maximum(q, p))[mass].min().item()


@pytest.mark.skipif(ON_GPU, reason="TRL's CPU path and the interpreter; the GPU has its own")
@pytest.mark.parametrize("cap", [None, ACCURACY_CAP])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fp32_as_exact_as_trl(temperature, cap):
    """Every backend's fp32 loss and gradients (dh, dW, db) within 2x the error of TRL 1.16's
    chunked divergence kernel on the same inputs (relative 2-norm errors against float64), for
    each divergence TRL has (forward KL, reverse KL, JSD). For the divergences TRL lacks (the skew
    KLs, TVD): absolute errors within 2x the largest absolute error TRL makes on the KLs and JSD
    at the same T and softcap (their gradients are smaller than the KLs', so their relative
    errors are larger: TVD's q (sign(q - p) / 2 - S) cancels where most of q's mass has one
    sign). The previous torch and reference paths fail this at T = 0.5 and 1 (up to 7x)."""
    pytest.importorskip("trl")
    assert tvd_kink_gap(temperature, cap) > 1e-5, "an id sits on TVD's kink: pick another seed"
    trl = {div: kd_errors("trl", div, temperature, cap) for div in TRL_BETA}
    worst = [max(e) for e in zip(*(absolute for _, absolute in trl.values()), strict=True)]
    for backend, divergence in itertools.product(("torch", "triton", "reference"), DIVERGENCES):
        relative, absolute = kd_errors(backend, divergence, temperature, cap)
        got, bound = (relative, trl[divergence][0]) if divergence in trl else (absolute, worst)
        for what, err, ref in zip(("loss", "dh", "dW", "db"), got, bound, strict=True):
            assert err <= 2 * ref, (backend, divergence, what, f"{err:.2e} > 2 x {ref:.2e}")
