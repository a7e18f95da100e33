"""python -m bench.gpu_profile: what a GPU session measures beside `python -m bench`.

1. ceilings: device-to-device copy GB/s (bytes read + written) and an 8192^3 bf16 GEMM's TFLOP/s;
2. per target shape (Llama-3.1-8B -> 3.2-1B and Gemma-2-9B -> 2B heads, N = 8192, bf16, the
   "distill" case): fastkd fwd+bwd against the float64 reference (computed in chunks), its median
   time, ratio to the FLOP floor at the measured GEMM rate, peak memory beyond the inputs, and a
   breakdown of device time by kernel (GEMMs / row kernel / the rest) from torch.profiler;
3. tuning sweeps at the Llama shape: tokens per chunk (time and memory), and the row kernel alone
   over BLOCK_V x num_warps (GB/s against the copy ceiling);
4. memory flat in N: fastkd's peak at N = 2k, 8k, 32k.

Writes profile.json (rewritten after every step, so a cut-off run leaves its figures) and
profile.md into --out. Timing: `triton.testing.do_bench` (CUDA events, L2 flushed before each
call), median and [20th, 80th] percentiles.

`--device cpu` with small sizes (the kernels under TRITON_INTERPRET=1) runs every step as a
rehearsal, so that a GPU session does not find the script's own bugs: the tests do this. Its
figures are CPU numbers and are labelled so.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
from fastkd.kernels import dense as kernel
from triton.testing import do_bench

import fastkd
from bench.harness import _release, compare, device_info, fp64_reference, make_inputs, versions
from bench.measure import QUANTILES, _summary, measure_peak, sync
from bench.methods import Problem
from bench.shapes import PRESETS, Shape, cases, flop_floor
from fastkd.autograd import OUTPUTS, ROW_ALIGN, padded_rows


def bench(fn, dev: torch.device, rep_ms: float = 300) -> dict:
    if dev.type == "cuda":
        med, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=list(QUANTILES))
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    fn()  # the CPU rehearsal: three timed calls after one warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def ceilings(dev: torch.device, gemm_n: int = 8192, copy_numel: int = 2**29) -> dict:
    src = torch.randn(copy_numel, device=dev, dtype=torch.float32)  # 2 GiB by default
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src), dev)
    nbytes = 2 * src.numel() * src.element_size()
    a = torch.randn(gemm_n, gemm_n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=dev, dtype=torch.bfloat16)
    gemm = bench(lambda: torch.mm(a, b), dev)
    return {"copy": {**copy, "gbps": nbytes / copy["median_ms"] / 1e6},
            "gemm_bf16": {**gemm, "n": gemm_n,
                          "tflops": 2 * gemm_n**3 / gemm["median_ms"] / 1e9}}


def problem(head: str, n: int, dev: torch.device, scale: tuple[int, int] = (1, 1)) -> Problem:
    """The "distill" case at a preset head, bf16; scale = (D divisor, V divisor) shrinks the head
    (the CPU rehearsal)."""
    h = PRESETS[head]
    if scale != (1, 1):
        h = h.scaled(*scale)
    shape = Shape(h.name, h.title, n, h.d_s, h.d_t, h.v, h.v_t, h.softcap)
    return Problem(cases(2.0)["distill"], shape, torch.bfloat16, dev)


def step_fn(x, opts, **kw):
    def step():
        loss = fastkd.distill(x.h_s, x.w_s, x.h_t, x.w_t, x.labels, opts, **kw)
        return loss, torch.autograd.grad(loss, (x.h_s, x.w_s))
    return step


GEMM_NAMES = ("gemm", "gemv", "cutlass", "nvjet", "xmma", "sm90_", "cublas", "splitk",
              "aten::mm", "aten::addmm", "aten::bmm")


def breakdown(step, dev: torch.device, iters: int = 3) -> dict:
    """Device time per call by kernel class, from torch.profiler over `iters` calls (on CPU: the
    operators' self time; the interpreted row kernel counts as "other" there)."""
    cuda = dev.type == "cuda"
    step()
    sync(dev)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(iters):
            step()
        sync(dev)
    per_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if cuda:
            us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CPU:
                continue
        else:
            us = evt.self_cpu_time_total
        if us:
            per_kernel[evt.key] += us / 1e3 / iters
    classes: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        low = name.lower()
        cls = ("row kernel" if "dense_rows" in low
               else "gemm" if any(k in low for k in GEMM_NAMES) else "other")
        classes[cls] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"ms_per_call": dict(classes), "total_ms": sum(classes.values()),
            "top_kernels": [{"name": k[:160], "ms": v} for k, v in top]}


