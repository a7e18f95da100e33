"""Measuring one call: its time (perf_counter on CPU, CUDA events with the L2 flushed on CUDA,
methods timed in alternating rounds) and its peak memory beyond what was allocated before it
(CUDA's allocator statistics; on CPU the process's peak RSS, VmHWM, reset by writing 5 to
/proc/self/clear_refs after malloc_trim: approximate, since the allocator keeps freed memory)."""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory --------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None)


def _proc_kib(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in {path}")


def _reset_cpu_peak() -> bool:
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):  # glibc: hand freed heap back so the baseline is the live set
        _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return False
    return True


def measure_peak(fn: Callable[[], object], device: torch.device) -> tuple[object, int | None]:
    """(fn(), peak bytes allocated during fn beyond what was allocated before it, or None)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    if not _reset_cpu_peak():
        return fn(), None
    base = _proc_kib("VmRSS")
    out = fn()
    return out, max(0, _proc_kib("VmHWM") - base) * 1024


# ---- timing --------------------------------------------------------------------------------------

def _summary(times_ms: Sequence[float], cpu_ms: Sequence[float] = ()) -> dict:
    """Quantiles of the wall times; on CPU also the median of the process's CPU time a call."""
    q = torch.quantile(torch.tensor(times_ms, dtype=torch.float64),
                       torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    out = {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "reps": len(times_ms)}
    if cpu_ms:
        out["cpu_median_ms"] = torch.tensor(cpu_ms, dtype=torch.float64).median().item()
    return out


class Timer:
    """Times single calls: CPU `time.perf_counter`, and the process's CPU time (all its threads:
    steadier than the wall time where other work shares the cores, though it counts the threads'
    spin-waits too); CUDA events around the call, the L2 flushed (a 256 MiB buffer zeroed)
    before it, read at `collect` (one sync for many calls)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush = (torch.empty(256 * 2**20, dtype=torch.int8, device=device)
                      if device.type == "cuda" else None)
        self.pending: list[tuple[list, object, object]] = []
        self.cpu_ms: dict[int, list[float]] = {}  # CPU time per call, by id of the wall list

    def __call__(self, fn: Callable[[], object], into: list) -> None:
        if self.flush is None:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            into.append((time.perf_counter() - t0) * 1e3)
            self.cpu_ms.setdefault(id(into), []).append((time.process_time() - c0) * 1e3)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        start.record()
        fn()
        end.record()
        self.pending.append((into, start, end))

    def collect(self) -> None:
        sync(self.device)
        for into, start, end in self.pending:
            into.append(start.elapsed_time(end))
        self.pending.clear()


def time_alternating(fns: Sequence[Callable[[], object]], estimates_ms: Sequence[float],
                     device: torch.device, min_rounds: int, rep_ms: float) -> list[dict]:
    """Quantiles of each fn's per-call times over alternating rounds: every fn warmed up for
    25 ms, then rounds calling each fn once, the order reversed every other round, for rep_ms of
    the slowest fn (by its estimate) and at least min_rounds rounds."""
    timer = Timer(device)
    for fn, estimate in zip(fns, estimates_ms, strict=True):  # (a slow fn is warm already)
        for _ in range(int(25 / max(estimate, 1e-3))):
            fn()
    rounds = max(min_rounds, min(1000, int(rep_ms / max(max(estimates_ms, default=0), 1e-3))))
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            timer(fns[k], times[k])
        timer.collect()
    return [_summary(t, timer.cpu_ms.get(id(t), ())) for t in times]


def available_bytes() -> int | None:
    """The memory the kernel says is available (MemAvailable), or None without /proc."""
    try:
        return _proc_kib("MemAvailable", "/proc/meminfo") * 1024
    except OSError:
        return None
