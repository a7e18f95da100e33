"""python -m bench --multi-teacher: several teachers in one fused pass, beside one teacher.

    python -m bench --multi-teacher --out bench/results/cpu-multi-teacher   # the committed tables

Every case runs in one process, its methods alternating call by call (the order reversed every
round), and reports medians of the per-call times and the median of the per-round ratios, so a
machine shared with other jobs moves both sides alike. Forward and backward (dH, dW) of the loss
(T = 2, 0.5 CE + 0.5 T^2 forward KL, 10% ignored tokens), the Llama head (D_s 2048, D_t 4096, V
128256; on CPU widths / 16 and vocabularies / 32, fp32, one thread unless OMP_NUM_THREADS says):

    routed-2   two teachers of different widths (D_t 3/4 and 5/4 of the preset's, the second with
               a padded vocabulary V + 64), each routed half the rows, compact (its own rows
               only: what a trainer passes), against one teacher of the mean width on every
               token. Target: time per token within 1.1x.
    routed-4   four (D_t 1/2, 3/4, 5/4, 3/2 of it): the same.
               Each twice: at the default chunk sizes (a memory budget; routing hands the CPU
               row op one teacher's segment of a chunk at a time, smaller working sets, so it
               can come in under one teacher), and both at chunk_size 64, the control.
    mixture-2  the two teachers on every token (weights 0.3, 0.7), against the floor: the same
               GEMMs alone (S = H W^T, each T_k = H_k W_k^T, dH = G W, dW = G^T H over the
               counted tokens), timed in the same rounds; and one teacher at the mean width.
    memory     peak memory of one fwd+bwd beyond its inputs (CUDA: max_memory_allocated; CPU:
               peak RSS): one teacher, routed-2, routed-4. Target: no growth with K beyond the
               teachers' own weights, which are inputs here: no growth.

Writes results.json and results.md into --out (default ./bench-results/<device>-multi-teacher/).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

import fastkd
from bench.harness import device_info, measure_peak
from bench.shapes import CPU_D_DIV, CPU_V_DIV, PRESETS

TARGET_RATIO = 1.1
# the control: one chunk size for both sides (the default sizes chunks by a memory budget, and
# routing hands the CPU row op one teacher's segment of a chunk at a time: smaller working sets)
EQUAL_CHUNK = 64
WIDTHS = {"routed-2": (0.75, 1.25), "routed-4": (0.5, 0.75, 1.25, 1.5)}
MIX_WEIGHTS = (0.3, 0.7)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device, dtype, quick: bool, seed: int) -> dict:
    head = PRESETS["llama"]
    if device.type == "cpu":
        head = head.scaled(CPU_D_DIV, CPU_V_DIV)
    rows, length = ((4 if quick else 16), 32) if device.type == "cpu" else (8, 1024)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device, dtype)

    labels = torch.randint(0, head.v, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.1] = -100
    student = dict(student_hidden=randn(rows, length, head.d_s).requires_grad_(),
                   student_weight=randn(head.v, head.d_s, s=head.d_s**-0.5).requires_grad_(),
                   labels=labels.to(device))
    single = fastkd.TeacherHead(randn(rows, length, head.d_t),
                                randn(head.v, head.d_t, s=head.d_t**-0.5))
    routed = {}
    for case, widths in WIDTHS.items():
        index = (torch.arange(rows) % len(widths)).to(device)  # a teacher per row, in turn
        teachers = []
        for k, f in enumerate(widths):
            d_t, v_t = int(head.d_t * f), head.v + (64 if k % 2 else 0)
            teachers.append(fastkd.TeacherHead(randn(int((index == k).sum()) * length, d_t),
                                               randn(v_t, d_t, s=d_t**-0.5)))
        routed[case] = (teachers, index)
    mixed = [fastkd.TeacherHead(randn(rows, length, t.hidden.shape[-1]), t.weight)
             for t in routed["routed-2"][0]]
    return dict(head=head, rows=rows, length=length, student=student, single=single,
                routed=routed, mixed=mixed)


def step(student, teachers, **kw):
    """One fwd+bwd: the loss and the student's dH, dW."""
    loss = fastkd.fused_multi_teacher_loss(**student, teachers=teachers, temperature=2.0, **kw)
    return torch.autograd.grad(loss, (student["student_hidden"], student["student_weight"]))