def target(head: str, n: int, dev: torch.device, rate: float, log,
           scale: tuple[int, int] = (1, 1)) -> dict:
    prob = problem(head, n, dev, scale)
    x = make_inputs(prob, seed=0)
    opts = prob.opts
    ref = fp64_reference(x, opts)
    _release(dev)
    step = step_fn(x, opts)
    step()
    (loss, grads), peak = measure_peak(step, dev)
    check = compare(loss, grads, ref)
    del loss, grads, ref
    t = bench(step, dev)
    floor_ms = flop_floor(prob.shape, backward=True) / (rate * 1e12) * 1e3
    out = {"shape": vars(prob.shape), "options": repr(opts), "fwd_bwd": t,
           "floor_ms": floor_ms, "x_floor": t["median_ms"] / floor_ms,
           "peak_mib": (peak or 0) / 2**20, "check": check, "breakdown": breakdown(step, dev)}
    with torch.no_grad():
        fwd = bench(lambda: fastkd.distill(x.h_s, x.w_s, x.h_t, x.w_t, x.labels, opts), dev)
    out["fwd"] = fwd
    log(f"[{head} N={n}] fwd+bwd {t['median_ms']:.2f} ms ({out['x_floor']:.2f}x floor "
        f"{floor_ms:.2f} ms), fwd {fwd['median_ms']:.2f} ms, peak {out['peak_mib']:.0f} MiB, "
        f"loss rel {check['loss_rel_diff']:.1e} dH {check['dh_rel_diff']:.1e} "
        f"dW {check['dw_rel_diff']:.1e}; breakdown {out['breakdown']['ms_per_call']}")
    return out


def chunk_sweep(dev: torch.device, n: int, chunks: list[int], log,
                scale: tuple[int, int] = (1, 1)) -> list[dict]:
    prob = problem("llama", n, dev, scale)
    x = make_inputs(prob, seed=1)
    rows = []
    for chunk in chunks:
        step = step_fn(x, prob.opts, chunk_size=chunk)
        step()
        _, peak = measure_peak(step, dev)
        t = bench(step, dev, rep_ms=200)
        rows.append({"chunk": chunk, **t, "peak_mib": (peak or 0) / 2**20})
        log(f"[chunk {chunk}] {t['median_ms']:.2f} ms, peak {rows[-1]['peak_mib']:.0f} MiB")
    return rows


def row_kernel_sweep(dev: torch.device, configs, log, n: int = 1024, vocab: int = 128256,
                     divergence: str = "forward_kl") -> list[dict]:
    """The row kernel alone on one chunk of bf16 logits (gradient written in place)."""
    g = torch.Generator(dev).manual_seed(2)
    s = padded_rows(n, vocab, torch.bfloat16, dev)
    t = padded_rows(n, vocab, torch.bfloat16, dev)
    s.copy_(torch.randn(n, vocab, generator=g, device=dev).mul_(2))
    t.copy_(torch.randn(n, vocab, generator=g, device=dev).mul_(2))
    labels = torch.randint(0, vocab, (n,), generator=g, device=dev)
    scale = torch.full((n,), 1.0 / n, device=dev)
    out = torch.empty(n, len(OUTPUTS), device=dev)  # loss, ce, kd, entropy per row
    opts = fastkd.DistillOptions(temperature=2.0, divergence=divergence)
    passes = 3 if divergence == "jsd" else 2  # reads of S and T; plus one write of G
    nbytes = n * (passes * 2 * vocab + vocab) * 2
    rows = []
    for block_v, warps in configs:
        def call(block_v=block_v, warps=warps):
            kernel.dense_rows(s, t, labels, scale, out, opts, True, block_v=block_v,
                                num_warps=warps)
        call()
        r = bench(call, dev, rep_ms=100)
        rows.append({"divergence": divergence, "n": n, "vocab": vocab, "block_v": block_v,
                     "num_warps": warps, **r, "gbps": nbytes / r["median_ms"] / 1e6})
        log(f"[row kernel {divergence} BLOCK_V={block_v} warps={warps}] {r['median_ms']:.3f} ms "
            f"{rows[-1]['gbps']:.0f} GB/s")
    return rows


