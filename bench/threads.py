"""CPU threads and the full demo's step: one optimizer step of `fastkd demo`'s distillation (its
teacher, 4 layers of 256, and student, 2 layers of 128, vocabulary 2048, 16 sequences of 128
tokens: the teacher's forward, the fused loss's forward and backward, AdamW) timed under each
thread count, the counts alternating, with the cores to itself or shared with busy processes.

    python bench/threads.py                      # writes bench/results/cpu/threads.{json,md}
    python bench/threads.py --busy 3 --cores 0,1 # the same two cores shared with 3 spinning jobs

`--cores` pins this process (and the busy ones) to those cores, so a many-core machine can stand
in for a small shared one. The step time is the median of `--steps` timed steps per setting,
after one warm-up step each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def demo_step(threads: int):
    """A closure running one distillation step of the full demo's shapes on `threads` threads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastkd.batch_loss import StudentLoss, TeacherForward, batch_loss
    from fastkd.data import Blocks
    from fastkd.demo import FULL
    from fastkd.models import lm_head
    from fastkd.options import DistillOptions

    def llama(sizes: dict, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=FULL.vocab_size, max_position_embeddings=FULL.seq_len,
                             num_key_value_heads=sizes["num_attention_heads"], **sizes)
        return LlamaForCausalLM(config)

    teacher = llama(FULL.teacher, 0).eval().requires_grad_(False)
    opts = DistillOptions(temperature=2.0, ce_weight=0.5, kd_weight=0.5, reduction="sum")
    student = StudentLoss(lm_head(llama(FULL.student, 1), "student"), opts, "auto")
    forward = TeacherForward(lm_head(teacher, "teacher"))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, FULL.vocab_size, (FULL.batch_size, FULL.seq_len), generator=gen)
    batch = Blocks(ids, torch.ones_like(ids))

    def step() -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        loss, _, _ = batch_loss(student, forward, batch, torch.device("cpu"))
        (loss / batch.count_targets()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    parser.add_argument("--threads", default="1,2", help="thread counts, alternated")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes beside it")
    parser.add_argument("--cores", default=None, help="pin everything to these cores (0,1)")
    parser.add_argument("--name", default="threads")
    args = parser.parse_args(argv)
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
    try:
        counts = [int(t) for t in args.threads.split(",")]
        steps = {n: demo_step(n) for n in counts}
        for n in counts:
            steps[n]()  # warm-up
        times: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.steps):
            for n in counts:  # alternating: the load drifts alike for every count
                times[n].append(steps[n]())
    finally:
        for spinner in spinners:
            spinner.kill()
    load = os.getloadavg()
    rows = [{"threads": n, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
            for n, t in times.items()]
    result = {"rows": rows, "busy": args.busy, "cores": args.cores or "all",
              "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
              "loadavg": load, "torch": torch.__version__, "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# The full demo's step under each thread count ({args.name})", "",
             f"{len(os.sched_getaffinity(0))} cores ({args.cores or 'all'}) of {os.cpu_count()}, "
             f"{args.busy} busy processes beside it, load average {load[0]:.1f} at the end, "
             f"torch {torch.__version__}, {result['date']}.", "",
             "| threads | step, median (s) | min | max |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['threads']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} |"
              for r in rows]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