def gemm_floor(p: dict, teachers: list):
    """The loss's GEMMs alone over the counted tokens (a mixture's: every teacher on every
    token), in the models' dtype: what no fused loss can go below on this machine."""
    h = p["student"]["student_hidden"].detach()
    keep = (p["student"]["labels"] != -100).reshape(-1)
    h = h.reshape(-1, h.shape[-1])[keep]
    w = p["student"]["student_weight"].detach()
    hidden = [t.hidden.reshape(-1, t.hidden.shape[-1])[keep] for t in teachers]

    def run():
        s = h @ w.T
        for h_t, t in zip(hidden, teachers, strict=True):
            h_t @ t.weight[: w.shape[0]].T
        return s @ w, s.T @ h

    return run


def alternate(fns: dict, device, rounds: int, warmup: int = 2) -> dict:
    """Per-call times (ms) of each function, called in turn, the order reversed every round:
    {name: {"wall": [...], "cpu": [...]}}, cpu the process's CPU time (on a shared machine it
    leaves out the time spent waiting for a core; with one thread it is the call's compute)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            times[name]["wall"].append((time.perf_counter() - t0) * 1e3)
            times[name]["cpu"].append((time.process_time() - c0) * 1e3)
    return times


def _clock(device) -> str:
    """The clock the ratios use: the process's CPU time on CPU, wall time (synchronised) on
    CUDA, where the host's CPU time says nothing of the GPU's."""
    return "cpu" if device.type == "cpu" else "wall"


def summary(times: dict, tokens: int, clock: str) -> dict:
    out = {"reps": len(times["wall"])}
    for name, series in times.items():
        q = statistics.quantiles(series, n=5) if len(series) > 1 else [series[0]] * 4
        out[f"{name}_median_ms"] = statistics.median(series)
        out[f"{name}_p20_ms"], out[f"{name}_p80_ms"] = q[0], q[3]
    out["us_per_token"] = out[f"{clock}_median_ms"] * 1e3 / tokens
    return out


def paired(times: dict, a: str, b: str, clock: str) -> float:
    """The median over rounds of b's time / a's, on `clock`."""
    return statistics.median(y / x for x, y in zip(times[a][clock], times[b][clock],
                                                   strict=True))


def timing_cases(p: dict, device, rounds: int) -> list[dict]:
    student, tokens, clock = p["student"], p["rows"] * p["length"], _clock(device)
    out = []
    for (case, (teachers, index)), chunk in itertools.product(p["routed"].items(),
                                                              (None, EQUAL_CHUNK)):
        name = case if chunk is None else f"{case}, chunk {chunk}"
        times = alternate({"one teacher": lambda c=chunk: step(student, [p["single"]],
                                                               chunk_size=c),
                           name: lambda t=teachers, i=index, c=chunk: step(
                               student, t, teacher_index=i, chunk_size=c)},
                          device, rounds)
        ratio = paired(times, "one teacher", name, clock)
        out.append({"case": name, "widths_d_t": [t.hidden.shape[-1] for t in teachers],
                    "baseline_d_t": p["single"].hidden.shape[-1], "tokens": tokens,
                    "chunk_size": chunk, "clock": clock,
                    "methods": {k: summary(v, tokens, clock) for k, v in times.items()},
                    "ratio": ratio, "wall_ratio": paired(times, "one teacher", name, "wall"),
                    "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO})
    weights = torch.tensor(MIX_WEIGHTS, device=device)
    times = alternate({"floor (GEMMs alone)": gemm_floor(p, p["mixed"]),
                       "mixture-2": lambda: step(student, p["mixed"], teacher_weights=weights),
                       "one teacher": lambda: step(student, [p["single"]])}, device, rounds)
    out.append({"case": "mixture-2", "widths_d_t": [t.hidden.shape[-1] for t in p["mixed"]],
                "baseline_d_t": p["single"].hidden.shape[-1], "tokens": tokens, "clock": clock,
                "methods": {k: summary(v, tokens, clock) for k, v in times.items()},
                "ratio": paired(times, "floor (GEMMs alone)", "mixture-2", clock),
                "wall_ratio": paired(times, "floor (GEMMs alone)", "mixture-2", "wall"),
                "ratio_one_teacher": paired(times, "one teacher", "mixture-2", clock)})
    return out


def memory_cases(p: dict, device) -> list[dict]:
    """Peak memory of one fwd+bwd beyond the inputs (the least of 3, in turn)."""
    student = p["student"]
    fns = {"one teacher": lambda: step(student, [p["single"]])}
    for case, (teachers, index) in p["routed"].items():
        fns[case] = lambda t=teachers, i=index: step(student, t, teacher_index=i)
    peaks = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(3):
        for name, fn in fns.items():
            peaks[name].append(measure_peak(fn, device)[1])
    if any(None in v for v in peaks.values()):
        return []
    weights = {"one teacher": p["single"].weight.numel() * p["single"].weight.element_size()}
    for case, (teachers, _) in p["routed"].items():
        weights[case] = sum(t.weight.numel() * t.weight.element_size() for t in teachers)
    base = min(peaks["one teacher"])
    return [{"case": name, "peak_mib": min(v) / 2**20, "over_one_teacher_mib": (min(v) - base)
             / 2**20, "teacher_weights_mib": weights[name] / 2**20} for name, v in peaks.items()]


def render(doc: dict) -> str:
    lines = ["# Several teachers in one fused pass (`python -m bench --multi-teacher`)", "",
             f"{doc['device']['name']}, {doc['dtype']}, {doc['threads']} thread(s); load average "
             f"{doc['load_before']} before, {doc['load_after']} after; head "
             f"{doc['head']}; {doc['tokens']} tokens, fwd+bwd, medians of {doc['rounds']} "
             "alternating rounds; ratio = median of the per-round ratios."]
    if doc["cpu"]:
        lines += ["", "CPU numbers, not GPU."]
    clock = doc["cases"][0]["clock"]
    lines += ["", f"Times: the process's {'CPU' if clock == 'cpu' else 'wall'} time per call "
              "(medians; wall time beside it), ratio on that clock (wall-time ratio beside).", "",
              f"| case | teachers' D_t | method | {clock} ms | wall ms | us/token | ratio | "
              "wall ratio | target |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in doc["cases"]:
        for name, m in c["methods"].items():
            is_case = name == c["case"]
            ratio = f"{c['ratio']:.3f} | {c['wall_ratio']:.3f}" if is_case else " | "
            target = ""
            if is_case and "target" in c:
                target = f"<= {c['target']} vs one teacher: {'met' if c['met'] else 'NOT met'}"
            elif is_case:
                target = (f"vs the floor; {c['ratio_one_teacher']:.2f}x one teacher "
                          f"(D_t {c['baseline_d_t']})")
            widths = ", ".join(map(str, c["widths_d_t"])) if is_case else str(c["baseline_d_t"])
            lines.append(f"| {c['case']} | {widths if name != 'floor (GEMMs alone)' else '-'} | "
                         f"{name} | {m[f'{clock}_median_ms']:.1f} | {m['wall_median_ms']:.1f} | "
                         f"{m['us_per_token']:.1f} | {ratio} | {target} |")
    lines += ["", "What routing adds over one teacher: per chunk, one row-op call and one teacher "
              "GEMM for each teacher's segment instead of one for all (smaller calls, and one host "
              "sync to split the rows); at these scaled-down CPU widths a call takes tens of "
              "milliseconds, so that fixed cost weighs more than at real widths, and more with "
              "more teachers. The mixture on CPU runs the spec's closed form once per teacher "
              "plus once for the cross-entropy (the native CPU row ops take one teacher; the "
              "Triton kernel streams the K teachers in one pass, not measured here)."]
    if doc["memory"]:
        lines += ["", "Peak memory of one fwd+bwd beyond its inputs (least of 3):", "",
                  "| case | peak MiB | over one teacher MiB | teachers' weights MiB (inputs) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {m['case']} | {m['peak_mib']:.1f} | {m['over_one_teacher_mib']:+.1f} | "
                  f"{m['teacher_weights_mib']:.1f} |" for m in doc["memory"]]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """Run the cases with bench's parsed arguments (--device, --dtype, --quick, --seed, --out)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one thread, as the docstring says: calls of tens of ms at these widths, where a
        # thread pool's hand-offs are noise the ratio would carry
        torch.set_num_threads(1)
    info = device_info(device)
    out = args.out or Path.cwd() / "bench-results" / f"{info['slug']}-multi-teacher"
    rounds = 3 if args.quick else 15
    load_before = [round(x, 2) for x in os.getloadavg()]
    p = build(device, dtype, args.quick, args.seed)
    cases = timing_cases(p, device, rounds)
    memory = memory_cases(p, device)
    head = p["head"]
    doc = {"device": info, "cpu": device.type == "cpu", "dtype": str(dtype).removeprefix("torch."),
           "threads": torch.get_num_threads(), "rounds": rounds,
           "head": f"D_s {head.d_s}, D_t {head.d_t}, V {head.v}",
           "tokens": p["rows"] * p["length"], "load_before": load_before,
           "load_after": [round(x, 2) for x in os.getloadavg()],
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": cases, "memory": memory}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(render(doc))
    print(render(doc))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if all(c.get("met", True) for c in cases) else 1
