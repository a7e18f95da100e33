"""Peak memory of a stretch of code: CUDA's peak allocated bytes, or on the CPU the peak anonymous
resident memory of the process (RssAnon in /proc/self/status, sampled by a thread every 20 ms;
file-backed pages such as memory-mapped cache shards and libraries are not counted)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def anonymous_rss() -> int | None:
    """The process's anonymous resident bytes (Linux), or None where /proc is unavailable."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """`start()`, then `stop()` -> peak bytes (None where it cannot be measured).

    CUDA: torch.cuda.max_memory_allocated after a reset (all live tensors, this process). CPU:
    the largest RssAnon sampled while running, process-wide (it includes everything the process
    holds, and memory a previous stretch left to the allocator).
    """

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.peak: int | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            rss = anonymous_rss()
            if rss is not None:
                self.peak = max(self.peak or 0, rss)
            if self._done.wait(self.interval):
                return

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif anonymous_rss() is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            rss = anonymous_rss()
            self.peak = max(self.peak or 0, rss or 0)
        return self.peak
