"""Timing, memory, correctness and the run loop.

For each case x shape (a `Problem`) the harness builds the inputs (in a few copies, rotated between
calls so no call finds the previous one's operands in cache) and the float64 ground truth, then for
each method and each mode ("fwd": the loss under no_grad; "fwd_bwd": the loss and dH, dW_s) runs
1. a first call (warm-up: compilation, autotuning, allocator growth), its wall time first_call_ms;
2. one call under memory accounting: peak memory beyond what was allocated before it (the inputs),
   so the gradients it returns count; in fwd_bwd its loss and gradients are checked against float64;
then, every method and mode warmed up for 25 ms,
3. timed rounds: each round calls every method once, in turn, the order reversed every other
   round (a shared machine drifts: alternating spreads it over the methods), for `rep_ms` of the
   slowest method and at least `min_reps` rounds. CUDA: the `triton.testing.do_bench` protocol
   (CUDA events around each call, the L2 flushed by zeroing a 256 MiB buffer before it); CPU:
   `time.perf_counter` around each call. Reported: quantiles (0.5, 0.2, 0.8) of the per-call times.
On CPU a method that holds full N x V logits is skipped where they would need more than half the
memory free at the start of the problem (`Method.logit_copies`): Linux would rather kill the
process than fail the allocation.

Peak memory: CUDA `max_memory_allocated` after `reset_peak_memory_stats`, less `memory_allocated`
before the call. CPU: the process's peak RSS (VmHWM, reset by writing 5 to /proc/self/clear_refs
after `malloc_trim`) less its RSS before: approximate (allocator caching); None without /proc.

The matmul rate is a square GEMM in the benchmark dtype, timed the same way in the same run; a
figure's x_floor is its median over the time that rate needs for the FLOP floor (`flop_floor`).
Out of memory is a result: recorded as "OOM at N=...", the run goes on, and larger sizes of the same
sweep are not tried for that method and mode.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

import fastkd
from bench.measure import (
    QUANTILES,
    available_bytes,
    measure_peak,
    sync,
    time_alternating,
)
from bench.methods import Inputs, LossFn, Method, Problem, peer_versions
from bench.shapes import Case, Shape, flop_floor, problem_shape
from fastkd import DistillOptions, reference

MODES = ("fwd", "fwd_bwd")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    cases: tuple[Case, ...]
    shapes: tuple[Shape, ...]
    quick: bool = False
    seed: int = 0
    modes: tuple[str, ...] = MODES
    grid: str = "default"  # "floor": the unscaled CPU floor grid (bench.shapes.FLOOR_HEADS)
    check_max_n: int | None = None  # no float64 check above this N (None: everywhere)
    rounds: int | None = None  # timed rounds at least (None: 3 with quick, 5 on CPU, 10 on CUDA)

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def min_reps(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return 3 if self.quick else (5 if self.cpu else 10)

    @property
    def rep_ms(self) -> float:
        """Time budget for the timed calls; at least min_reps calls run whatever it says."""
        return 100.0 if self.quick else 300.0


# ---- device and environment ----------------------------------------------------------------------

def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "memory_gib": round(_memory_bytes(device) / 2**30, 1)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {**info, "name": props.name, "slug": slug(props.name),
                "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                "cuda": torch.version.cuda}
    # The load average at the start says whether other work shared the cores during the run.
    return {**info, "name": _cpu_model(), "slug": "cpu", "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0]}


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno", "--",
                                "fastkd", "kernels"], capture_output=True, text=True,
                               check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "fastkd": fastkd.__version__,
            "fastkd_commit": _git_commit(), **peer_versions()}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    """torch's OOM error, or the RuntimeError some libraries (cuBLAS, Triton) raise instead."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


# ---- inputs and the float64 ground truth ---------------------------------------------------------