def flat_in_n(dev: torch.device, ns: list[int], log, scale: tuple[int, int] = (1, 1)) -> list[dict]:
    rows = []
    for n in ns:
        prob = problem("llama", n, dev, scale)
        x = make_inputs(prob, seed=3)
        step = step_fn(x, prob.opts)
        step()
        _, peak = measure_peak(step, dev)
        t = bench(step, dev, rep_ms=200)
        rows.append({"n": n, **t, "peak_mib": (peak or 0) / 2**20})
        log(f"[flat N={n}] {t['median_ms']:.2f} ms, peak {rows[-1]['peak_mib']:.0f} MiB")
        del x, step
        _release(dev)
    return rows


def guarded(dev: torch.device, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # one shape failing must not lose the others
        _release(dev)
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


def markdown(doc: dict) -> str:
    c = doc.get("ceilings", {})
    gemm = c.get("gemm_bf16", {})
    cpu = doc["device"].get("type") == "cpu"
    title = ("CPU rehearsal (CPU numbers, not GPU)" if cpu else "GPU profile")
    lines = [f"# {title}: {doc['device']['name']}", "",
             f"Copy {c.get('copy', {}).get('gbps', math.nan):.0f} GB/s, bf16 GEMM "
             f"{gemm.get('tflops', math.nan):.0f} TFLOP/s ({gemm.get('n', '?')}^3). Times are "
             + ("medians of 3 calls." if cpu else "medians (do_bench, L2 flushed)."), "",
             "| shape | fwd+bwd ms | × floor | fwd ms | peak MiB | loss / dH / dW rel err | "
             "GEMM ms | row kernel ms | other ms |", "|---|---|---|---|---|---|---|---|---|"]
    for head, r in doc.get("targets", {}).items():
        if "error" in r:
            lines.append(f"| {head} | error: {r['error'][:80]} |||||||| ")
            continue
        b, ck = r["breakdown"]["ms_per_call"], r["check"]
        lines.append(
            f"| {head} N={r['shape']['n']} | {r['fwd_bwd']['median_ms']:.2f} "
            f"[{r['fwd_bwd']['p20_ms']:.2f}, {r['fwd_bwd']['p80_ms']:.2f}] | {r['x_floor']:.2f} | "
            f"{r['fwd']['median_ms']:.2f} | {r['peak_mib']:.0f} | {ck['loss_rel_diff']:.1e} / "
            f"{ck['dh_rel_diff']:.1e} / {ck['dw_rel_diff']:.1e} | {b.get('gemm', 0):.2f} | "
            f"{b.get('row kernel', 0):.2f} | {b.get('other', 0):.2f} |")
    if doc.get("chunks"):
        lines += ["", "| chunk | fwd+bwd ms | peak MiB |", "|---|---|---|"]
        lines += [f"| {r['chunk']} | {r['median_ms']:.2f} | {r['peak_mib']:.0f} |"
                  for r in doc["chunks"]]
    if doc.get("row_kernel"):
        lines += ["", "| row kernel | BLOCK_V | warps | ms | GB/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['divergence']} | {r['block_v']} | {r['num_warps']} | "
                  f"{r['median_ms']:.3f} | {r['gbps']:.0f} |" for r in doc["row_kernel"]]
    if doc.get("flat_in_n"):
        lines += ["", "| N | fwd+bwd ms | peak MiB |", "|---|---|---|"]
        lines += [f"| {r['n']} | {r['median_ms']:.2f} | {r['peak_mib']:.0f} |"
                  for r in doc["flat_in_n"]]
    errors = [f"{k}: {v}" for k, v in doc.items() if k.endswith("_error")]
    errors += [f"{h}: {r['error']}" for h, r in doc.get("targets", {}).items() if "error" in r]
    if errors:
        lines += ["", "Errors:", *[f"- {e[:300]}" for e in errors]]
    return "\n".join(lines) + "\n"


def _pair(text: str) -> tuple[int, int]:
    d, v = (int(t) for t in text.split(","))
    return d, v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the rehearsal")
    p.add_argument("--steps", default="ceilings,targets,chunks,row_kernel,flat_in_n")
    p.add_argument("--merge", action="store_true",
                   help="keep the steps of --out's profile.json (same device) that this call "
                        "does not run: a session can profile in several calls")
    p.add_argument("--heads", default="llama,gemma")
    p.add_argument("--n", type=int, default=8192, help="tokens of the targets and chunk sweep")
    p.add_argument("--scale", type=_pair, default=(1, 1), metavar="D_DIV,V_DIV",
                   help="shrink the heads: widths / D_DIV, vocabularies / V_DIV")
    p.add_argument("--chunks", default="512,1024,2048,4096")
    p.add_argument("--blocks", default="1024,2048,4096,8192")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--row-shape", type=_pair, default=(1024, 128256), metavar="N,V",
                   help="the row kernel sweep's chunk of logits")
    p.add_argument("--ns", default="2048,8192,32768")
    p.add_argument("--gemm-n", type=int, default=8192, help="the ceiling GEMM's size")
    p.add_argument("--copy-mib", type=int, default=2048, help="the ceiling copy's size")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (for a rehearsal on CPU: --device cpu, small sizes)")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"device": device_info(dev), "versions": versions(), "row_align": ROW_ALIGN,
           "kernel_defaults": {"block_v": kernel.DEFAULT_BLOCK_V,
                               "num_warps": kernel.DEFAULT_NUM_WARPS},
           "triton": triton.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if dev.type == "cpu":
        doc["note"] = "CPU numbers, not GPU (a rehearsal of the GPU session's script)"
    earlier = args.out / "profile.json"
    if args.merge and earlier.is_file():
        old = json.loads(earlier.read_text())
        if old.get("device", {}).get("name") != doc["device"].get("name"):
            raise SystemExit(f"--merge: {earlier} was measured on {old.get('device')}, not here")
        doc = {**old, **doc}
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    def save() -> None:
        (args.out / "profile.json").write_text(json.dumps(doc, indent=1, default=str))
        (args.out / "profile.md").write_text(markdown(doc))

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    steps = args.steps.split(",")
    rate = doc.get("ceilings", {}).get("gemm_bf16", {}).get("tflops", 790.0)
    if "ceilings" in steps:
        doc["ceilings"] = ceilings(dev, args.gemm_n, args.copy_mib * 2**20 // 4)
        rate = doc["ceilings"]["gemm_bf16"]["tflops"]
        log(f"copy {doc['ceilings']['copy']['gbps']:.0f} GB/s, GEMM {rate:.0f} TFLOP/s")
        save()
    doc["gemm_rate_tflops"] = rate
    row_n, row_v = args.row_shape
    for name, run in (
        ("targets", lambda: {h: guarded(dev, target, h, args.n, dev, rate, log, args.scale)
                             for h in args.heads.split(",")}),
        ("chunks", lambda: chunk_sweep(dev, args.n, ints(args.chunks), log, args.scale)),
        ("row_kernel", lambda: row_kernel_sweep(
            dev, [(b, w) for b in ints(args.blocks) for w in ints(args.warps)], log, row_n, row_v)
            + row_kernel_sweep(dev, [(kernel.DEFAULT_BLOCK_V, kernel.DEFAULT_NUM_WARPS)], log,
                               row_n, row_v, divergence="jsd")),
        ("flat_in_n", lambda: flat_in_n(dev, ints(args.ns), log, args.scale)),
    ):
        if name not in steps:
            continue
        try:
            doc[name] = run()
        except Exception as err:  # keep going: the other steps' figures still count
            doc[name + "_error"] = f"{type(err).__name__}: {err}"[:2000]
            log(f"{name} failed: {doc[name + '_error']}")
        _release(dev)
        save()
    text = markdown(doc)
    print(text)
    return 1 if "\nErrors:" in text else 0


if __name__ == "__main__":
    raise SystemExit(main())
