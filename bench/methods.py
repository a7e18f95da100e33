"""The methods compared, each a small adapter with one call signature: `build(problem)` returns a
function from `Inputs` to the scalar loss (with autograd to h_s and W_s); `skip(problem)` says why a
method cannot compute this problem's loss (not installed, needs CUDA, lacks a loss term) or is None.

Every adapter computes the loss `fastkd.reference` specifies, so one float64 ground truth holds all:
- fastkd:    `fastkd.distill`, backend "auto" (Triton kernels on CUDA, chunked torch on CPU).
- reference: the spec with full N x V logits in the benchmark dtype (`backend="reference"`).
- compile:   `torch.compile(fastkd.reference.distill_loss)`, default options.
- liger:     Liger-Kernel's `LigerFusedLinearJSDLoss`. Its beta = 0 is forward KL(p||q) (beta = 1
             reverse KL) on logits / T without the T^2 factor, so its soft weight is kd_weight T^2:
             the same loss as fastkd's (equivalently, fastkd at kd_weight / T^2 is Liger's loss at
             kd_weight). Liger pads the student to the teacher's vocab, so it gets W_t[:V].
- liger_kl:  Liger's `LigerFusedLinearKLDivLoss` where the installed version has it: KL against
             given teacher probabilities, so softmax(h_t W_t[:V]^T / T) is formed inside the timed
             call; its batchmean KL times kd_weight T^2 is the "kd" case.
- cce:       Apple's cut-cross-entropy `linear_cross_entropy` (default impl and gradient filter),
             in the "ce" case beside fastkd at kd_weight = 0.
- trl:       TRL's `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (the loss of
             trl.DistillationTrainer, TRL 1.16; Triton on CUDA, torch tiles elsewhere) in the
             divergence-only cases: beta 0 = forward KL ("kd"), 1 = reverse KL ("rkl"), between =
             JSD with the same beta ("jsd"), on logits / T without T^2, so its mean over the
             counted tokens (gathered first, as TRL's trainer does) is multiplied by
             kd_weight T^2. It gets W_t[:V] (one vocabulary).
- lce:       torch's `F.linear_cross_entropy` with `LinearCrossEntropyOptions()` (chunked over
             tokens): CE on the labels ("ce"), and forward KL as CE against the teacher's
             probabilities softmax(h_t W_t[:V]^T / T) on h_s / T ("kd"), minus the teacher's
             entropy (which does not depend on the student), times kd_weight T^2. Soft targets
             are outside its chunked path: torch runs its unchunked reference path instead (with
             a warning), which is what a user gets.
- floor:     not a loss: the GEMMs no method can skip, alone (S = H_s W_s^T, T = H_t W_t[:K]^T,
             and with the backward dH = S W_s, dW_s = S^T H_s, S standing in for the gradient),
             over the counted tokens in chunks of 1024: the measured floor in the same run.
In the "sparse" case fastkd is `fastkd.sparse_distill` (the fused sparse loss) and reference its
spec with full logits; the teacher's top-k targets are inputs, formed before any timing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastkd
from bench.shapes import Case, Shape, options
from fastkd import DistillOptions, reference
from fastkd.autograd import MatmulAccumulator


@dataclass(frozen=True)
class Problem:
    """One measurement's problem: a loss case at a shape, in a dtype, on a device."""

    case: Case
    shape: Shape
    dtype: torch.dtype
    device: torch.device

    @property
    def opts(self) -> DistillOptions:
        return options(self.case, self.shape)


@dataclass(frozen=True)
class Inputs:
    """h_s (N, D_s), W_s (V, D_s), h_t (N, D_t), W_t (V_t, D_t), labels (N,) int64; for the
    sparse case also the teacher's top-k targets, ids (N, k) int32 and logprobs (N, k)."""

    h_s: torch.Tensor
    w_s: torch.Tensor
    h_t: torch.Tensor
    w_t: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.h_s, self.w_s, self.h_t, self.w_t, self.labels

    @property
    def nbytes(self) -> int:
        extra = [x for x in (self.ids, self.logprobs) if x is not None]
        return sum(x.numel() * x.element_size() for x in (*self.tensors(), *extra))

    def clone(self) -> Inputs:
        h_s, w_s, h_t, w_t, labels = (x.detach().clone() for x in self.tensors())
        return Inputs(h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t, labels, self.ids,
                      self.logprobs)

    def detached(self) -> Inputs:
        """The same storage without requires_grad: what a forward-only call gets."""
        h_s, w_s, h_t, w_t, labels = (x.detach() for x in self.tensors())
        return Inputs(h_s, w_s, h_t, w_t, labels, self.ids, self.logprobs)