def make_inputs(problem: Problem, seed: int) -> Inputs:
    """Hidden states ~ N(0, 1), weights ~ N(0, 4 / D) (logits of std ~2), the shape's share of
    labels (10% by default) set to ignore_index at random positions."""
    s, dev, dtype = problem.shape, problem.device, problem.dtype
    gen = torch.Generator(dev).manual_seed(seed)

    def randn(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, device=dev, dtype=dtype).mul_(std)

    labels = torch.randint(0, s.v, (s.n,), generator=gen, device=dev)
    ignored = torch.randperm(s.n, generator=gen, device=dev)[:s.n_ignored]
    labels[ignored] = problem.opts.ignore_index
    x = Inputs(randn(s.n, s.d_s, 1.0).requires_grad_(),
               randn(s.v, s.d_s, 2 / math.sqrt(s.d_s)).requires_grad_(),
               randn(s.n, s.d_t, 1.0), randn(s.v_t, s.d_t, 2 / math.sqrt(s.d_t)), labels)
    if problem.case.sparse_k is None:
        return x
    return replace(x, **sparse_targets(x, problem.opts, problem.case.sparse_k))


def sparse_targets(x: Inputs, opts: DistillOptions, k: int) -> dict:
    """The teacher's top-k (ids int32, log softmax(t / T) there in the inputs' dtype), as
    `fastkd cache-teacher` stores them, over the shared ids; in row blocks (never N x V)."""
    from fastkd.cache_teacher import topk_targets

    shared = min(x.w_s.shape[0], x.w_t.shape[0])
    rows = max(1, 2**26 // shared)
    ids, logprobs = [], []
    for i0 in range(0, x.h_t.shape[0], rows):
        logits = torch.mm(x.h_t[i0:i0 + rows], x.w_t[:shared].t())
        block_ids, block_lp = topk_targets(reference.softcap(logits.float(), opts.teacher_softcap),
                                           opts.temperature, k)
        ids.append(block_ids)
        logprobs.append(block_lp.to(x.h_t.dtype))
        del logits
    return {"ids": torch.cat(ids), "logprobs": torch.cat(logprobs)}


def input_copies(first: Inputs, device: torch.device) -> list[Inputs]:
    """Three copies to rotate through, or one where three would take over a fifth of the memory."""
    n = 3 if 3 * first.nbytes <= _memory_bytes(device) // 5 else 1
    return [first] + [first.clone() for _ in range(n - 1)]


@dataclass(frozen=True)
class Reference:
    """The float64 loss and gradients, the gradients kept on the host."""

    loss: float
    dh: torch.Tensor
    dw: torch.Tensor


def fp64_reference(x: Inputs, opts: DistillOptions, rows: int | None = None) -> Reference:
    """`fastkd.reference` in float64 over all N tokens, in token chunks so it fits at any N.

    Exact, not a subsample: per chunk S = H_s W_s^T and T = H_t W_t[:K]^T in float64, the spec's
    `token_losses`, its logit gradient G by autograd, then dH = G W_s and dW_s += G^T H_s; the mean
    divides by the counted tokens at the end. Reduction "mean" (every case uses it). rows: tokens
    per chunk; by default what a budget allows (an eighth of free GPU memory, 256 MiB on CPU).
    """
    n, d_s = x.h_s.shape
    vocab, shared = x.w_s.shape[0], min(x.w_s.shape[0], x.w_t.shape[0])
    dev = x.h_s.device
    if rows is None:
        budget = torch.cuda.mem_get_info(dev)[0] // 8 if dev.type == "cuda" else 256 * 2**20
        rows = max(1, budget // ((vocab + shared) * 8 * 6))  # ~6 float64 logit-sized temporaries
    w_s, w_t = x.w_s.detach().double(), x.w_t.detach()[:shared].double()
    sparse = x.ids is not None  # the sparse case: the spec of the sparse loss, tail "bucket"
    dh = torch.empty(n, d_s, dtype=torch.float64)
    dw = torch.zeros_like(w_s)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i0 in range(0, n, rows):
        h = x.h_s.detach()[i0:i0 + rows].double()
        s = torch.mm(h, w_s.t()).requires_grad_()
        if sparse:
            loss, _, _ = reference.sparse_token_losses(
                s, x.ids[i0:i0 + rows], x.logprobs[i0:i0 + rows].double(),
                x.labels[i0:i0 + rows], opts, "bucket")
        else:
            t = torch.mm(x.h_t[i0:i0 + rows].double(), w_t.t())
            loss, _, _ = reference.token_losses(s, t, x.labels[i0:i0 + rows], opts)
            del t
        (g,) = torch.autograd.grad(loss.sum(), s)
        total += loss.detach().sum()
        dh[i0:i0 + rows] = torch.mm(g, w_s).cpu()
        dw.addmm_(g.t(), h)
        del s, loss, g
    count = (x.labels != opts.ignore_index).sum().clamp(min=1).item()
    return Reference(loss=total.item() / count, dh=dh / count, dw=dw.cpu() / count)


def max_rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (normwise: elementwise relative error means nothing near 0).
    A NaN in x gives NaN. ref lives on the host and moves to x's device in row blocks."""
    rows = max(1, 2**24 // max(1, ref.shape[-1]))
    errs, scales = [], []
    for i0 in range(0, ref.shape[0], rows):
        r = ref[i0:i0 + rows].to(x.device)
        errs.append((x[i0:i0 + rows].detach().double() - r).abs().max())
        scales.append(r.abs().max())
    err, scale = torch.stack(errs).max().item(), torch.stack(scales).max().item()
    return err / scale if scale > 0 else err


def compare(loss: torch.Tensor, grads: Sequence[torch.Tensor], ref: Reference) -> dict:
    value = loss.item()
    diff = abs(value - ref.loss)
    return {"loss": value, "ref_loss": ref.loss, "loss_abs_diff": diff,
            "loss_rel_diff": diff / abs(ref.loss) if ref.loss else diff,
            "dh_rel_diff": max_rel_diff(grads[0], ref.dh),
            "dw_rel_diff": max_rel_diff(grads[1], ref.dw)}


def matmul_rate(settings: Settings) -> dict:
    """The device's own dense-GEMM rate: an n x n x n matmul in the benchmark dtype."""
    dev = settings.device
    n = 8192 if dev.type == "cuda" else (1024 if settings.quick else 2048)
    a = torch.randn(n, n, device=dev, dtype=settings.dtype)
    b = torch.randn(n, n, device=dev, dtype=settings.dtype)
    torch.mm(a, b)
    sync(dev)
    t0 = time.perf_counter()
    torch.mm(a, b)
    sync(dev)
    (stats,) = time_alternating([lambda: torch.mm(a, b)], [(time.perf_counter() - t0) * 1e3],
                                dev, settings.min_reps, settings.rep_ms)
    return {"n": n, "dtype": str(settings.dtype).removeprefix("torch."), **stats,
            "tflops": 2 * n**3 / (stats["median_ms"] * 1e-3) / 1e12}


# ---- one method on one problem -------------------------------------------------------------------

def _step(loss_fn: LossFn, mode: str) -> Callable[[Inputs], tuple]:
    if mode == "fwd":
        def forward(x: Inputs) -> tuple:
            with torch.no_grad():
                return loss_fn(x), ()
        return forward

    def forward_backward(x: Inputs) -> tuple:
        loss = loss_fn(x)
        return loss, torch.autograd.grad(loss, (x.h_s, x.w_s))
    return forward_backward


def _timed_once(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def first_calls(loss_fn: LossFn, mode: str, problem: Problem, copies: list[Inputs],
                ref: Reference | None) -> tuple[dict, Callable[[], object], float]:
    """One method in one mode, before the timed rounds: the first call, then one call under
    memory accounting (+ check in fwd_bwd). Returns (its figures so far, the step to time,
    rotating through the copies, one call's time in ms)."""
    dev = problem.device
    step = _step(loss_fn, mode)
    feeds = [c.detached() for c in copies] if mode == "fwd" else copies
    _, first_ms = _timed_once(lambda: step(feeds[0]), dev)
    t0 = time.perf_counter()
    (loss, grads), peak = measure_peak(lambda: step(feeds[0]), dev)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    check = compare(loss, grads, ref) if mode == "fwd_bwd" and ref is not None else None
    del loss, grads
    rotation = itertools.cycle(feeds)
    figures = {"status": "ok", "first_call_ms": first_ms,
               "peak_mib": None if peak is None else peak / 2**20, "check": check}
    return figures, lambda: step(next(rotation)), estimate_ms


def with_times(figures: dict, stats: dict, problem: Problem, mode: str,
               rate_tflops: float) -> dict:
    """figures with the timed quantiles, the FLOP floor and the time against it."""
    flops = flop_floor(problem.shape, backward=mode == "fwd_bwd",
                       teacher=problem.case.teacher_gemm)
    floor_ms = flops / (rate_tflops * 1e12) * 1e3
    return {**figures, **stats, "flops": flops,
            "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12,
            "x_floor": stats["median_ms"] / floor_ms}


def _failure(err: BaseException, shape: Shape) -> dict:
    if is_oom(err):
        return {"status": "oom", "reason": f"OOM at {shape.x_name}={shape.x}"}
    return {"status": "error", "reason": f"{type(err).__name__}: {err}"[:400]}


def _row(method: Method, problem: Problem) -> dict:
    s = problem.shape
    return {"case": problem.case.name, "sweep": s.sweep, "title": s.title, "x": s.x, "n": s.n,
            "d_s": s.d_s, "d_t": s.d_t, "v": s.v, "v_t": s.v_t, "softcap": s.softcap,
            "method": method.name, "status": "ok", "reason": None, "fwd": None, "fwd_bwd": None,
            "check": None}


def _too_big(method: Method, problem: Problem) -> str | None:
    """Why a method holding full logits is not run here (CPU: half the free memory), or None."""
    if method.logit_copies is None or problem.device.type != "cpu":
        return None
    s = problem.shape
    need = method.logit_copies * s.n * (s.v + min(s.v, s.v_t)) * 4
    free = available_bytes()
    if free is None or need <= free / 2:
        return None
    return (f"its full N x V logits need about {need / 2**30:.1f} GiB, more than half the "
            f"{free / 2**30:.1f} GiB free")


def start_method(method: Method, problem: Problem, copies: list[Inputs], ref: Reference | None,
                 settings: Settings, oom_at: dict) -> tuple[dict, list[tuple[str, Callable,
                                                                                float]]]:
    """One method's row with its first calls done, and what to time: (mode, step, estimate ms)
    per mode that ran. A failure becomes the mode's (and the row's) status."""
    row = _row(method, problem)
    if (reason := method.skip(problem) or _too_big(method, problem)) is not None:
        return {**row, "status": "skipped", "reason": reason}, []
    try:
        loss_fn = method.build(problem)
    except Exception as err:  # an optional peer that fails to import or construct is a result
        return {**row, "status": "error", "reason": f"build: {type(err).__name__}: {err}"[:400]}, []
    timed = []
    for mode in settings.modes:
        key = (method.name, problem.case.name, problem.shape.sweep, mode)
        if problem.shape.x > oom_at.get(key, problem.shape.x):
            row[mode] = {"status": "skipped",
                         "reason": f"OOM at {problem.shape.x_name}={oom_at[key]}, larger not run"}
            continue
        try:
            row[mode], step, estimate = first_calls(loss_fn, mode, problem, copies,
                                                    ref if method.loss else None)
            timed.append((mode, step, estimate))
        except Exception as err:  # OOM is a result; so is any other failure, reported as an error
            row[mode] = _failure(err, problem.shape)
        _release(problem.device)
        if row[mode]["status"] == "oom":
            oom_at[key] = problem.shape.x
        row["check"] = row["check"] or row[mode].pop("check", None)
    return row, timed


def finish_row(row: dict, settings: Settings) -> dict:
    """The row's status and reason from its modes'."""
    statuses = {row[mode]["status"] for mode in settings.modes}
    row["status"] = next((s for s in ("error", "oom", "skipped") if s in statuses), "ok")
    reasons = [f"{m}: {row[m]['reason']}" for m in settings.modes if row[m].get("reason")]
    row["reason"] = "; ".join(reasons) or None
    return row


# ---- the run -------------------------------------------------------------------------------------

def run_problem(problem: Problem, methods: Sequence[Method], rate_tflops: float, settings: Settings,
                oom_at: dict, log: Callable[[str], None]) -> list[dict]:
    try:
        copies = input_copies(make_inputs(problem, settings.seed), problem.device)
    except Exception as err:
        if not is_oom(err):
            raise
        copies = None
    if copies is None:
        _release(problem.device)
        reason = f"inputs do not fit at {problem.shape.x_name}={problem.shape.x}"
        return [{**_row(m, problem), "status": "oom", "reason": reason} for m in methods]
    ref, ref_note = None, None
    if settings.check_max_n is not None and problem.shape.n > settings.check_max_n:
        ref_note = f"no float64 check above N={settings.check_max_n} (minutes per case on a CPU)"
    else:
        try:
            ref = fp64_reference(copies[0], problem.opts)
        except Exception as err:
            if not is_oom(err):
                raise
            ref_note = f"float64 reference OOM at {problem.shape.x_name}={problem.shape.x}"
    _release(problem.device)
    rows, timed = [], []  # timed: (row, mode, step, estimate)
    for method in methods:
        row, steps = start_method(method, problem, copies, ref, settings, oom_at)
        if ref_note is not None:
            row["check_note"] = ref_note
        rows.append(row)
        timed += [(row, *step) for step in steps]
    try:
        stats = time_alternating([step for _, _, step, _ in timed],
                                 [estimate for *_, estimate in timed], problem.device,
                                 settings.min_reps, settings.rep_ms)
    except Exception as err:  # a failure in the timed rounds (OOM from drift, ...) spoils them all
        stats = [_failure(err, problem.shape)] * len(timed)
    for (row, mode, _, _), fig in zip(timed, stats, strict=True):
        row[mode] = (with_times(row[mode], fig, problem, mode, rate_tflops) if "median_ms" in fig
                     else fig)
    for row in rows:
        if any(row[mode] is not None for mode in settings.modes):
            finish_row(row, settings)
        log(_log_line(row, problem))
    del copies, ref, timed
    _release(problem.device)
    return rows


def _log_line(row: dict, problem: Problem) -> str:
    head = f"[{problem.case.name} {problem.shape.sweep} {problem.shape.x_name}={problem.shape.x}]"
    if row["status"] == "skipped" and row["fwd"] is None:
        return f"{head} {row['method']}: skipped ({row['reason']})"
    parts = []
    for mode in (m for m in MODES if row[m] is not None):
        fig = row[mode]
        parts.append(f"{mode} {fig['median_ms']:.3g} ms" if fig.get("status") == "ok"
                     else f"{mode} {fig.get('status', row['status'])}")
    peak = (row["fwd_bwd"] or {}).get("peak_mib")
    if peak is not None:
        parts.append(f"peak {peak:.4g} MiB")
    if row["check"]:
        parts.append(f"loss rel {row['check']['loss_rel_diff']:.1e} "
                     f"dW rel {row['check']['dw_rel_diff']:.1e}")
    if row["reason"]:
        parts.append(row["reason"])
    return f"{head} {row['method']}: " + " | ".join(parts)


def header(settings: Settings, methods: Sequence[Method], rate: dict) -> dict:
    cpu = settings.cpu
    return {
        "cpu": cpu,
        "note": "CPU numbers, not GPU" if cpu else f"GPU numbers: {torch.cuda.get_device_name()}",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(settings.device),
        "versions": versions(),
        "dtype": str(settings.dtype).removeprefix("torch."),
        "quick": settings.quick,
        "grid": settings.grid,
        "quantiles": list(QUANTILES),
        "cases": {c.name: {"title": c.title, "options": asdict(c.opts)} for c in settings.cases},
        "methods": {m.name: m.description for m in methods},
        "matmul": rate,
        "results": [],
    }


def run(settings: Settings, methods: Sequence[Method], emit: Callable[[dict], None] | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Every case x shape x method; `emit(doc)` after each problem, so a cut-off run leaves data."""
    rate = matmul_rate(settings)
    doc = header(settings, methods, rate)
    log(f"{doc['note']} | {doc['device']['name']} | {doc['dtype']} | matmul "
        f"{rate['tflops']:.3g} TFLOP/s ({rate['n']}^3)")
    oom_at: dict = {}
    for case in settings.cases:
        for shape in settings.shapes:
            problem = Problem(case, problem_shape(case, shape), settings.dtype, settings.device)
            rows = run_problem(problem, methods, rate["tflops"], settings, oom_at, log)
            doc["results"].extend(rows)
            if emit is not None:
                emit(doc)
    if settings.cpu:
        doc["device"]["load_avg_1m_end"] = os.getloadavg()[0]
    return doc
