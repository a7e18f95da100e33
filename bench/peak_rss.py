"""`python bench/peak_rss.py ARGS` runs `python -m fastkd ARGS`, then prints this process's peak
resident memory to stderr ("peak-rss PID BYTES"): VmHWM, the high-water mark of the address space
exec made. (A parent's ru_maxrss of a child is not that: Linux carries the high-water mark of the
address space a process replaced at exec, so a child forked from a large process reports at least
the parent's size.) Works under torchrun, one line per rank: bench/data_scale.py reads them."""

import atexit
import re
import runpy
import sys
from pathlib import Path


def report() -> None:
    status = Path("/proc/self/status").read_text()
    kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    print(f"peak-rss {Path('/proc/self').resolve().name} {kib << 10}", file=sys.stderr, flush=True)


atexit.register(report)
sys.argv = ["fastkd", *sys.argv[1:]]
runpy.run_module("fastkd", run_name="__main__", alter_sys=True)