LossFn = Callable[[Inputs], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A method under test: build(problem) gives its loss function; skip(problem), a reason."""

    name: str
    description: str
    build: Callable[[Problem], LossFn]
    skip: Callable[[Problem], str | None]
    package: str | None = None  # distribution name of an optional peer
    loss: bool = True  # computes the loss (its results are checked against float64)
    # about how many fp32 N x (V + K) logit tensors the method holds at its peak (None: chunked,
    # flat in N); the harness skips it on CPU where that would not fit in half the free memory
    logit_copies: float | None = None


def _never(problem: Problem) -> str | None:
    return None


def _build_fastkd(problem: Problem, backend: str = "auto") -> LossFn:
    opts = problem.opts
    if problem.case.sparse_k is not None:
        return lambda x: fastkd.sparse_distill(x.h_s, x.w_s, x.ids, x.logprobs, x.labels, opts,
                                               backend=backend)
    return lambda x: fastkd.distill(x.h_s, x.w_s, x.h_t, x.w_t, x.labels, opts, backend=backend)


def _build_reference(problem: Problem) -> LossFn:
    return _build_fastkd(problem, backend="reference")


def _dense_only(problem: Problem) -> str | None:
    return "dense teacher only" if problem.case.sparse_k is not None else None


def _build_compile(problem: Problem) -> LossFn:
    opts = problem.opts
    # One code object meets every case, softcap, grad mode and size of the run: more recompiles
    # than dynamo's default limit of 8, past which it would fall back to eager for the rest.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    compiled = torch.compile(reference.distill_loss)
    return lambda x: compiled(x.h_s, x.w_s, x.h_t, x.w_t, x.labels, opts)[0]


def _peer_unavailable(problem: Problem, module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{package} not installed"
    if problem.device.type != "cuda":
        return f"{package} needs a CUDA device (Triton kernels)"
    return None


def _liger_jsd_class() -> type | None:
    # Liger 0.5+ keeps it in chunked_loss; look in transformers too for versions that re-export it.
    for module in ("liger_kernel.chunked_loss", "liger_kernel.transformers"):
        cls = getattr(importlib.import_module(module), "LigerFusedLinearJSDLoss", None)
        if cls is not None:
            return cls
    return None


def _liger_kl_class() -> type | None:
    return getattr(importlib.import_module("liger_kernel.transformers"),
                   "LigerFusedLinearKLDivLoss", None)


def _liger_common_skip(problem: Problem) -> str | None:
    if (reason := _dense_only(problem)) is not None:
        return reason
    if (reason := _peer_unavailable(problem, "liger_kernel", "liger-kernel")) is not None:
        return reason
    if problem.opts.kd_weight == 0:
        return "CE-only case: compared with cce"
    if problem.opts.student_softcap is not None:
        return "Liger's distillation losses have no logit softcap"
    if problem.shape.v > problem.shape.v_t:
        return "student vocab larger than the teacher's: Liger pads the student, not the teacher"
    return None


def _skip_liger(problem: Problem) -> str | None:
    if (reason := _liger_common_skip(problem)) is not None:
        return reason
    if _liger_jsd_class() is None:
        return f"liger-kernel {_version('liger-kernel')} has no LigerFusedLinearJSDLoss"
    return None


def _build_liger(problem: Problem) -> LossFn:
    opts, vocab = problem.opts, problem.shape.v
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": opts.beta}[opts.divergence]
    crit = _liger_jsd_class()(
        weight_hard_loss=opts.ce_weight, weight_soft_loss=opts.kd_weight * opts.temperature**2,
        beta=beta, ignore_index=opts.ignore_index, temperature=opts.temperature,
    )
    return lambda x: crit(x.h_s, x.w_s, x.h_t, x.w_t[:vocab], x.labels)


def _skip_liger_kl(problem: Problem) -> str | None:
    if (reason := _liger_common_skip(problem)) is not None:
        return reason
    if problem.opts.ce_weight != 0:
        return "KL only (no CE term): runs in the kd case"
    if problem.opts.divergence != "forward_kl":
        return "forward KL only"
    if _liger_kl_class() is None:
        return f"liger-kernel {_version('liger-kernel')} has no fused-linear KL loss"
    return None


def _build_liger_kl(problem: Problem) -> LossFn:
    opts, vocab = problem.opts, problem.shape.v
    temp = opts.temperature
    crit = _liger_kl_class()(reduction="batchmean", ignore_index=opts.ignore_index,
                             temperature=temp)
    scale = opts.kd_weight * temp**2

    def loss(x: Inputs) -> torch.Tensor:
        with torch.no_grad():  # the teacher's probabilities: the N x V input this API needs
            target = torch.softmax(torch.mm(x.h_t, x.w_t[:vocab].t()).div_(temp), dim=-1)
        return crit(x.h_s, x.w_s, target, x.labels) * scale

    return loss


def _skip_cce(problem: Problem) -> str | None:
    if (reason := _peer_unavailable(problem, "cut_cross_entropy", "cut-cross-entropy")) is not None:
        return reason
    if problem.opts.kd_weight != 0:
        return "CE only: runs in the ce case"
    return None


def _build_cce(problem: Problem) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    opts = problem.opts
    return lambda x: opts.ce_weight * linear_cross_entropy(
        x.h_s, x.w_s, x.labels, ignore_index=opts.ignore_index, softcap=opts.student_softcap,
        reduction="mean",
    )


TRL_DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}  # TRL beta (jsd: opts.beta)


def _trl_function():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    return ChunkedDivergenceFunction


def _skip_trl(problem: Problem) -> str | None:
    if (reason := _dense_only(problem)) is not None:
        return reason
    if importlib.util.find_spec("trl") is None:
        return "trl not installed"
    opts = problem.opts
    if opts.ce_weight != 0 or opts.kd_weight == 0:
        return "divergence only (no CE term): runs in the kd, rkl and jsd cases"
    if opts.divergence not in TRL_DIVERGENCES:
        return f"TRL's kernel has no {opts.divergence}"
    if problem.shape.v > problem.shape.v_t:
        return "student vocab larger than the teacher's: TRL needs one vocabulary"
    try:
        _trl_function()
    except ImportError as err:  # TRL present, a dependency of its trainer utilities missing
        return f"trl.kernels.chunked_divergence does not import: {err}"
    return None


def _build_trl(problem: Problem) -> LossFn:
    opts, vocab, fn = problem.opts, problem.shape.v, _trl_function()
    beta = TRL_DIVERGENCES[opts.divergence]
    beta = opts.beta if beta is None else beta
    scale = opts.kd_weight * opts.temperature**2

    def loss(x: Inputs) -> torch.Tensor:
        valid = x.labels != opts.ignore_index
        divergence, _ = fn.apply(x.h_s[valid], x.w_s, None, x.h_t[valid], x.w_t[:vocab], None,
                                 beta, opts.temperature, 1.0, opts.student_softcap, 1.0,
                                 opts.teacher_softcap)
        return divergence.sum() / valid.sum() * scale

    return loss


def _skip_lce(problem: Problem) -> str | None:
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no LinearCrossEntropyOptions"
    opts = problem.opts
    if problem.case.sparse_k is not None:
        return "dense teacher only"
    if opts.student_softcap is not None:
        return "linear_cross_entropy has no logit softcap"
    if opts.kd_weight == 0 or (opts.ce_weight == 0 and opts.divergence == "forward_kl"):
        return None if problem.shape.v <= problem.shape.v_t else "needs the teacher's V ids"
    return "CE, or forward KL as CE on soft targets: runs in the ce and kd cases"


def _build_lce(problem: Problem) -> LossFn:
    import torch.nn.functional as F

    opts, vocab = problem.opts, problem.shape.v
    chunked = torch.nn.LinearCrossEntropyOptions()
    if opts.kd_weight == 0:
        return lambda x: opts.ce_weight * F.linear_cross_entropy(
            x.h_s, x.w_s, x.labels, ignore_index=opts.ignore_index, options=chunked)
    temp, scale = opts.temperature, opts.kd_weight * opts.temperature**2

    def loss(x: Inputs) -> torch.Tensor:
        valid = x.labels != opts.ignore_index
        with torch.no_grad():  # the teacher's probabilities: the N x V input this API needs
            log_p = torch.log_softmax(torch.mm(x.h_t[valid], x.w_t[:vocab].t()).div_(temp), -1)
            p = log_p.exp()
            entropy = -(p * log_p).sum() / p.shape[0]
            del log_p
        with warnings.catch_warnings():  # "options ignored": soft targets are not chunked
            warnings.simplefilter("ignore", UserWarning)
            ce = F.linear_cross_entropy(x.h_s[valid] / temp, x.w_s, p, options=chunked)
        return (ce - entropy) * scale

    return loss


class _GemmsAlone(torch.autograd.Function):
    """The floor's GEMMs in the loop a fused loss runs: per chunk of counted tokens S = H_s W_s^T
    and T = H_t W_t^T (no teacher: T skipped), and when gradients are wanted dH = S W_s and
    dW += S^T H_s in fp32, S standing in for dloss/dS; backward hands them out. A half-precision
    dW goes through `fastkd.autograd.MatmulAccumulator` (a reused product buffer and fp32 slab),
    the cheapest fp32 accumulation of a CPU bf16 GEMM we know: `dw += mm(...).float()` costs
    more than the GEMM itself at V = 128256, which would flatter every method over the floor."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t):
        n, rows = h_s.shape[0], min(1024, max(h_s.shape[0], 1))
        grads = any(ctx.needs_input_grad[:2])
        dh = torch.empty_like(h_s) if grads else None
        dw = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if grads else None
        accumulate_dw = MatmulAccumulator(dw) if grads else None
        s_buf = h_s.new_empty(rows, w_s.shape[0])
        t_buf = None if w_t is None else h_t.new_empty(rows, w_t.shape[0])
        for i0 in range(0, n, rows):
            h = h_s[i0:i0 + rows]
            s = torch.mm(h, w_s.t(), out=s_buf[:h.shape[0]])
            if w_t is not None:
                torch.mm(h_t[i0:i0 + rows], w_t.t(), out=t_buf[:h.shape[0]])
            if grads:
                torch.mm(s, w_s, out=dh[i0:i0 + rows])
                accumulate_dw(s.t(), h)
        ctx.save_for_backward(dh, dw)
        return h_s.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad, (dw * grad).to(dh.dtype), None, None


def _build_floor(problem: Problem) -> LossFn:
    opts, shared = problem.opts, min(problem.shape.v, problem.shape.v_t)
    teacher = problem.case.teacher_gemm

    def gemms(x: Inputs) -> torch.Tensor:
        valid = (x.labels != opts.ignore_index).nonzero().squeeze(1)
        h_t = x.h_t.index_select(0, valid) if teacher else None
        return _GemmsAlone.apply(x.h_s.index_select(0, valid), x.w_s, h_t,
                                 x.w_t[:shared] if teacher else None)

    return gemms


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("floor", "the GEMMs alone (both heads' logits, dH, dW_s), chunks of 1024 tokens",
           _build_floor, _never, loss=False),
    Method("fastkd", "fastkd.distill, backend='auto' (Triton on CUDA, fused chunked row op on "
           "CPU)", _build_fastkd, _never),
    Method("reference", "fastkd.reference: full N x V logits in the benchmark dtype (plain "
           "PyTorch)", _build_reference, _never, logit_copies=5),
    Method("compile", "torch.compile(fastkd.reference.distill_loss), default options",
           _build_compile, _dense_only, logit_copies=3),
    Method("lce", "torch F.linear_cross_entropy, LinearCrossEntropyOptions() (ce; kd: CE on "
           "the teacher's probabilities, unchunked by torch)", _build_lce, _skip_lce,
           logit_copies=3),
    Method("liger", "liger_kernel LigerFusedLinearJSDLoss (beta 0 = forward KL, soft weight x T^2)",
           _build_liger, _skip_liger, "liger-kernel"),
    Method("liger_kl", "liger_kernel LigerFusedLinearKLDivLoss on softmax(teacher logits / T)",
           _build_liger_kl, _skip_liger_kl, "liger-kernel", logit_copies=1),
    Method("cce", "cut_cross_entropy.linear_cross_entropy (CE only)",
           _build_cce, _skip_cce, "cut-cross-entropy"),
    Method("trl", "trl.kernels.chunked_divergence.ChunkedDivergenceFunction (divergence only, "
           "x T^2)", _build_trl, _skip_trl, "trl"),
)}


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the optional peers (None when absent)."""
    return {p: _version(p) for p in sorted({m.package for m in METHODS.values() if m.package})}
